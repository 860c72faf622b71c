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

from authority_sdk.audit import redact, tail, verify
from authority_sdk.errors import AuthorityUnavailable

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
    as ``invalid_line`` and its byte ``offset`` instead of being hidden."""

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
    details: dict[str, Any] | None = None
    invalid_line: str | None = None
    offset: int | None = None

    model_config = ConfigDict(extra="allow")


class AuditTail(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEntry] = Field(description="The last entries, oldest first.")


class AuditVerify(BaseModel):
    ok: bool
    entries: int = Field(description="Entries checked before the first bad line (all if ok).")
    first_bad_line: int | None = None
    reason: str | None = None
    last_seq: int
    last_hash: str
    head_checked: bool = Field(description="Whether the head kept in the state store was "
                                           "checked, which catches entries cut off the end.")
    warnings: list[str] = Field(default_factory=list)


def audit_tail(gw: Gateway, limit: int) -> dict[str, Any]:
    path = gw.audit.path
    try:
        entries = tail(path, limit)
    except FileNotFoundError:
        entries = []
    except OSError as exc:
        raise AuthorityUnavailable(
            f"audit log unreadable: {path}: {exc.strerror or exc}") from exc
    # Redacted when written; applied again so a log written under an older, shorter
    # redact list does not show today's secrets through the API.
    return {"object": "list", "data": redact(entries, gw.policy.redact)}


def audit_verify(gw: Gateway) -> dict[str, Any]:
    path = gw.audit.path
    # The head is read before the file: every entry it names is then already written.
    head = gw.store.get_audit_head()
    result = verify(path, head)
    warnings = list(result.warnings)
    if head is not None and result.ok and result.last_seq > head[0]:
        # On a live gateway, appends made while the file was being read land past the
        # head read before it. If the head has caught up since, that is traffic, not the
        # crash the warning is about.
        later = gw.store.get_audit_head()
        if later is not None and later[0] >= result.last_seq:
            stale = (f"{result.last_seq - head[0]} entries after the head recorded in the "
                     f"state store (seq {head[0]}); expected only after a crash")
            warnings = [w for w in warnings if w != stale]
    if head is None:
        warnings.append("head check skipped: the state store has no audit head yet")
    return {"ok": result.ok, "entries": result.entries, "first_bad_line": result.first_bad_line,
            "reason": result.reason, "last_seq": result.last_seq,
            "last_hash": result.last_hash, "head_checked": head is not None,
            "warnings": warnings}


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
