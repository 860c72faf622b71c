"""The demo's model: the scripted model that, like a real one, answers tool results in words."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from authority_sdk.demo.processes import Child, start_child, start_demo_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    child = start_demo_model(tmp_path_factory.mktemp("model"))
    yield child
    child.stop()
    assert not child.alive()


def chat(model: Child, messages: list[Any], **extra: Any) -> httpx.Response:
    return httpx.post(model.url + "/v1/chat/completions",
                      json={"model": "gpt-4o-mini", "messages": messages, **extra}, timeout=10)


TASK = {"role": "user", "content": 'CALL issue_refund {"order_id": "A-1", "amount": 5}'}


def test_directives_of_the_last_user_message_are_followed(model: Child) -> None:
    r = chat(model, [TASK])
    msg = r.json()["choices"][0]["message"]
    assert r.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert msg["tool_calls"][0]["function"] == {
        "name": "issue_refund", "arguments": '{"order_id": "A-1", "amount": 5}'}


def test_tool_results_are_answered_in_words_not_with_the_same_calls(model: Child) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "issue_refund", "arguments": "{}"}}
    conversation = [TASK, {"role": "assistant", "content": None, "tool_calls": [call, call]},
                    {"role": "tool", "tool_call_id": "call_1",
                     "content": json.dumps({"status": "executed", "result": {"id": 1}})},
                    {"role": "tool", "tool_call_id": "call_2",
                     "content": json.dumps({"status": "pending_approval",
                                            "approval_id": "apr_9"})}]
    r = chat(model, conversation)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == (
        "I have the results: executed; pending_approval (apr_9).")


def test_streaming_and_stats_still_work(model: Child) -> None:
    before = httpx.get(model.url + "/_stats").json()["chat_requests"]
    with httpx.stream("POST", model.url + "/v1/chat/completions", json={
            "model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "SAY one two three"}]}) as r:
        text = "".join(r.iter_text())
    assert text.rstrip().endswith("data: [DONE]")
    assert '"content": " three"' in text
    assert httpx.get(model.url + "/_stats").json()["chat_requests"] == before + 1


def test_a_taken_port_is_retried_on_another(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        handed: list[int] = []

        def command(p: int) -> list[str]:
            # As if another process grabbed the free port first: the first attempt gets it.
            handed.append(taken if not handed else p)
            return [sys.executable, "-m", "authority_sdk.demo.model", "--port", str(handed[-1])]

        child = start_child("demo model", command, tmp_path / "m.log", ready_path="/v1/models")
        try:
            assert handed[0] == taken and len(handed) == 2
            assert child.port == handed[1] != taken
            assert httpx.get(child.url + "/v1/models").status_code == 200
        finally:
            child.stop()
