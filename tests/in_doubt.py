"""Executions left ``in_doubt`` the real way: a process SIGKILLed in the middle of a
non-idempotent execution, then recovered by another (DESIGN.md §5).

Built on the crash helpers of ``test_execution``: its ``hang_once`` target records
each run in ``arguments["runs"]`` and hangs on the first one until it is killed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from test_execution import (
    _approve_in_process,
    _kill,
    _request_in_process,
    _spawn,
    _wait,
    ask,
    lines,
    script_for,
)

from authority_sdk import control
from authority_sdk.client import AuthorityClient
from authority_sdk.engine import Gateway

# Merged into a policy: write_note runs at once, note_later after an approval; both on a
# python executor that cannot deduplicate.
POLICY: dict[str, Any] = {
    "upstream": {"timeout_s": 1},
    "actions": {
        "write_note": {"executor": "notes", "mode": "auto_execute"},
        "note_later": {"executor": "notes", "mode": "require_human_approval"},
    },
    "executors": {"notes": {"type": "python", "target": "test_execution:hang_once"}},
}


@dataclass
class Crashed:
    """What a crash left behind: the action key in doubt and the file of its real runs."""

    action_key: str
    runs: Path
    script: str
    idem_key: str | None = None
    approval_id: str | None = None

    def run_count(self) -> int:
        return len(lines(self.runs))


def note_args(workdir: Path, name: str, **extra: Any) -> dict[str, Any]:
    return {"text": name, "runs": str(workdir / f"{name}.runs"),
            "ready": str(workdir / f"{name}.ready"), **extra}


def crash(policy: Path, workdir: Path, procs: list[BaseProcess], *, auto: bool = True,
          approval: bool = False, caller: str = "sdk",
          extra: dict[str, Any] | None = None) -> dict[str, Crashed]:
    """Kill mid-execution an auto-executed ``write_note`` and/or an approved ``note_later``
    (in parallel, one child each), then recover: both end ``in_doubt``. ``extra`` goes
    into the auto-executed action's arguments."""
    started: dict[str, tuple[BaseProcess, dict[str, Any], str, str | None, str | None]] = {}
    if auto:
        args = note_args(workdir, "auto", password="hunter2", **(extra or {}))
        script = script_for("write_note", args)
        proc = _spawn(_request_in_process, str(policy), script, "idem-auto")
        started["auto"] = (proc, args, script, "idem-auto", None)
    if approval:
        args = note_args(workdir, "approved")
        script = script_for("note_later", args)
        client = AuthorityClient(policy=str(policy), caller=caller, max_retries=0)
        try:
            [held] = ask(client, script).authority["actions"]
        finally:
            client.gateway.close()
        proc = _spawn(_approve_in_process, str(policy), held["approval_id"])
        started["approval"] = (proc, args, script, None, held["approval_id"])
    for proc, args, *_ in started.values():
        procs.append(proc)
        ready = Path(args["ready"])
        _wait(ready.exists, proc, "the execution started")
    for proc, *_ in started.values():
        _kill(proc)

    gw = Gateway(policy)
    try:
        settled = {s["action_key"]: s for s in control.recover(gw)}
        # A proxy running on the same policy may have recovered an entry first (its worker
        # notices a dead pid at once): then the journal says so, not this recovery's report.
        keys = {name: lines(Path(v[1]["runs"])) for name, v in started.items()}
        for found in keys.values():
            if len(found) == 1 and found[0] not in settled:
                settled[found[0]] = gw.store.journal_get(found[0]) or {}
    finally:
        gw.close()
    out: dict[str, Crashed] = {}
    for name, (_, args, script, idem_key, approval_id) in started.items():
        [key] = keys[name]  # the one real run, under its action key
        assert settled[key].get("status") == "in_doubt", settled
        out[name] = Crashed(key, Path(args["runs"]), script, idem_key, approval_id)
    return out


def audit_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
