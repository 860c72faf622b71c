"""A webhook executor's receiver: the real system behind a gateway-dispatched action.

The gateway's ``webhook`` executor POSTs ``{"action_type", "arguments",
"action_key"}`` as JSON with ``Idempotency-Key: <action key>``. A receiver that
remembers the keys it has seen makes the action safe to deliver twice (the
gateway may re-send after a crash), so this one does: a repeated key gets the
first answer back and nothing is done again.

    python examples/webhook_receiver.py --port 9000      # the port examples/policy.yaml names
    python examples/webhook_receiver.py --port 0         # any free port (printed on start)

``GET /received`` lists every delivery (``authority demo`` shows them). Only the
standard library is used, so the file can be copied as the start of a real one.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Ledger:
    """What the downstream system did, keyed by the gateway's action key."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: dict[str, dict[str, Any]] = {}
        self.deliveries: list[dict[str, Any]] = []

    def handle(self, path: str, key: str | None, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            replayed = key is not None and key in self.done
            if replayed:
                answer = self.done[key]  # type: ignore[index]
            else:
                answer = self.perform(body)
                if key is not None:
                    self.done[key] = answer
            self.deliveries.append({"path": path, "idempotency_key": key, "body": body,
                                    "replayed": replayed, "answer": answer})
            return answer

    def perform(self, body: dict[str, Any]) -> dict[str, Any]:
        # A real receiver would call the payment provider here.
        args = body.get("arguments") or {}
        n = len(self.done) + 1
        if body.get("action_type") == "issue_refund":
            return {"refund_id": f"rf_{n:04d}", "order_id": args.get("order_id"),
                    "amount": args.get("amount"), "status": "refunded"}
        return {"id": f"op_{n:04d}", "status": "done"}


def make_server(host: str, port: int, ledger: Ledger, quiet: bool = False) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/received":
                with ledger.lock:
                    self._send(200, {"deliveries": list(ledger.deliveries)})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError:
                self._send(400, {"error": "expected a JSON object"})
                return
            key = self.headers.get("Idempotency-Key")
            answer = ledger.handle(self.path, key, body)
            if not quiet:
                print(f"received POST {self.path}  Idempotency-Key: {key}  "
                      f"{body.get('action_type')} {json.dumps(body.get('arguments'))}"
                      f"  -> {json.dumps(answer)}", flush=True)
            self._send(200, answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per delivery is printed above; no access log noise

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--quiet", action="store_true", help="do not print each delivery")
    a = ap.parse_args(argv)
    server = make_server(a.host, a.port, Ledger(), a.quiet)
    print(f"listening on http://{a.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
