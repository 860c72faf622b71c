"""A ``python`` executor target: a function of your application that the gateway calls.

In the policy (examples/policy.yaml)::

    executors:
      notes: {type: python, target: "python_executor:add_note", idempotent: true}
    actions:
      add_note: {executor: notes, mode: auto_execute}

The gateway calls ``add_note(arguments, action_key=..., action_type=...)`` only
once the action has passed policy. The function dedupes on ``action_key``, so
the executor may be marked ``idempotent: true``: after a crash the gateway can
call it again without writing the note twice. The module must be importable by
the gateway (``authority demo`` puts examples/ on its PYTHONPATH).

Run it (the AuthorityClient runs the gateway in this process)::

    python examples/python_executor.py --policy .authority/demo-<stamp>/policy.yaml
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

NOTES_FILE_ENV = "AUTHORITY_NOTES_FILE"


def notes_file() -> Path:
    return Path(os.environ.get(NOTES_FILE_ENV) or ".authority/notes.jsonl")


def add_note(arguments: dict[str, Any], *, action_key: str, action_type: str) -> dict[str, Any]:
    """Append a note to a ticket, at most once per action key."""
    path = notes_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as f:
        # One writer at a time, across processes: the check and the append must not interleave.
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        notes = [json.loads(line) for line in f if line.strip()]
        for note in notes:
            if note["action_key"] == action_key:
                return {**note["result"], "already_written": True}
        result = {"note_id": f"note_{len(notes) + 1}", "ticket_id": arguments.get("ticket_id")}
        f.write(json.dumps({"action_key": action_key, "action_type": action_type,
                            "arguments": arguments, "result": result, "ts": time.time()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
        return result


def main(argv: list[str] | None = None) -> int:
    from authority_sdk.client import AuthorityClient
    from authority_sdk.types import authority_of

    ap = argparse.ArgumentParser(description="Have the model add a note through the gateway.")
    ap.add_argument("--policy", default=str(Path(__file__).with_name("policy.yaml")))
    ap.add_argument("--environment", default="prod")
    ap.add_argument("--ticket", default="T-1")
    a = ap.parse_args(argv)

    client = AuthorityClient(policy=a.policy, environment=a.environment, caller="notes-example")
    args = json.dumps({"ticket_id": a.ticket, "text": "Customer called back; issue resolved."})
    resp = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"Note on {a.ticket} that the customer called "
                   f"back.\nCALL add_note {args}"}],
    )
    for action in authority_of(resp).actions:
        print(f"{action.action_type}: {action.status} -> {json.dumps(action.result)}")
    print(f"notes file: {notes_file()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
