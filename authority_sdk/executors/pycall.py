"""``python``: call a function of the application, named ``"package.module:function"``.

The target is called as::

    def function(arguments: dict, *, action_key: str, action_type: str) -> Any

(``async def`` works too). ``arguments`` is a copy, so the function cannot
alter what the gateway audits. Set ``idempotent: true`` in the executor's
config only if the function dedupes on ``action_key`` itself; the engine may
then call it again after a crash. The return value is kept as JSON (or as
``str()`` of it when it is not JSON-able); an exception is reported as
``"ExceptionType: message"``.

The module is imported on the first call, not when the policy loads, so a
simulation never runs the application's import-time code.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import inspect
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from ..audit import REDACTED
from ..policy import PythonExecutor
from ._base import (
    ExecutionResult,
    exc_text,
    redact_names,
    redacted,
    redacted_values,
    scrub,
    to_jsonable,
)

__all__ = ["PythonActionExecutor"]


class _TargetError(Exception):
    pass


def _resolve(target: str) -> Callable[..., Any]:
    module_name, _, attr_path = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise _TargetError(f"python target {target!r}: module {module_name!r} not found") \
                from exc
        raise _TargetError(f"python target {target!r}: importing {module_name!r} failed: "
                           f"{exc_text(exc)}") from exc
    except Exception as exc:
        raise _TargetError(f"python target {target!r}: importing {module_name!r} failed: "
                           f"{exc_text(exc)}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise _TargetError(f"python target {target!r}: {module_name!r} has no attribute "
                               f"{attr_path!r}") from exc
    if not callable(obj):
        raise _TargetError(f"python target {target!r} is not callable")
    fn: Callable[..., Any] = obj
    return fn


def _run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion from sync code, even when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=runner, name="authority-python-executor", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


async def _await(awaitable: Any) -> Any:
    return await awaitable


class PythonActionExecutor:
    kind = "python"

    def __init__(self, name: str, config: PythonExecutor, *,
                 redact: Iterable[str] = ()) -> None:
        self.name = name
        self.config = config
        self.redact = redact_names(redact)
        self.idempotent_downstream = config.idempotent
        self._fn: Callable[..., Any] | None = None
        self._lock = threading.Lock()

    def _function(self) -> Callable[..., Any]:
        with self._lock:
            if self._fn is None:
                self._fn = _resolve(self.config.target)
            return self._fn

    def describe(self, action_type: str, arguments: dict[str, Any],
                 action_key: str) -> dict[str, Any]:
        function = self.config.target.partition(":")[2]
        return redacted({
            "executor": self.name,
            "type": "python",
            "target": self.config.target,
            "call": f"{function}(arguments, action_key=..., action_type=...)",
            "args": [arguments],
            "kwargs": {"action_key": action_key, "action_type": action_type},
        }, self.redact)

    def _prepare(self, arguments: dict[str, Any]) -> tuple[Callable[..., Any], dict[str, Any]]:
        return self._function(), copy.deepcopy(arguments)

    def _hide(self, result: ExecutionResult, arguments: dict[str, Any]) -> ExecutionResult:
        # An exception text or a return value may quote a redacted argument back.
        return scrub(result, dict.fromkeys(redacted_values(arguments, self.redact), REDACTED))

    def execute(self, action_type: str, arguments: dict[str, Any],
                action_key: str) -> ExecutionResult:
        return self._hide(self._execute(action_type, arguments, action_key), arguments)

    async def aexecute(self, action_type: str, arguments: dict[str, Any],
                       action_key: str) -> ExecutionResult:
        return self._hide(await self._aexecute(action_type, arguments, action_key), arguments)

    def _execute(self, action_type: str, arguments: dict[str, Any],
                 action_key: str) -> ExecutionResult:
        try:
            fn, args = self._prepare(arguments)
        except _TargetError as exc:
            return ExecutionResult(False, None, str(exc))
        try:
            value = fn(args, action_key=action_key, action_type=action_type)
            if inspect.isawaitable(value):
                value = _run_coroutine(_await(value))
        except (Exception, SystemExit) as exc:
            return ExecutionResult(False, None, exc_text(exc))
        return ExecutionResult(True, to_jsonable(value))

    async def _aexecute(self, action_type: str, arguments: dict[str, Any],
                        action_key: str) -> ExecutionResult:
        try:
            fn, args = self._prepare(arguments)
        except _TargetError as exc:
            return ExecutionResult(False, None, str(exc))
        try:
            if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
                value = await fn(args, action_key=action_key, action_type=action_type)
            else:
                # A sync target may block: keep it off the event loop.
                value = await asyncio.to_thread(fn, args, action_key=action_key,
                                                action_type=action_type)
                if inspect.isawaitable(value):
                    value = await value
        except (Exception, SystemExit) as exc:
            return ExecutionResult(False, None, exc_text(exc))
        return ExecutionResult(True, to_jsonable(value))
