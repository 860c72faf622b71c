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
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..policy import WebhookExecutor
from ._base import ExecutionResult, check_action_key, dumps, exc_text, fmt_seconds, shorten

__all__ = ["WebhookActionExecutor"]

# Header values the gateway holds for the app and must not show it in a simulation.
_SECRET_HEADER = re.compile(r"authorization|cookie|secret|token|password|api[-_]?key|signature",
                            re.IGNORECASE)
_MASK = "***"


class WebhookActionExecutor:
    kind = "webhook"
    idempotent_downstream = True

    def __init__(self, name: str, config: WebhookExecutor) -> None:
        self.name = name
        self.config = config
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
        headers = {k: (_MASK if _SECRET_HEADER.search(k) and k != "Idempotency-Key" else v)
                   for k, v in self._headers(action_key).items()}
        return {
            "executor": self.name,
            "type": "webhook",
            "method": "POST",
            "url": _mask_url(self.config.url),
            "headers": headers,
            "json": self._body(action_type, arguments, action_key),
            "timeout_s": self.config.timeout_s,
        }

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
        return content, self._headers(action_key)

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
            return self._transport_failure(exc)
        return self._outcome(response)

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
            return self._transport_failure(exc)
        return self._outcome(response)

    # -- outcomes -----------------------------------------------------------

    def _transport_failure(self, exc: httpx.HTTPError) -> ExecutionResult:
        timeout = fmt_seconds(self.config.timeout_s)
        if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
            return ExecutionResult(False, None, f"webhook timed out after {timeout} "
                                   "while connecting (nothing was sent)", retryable=True)
        if isinstance(exc, httpx.TimeoutException):
            # The receiver may have acted on the request: only the engine,
            # knowing the downstream is idempotent, may decide to resend.
            return ExecutionResult(False, None, f"webhook timed out after {timeout}")
        if isinstance(exc, httpx.ConnectError):
            return ExecutionResult(False, None, f"webhook unreachable (nothing was sent): "
                                   f"{exc_text(exc)}", retryable=True)
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


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:{_MASK}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
