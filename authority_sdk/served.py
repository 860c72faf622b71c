"""Records of the responses the gateway served: the Responses API's server-side history.

With ``previous_response_id`` the provider bills the earlier turns again, and an
app that only saw the calls the gateway let through would leave the withheld
ones unanswered (a 400 upstream). So every response served is recorded — who it
was served to (key and environment), the tokens of its whole context, the
outputs of its withheld calls and the answer as the app got it — and read back
when a request continues it: the history is priced, the missing outputs are
added, and ``GET /v1/responses/{id}`` answers from the record, withheld items
still withheld. A response served to another key or environment, or never
served here, is unknown: state never crosses environments.

Records live in the state store under the idempotency primitives (a keyed record
with a TTL, ``defaults.served_response_ttl_s``), so replicas share them with the
store.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .effects import Decision, S
from .errors import InvalidRequest, NotFound
from .wire import GatewayResponse, error_response

__all__ = ["MAX_ID_CHARS", "lookup_d", "record_d", "stored_path", "stored_response_d"]

MAX_ID_CHARS = 256
_PREFIX = "served:"
_STORED_PATH = re.compile(r"/responses/([A-Za-z0-9_.-]{1,256})(/input_items)?/?$")


def stored_path(path: str) -> tuple[str, str] | None:
    """``GET /v1/responses/{id}`` or its ``input_items``: (the id, "response" or
    "input_items"); None for any other path (``cancel``, ``compact``…)."""
    m = _STORED_PATH.search(path)
    if m is None:
        return None
    return m.group(1), "input_items" if m.group(2) else "response"


def _key(response_id: str) -> str:
    return _PREFIX + response_id


def record_d(body: dict[str, Any], *, caller: str, environment: str, request_id: str,
             context_tokens: int, outputs: list[dict[str, Any]], withheld_ids: list[str],
             input_items: list[Any], pending_approvals: list[dict[str, Any]],
             ttl_s: float) -> Decision[None]:
    rid = body.get("id")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_CHARS:
        return  # nothing a later request could name
    yield S.idem_put(_key(rid), {
        "kind": "served_response", "caller": caller, "environment": environment,
        "request_id": request_id, "context_tokens": context_tokens, "outputs": outputs,
        "withheld_ids": withheld_ids, "input": input_items,
        "pending_approvals": pending_approvals, "body": body}, ttl_s=ttl_s)


def _find_d(response_id: str, caller: str, environment: str) -> Decision[dict[str, Any] | None]:
    if len(response_id) > MAX_ID_CHARS:
        return None
    record = yield S.idem_get(_key(response_id))
    if not isinstance(record, dict) or record.get("kind") != "served_response" \
            or record.get("caller") != caller or record.get("environment") != environment:
        return None
    return record


def lookup_d(response_id: str, *, caller: str, environment: str) -> Decision[dict[str, Any]]:
    """The record of a response this caller was served, or ``previous_response_unknown``."""
    record = yield from _find_d(response_id, caller, environment)
    if record is None:
        raise InvalidRequest(
            f"previous_response_id {response_id[:80]!r} is not a response this gateway served "
            "to this key and environment (or its record expired); send the whole "
            "conversation in 'input' instead", code="previous_response_unknown",
            decided_by="served_responses")
    return record


def stored_response_d(response_id: str, what: str, *, caller: str,
                      environment: str) -> Decision[GatewayResponse]:
    """``GET /v1/responses/{id}`` (the answer as the app got it) or its ``input_items``
    (the input as the gateway sent it, newest first), to the key that got it."""
    record = yield from _find_d(response_id, caller, environment)
    if record is None:
        return error_response(NotFound(
            f"no response {response_id[:80]!r} was served by this gateway to this key and "
            "environment", code="response_not_found"))
    body: Any = record["body"]
    if what == "input_items":
        items = [{**i, "id": i.get("id") or f"item_{n}"} if isinstance(i, dict) else i
                 for n, i in enumerate(record.get("input") or [])][::-1]
        ids = [i.get("id") for i in items if isinstance(i, dict)]
        body = {"object": "list", "data": items, "first_id": ids[0] if ids else None,
                "last_id": ids[-1] if ids else None, "has_more": False}
    return GatewayResponse(200, {"content-type": "application/json"},
                           json.dumps(body).encode(), decision="allow")
