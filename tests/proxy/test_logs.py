"""``--log-format json`` (issue 17, point 4): one JSON object per line, a line per request
and per action, with the request id and the caller's W3C trace id; hostile input stays data."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from helpers import ScriptedServer, tool, user
from proxy_env import AGENT_KEY, start_proxy

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def _lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def _wait_for(path: Path, predicate: Any) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        lines = _lines(path)
        if predicate(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_json_lines_per_request_and_action_with_trace_ids(upstream: ScriptedServer,
                                                          tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path, serve_args=["--log-format", "json"]) as px:
        traced = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                         headers={"traceparent": TRACEPARENT},
                         json={"model": "gpt-4o-mini",
                               "messages": user('CALL lookup_customer {"id": 7}'),
                               "tools": [tool("lookup_customer",
                                              {"id": {"type": "integer"}})]})
        assert traced.status_code == 200
        request_id = traced.json()["authority"]["request_id"]
        bad_trace = px.http("POST", "/v1/chat/completions", AGENT_KEY,
                            headers={"traceparent": "00-zz-not-a-trace-01"},
                            json={"model": "gpt-4o-mini", "messages": user("SAY hi")})
        hostile = px.http("GET", "/v1/no%0Asuch%22path", AGENT_KEY)
        assert hostile.status_code == 404
        lines = _wait_for(tmp_path / "proxy.log", lambda ls: sum(
            1 for x in ls if x.get("kind") == "request") >= 3)
    # Every line of the file parsed as JSON (uvicorn's own included) — or _lines raised.
    assert all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    [req] = [x for x in lines if x.get("kind") == "request" and x["request_id"] == request_id]
    assert req["trace_id"] == TRACE and req["key"] == "support-agent"
    assert (req["decision"], req["status"], req["route"]) == ("allow", 200,
                                                              "/v1/chat/completions")
    assert req["latency_ms"] >= req["overhead_ms"] >= 0
    [act] = [x for x in lines if x.get("kind") == "action" and x["request_id"] == request_id]
    assert (act["action_type"], act["trace_id"], act["status"]) == (
        "lookup_customer", TRACE, "allowed")
    other = [x for x in lines if x.get("kind") == "request"
             and x["request_id"] == bad_trace.json()["authority"]["request_id"]]
    assert other and other[0]["trace_id"] is None  # malformed trace context is ignored
    [miss] = [x for x in lines if x.get("kind") == "request" and x["status"] == 404]
    assert "\n" not in miss["message"] and miss["path"].startswith("/v1/no")
    assert "such" in miss["path"]


def test_an_unknown_log_format_is_refused(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "authority_sdk.cli", "serve",
                          "--log-format", "xml"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--log-format must be text or json" in out.stderr
