"""The finished answer written as the response goes out (``Engine.ahandle(finish_later=
True)``, the proxy's way): only for an answer already held in its claim; a retry of the
key meanwhile waits for it and is replayed (never 409); a finish that never happens leaves
the held answer, which a retry that takes over re-gates — the same calls, not new ones."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import audit_entries, tool, user

from authority_sdk import effects
from authority_sdk.engine import CallContext, Gateway, UpstreamReply
from authority_sdk.wire import Caller, GatewayRequest

pytestmark = pytest.mark.usefixtures("audit_chain_intact")

MODEL = "gpt-4o-mini"
TOOLS = [tool("lookup_customer")]


def _answer(calls: bool) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": "done"}
    if calls:
        message = {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function", "function": {
                "name": "lookup_customer", "arguments": '{"customer_id": "C-1"}'}}]}
    return json.dumps({
        "id": "chatcmpl-later", "object": "chat.completion", "created": 1, "model": MODEL,
        "choices": [{"index": 0, "message": message,
                     "finish_reason": "tool_calls" if calls else "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
    }).encode()


def _request(key: str) -> GatewayRequest:
    body = json.dumps({"model": MODEL, "messages": user("hello"), "tools": TOOLS}).encode()
    return GatewayRequest(caller=Caller(name="app", environment="prod"), body=body,
                          headers={"idempotency-key": key})


class _Upstream:
    def __init__(self, calls: bool) -> None:
        self.calls = calls
        self.sent = 0

    async def send(self, ctx: CallContext) -> UpstreamReply:
        self.sent += 1
        return UpstreamReply(200, {"content-type": "application/json"}, _answer(self.calls))


class _HeldFinish:
    """Holds every finished-answer write (``idem_replace(flush=False)``) until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = asyncio.Event()
        self.waiting = 0
        real = effects.Runtime.aperform
        held = self

        async def aperform(rt: Any, effect: Any) -> Any:
            if (type(effect) is effects.StoreOp and effect.method == "idem_replace"
                    and effect.kwargs.get("flush") is False):
                held.waiting += 1
                await held.release.wait()
            return await real(rt, effect)

        monkeypatch.setattr(effects.Runtime, "aperform", aperform)


@pytest.fixture
def gw(write_policy: Callable[..., Path], gateways: list[Gateway]) -> Gateway:
    g = Gateway(write_policy({}))
    gateways.append(g)
    return g


def _record(gw: Gateway, key: str) -> dict[str, Any] | None:
    return gw.store.idem_get(f"idem:app:prod:{key}")


def test_the_response_comes_before_its_finished_answer_and_a_retry_waits_for_it(
        gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    held = _HeldFinish(monkeypatch)
    up = _Upstream(calls=True)

    async def main() -> tuple[Any, Any, dict[str, Any] | None]:
        first = await gw.ahandle(_request("k-1"), up.send, finish_later=True)
        # Answered while the finished answer is still to be written: the claim holds the
        # answer (kept before the app saw its calls), not the response yet.
        pending = _record(gw, "k-1")
        retry = asyncio.create_task(gw.ahandle(_request("k-1"), up.send, finish_later=True))
        await asyncio.sleep(0.2)
        assert not retry.done()  # waiting for the finish, not refused with 409
        held.release.set()
        again = await retry
        await gw.finished()
        return first, again, pending

    first, again, pending = asyncio.run(main())
    assert first.status_code == 200
    assert pending is not None and pending.get("answer") is not None
    assert "response" not in pending
    assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"
    assert json.loads(again.body)["choices"] == json.loads(first.body)["choices"]
    assert up.sent == 1 and held.waiting == 1
    assert _record(gw, "k-1")["status"] == "done"


def test_an_answer_not_held_is_finished_before_its_response(
        gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without calls nothing of the answer is kept before the response: its finished
    answer (and its settlement) go before it, as without ``finish_later``."""
    held = _HeldFinish(monkeypatch)
    held.release.set()
    up = _Upstream(calls=False)

    async def main() -> Any:
        resp = await gw.ahandle(_request("k-2"), up.send, finish_later=True)
        return resp, _record(gw, "k-2")

    resp, record = asyncio.run(main())
    assert resp.status_code == 200 and record is not None and record["status"] == "done"


def test_a_finish_that_never_came_leaves_the_held_answer_to_a_retry(
        gw: Gateway, tmp_path: Path) -> None:
    """The process died between the response and its finished answer: a retry, once the
    claim's owner is gone, re-gates the held answer — the same call, no second upstream
    call, no new calls for the app."""
    up = _Upstream(calls=True)

    async def main() -> Any:
        first = await gw.ahandle(_request("k-3"), up.send, finish_later=True)
        for task in list(gw._finishing.values()):
            task.cancel()  # as a kill -9 would: nothing after the response is written
        await asyncio.sleep(0)
        return first

    with pytest.MonkeyPatch.context() as mp:
        _HeldFinish(mp)  # never released: the finish never happens
        first = asyncio.run(main())
    record = _record(gw, "k-3")
    assert record is not None and record.get("answer") is not None
    dead = {**record, "owner": {"host": "gone", "pid": 1, "boot": "x", "start": 0.0},
            "lease_until": 1.0}
    assert gw.store.idem_replace("idem:app:prod:k-3", record["claim_id"], dead, ttl_s=600)

    async def retry() -> Any:
        return await gw.ahandle(_request("k-3"), up.send, finish_later=True)

    again = asyncio.run(retry())
    assert up.sent == 1
    assert again.status_code == 200
    assert json.loads(again.body)["choices"][0]["message"]["tool_calls"] == \
        json.loads(first.body)["choices"][0]["message"]["tool_calls"]
    requests = [e for e in audit_entries(tmp_path / "audit.jsonl") if e["event"] == "request"]
    assert len(requests) == 2
