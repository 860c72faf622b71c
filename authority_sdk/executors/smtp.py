"""``smtp``: send a real email through an SMTP server.

Arguments: ``to`` (an address or a list of them), ``subject``, ``body``, and
optional ``cc`` and ``bcc``. Every address is parsed strictly by
``authority_sdk.addresses`` — the parser the policy's ``recipients`` matcher
uses — one address per value, so the envelope holds exactly the recipients the
rules checked and the approver saw. Display names are written back quoted when
they need it. Anything else, or anything malformed, is refused before
connecting: a half-formed message is never sent. ``bcc`` recipients are in the
envelope only, never in a header.

SMTP has no idempotency key, so this executor is *not* idempotent downstream.
The Message-ID is derived from the action key and the key itself travels in
``X-Authority-Action-Key``, so a duplicate that does get through can be
recognised by the receiving side.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import smtplib
import ssl
import threading
from collections import OrderedDict
from collections.abc import Iterable
from email.message import EmailMessage
from email.policy import default as _default_policy
from email.utils import formatdate
from typing import Any

from ..addresses import (
    RECIPIENT_FIELDS,
    AddressError,
    Recipient,
    header_registry,
    parse_recipient_field,
    wire_header,
)
from ..audit import REDACTED
from ..policy import SmtpExecutor
from ._base import (
    MASK,
    ExecutionResult,
    check_action_key,
    exc_text,
    fmt_seconds,
    redact_names,
    redacted,
    redacted_values,
    scrub,
)

__all__ = ["SmtpActionExecutor", "build_message"]

ALLOWED_ARGUMENTS = (*RECIPIENT_FIELDS, "subject", "body")
_DESCRIBED_KEPT = 256


class _Invalid(ValueError):
    pass


def _recipients(arguments: dict[str, Any], field: str, *, required: bool) -> list[Recipient]:
    if field not in arguments or arguments[field] is None:
        if required:
            raise _Invalid(f"missing argument {field!r} (a recipient address or a list of them)")
        return []
    try:
        parsed = parse_recipient_field(arguments[field], field)
    except AddressError as exc:
        raise _Invalid(f"argument {exc.field or field!r}: {exc.problem}") from None
    if required and not parsed:
        raise _Invalid(f"argument {field!r} names no recipient")
    return parsed


def _text(arguments: dict[str, Any], field: str, *, one_line: bool) -> str:
    if field not in arguments:
        raise _Invalid(f"missing argument {field!r}")
    value = arguments[field]
    if not isinstance(value, str):
        raise _Invalid(f"argument {field!r} must be a string, not {type(value).__name__}")
    if one_line and ("\r" in value or "\n" in value):
        raise _Invalid(f"argument {field!r}: line breaks are not allowed")
    return value


def message_id(action_key: str, sender: str) -> str:
    domain = sender.rpartition("@")[2].strip(" >") or "authority.invalid"
    digest = hashlib.sha256(action_key.encode()).hexdigest()[:32]
    return f"<authority.{digest}@{domain}>"


# Address headers are set raw (already folded, by ``addresses.wire_header``) and never
# refolded: the stdlib folder can turn the comma between two addresses into an encoded
# word, so the header would name fewer recipients than the envelope.
_POLICY = _default_policy.clone(refold_source="none", header_factory=header_registry())


def build_message(sender: str, arguments: dict[str, Any], action_key: str
                  ) -> tuple[EmailMessage, list[str], dict[str, list[Recipient]]]:
    """The message, its envelope recipients and the parsed recipients by field.

    Raises ``ValueError`` on bad arguments (the message never quotes an address value).
    """
    if not isinstance(arguments, dict):
        raise _Invalid("arguments must be an object")
    unknown = sorted(set(arguments) - set(ALLOWED_ARGUMENTS))
    if unknown:
        raise _Invalid(f"unexpected argument(s) {', '.join(map(repr, unknown))} "
                       f"(allowed: {', '.join(ALLOWED_ARGUMENTS)})")
    problem = check_action_key(action_key)
    if problem:
        raise _Invalid(problem)
    by_field = {"to": _recipients(arguments, "to", required=True),
                "cc": _recipients(arguments, "cc", required=False),
                "bcc": _recipients(arguments, "bcc", required=False)}
    subject = _text(arguments, "subject", one_line=True)
    body = _text(arguments, "body", one_line=False)

    msg = EmailMessage(policy=_POLICY)
    msg["From"] = sender
    msg.set_raw("To", wire_header(by_field["to"]))
    if by_field["cc"]:
        msg.set_raw("Cc", wire_header(by_field["cc"]))
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = message_id(action_key, sender)
    msg["X-Authority-Action-Key"] = action_key
    msg.set_content(body)
    envelope = list(dict.fromkeys(r.addr_spec for field in RECIPIENT_FIELDS
                                  for r in by_field[field]))
    return msg, envelope, by_field


class SmtpActionExecutor:
    kind = "smtp"
    idempotent_downstream = False

    def __init__(self, name: str, config: SmtpExecutor, *, redact: Iterable[str] = ()) -> None:
        self.name = name
        self.config = config
        self.redact = redact_names(redact)
        self._lock = threading.Lock()
        self._described: OrderedDict[tuple[str, str, str], dict[str, Any]] = OrderedDict()

    def describe(self, action_type: str, arguments: dict[str, Any],
                 action_key: str) -> dict[str, Any]:
        """The envelope, the headers and the body as they would be sent; credentials never
        appear (only whether a login happens), redacted fields are masked.

        Kept for the last few actions: building a message with the ``email`` package takes
        about a millisecond, and an approvals list describes every pending email each time
        it is read. A kept description is a copy, so a caller cannot alter the next one."""
        try:
            key = (action_type, json.dumps(arguments, sort_keys=True, allow_nan=False),
                   action_key)
        except (TypeError, ValueError):
            return self._describe(action_type, arguments, action_key)
        with self._lock:
            kept = self._described.get(key)
            if kept is not None:
                self._described.move_to_end(key)
                return copy.deepcopy(kept)
        described = self._describe(action_type, arguments, action_key)
        with self._lock:
            self._described[key] = copy.deepcopy(described)
            while len(self._described) > _DESCRIBED_KEPT:
                self._described.popitem(last=False)
        return described

    def _describe(self, action_type: str, arguments: dict[str, Any],
                  action_key: str) -> dict[str, Any]:
        base: dict[str, Any] = {
            "executor": self.name,
            "type": "smtp",
            "server": {"host": self.config.host, "port": self.config.port,
                       "starttls": self.config.starttls,
                       "login": self.config.username_env is not None},
        }
        try:
            msg, envelope, by_field = build_message(self.config.sender, arguments, action_key)
        except ValueError as exc:
            return {**base, "error": f"email not sent: {exc}"}
        return redacted({
            **base,
            "envelope": {"mail_from": self.config.sender, "rcpt_to": envelope},
            # What an approver reads: each recipient parsed, by field, as it is written.
            "recipients": {field: [r.header for r in by_field[field]]
                           for field in RECIPIENT_FIELDS if by_field[field]},
            "headers": {name: str(value) for name, value in msg.items()},
            "body": msg.get_content(),
        }, self.redact)

    def _credentials(self) -> tuple[str, str] | None:
        user_env, pw_env = self.config.username_env, self.config.password_env
        if user_env is None and pw_env is None:
            return None
        missing = [e for e in (user_env, pw_env) if e is None or e not in os.environ]
        if missing:
            names = ", ".join("(not configured)" if e is None else e for e in missing)
            raise _Invalid(f"SMTP credentials missing: environment variable(s) {names} not set")
        assert user_env is not None and pw_env is not None
        return os.environ[user_env], os.environ[pw_env]

    def execute(self, action_type: str, arguments: dict[str, Any],
                action_key: str) -> ExecutionResult:
        try:
            msg, recipients, _ = build_message(self.config.sender, arguments, action_key)
            credentials = self._credentials()
        except ValueError as exc:
            return ExecutionResult(False, None, f"email not sent: {exc}")
        result = self._send(msg, recipients, credentials)
        # A server may echo the login, or a redacted value, in its answer; the result goes to
        # the audit log and the model.
        masks = dict.fromkeys(redacted_values(arguments, self.redact), REDACTED)
        masks.update(dict.fromkeys(credentials or (), MASK))
        return scrub(result, masks)

    async def aexecute(self, action_type: str, arguments: dict[str, Any],
                       action_key: str) -> ExecutionResult:
        return await asyncio.to_thread(self.execute, action_type, arguments, action_key)

    def _send(self, msg: EmailMessage, recipients: list[str],
              credentials: tuple[str, str] | None) -> ExecutionResult:
        cfg = self.config
        where = f"SMTP server {cfg.host}:{cfg.port}"
        # Until DATA is under way nothing can have been delivered, so a
        # transient failure up to there is safe to retry.
        delivering = False
        smtp: smtplib.SMTP | None = None
        try:
            smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout_s)
            if cfg.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if credentials is not None:
                smtp.login(*credentials)
            delivering = True
            refused = smtp.send_message(msg, from_addr=cfg.sender, to_addrs=recipients)
        except OSError as exc:  # smtplib's and ssl's errors are all OSErrors
            return self._failure(exc, where, delivering)
        finally:
            if smtp is not None:
                _goodbye(smtp)
        accepted = [r for r in recipients if r not in refused]
        result: dict[str, Any] = {"message_id": msg["Message-ID"], "recipients": accepted}
        if refused:
            # Delivered to some: reporting failure would invite a resend to the others.
            result["refused"] = _refusals(refused)
        return ExecutionResult(True, result)

    def _failure(self, exc: OSError, where: str, delivering: bool) -> ExecutionResult:
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            return ExecutionResult(False, {"refused": _refusals(exc.recipients)},
                                   "email not sent: every recipient was refused: "
                                   + _refusal_text(exc.recipients))
        if isinstance(exc, smtplib.SMTPSenderRefused):
            return ExecutionResult(False, None, f"email not sent: sender {exc.sender} refused: "
                                   f"{exc.smtp_code} {_decode(exc.smtp_error)}")
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            return ExecutionResult(False, None, f"email not sent: SMTP login failed: "
                                   f"{exc.smtp_code} {_decode(exc.smtp_error)}")
        if isinstance(exc, smtplib.SMTPDataError):
            return ExecutionResult(False, None, f"email not sent: {where} rejected the message: "
                                   f"{exc.smtp_code} {_decode(exc.smtp_error)}")
        timeout = fmt_seconds(self.config.timeout_s)
        what = (f"timed out after {timeout}" if isinstance(exc, TimeoutError)
                else f"failed: {exc_text(exc)}")
        if delivering:
            return ExecutionResult(False, None, f"{where} {what} while sending; "
                                   "the email may have been delivered")
        return ExecutionResult(False, None, f"email not sent: {where} {what}")


def _goodbye(smtp: smtplib.SMTP) -> None:
    # The outcome is already decided; a failed QUIT must not change it.
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()


def _decode(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)


def _refusals(refused: dict[str, tuple[int, bytes]]) -> dict[str, str]:
    return {addr: f"{code} {_decode(text)}" for addr, (code, text) in refused.items()}


def _refusal_text(refused: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{a}: {t}" for a, t in _refusals(refused).items())
