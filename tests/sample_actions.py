"""Targets for the ``python`` executor tests (``sample_actions:<function>``).

Each one writes a line to the file named by ``arguments["journal"]`` (when
given), so a test can see that, and how often, the function really ran.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any


def _journal(arguments: dict[str, Any], entry: dict[str, Any]) -> None:
    path = arguments.get("journal")
    if path:
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def write_note(arguments: dict[str, Any], *, action_key: str, action_type: str) -> dict[str, Any]:
    _journal(arguments, {"fn": "write_note", "key": action_key, "type": action_type})
    arguments["mutated"] = True  # must not leak back into the caller's dict
    return {"note": arguments["text"].upper(), "key": action_key, "type": action_type,
            "thread": threading.current_thread().name}


async def awrite_note(arguments: dict[str, Any], *, action_key: str,
                      action_type: str) -> dict[str, Any]:
    await asyncio.sleep(0)
    _journal(arguments, {"fn": "awrite_note", "key": action_key, "type": action_type})
    return {"note": arguments["text"][::-1], "key": action_key,
            "loop_thread": threading.current_thread().name}


def refuse(arguments: dict[str, Any], *, action_key: str, action_type: str) -> None:
    raise PermissionError(f"refund over limit: {arguments.get('amount')}")


async def arefuse(arguments: dict[str, Any], *, action_key: str, action_type: str) -> None:
    await asyncio.sleep(0)
    raise ValueError("async target failed")


class _Opaque:
    def __str__(self) -> str:
        return "<opaque 42>"


def opaque(arguments: dict[str, Any], *, action_key: str, action_type: str) -> Any:
    return _Opaque()


def as_tuple(arguments: dict[str, Any], *, action_key: str, action_type: str) -> Any:
    return (1, "two", None)


NOT_CALLABLE = 42


# -- effects a test can count, whatever arguments a hostile model sends -------------------

EFFECTS_ENV = "AUTHORITY_TEST_EFFECTS"


def record(arguments: dict[str, Any], *, action_key: str, action_type: str) -> dict[str, Any]:
    """One line per real run in the file named by $AUTHORITY_TEST_EFFECTS (the model cannot
    choose where it writes)."""
    import os

    with Path(os.environ[EFFECTS_ENV]).open("a", encoding="utf-8") as f:
        f.write(json.dumps({"key": action_key, "type": action_type}) + "\n")
    return {"recorded": action_key}


BREAK_AUDIT_ENV = "AUTHORITY_TEST_BREAK_AUDIT"


def record_then_break_audit(arguments: dict[str, Any], *, action_key: str,
                            action_type: str) -> dict[str, Any]:
    """Take effect, then make the audit log unwritable the real way: the log is moved aside
    and a directory stands at its path, so the next append cannot open it."""
    result = record(arguments, action_key=action_key, action_type=action_type)
    _break_audit()
    return result


def _break_audit() -> None:
    import os

    log = Path(os.environ[BREAK_AUDIT_ENV])
    if log.is_file():
        log.rename(log.with_name(log.name + ".aside"))
        log.mkdir()


GO_ENV = "AUTHORITY_TEST_GO"


def record_then_wait(arguments: dict[str, Any], *, action_key: str,
                     action_type: str) -> dict[str, Any]:
    """``record``, then wait (at most 30 s) for the file named by $AUTHORITY_TEST_GO to
    exist: a test holds the request in flight here (to reload the policy under it)."""
    import os
    import time

    out = record(arguments, action_key=action_key, action_type=action_type)
    go, deadline = Path(os.environ[GO_ENV]), time.monotonic() + 30
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return out


def record_wait_then_break_audit(arguments: dict[str, Any], *, action_key: str,
                                 action_type: str) -> dict[str, Any]:
    """``record_then_wait``, then ``record_then_break_audit``'s break of the log."""
    out = record_then_wait(arguments, action_key=action_key, action_type=action_type)
    _break_audit()
    return out


def record_then_hang(arguments: dict[str, Any], *, action_key: str,
                     action_type: str) -> dict[str, Any]:
    """``record``, then hang: a kill -9 lands after the effect and before its outcome."""
    import time

    out = record(arguments, action_key=action_key, action_type=action_type)
    time.sleep(120)
    return out
