"""Refusals the proxy itself makes, put on the record (DESIGN.md §6).

The engine audits every chat request it sees, and the control plane every
approval, resolution and kill-switch refusal. What is left is what the proxy
refuses before either sees it: a wrong role, a body too large, a malformed
body or query, an unknown route or method. An authenticated caller's refusal
is one ``request`` entry (decision ``error`` for malformed input, ``deny``
otherwise), with every client-supplied value clipped. An unauthenticated one
is never written: junk must not cost the gateway an fsync.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from authority_sdk.errors import AuthorityError
from authority_sdk.render import clip, escape_surrogates

from .decide import loggable_path

if TYPE_CHECKING:
    from authority_sdk.engine import Gateway

    from .auth import Identity

__all__ = ["AUDITED_STATUSES", "audit_refusal", "decision_for"]

# Malformed input and refused roles/scopes, and the gateway's own failures (500: a bug met
# before the engine could record the request). A 404 for a missing approval or a 409 for
# one already decided is an answer about data, not a refusal of the caller.
AUDITED_STATUSES = frozenset({400, 403, 405, 413, 422, 500})
_MAX_REASON = 1000
_MAX_PATH = 256


def decision_for(status: int) -> str:
    # As the engine does for chat requests: malformed input is an error, a refusal a deny.
    return "error" if status == 400 or status >= 500 else "deny"


async def audit_refusal(gw: Gateway, ident: Identity, exc: AuthorityError, method: str,
                        path: str) -> AuthorityError | None:
    """Write ``exc`` to the audit log for ``ident``; returns the error to answer instead
    when the log cannot be written (fail closed: the refusal then says so)."""
    if exc.audited:
        return None
    request_id = "req_" + secrets.token_hex(12)
    # Chat routes run in the caller's environment; management acts in the key's scope.
    environment = ident.caller.environment if path.startswith("/v1/") else \
        ident.key.environment
    try:
        await run_in_threadpool(
            gw.audit_event, "request", request_id=request_id, environment=environment,
            decision=decision_for(exc.status_code), reason=clip(exc.message, _MAX_REASON),
            actor=ident.name,
            details={"code": exc.code, "status_code": exc.status_code,
                     "method": clip(method, 16),
                     "path": escape_surrogates(clip(loggable_path(path), _MAX_PATH))})
    except AuthorityError as audit_exc:
        return audit_exc
    exc.audited = True
    exc.details["request_id"] = request_id
    return None
