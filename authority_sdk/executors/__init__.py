"""Built-in action executors: the code that touches the real world (DESIGN.md §5).

The engine decides *whether* an action runs and keeps the execution journal;
an executor only runs it, once per call, and reports what happened:

- ``webhook`` — POST ``{"action_type", "arguments", "action_key"}`` as JSON,
  with ``Idempotency-Key: <action key>`` (idempotent downstream);
- ``smtp`` — a real email with ``to``/``cc``/``subject``/``body`` (not idempotent);
- ``python`` — ``fn(arguments, *, action_key, action_type)``, sync or async
  (idempotent only if its config says so);
- ``log`` — one line on the ``authority.executor`` logger (no side effects).

``execute``/``aexecute`` never raise for a downstream failure: they return
``ExecutionResult(ok=False, error=...)``, whose error says when nothing reached
the downstream system. ``describe`` shows what ``execute``
would send, for ``simulation_only``, without sending anything.

Importing this package is cheap: httpx and smtplib are imported by the
executor modules, which load the first time an executor of that type is built.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ._base import ExecutionResult, Executor

if TYPE_CHECKING:
    from ..policy import ExecutorConfig, Policy
    from .log import LogActionExecutor
    from .pycall import PythonActionExecutor
    from .smtp import SmtpActionExecutor
    from .webhook import WebhookActionExecutor

__all__ = [
    "ExecutionResult",
    "Executor",
    "ExecutorRegistry",
    "LogActionExecutor",
    "PythonActionExecutor",
    "SmtpActionExecutor",
    "WebhookActionExecutor",
    "build_executor",
]

_CLASSES = {
    "webhook": ("webhook", "WebhookActionExecutor"),
    "smtp": ("smtp", "SmtpActionExecutor"),
    "python": ("pycall", "PythonActionExecutor"),
    "log": ("log", "LogActionExecutor"),
}


def _class(kind: str) -> Any:
    import importlib

    try:
        module, cls = _CLASSES[kind]
    except KeyError:
        raise ValueError(f"unknown executor type {kind!r} "
                         f"(one of {', '.join(_CLASSES)})") from None
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def __getattr__(name: str) -> Any:
    for kind, (_, cls) in _CLASSES.items():
        if name == cls:
            return _class(kind)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_executor(name: str, config: ExecutorConfig, *,
                   redact: Iterable[str] = ()) -> Executor:
    """The executor for one ``executors:`` entry of the policy.

    ``redact``: the policy's redacted field names; an executor masks them wherever it
    shows arguments (``describe``, the ``log`` executor's line), never in what it sends.
    """
    executor: Executor = _class(config.type)(name, config, redact=redact)
    return executor


class ExecutorRegistry:
    """The policy's executors by name, each built on first use and then reused.

    Reuse matters: a webhook executor keeps its HTTP connection pool. Safe to
    share between threads.
    """

    def __init__(self, configs: Mapping[str, ExecutorConfig], *,
                 redact: Iterable[str] = ()) -> None:
        self._configs = dict(configs)
        self._redact = tuple(redact)
        self._built: dict[str, Executor] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_policy(cls, policy: Policy) -> ExecutorRegistry:
        """The registry the gateway uses: the policy's executors and its ``redact`` list."""
        return cls(policy.executors, redact=policy.redact)

    def get(self, name: str) -> Executor:
        with self._lock:
            executor = self._built.get(name)
            if executor is None:
                try:
                    config = self._configs[name]
                except KeyError:
                    raise KeyError(f"unknown executor {name!r} (configured: "
                                   f"{', '.join(sorted(self._configs)) or 'none'})") from None
                executor = self._built[name] = build_executor(name, config,
                                                              redact=self._redact)
            return executor

    def __contains__(self, name: object) -> bool:
        return name in self._configs

    def __iter__(self) -> Iterator[str]:
        return iter(self._configs)

    def __len__(self) -> int:
        return len(self._configs)

    def close(self) -> None:
        """Release connection pools of the executors built so far."""
        with self._lock:
            built = list(self._built.values())
        for executor in built:
            close = getattr(executor, "close", None)
            if close is not None:
                close()

    async def aclose(self) -> None:
        with self._lock:
            built = list(self._built.values())
        for executor in built:
            aclose = getattr(executor, "aclose", None)
            if aclose is not None:
                await aclose()
            else:
                close = getattr(executor, "close", None)
                if close is not None:
                    close()
