"""Named points where a test can have the process killed (``kill -9``) mid-operation.

Rotation, compression and pruning each take several steps (rename, sync, create,
delete); the crash tests set ``AUTHORITY_AUDIT_CRASH_AT`` to one step's name and check
that what a real SIGKILL leaves there verifies or is recovered. Unset, this is one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_ENV", "crash_point"]

CRASH_ENV = "AUTHORITY_AUDIT_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
