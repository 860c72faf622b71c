"""Streamed completions are gated exactly like plain ones (DESIGN.md §3 "Streaming"),
through the sync and the async ``AuthorityClient`` against the scripted model, which
splits tool-call arguments into 5-character pieces."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ScriptedServer, tool, user
from servers import HttpReceiver

from authority_sdk.client import AsyncAuthorityClient, AuthorityClient
from authority_sdk.engine import Gateway

pytestmark = pytest.mark.usefixtures("audit_chain_intact")

MODEL = "gpt-4o-mini"
TOOLS = [tool("issue_refund"), tool("lookup_customer"), tool("wipe_disk")]

MIXED = "\n".join([
    "SAY Here are the results you asked for",
    'CALL lookup_customer {"id": 7, "fields": ["name", "email", "tier"]}',
    'CALL issue_refund {"amount": 20, "order_id": "o-1", "note": "late delivery"}',
    'CALL issue_refund {"amount": 5000, "order_id": "o-2"}',
    'CALL issue_refund {"amount": 300, "order_id": "o-3"}',
    'CALL lookup_customer {"id": 8}',
])
NONE_KEPT = "\n".join([
    'CALL issue_refund {"amount": 20, "order_id": "o-4"}',
    'CALL wipe_disk {"path": "/var/lib"}',
])


@pytest.fixture
def policy(write_policy: Callable[..., Path], rx: HttpReceiver) -> Path:
    return write_policy({
        "actions": {
            "issue_refund": {
                "executor": "billing", "mode": "require_human_approval",
                "rules": [{"if": {"amount": {"lte": 50}}, "mode": "auto_execute"},
                          {"if": {"amount": {"gt": 1000}}, "mode": "deny"}],
            },
            "wipe_disk": {"mode": "deny"},
        },
        "executors": {"billing": {"type": "webhook", "url": rx.url("/refunds")}},
    })


@pytest.fixture
def gw(policy: Path) -> Iterator[Gateway]:
    gateway = Gateway(policy)
    yield gateway
    gateway.close()


@dataclass
class Assembled:
    """What an app puts together from the chunks it received."""

    chunks: list[Any] = field(default_factory=list)
    content: str = ""
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    tool_call_deltas: int = 0
    finish_reason: str | None = None
    usage_chunks: list[Any] = field(default_factory=list)
    authority: dict[str, Any] | None = None
    # How many webhook deliveries had happened when the first words arrived.
    deliveries_at_first_content: int | None = None

    def add(self, chunk: Any, deliveries: int) -> None:
        self.chunks.append(chunk)
        if chunk.usage is not None:
            self.usage_chunks.append(chunk)
        extra = chunk.model_extra or {}
        if "authority" in extra:
            self.authority = extra["authority"]
        for ch in chunk.choices:
            delta = ch.delta
            if delta.content:
                if self.deliveries_at_first_content is None:
                    self.deliveries_at_first_content = deliveries
                self.content += delta.content
            for tc in delta.tool_calls or []:
                self.tool_call_deltas += 1
                slot = self.tool_calls.setdefault(tc.index, {"id": None, "name": "",
                                                             "arguments": ""})
                slot["id"] = tc.id or slot["id"]
                if tc.function is not None:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
            if ch.finish_reason:
                self.finish_reason = ch.finish_reason

    def kept(self) -> list[tuple[str, Any]]:
        return [(c["name"], json.loads(c["arguments"]))
                for _, c in sorted(self.tool_calls.items())]


def stream_sync(client: AuthorityClient, script: str, rx: HttpReceiver,
                **kw: Any) -> Assembled:
    out = Assembled()
    stream = client.chat.completions.create(model=MODEL, messages=user(script), tools=TOOLS,
                                            stream=True, **kw)
    for chunk in stream:
        out.add(chunk, len(rx.requests))
    return out


def stream_async(policy: Path, script: str, rx: HttpReceiver, **kw: Any) -> Assembled:
    async def run() -> Assembled:
        gateway = Gateway(policy)
        try:
            client = AsyncAuthorityClient(gateway=gateway, max_retries=0)
            out = Assembled()
            stream = await client.chat.completions.create(
                model=MODEL, messages=user(script), tools=TOOLS, stream=True, **kw)
            async for chunk in stream:
                out.add(chunk, len(rx.requests))
            await client.close()
            return out
        finally:
            gateway.close()

    return asyncio.run(run())


def outcome(actions: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(a["action_type"], json.loads(a["tool_call"]["arguments"]), a["mode"],
             a["dispatch"], a["decision"], a["status"], a["code"], a["reason"])
            for a in actions]


def followup_shape(msgs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    shape: list[tuple[Any, ...]] = []
    for m in msgs:
        if m["role"] == "assistant":
            shape.append(("assistant", m["content"], [
                (c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]))
        else:
            body = json.loads(m["content"])
            body.pop("approval_id", None)
            shape.append(("tool", body))
    return shape


def plain_and_streamed(policy: Path, gw: Gateway, rx: HttpReceiver, mode: str,
                       script: str) -> tuple[Any, Any]:
    """One script answered plain and streamed (sync or async) through the same gateway."""
    client = AuthorityClient(gateway=gw, max_retries=0)
    plain = client.chat.completions.create(model=MODEL, messages=user(script), tools=TOOLS)
    streamed = (stream_sync(client, script, rx) if mode == "sync"
                else stream_async(policy, script, rx))
    return plain, streamed


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_streamed_answer_equals_the_plain_answer_for_the_same_script(
        policy: Path, gw: Gateway, rx: HttpReceiver, mode: str) -> None:
    plain, streamed = plain_and_streamed(policy, gw, rx, mode, MIXED)

    message = plain.choices[0].message
    # The model's words, then the gateway's summary (its approval ids differ per answer).
    said = "Here are the results you asked for\n\n[authority] "
    assert streamed.content.startswith(said) and message.content.startswith(said)
    assert _no_ids(streamed.content) == _no_ids(message.content)
    assert streamed.finish_reason == plain.choices[0].finish_reason == "tool_calls"
    assert streamed.kept() == [(c.function.name, json.loads(c.function.arguments))
                               for c in message.tool_calls]
    assert [name for name, _ in streamed.kept()] == ["lookup_customer", "lookup_customer"]
    assert streamed.authority is not None
    assert outcome(streamed.authority["actions"]) == outcome(plain.authority["actions"])
    assert [a["status"] for a in streamed.authority["actions"]] == [
        "allowed", "executed", "denied", "pending_approval", "allowed"]
    assert followup_shape(streamed.authority["followup_messages"]) == followup_shape(
        plain.authority["followup_messages"])
    # The kept calls the app sees are exactly the ones the authority field allows.
    allowed_ids = [a["tool_call"]["id"] for a in streamed.authority["actions"]
                   if a["status"] == "allowed"]
    assert [c["id"] for _, c in sorted(streamed.tool_calls.items())] == allowed_ids
    assert len(rx.requests) == 2  # one auto refund for each answer


def _no_ids(text: str) -> str:
    import re

    return re.sub(r"apr_[0-9a-f]+", "apr_…", text)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_streamed_answer_with_no_call_left_ends_like_the_plain_one(
        policy: Path, gw: Gateway, rx: HttpReceiver, mode: str) -> None:
    plain, streamed = plain_and_streamed(policy, gw, rx, mode, NONE_KEPT)

    assert plain.choices[0].finish_reason == streamed.finish_reason == "stop"
    assert plain.choices[0].message.tool_calls is None
    assert streamed.tool_calls == {} and streamed.tool_call_deltas == 0
    assert streamed.content == plain.choices[0].message.content == (
        "[authority] issue_refund: executed (amount <= 50); wipe_disk: denied (denied_by_policy)")
    assert streamed.authority is not None
    assert outcome(streamed.authority["actions"]) == outcome(plain.authority["actions"])


def test_tool_calls_split_across_many_chunks_are_held_then_emitted_whole(
        gw: Gateway, rx: HttpReceiver, upstream: ScriptedServer) -> None:
    # The upstream really sends the arguments in many small pieces.
    body = {"model": MODEL, "messages": user(MIXED), "tools": TOOLS, "stream": True}
    pieces = 0
    with httpx.stream("POST", f"{upstream.base_url}/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    pieces += len(ch["delta"].get("tool_calls") or [])
    assert pieces > 20

    client = AuthorityClient(gateway=gw, max_retries=0)
    streamed = stream_sync(client, MIXED, rx)
    # One delta per kept call, complete; the withheld calls never appear at all.
    assert streamed.tool_call_deltas == 2
    assert streamed.kept() == [("lookup_customer", {"id": 7, "fields": ["name", "email", "tier"]}),
                               ("lookup_customer", {"id": 8})]
    names = {tc.function.name for c in streamed.chunks for ch in c.choices
             for tc in ch.delta.tool_calls or []}
    assert names == {"lookup_customer"}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_content_arrives_before_the_end_and_the_last_chunk_carries_authority(
        policy: Path, gw: Gateway, rx: HttpReceiver, mode: str) -> None:
    client = AuthorityClient(gateway=gw, max_retries=0)
    streamed = (stream_sync(client, MIXED, rx) if mode == "sync"
                else stream_async(policy, MIXED, rx))

    # The words reached the app while the answer was still open: before any action ran.
    assert streamed.deliveries_at_first_content == 0
    assert len(rx.requests) == 1
    content_at = [i for i, c in enumerate(streamed.chunks)
                  if any(ch.delta.content for ch in c.choices)]
    tools_at = [i for i, c in enumerate(streamed.chunks)
                if any(ch.delta.tool_calls for ch in c.choices)]
    # One per word, as the model sent them, then the gateway's summary with the held calls.
    assert len(content_at) == 8
    assert max(content_at[:7]) < min(tools_at)
    assert streamed.chunks[content_at[7]].choices[0].delta.content.startswith(
        "\n\n[authority] ")
    last = streamed.chunks[-1]
    assert last.choices == [] and (last.model_extra or {}).get("authority") is not None
    assert all("authority" not in (c.model_extra or {}) for c in streamed.chunks[:-1])


def test_usage_is_always_requested_upstream_but_shown_only_when_asked(
        gw: Gateway, rx: HttpReceiver, upstream: ScriptedServer) -> None:
    client = AuthorityClient(gateway=gw, max_retries=0)
    script = "COMPLETION_TOKENS 40\n" + MIXED
    hidden = stream_sync(client, script, rx)
    sent = httpx.get(f"{upstream.base_url.removesuffix('/v1')}/_stats").json()["last_request"]
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert hidden.usage_chunks == []

    shown = stream_sync(client, script, rx, stream_options={"include_usage": True})
    [usage_chunk] = shown.usage_chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 40
    assert shown.chunks.index(usage_chunk) == len(shown.chunks) - 2  # then authority
    # The hidden usage still priced the stream, exactly as the shown one.
    assert hidden.authority is not None and shown.authority is not None
    assert hidden.authority["cost"]["actual_usd"] == shown.authority["cost"]["actual_usd"] > 0


def test_a_streamed_answer_above_the_ceiling_runs_no_action(
        gw: Gateway, rx: HttpReceiver) -> None:
    client = AuthorityClient(gateway=gw, max_retries=0)
    streamed = stream_sync(client, "COMPLETION_TOKENS 1000000\n" + MIXED, rx)
    assert streamed.authority is not None
    assert streamed.authority["code"] == "post_cost_ceiling_exceeded"
    # The one the rules deny anyway keeps its own reason; every other one is stopped.
    assert [(a["status"], a["code"]) for a in streamed.authority["actions"]] == [
        ("denied", "post_cost_ceiling_exceeded"), ("denied", "post_cost_ceiling_exceeded"),
        ("denied", "denied_by_rule"), ("denied", "post_cost_ceiling_exceeded"),
        ("denied", "post_cost_ceiling_exceeded")]
    assert streamed.tool_call_deltas == 0 and streamed.finish_reason == "stop"
    assert streamed.content == (
        "Here are the results you asked for\n\n[authority] "
        "lookup_customer: denied (post_cost_ceiling_exceeded); "
        "issue_refund: denied (post_cost_ceiling_exceeded); "
        "issue_refund: denied (denied_by_rule); "
        "issue_refund: denied (post_cost_ceiling_exceeded); "
        "lookup_customer: denied (post_cost_ceiling_exceeded)")
    assert rx.requests == []


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_replayed_stream_runs_nothing_again(policy: Path, gw: Gateway, rx: HttpReceiver,
                                             upstream: ScriptedServer, mode: str) -> None:
    client = AuthorityClient(gateway=gw, max_retries=0)
    headers = {"Idempotency-Key": "stream-1"}

    def send() -> Assembled:
        if mode == "sync":
            return stream_sync(client, MIXED, rx, extra_headers=headers)
        return stream_async(policy, MIXED, rx, extra_headers=headers)

    first = send()
    served = upstream.chat_requests
    # The app read up to [DONE] and stopped there, as openai's Stream does.
    again = send()
    assert upstream.chat_requests == served
    assert again.authority is not None and first.authority is not None
    # A replay says so in its body, and names the request it replays.
    assert again.authority.pop("original_request_id") == first.authority["request_id"]
    assert again.authority.pop("idempotency") == {"key": "stream-1", "replayed": True}
    assert first.authority.pop("idempotency") == {"key": "stream-1", "replayed": False}
    assert again.authority == first.authority
    assert again.content == first.content and again.kept() == first.kept()
    assert len(rx.requests) == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_closed_early_runs_no_action_and_is_still_audited(
        policy: Path, gw: Gateway, rx: HttpReceiver, tmp_path: Path, mode: str) -> None:
    headers = {"Idempotency-Key": "abandoned-1"}
    kw: dict[str, Any] = {"model": MODEL, "messages": user(MIXED), "tools": TOOLS,
                          "stream": True, "extra_headers": headers}

    def read_a_word_then_close() -> str:
        client = AuthorityClient(gateway=gw, max_retries=0)
        stream = client.chat.completions.create(**kw)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stream.close()
                return str(chunk.choices[0].delta.content)
        raise AssertionError("no content")

    async def aread_a_word_then_close() -> str:
        client = AsyncAuthorityClient(gateway=gw, max_retries=0)
        stream = await client.chat.completions.create(**kw)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                await stream.close()
                return str(chunk.choices[0].delta.content)
        raise AssertionError("no content")

    word = read_a_word_then_close() if mode == "sync" else asyncio.run(aread_a_word_then_close())
    assert word == "Here"
    assert rx.requests == []
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["decision"], e["details"]["code"]) for e in entries] == [
        ("request", "error", "client_closed_stream")]

    # Its claim on the key was released: sending it again runs it, once.
    client = AuthorityClient(gateway=gw, max_retries=0)
    again = stream_sync(client, MIXED, rx, extra_headers=headers)
    assert again.authority is not None
    assert [a["status"] for a in again.authority["actions"]][1] == "executed"
    assert len(rx.requests) == 1
