"""Real local servers for tests, on free loopback ports.

``free_port() -> int``
    A port on 127.0.0.1 with nothing listening (use it for "connection refused").

``HttpReceiver()`` — a threaded HTTP/1.1 server that records every request::

    with HttpReceiver() as rx:
        url = rx.url("/hooks/refund")            # http://127.0.0.1:<port>/hooks/refund
        rx.reply(status=200, json={"ok": True})   # default answer (200 {"ok": true} unless set)
        rx.reply_once(status=500, body="boom")    # queued answers are used first, in order
        rx.reply_once(delay_s=30)                 # sleep before answering (woken by close)
        ... make requests ...
        rx.requests        # list[RecordedRequest], recorded *before* the answer is sent
        rx.requests[0].header("idempotency-key"); .json; .body; .method; .path; .client_port
        rx.wait_for(2, timeout_s=5)               # block until 2 requests arrived

  ``reply(...)``/``reply_once(...)`` take ``status``, ``json`` (serialised, with
  a JSON content type) or ``body`` (str/bytes), ``content_type``, ``headers``
  and ``delay_s``. Closing the receiver wakes any sleeping handler at once.

``SmtpSink(reject=(), auth=None, tls=None)`` — an aiosmtpd server collecting messages::

    with SmtpSink() as smtp:
        smtp.host, smtp.port
        ... send mail ...
        smtp.messages      # list[ReceivedMail]: .mail_from, .rcpt_tos, .data (bytes),
                           # .message (email.message.EmailMessage), .login (user or None),
                           # .tls (True if the session had switched to TLS)
        smtp.wait_for(1, timeout_s=5)

  ``reject`` lists recipient addresses answered with ``550``; ``auth`` maps
  user names to passwords and makes login mandatory (plain text allowed);
  ``tls=(certfile, keyfile)`` offers STARTTLS and requires it before MAIL.
  ``self_signed_cert(directory) -> (certfile, keyfile)`` makes a certificate
  for 127.0.0.1 with the ``openssl`` command (trust it via ``SSL_CERT_FILE``).

``TcpRelay(host, port)`` — forwards a free loopback port to a real server (PostgreSQL),
so a test can cut the network between the gateway and its database::

    with TcpRelay("127.0.0.1", 5432) as relay:
        relay.port         # connect here instead
        relay.cut()        # close every connection and refuse new ones
        relay.restore()    # accept again
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json as jsonlib
import socket
import ssl
import subprocess
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["HttpReceiver", "ReceivedMail", "RecordedRequest", "SmtpSink", "TcpRelay",
           "free_port", "self_signed_cert"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- HTTP ---------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    client_port: int  # the same port twice means the client reused its connection

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def json(self) -> Any:
        return jsonlib.loads(self.body)


@dataclass(frozen=True)
class _Reply:
    status: int = 200
    body: bytes = b'{"ok": true}'
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def _make_reply(status: int, json: Any, body: str | bytes | None, content_type: str | None,
                headers: dict[str, str] | None, delay_s: float) -> _Reply:
    if json is not None and body is not None:
        raise ValueError("give json or body, not both")
    if json is not None:
        data, ctype = jsonlib.dumps(json).encode(), content_type or "application/json"
    else:
        raw = body if body is not None else b""
        data = raw.encode() if isinstance(raw, str) else raw
        ctype = content_type or "text/plain; charset=utf-8"
    return _Reply(status, data, ctype, dict(headers or {}), delay_s)


class HttpReceiver:
    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._default = _Reply()
        self._queue: deque[_Reply] = deque()
        self._cond = threading.Condition()
        self._closing = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if len(body) < length:  # the sender died mid-request: nothing was received
                    self.close_connection = True
                    return
                reply = receiver._record(RecordedRequest(
                    self.command, self.path,
                    {k.lower(): v for k, v in self.headers.items()}, body,
                    self.client_address[1]))
                if reply.delay_s and receiver._closing.wait(reply.delay_s):
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def _record(self, request: RecordedRequest) -> _Reply:
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()
            return self._queue.popleft() if self._queue else self._default

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def reply(self, status: int = 200, *, json: Any = None, body: str | bytes | None = None,
              content_type: str | None = None, headers: dict[str, str] | None = None,
              delay_s: float = 0.0) -> None:
        with self._cond:
            self._default = _make_reply(status, json, body, content_type, headers, delay_s)

    def reply_once(self, status: int = 200, *, json: Any = None, body: str | bytes | None = None,
                   content_type: str | None = None, headers: dict[str, str] | None = None,
                   delay_s: float = 0.0) -> None:
        with self._cond:
            self._queue.append(_make_reply(status, json, body, content_type, headers, delay_s))

    def wait_for(self, count: int, timeout_s: float = 5.0) -> list[RecordedRequest]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= count, timeout_s):
                raise TimeoutError(f"{len(self.requests)} request(s) arrived, expected {count}")
            return list(self.requests)

    def start(self) -> HttpReceiver:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> HttpReceiver:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def self_signed_cert(directory: str | Path) -> tuple[str, str]:
    cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True)
    return str(cert), str(key)


# -- SMTP ---------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    login: str | None
    tls: bool

    @property
    def message(self) -> EmailMessage:
        # Lines travel as CRLF; give tests the text as the sender wrote it.
        msg = email.message_from_bytes(self.data.replace(b"\r\n", b"\n"),
                                       policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


class SmtpSink:
    def __init__(self, reject: Iterable[str] = (), auth: dict[str, str] | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        self._tls = tls
        self.messages: list[ReceivedMail] = []
        self._reject = {r.lower() for r in reject}
        self._auth = dict(auth) if auth is not None else None
        self._cond = threading.Condition()
        self.host = "127.0.0.1"
        self.port = 0
        self._controller: Any = None

    # aiosmtpd handler hooks
    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        if self._auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() in self._reject:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        user = session.auth_data if isinstance(session.auth_data, str) else None
        with self._cond:
            self.messages.append(ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos),
                                              bytes(envelope.original_content), user,
                                              session.ssl is not None))
            self._cond.notify_all()
        return "250 Message accepted for delivery"

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        if (isinstance(auth_data, LoginPassword) and self._auth is not None
                and self._auth.get(auth_data.login.decode()) == auth_data.password.decode()):
            return AuthResult(success=True, auth_data=auth_data.login.decode())
        return AuthResult(success=False, handled=False)

    def start(self) -> SmtpSink:
        from aiosmtpd.controller import Controller

        kwargs: dict[str, Any] = {}
        if self._auth is not None:
            # Login is enforced in handle_MAIL: aiosmtpd's own auth_required
            # warns on every connection when TLS is not required as well.
            kwargs = {"authenticator": self._authenticate, "auth_require_tls": False}
        if self._tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*self._tls)
            kwargs.update(tls_context=ctx, require_starttls=True)
        last: Exception | None = None
        # The port is picked before the server binds it; retry in the rare case it was taken.
        for _ in range(5):
            port = free_port()
            controller = Controller(self, hostname=self.host, port=port, ready_timeout=10,
                                    **kwargs)
            try:
                controller.start()
            except Exception as exc:
                last = exc
                continue
            self._controller, self.port = controller, port
            return self
        raise RuntimeError(f"could not start the SMTP sink: {last}")

    def wait_for(self, count: int, timeout_s: float = 5.0) -> list[ReceivedMail]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout_s):
                raise TimeoutError(f"{len(self.messages)} message(s) arrived, expected {count}")
            return list(self.messages)

    def close(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class TcpRelay:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                # A cut while this connection was being made: it must not outlive the cut
                # (a pool refilling in the background would otherwise get through).
                if not self._open.is_set():
                    client.close()
                    upstream.close()
                    continue
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self._open.clear()
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
