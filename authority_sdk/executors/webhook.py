"""``webhook``: POST the action as JSON, with ``Idempotency-Key: <action key>``.

Because the receiver can dedupe on that header, a webhook counts as
idempotent downstream: the engine may re-send an action whose first attempt
was cut short by a crash.
"""

from __future__ import annotations

import asyncio
import re
import threading
import weakref
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import httpx

from ..audit import REDACTED
from ..policy import WebhookExecutor
from ..telemetry import with_trace
from ._base import (
    MASK,
    ExecutionResult,
    check_action_key,
    dumps,
    exc_text,
    fmt_seconds,
    redact_names,
    redacted,
    redacted_values,
    scrub,
    shorten,
)

__all__ = ["WebhookActionExecutor", "mask_url"]

# A path segment shown as is in a description: a short lower-case word or two
# ("hooks", "refund-requests"). Anything else — digits, capitals, dots, escapes,
# length — may be a token (Slack- and Zapier-style URLs carry one in the path).
_PLAIN_SEGMENT = re.compile(r"[a-z]{1,24}(?:[-_][a-z]{1,24}){0,2}")


class WebhookActionExecutor:
    kind = "webhook"
    idempotent_downstream = True

    def __init__(self, name: str, config: WebhookExecutor, *,
                 redact: Iterable[str] = ()) -> None:
        self.name = name
        self.config = config
        self.redact = redact_names(redact)
        self._secrets = _url_secrets(config.url) | set(config.headers.values())
        self._timeout = httpx.Timeout(config.timeout_s)
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        # An AsyncClient's pool belongs to the loop that opened it, so keep one per loop.
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary())

    # -- what is sent -------------------------------------------------------

    def _headers(self, action_key: str) -> dict[str, str]:
        ours = {"Content-Type": "application/json", "Idempotency-Key": action_key}
        # The gateway's own headers win over configured ones: the idempotency
        # contract must not be overridable by a config typo.
        headers = {k: v for k, v in self.config.headers.items()
                   if k.lower() not in {o.lower() for o in ours}}
        headers.update(ours)
        return headers

    @staticmethod
    def _body(action_type: str, arguments: dict[str, Any], action_key: str) -> dict[str, Any]:
        return {"action_type": action_type, "arguments": arguments, "action_key": action_key}

    def describe(self, action_type: str, arguments: dict[str, Any],
                 action_key: str) -> dict[str, Any]:
        """The request as it would be sent, minus the secrets the gateway holds for the app:
        every configured header value, the URL's user info, query values, fragment and any
        path segment that is not a plain word are masked; redacted fields too."""
        configured = {k.lower() for k in self.config.headers}
        headers = {k: (MASK if k.lower() in configured else v)
                   for k, v in self._headers(action_key).items()}
        return redacted({
            "executor": self.name,
            "type": "webhook",
            "method": "POST",
            "url": mask_url(self.config.url),
            "headers": headers,
            "json": self._body(action_type, arguments, action_key),
            "timeout_s": self.config.timeout_s,
        }, self.redact)

    def _prepare(self, action_type: str, arguments: dict[str, Any],
                 action_key: str) -> tuple[bytes, dict[str, str]] | ExecutionResult:
        problem = check_action_key(action_key)
        if problem:
            return ExecutionResult(False, None, f"webhook not called: {problem}")
        try:
            content = dumps(self._body(action_type, arguments, action_key)).encode()
        except (TypeError, ValueError) as exc:
            return ExecutionResult(False, None,
                                   f"webhook not called: arguments are not JSON: {exc}")
        return content, with_trace(self._headers(action_key))

    # -- sync ---------------------------------------------------------------

    def _sync_client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=self._timeout, follow_redirects=False)
            return self._client

    def execute(self, action_type: str, arguments: dict[str, Any],
                action_key: str) -> ExecutionResult:
        prepared = self._prepare(action_type, arguments, action_key)
        if isinstance(prepared, ExecutionResult):
            return prepared
        content, headers = prepared
        try:
            response = self._sync_client().post(self.config.url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            return self._scrub(self._transport_failure(exc), arguments)
        return self._scrub(self._outcome(response), arguments)

    # -- async --------------------------------------------------------------

    def _async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._aclients.get(loop)
            if client is None or client.is_closed:
                client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
                self._aclients[loop] = client
            return client

    async def aexecute(self, action_type: str, arguments: dict[str, Any],
                       action_key: str) -> ExecutionResult:
        prepared = self._prepare(action_type, arguments, action_key)
        if isinstance(prepared, ExecutionResult):
            return prepared
        content, headers = prepared
        try:
            response = await self._async_client().post(self.config.url, content=content,
                                                       headers=headers)
        except httpx.HTTPError as exc:
            return self._scrub(self._transport_failure(exc), arguments)
        return self._scrub(self._outcome(response), arguments)

    # -- outcomes -----------------------------------------------------------

    def _scrub(self, result: ExecutionResult, arguments: dict[str, Any]) -> ExecutionResult:
        """The result without any configured secret or redacted value: an error text can
        quote the URL, and a receiver can echo a header or the request back; the result goes
        to the audit log and the model."""
        masks = dict.fromkeys(redacted_values(arguments, self.redact), REDACTED)
        masks.update(dict.fromkeys(self._secrets, MASK))
        return scrub(result, masks)

    def _transport_failure(self, exc: httpx.HTTPError) -> ExecutionResult:
        timeout = fmt_seconds(self.config.timeout_s)
        if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
            return ExecutionResult(False, None, f"webhook timed out after {timeout} "
                                   "while connecting (nothing was sent)")
        if isinstance(exc, httpx.TimeoutException):
            # The receiver may have acted on the request: only the engine,
            # knowing the downstream is idempotent, may decide to resend.
            return ExecutionResult(False, None, f"webhook timed out after {timeout}")
        if isinstance(exc, httpx.ConnectError):
            return ExecutionResult(False, None, f"webhook unreachable (nothing was sent): "
                                   f"{exc_text(exc)}")
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return ExecutionResult(False, None, f"webhook url is invalid: {exc_text(exc)}")
        return ExecutionResult(False, None, f"webhook request failed: {exc_text(exc)}")

    @staticmethod
    def _outcome(response: httpx.Response) -> ExecutionResult:
        status = response.status_code
        if 200 <= status < 300:
            return ExecutionResult(True, _parse_body(response))
        text = response.text
        return ExecutionResult(
            False, {"status_code": status, "text": shorten(text, 2000)},
            f"webhook answered {status}: {shorten(text) or response.reason_phrase}")

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close this loop's async client (and the sync one)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            aclient = self._aclients.pop(loop, None)
        if aclient is not None:
            await aclient.aclose()
        self.close()


def _parse_body(response: httpx.Response) -> Any:
    if response.content:
        try:
            return response.json()
        except ValueError:
            pass
    return {"status_code": response.status_code, "text": response.text}


def mask_url(url: str) -> str:
    """``url`` with its secrets masked, its scheme, host, port and path shape readable:
    ``https://***@hooks.example.com/hooks/***?token=***``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return MASK  # not a URL we can take apart: show nothing of it
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = (f"{MASK}@" if "@" in parts.netloc else "") + host
    if port is not None:
        netloc += f":{port}"
    path = "/".join(seg if seg == "" or _PLAIN_SEGMENT.fullmatch(seg) else MASK
                    for seg in parts.path.split("/"))
    query = "&".join(f"{name}={MASK}" if sep else MASK
                     for name, sep, _ in (item.partition("=")
                                          for item in parts.query.split("&") if item))
    return urlunsplit((parts.scheme, netloc, path, query, MASK if parts.fragment else ""))


def _url_secrets(url: str) -> set[str]:
    """Every part of the URL that ``mask_url`` hides, raw and percent-decoded."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return {url}
    found: set[str] = set()
    userinfo = parts.netloc.rpartition("@")[0]
    found.update(p for p in userinfo.split(":") if p)
    found.update(seg for seg in parts.path.split("/") if seg and not _PLAIN_SEGMENT.fullmatch(seg))
    found.update(value for _, value in parse_qsl(parts.query, keep_blank_values=False))
    found.update(item.partition("=")[2] for item in parts.query.split("&"))
    if parts.fragment:
        found.add(parts.fragment)
    return found | {unquote(f) for f in found}
