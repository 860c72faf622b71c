"""Keeps the benchmark code from rotting: the mock upstream really serves, the workload has
the advertised size, and the harness's pure helpers parse and judge correctly. No timings."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import mock_upstream  # noqa: E402
import workload  # noqa: E402

WRK_OUTPUT = """\
Running 4s test @ http://127.0.0.1:41234/v1/chat/completions
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    46.52ms   20.11ms 201.33ms   78.12%
    Req/Sec   344.61     40.03   410.00     70.00%
  Latency Distribution
     50%   42.60ms
     75%  512.00us
     90%    1.02s
     99%    2.50m
  1378 requests in 4.01s, 2.40MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:    343.64
Transfer/sec:    612.11KB
"""


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("mock") / "mock.log"
    srv, port = harness.start_mock(log, cpu=None)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        srv.stop()


def test_mock_answers_a_tool_call_with_usage_through_the_openai_client(mock: str) -> None:
    client = openai.OpenAI(base_url=mock, api_key="sk-test", max_retries=0)
    resp = client.chat.completions.create(**workload.chat_body())
    call = resp.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "lookup_customer"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"customer_id": "C-1042"}  # type: ignore[union-attr]
    assert resp.choices[0].finish_reason == "tool_calls"
    assert resp.usage is not None and resp.usage.prompt_tokens == mock_upstream.PROMPT_TOKENS


def test_mock_streams_the_same_tool_call_then_usage(mock: str) -> None:
    client = openai.OpenAI(base_url=mock, api_key="sk-test", max_retries=0)
    args, name, usage = "", None, None
    for chunk in client.chat.completions.create(**workload.chat_body(stream=True)):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                if tc.function and tc.function.name:
                    name = tc.function.name
                if tc.function and tc.function.arguments:
                    args += tc.function.arguments
    assert name == "lookup_customer"
    assert json.loads(args) == {"customer_id": "C-1042"}
    assert usage is not None and usage.completion_tokens == mock_upstream.COMPLETION_TOKENS


def test_mock_keeps_the_connection_alive_and_answers_pipelined_requests(mock: str) -> None:
    with httpx.Client() as client:
        r = client.get(f"{mock}/models")
        assert r.status_code == 200 and r.json()["data"][0]["id"] == workload.MODEL
    # Two requests written at once on one socket: both answered, in order, connection kept.
    raw = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
           b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    import socket

    host, port = mock.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(raw)
        want = len(mock_upstream.MODELS) + len(mock_upstream.COMPLETION)
        got = b""
        while len(got) < want:
            data = s.recv(65536)
            assert data, "connection closed early"
            got += data
    assert got == mock_upstream.MODELS + mock_upstream.COMPLETION


def test_mock_routes() -> None:
    assert mock_upstream.answer(b"POST", b"/v1/chat/completions", b'{"stream": true}') \
        == mock_upstream.STREAM
    assert mock_upstream.answer(b"POST", b"/v1/chat/completions", b'{"stream": false}') \
        == mock_upstream.COMPLETION
    assert mock_upstream.answer(b"GET", b"/nope", b"") == mock_upstream.NOT_FOUND
    assert mock_upstream.STREAM.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


def test_workload_is_about_a_thousand_tokens_and_nonces_change_every_message() -> None:
    msgs = workload.base_messages()
    assert 900 <= workload.count_tokens(msgs, [workload.TOOL]) <= 1100
    assert workload.body_bytes() == workload.body_bytes()
    tagged = workload.base_messages("n1")
    assert all(a["content"] != b["content"] for a, b in zip(msgs, tagged, strict=True))
    grown = workload.agent_turn(msgs, 2, "n1")
    assert grown[:len(msgs)] == msgs and len(grown) == len(msgs) + 3
    assert grown[-2]["tool_call_id"] == grown[-3]["tool_calls"][0]["id"]


def test_parse_wrk_reads_units_totals_and_errors() -> None:
    r = harness.parse_wrk(WRK_OUTPUT)
    assert (r.p50_ms, r.p75_ms, r.p90_ms, r.p99_ms) == (42.60, 0.512, 1020.0, 150_000.0)
    assert r.requests == 1378 and r.duration_s == pytest.approx(4.01) and r.rps == 343.64
    assert r.non_2xx == 7 and r.socket_errors == {"connect": 0, "read": 2, "write": 0,
                                                  "timeout": 3}
    assert r.errors == 12
    clean = WRK_OUTPUT.replace("  Socket errors: connect 0, read 2, write 0, timeout 3\n", "") \
        .replace("  Non-2xx or 3xx responses: 7\n", "")
    assert harness.parse_wrk(clean).errors == 0
    with pytest.raises(ValueError, match="latency distribution"):
        harness.parse_wrk(WRK_OUTPUT.replace("99%", "98%"))


def test_wrk_command_uses_whole_seconds_and_passes_body_and_token() -> None:
    cmd = harness.wrk_command("http://h/v1", connections=64, duration_s=0.3,
                              script=Path("s.lua"), body=Path("b.json"), token="tok", cpu=None)
    assert cmd[:5] == ["wrk", "-t1", "-c64", "-d1s", "--latency"]
    assert cmd[-4:] == ["http://h/v1", "--", "b.json", "tok"]


def test_statistics_and_goals() -> None:
    assert harness.percentile([4, 1, 3, 2], 50) == 2.5
    assert harness.percentile([1, 2, 3, 4, 5], 100) == 5
    assert harness.median([7.0]) == 7.0
    with pytest.raises(ValueError):
        harness.percentile([], 50)
    ceiling = harness.Goal("added", 2.5, 2.0, "ms")
    assert ceiling.status == "MISS" and ceiling.ratio == 1.25
    floor = harness.Goal("ratio", 3.3, 3.0, "x", higher_is_better=True)
    assert floor.status == "PASS"
    assert harness.Goal("none", None, 1.0, "s").status == "NOT MEASURED"
    table = harness.markdown_table(["a", "b"], [["1", "22"]])
    assert table.splitlines()[2] == "| 1 | 22 |"


def test_rss_of_this_process_is_read_from_proc() -> None:
    import os

    assert harness.rss_kib(os.getpid()) > 1000


def test_the_floor_runs_the_gateways_own_code_and_is_set_against_the_goals_budgets() -> None:
    import subprocess

    import run

    out = subprocess.run([sys.executable, str(BENCH / "micro.py"), "floor", "--n", "20"],
                         capture_output=True, text=True, check=True, cwd=BENCH, timeout=120)
    floor = json.loads(out.stdout)
    assert floor["body_bytes"] == len(workload.body_bytes())
    steps = ("parse_body", "audit_entries", "read_answer_and_respond")
    assert all(floor[s]["n"] == 20 and floor[s]["p50_us"] > 0 for s in steps)
    assert floor["total_p50_us"] == pytest.approx(sum(floor[s]["p50_us"] for s in steps))

    # 1 / share - 1 forwarders' CPU per request on top of the forwarding itself.
    r = {"matrix": {"bare|64|0": {"cpu_ms": 0.2}},
         "floor": {**floor, "total_p50_us": 100.0}}
    note = " ".join(run.floor_note(r))
    assert "**100 µs**" in note and "spends 200 µs of CPU" in note
    assert "goal 2 (50% of bare) leaves 200 µs, the floor is 50 % of it" in note
    assert "goal 4 (35% of bare) leaves 371 µs, the floor is 27 % of it" in note
    assert run.floor_note({"matrix": {}, "floor": floor}) == []
