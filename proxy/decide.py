"""One-time decision links (issue 16): ``GET|POST /authority/decide/{token}``.

The link is the credential (``authority_sdk.links``): no API key is sent. A GET only
shows the confirmation page — link scanners and chat unfurlers prefetch links — and
never decides. Only a POST from that page decides, and only with the confirmation code
typed in (a form a script could submit blindly is not enough), through the same
control-plane functions as the API (``control.approve`` / ``control.reject``: the
policy re-check, no self-approval, the approver key's environment scope, the kill
switch), recorded as the approver key the link was made for.

The page has no script at all; its one stylesheet is allowed by hash; nothing a model
wrote reaches it unescaped (the arguments are JSON with every non-ASCII character as a
``\\uXXXX`` escape, so bidi overrides and zero-width characters are visible, and
HTML-escaped on top). ``Referrer-Policy: no-referrer`` keeps the token out of any
request the page could cause.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from authority_sdk import approvals as approval_rules
from authority_sdk import control, links
from authority_sdk.audit import redact
from authority_sdk.control import Scope
from authority_sdk.errors import AuthorityError

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from authority_sdk.engine import Gateway

__all__ = ["DECIDE_PATH", "decide_get", "decide_post", "loggable_path"]

DECIDE_PATH = "/authority/decide/{token}"
_DECIDE_PREFIX = DECIDE_PATH.split("{", 1)[0]
_MAX_REASON = 1000
# Characters that change how text reads without being seen.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")

_STYLE = ("body{font:15px system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem}"
          "pre{background:#f4f4f4;padding:.8rem;white-space:pre-wrap;overflow-wrap:anywhere}"
          ".warn{color:#a00;font-weight:bold}dt{font-weight:bold}"
          "button{font-size:1rem;margin-right:1rem}input{font-size:1rem}")


def loggable_path(path: str) -> str:
    """``path`` as a log line or a record may show it. A decision link's token is the
    credential that decides (its confirmation code is derived from it): the access log, an
    error line or an audit entry that wrote it would let whoever reads them approve. Its
    place shows ``~`` and the link's id instead, the one the audit entries name it by."""
    # Anywhere in the path, not only at its start: behind a prefix (a mount, a root path,
    # a doubled slash) the token is the same credential.
    at = path.find(_DECIDE_PREFIX)
    if at < 0 or len(path) == at + len(_DECIDE_PREFIX):
        return path
    start = at + len(_DECIDE_PREFIX)
    return path[:start] + "~" + links.link_id(path[start:])


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
    return "; ".join(["default-src 'none'", f"style-src 'sha256-{digest}'", "img-src 'none'",
                      "base-uri 'none'", "form-action 'self'", "frame-ancestors 'none'"])


def _page(title: str, body: str, status: int = 200) -> Response:
    from starlette.responses import Response

    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width">'
           f'<meta name="referrer" content="no-referrer">'
           f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
           f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")
    return Response(doc.encode(), status_code=status, media_type="text/html", headers={
        "Content-Security-Policy": _csp(), "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY"})


def _invalid(status: int = 404) -> Response:
    return _page("Link not valid", "<p>This decision link is unknown, already used or "
                 "expired. Nothing was decided. Ask for the approval to be sent again, or "
                 "decide it in the console.</p>", status)


def _shown(value: Any) -> str:
    return html.escape(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=True))


def _describe(gw: Gateway, a: dict[str, Any]) -> str:
    args = redact(a.get("arguments"), gw.policy.redact)
    raw = json.dumps(args, ensure_ascii=False)
    warn = ('<p class="warn" id="hidden-chars">The arguments contain invisible or '
            "direction-changing characters; they are shown as \\u escapes.</p>"
            if _INVISIBLE.search(raw) else "")
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in [
        ("Action", a.get("action_type")), ("Environment", a.get("environment")),
        ("Requested by", a.get("requested_by")), ("Why it is held", a.get("reason")),
        ("Approval", a.get("id")), ("Status", a.get("status")),
        ("Action hash", a.get("action_hash"))])
    preview = control.approval_preview(gw, a)
    runs = (f"<h2>What approving runs</h2><pre id=\"would-execute\">{_shown(preview)}</pre>"
            if preview is not None else "<p>Approving lets the application run it "
            "(client dispatch).</p>")
    return (f"<dl>{rows}</dl><h2>Arguments</h2>{warn}<pre id=\"arguments\">{_shown(args)}</pre>"
            f"{runs}")


def _form(token: str, approver: str, problem: str | None = None) -> str:
    code = links.confirmation_code(token)
    err = f'<p class="warn" id="problem">{html.escape(problem)}</p>' if problem else ""
    return (f"<h2>Decide as {html.escape(approver)}</h2>{err}"
            f'<form method="post" autocomplete="off">'
            f'<p><label>Type <b id="code">{code}</b> to confirm: '
            f'<input name="confirm" id="confirm" required maxlength="12"></label></p>'
            f'<p><label>Reason (optional): <input name="reason" id="reason" '
            f'maxlength="{_MAX_REASON}"></label></p>'
            f'<button name="decision" value="approve" id="approve">Approve</button>'
            f'<button name="decision" value="reject" id="reject">Reject</button></form>')


def _load(gw: Gateway, rec: dict[str, Any]) -> dict[str, Any] | None:
    a = approval_rules.get(gw.store, str(rec.get("approval_id")), gw.policy)
    # Bound to what was shown when the link was made: a changed action is another action.
    if a is None or a.get("action_hash") != rec.get("action_hash"):
        return None
    return a


def decide_get(gw: Gateway, token: str) -> Response:
    rec = links.lookup(gw.store, token)
    a = _load(gw, rec) if rec is not None else None
    if rec is None or a is None:
        return _invalid()
    body = _describe(gw, a)
    if a.get("status") == "pending":
        body += _form(token, str(rec["approver"]))
    else:
        body += "<p>This approval is no longer pending: there is nothing to decide.</p>"
    return _page("Review an action held for approval", body)


def _refuse(gw: Gateway, token: str, rec: dict[str, Any] | None, why: str) -> None:
    gw.audit_event("approval", decision="deny", reason=f"decision link refused: {why}",
                   actor=f"link:{rec.get('approver')}" if rec else "link",
                   approval_status=None, details={
                       "approval_id": rec.get("approval_id") if rec else None,
                       "link": links.link_id(token)})


def _same_origin(gw: Gateway, request: Request) -> bool:
    """Refuse a form posted from another site. Under ``no-referrer`` browsers send
    ``Origin: null`` for the page's own form, so the fetch metadata decides where sent."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    base = gw.policy.notifications.public_base_url
    allowed = {f"{request.url.scheme}://{request.headers.get('host', '')}"}
    if base is not None:
        parts = urlsplit(base)
        allowed.add(f"{parts.scheme}://{parts.netloc}")
    return origin in allowed


def decide_post(gw: Gateway, token: str, request: Request, raw: bytes) -> Response:
    rec = links.lookup(gw.store, token)
    well_formed = links.well_formed(token)
    if rec is None:
        if well_formed:  # a replayed or expired link is worth a record; junk is not
            _refuse(gw, token, None, "unknown, already used or expired")
        return _invalid(410 if well_formed else 404)
    if not _same_origin(gw, request):
        _refuse(gw, token, rec, "posted from another origin")
        return _page("Refused", "<p>This form must be sent from its own page.</p>", 403)
    form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True,
                    max_num_fields=8, strict_parsing=False)
    decision = (form.get("decision") or [""])[0]
    typed = (form.get("confirm") or [""])[0].strip().upper()
    reason = (form.get("reason") or [""])[0][:_MAX_REASON] or None
    a = _load(gw, rec)
    if a is None:
        _refuse(gw, token, rec, "the approval is gone or its action changed")
        return _invalid(410)
    approver = str(rec["approver"])
    if decision not in ("approve", "reject") or not hmac.compare_digest(
            typed.encode(), links.confirmation_code(token).encode()):
        # Not used up: a person who mistyped the code tries again.
        _refuse(gw, token, rec, "the confirmation code was not typed"
                if decision in ("approve", "reject") else "no decision chosen")
        return _page("Review an action held for approval", _describe(gw, a) + _form(
            token, approver, "Type the confirmation code exactly as shown, then choose."), 400)
    key = next((k for k in gw.policy.keys if k.name == approver), None)
    if key is None or "approver" not in key.roles:
        _refuse(gw, token, rec, f"{approver} is no longer an approver key")
        return _page("Refused", "<p>The key this link was made for can no longer "
                     "approve. Nothing was decided.</p>", 403)
    if not links.consume(gw.store, token):
        _refuse(gw, token, rec, "already used")
        return _invalid(410)
    try:
        fn = control.approve if decision == "approve" else control.reject
        out = fn(gw, a["id"], actor=approver, reason=reason, scope=Scope(key.environment))
    except AuthorityError as exc:  # audited by the control plane, as over the API
        return _page("Not decided", f'<p class="warn" id="outcome">{html.escape(exc.message)}'
                     f"</p><p>Code: {html.escape(exc.code or '')}. This link is now used."
                     "</p>", exc.status_code)
    return _page("Decided", f'<p id="outcome">{html.escape(decision)}d by '
                 f"{html.escape(approver)}: the approval is now "
                 f'<b id="status">{html.escape(str(out.get("status")))}</b>.</p>'
                 f"<p>Decided at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p>")
