"""``log``: write one line to the ``authority.executor`` logger and nothing else.

Useful as a dry-run target and in tests: it has no side effects, so running it
twice is harmless (idempotent downstream).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ..policy import LogExecutor
from ._base import ExecutionResult, dumps, redact_names, redacted, to_jsonable

__all__ = ["LOGGER_NAME", "LogActionExecutor"]

LOGGER_NAME = "authority.executor"
logger = logging.getLogger(LOGGER_NAME)


class LogActionExecutor:
    kind = "log"
    idempotent_downstream = True

    def __init__(self, name: str, config: LogExecutor | None = None, *,
                 redact: Iterable[str] = ()) -> None:
        self.name = name
        self.config = config
        self.redact = redact_names(redact)

    def _line(self, action_type: str, arguments: dict[str, Any], action_key: str) -> str:
        # The line goes to the process log: the policy's redacted fields never reach it.
        shown = redacted(to_jsonable(arguments), self.redact)
        return (f"executor={self.name} action_type={action_type} action_key={action_key} "
                f"arguments={dumps(shown)}")

    def describe(self, action_type: str, arguments: dict[str, Any],
                 action_key: str) -> dict[str, Any]:
        return {"executor": self.name, "type": "log", "logger": LOGGER_NAME, "level": "INFO",
                "message": self._line(action_type, arguments, action_key)}

    def execute(self, action_type: str, arguments: dict[str, Any],
                action_key: str) -> ExecutionResult:
        logger.info("%s", self._line(action_type, arguments, action_key))
        return ExecutionResult(True, {"logged": True})

    async def aexecute(self, action_type: str, arguments: dict[str, Any],
                       action_key: str) -> ExecutionResult:
        return self.execute(action_type, arguments, action_key)
