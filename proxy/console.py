"""The web console (``GET /authority/ui``) and the audit reads it shares with the API.

The page is one static file with inline CSS and JS. Loading it needs no key;
every data call it makes carries the key the user typed, so it can do nothing
the HTTP API would not let that key do. Tool-call arguments come from a model
and are untrusted: the page writes them with ``textContent`` only, and its
Content-Security-Policy allows exactly its own inline script and style (by
hash), so markup smuggled into data could not run even if it reached the DOM.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from authority_sdk.audit_view import audit_page, audit_verdict
from authority_sdk.control import UNSCOPED, Scope

if TYPE_CHECKING:
    from starlette.responses import Response

    from authority_sdk.engine import Gateway

__all__ = [
    "AuditEntry",
    "AuditTail",
    "AuditVerify",
    "audit_tail",
    "audit_verify",
    "console_html",
    "console_response",
]

_PAGE = "static/console.html"


class AuditEntry(BaseModel):
    """One line of the audit log (DESIGN.md §6). A line that is not an entry comes back
    as ``invalid_line`` and its byte ``offset`` instead of being hidden (to unscoped keys;
    a scoped key sees only its environment's entries). Strings longer than 4096
    characters are clipped (``…[+N chars]``) and lone surrogates escaped (``\\udXXX``):
    this is a view; the file is the record."""

    ts: str | None = None
    seq: int | None = None
    event: str | None = None
    request_id: str | None = None
    environment: str | None = None
    model: str | None = None
    action_type: str | None = None
    decision: str | None = None
    reason: str | None = None
    cost_estimate_usd: float | None = None
    cost_actual_usd: float | None = None
    approval_status: str | None = None
    execution_result: Any = None
    actor: str | None = None
    policy_hash: str | None = None
    prev_hash: str | None = None
    hash: str | None = None
    mac: str | None = Field(None, description="HMAC of hash under the audit key, when one is "
                            "configured")
    details: dict[str, Any] | None = None
    invalid_line: str | None = None
    offset: int | None = None

    model_config = ConfigDict(extra="allow")


class AuditTail(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEntry] = Field(description="The last entries, oldest first.")
    next_cursor: str | None = Field(None, description="Pass as cursor for the entries "
                                    "before these; null at the start of the log.")


class AuditVerify(BaseModel):
    ok: bool
    entries: int = Field(description="Entries checked before the first bad line (all if ok).")
    first_bad_line: int | None = None
    reason: str | None = None
    last_seq: int
    last_hash: str
    head_checked: bool = Field(description="Whether the head kept in the state store was "
                                           "checked, which catches entries cut off the end.")
    kind: Literal["tampered", "lost", "unreadable"] | None = Field(
        None, description="When not ok: tampered (broken chain, bad MAC, disagrees with the "
        "head or checkpoint), lost (a recorded loss no one has acknowledged: `authority audit "
        "acknowledge`), unreadable.")
    checkpoint_checked: bool = Field(False, description="Whether a signed checkpoint kept "
                                     "outside the state folder was checked.")
    warnings: list[str] = Field(default_factory=list)


def audit_tail(gw: Gateway, limit: int, *, cursor: str | None = None,
               scope: Scope = UNSCOPED) -> dict[str, Any]:
    """One page of the log's tail as ``scope`` may read it (audit_view.py)."""
    return audit_page(gw, limit=limit, cursor=cursor, scope=scope)


def audit_verify(gw: Gateway, *, scope: Scope = UNSCOPED) -> dict[str, Any]:
    """The chain's verdict; a scoped key gets it without the warnings' text."""
    return audit_verdict(gw, scope=scope)


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


@lru_cache(maxsize=1)
def console_html() -> tuple[bytes, str]:
    """The page's bytes and the Content-Security-Policy that lets exactly it run."""
    text = (resources.files("proxy") / _PAGE).read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", text, flags=re.DOTALL)
    styles = re.findall(r"<style>(.*?)</style>", text, flags=re.DOTALL)
    csp = "; ".join([
        "default-src 'none'",
        "script-src " + " ".join(_csp_hash(s) for s in scripts),
        "style-src " + " ".join(_csp_hash(s) for s in styles),
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
    return text.encode("utf-8"), csp


def console_response() -> Response:
    from starlette.responses import Response

    body, csp = console_html()
    return Response(body, media_type="text/html", headers={
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    })
