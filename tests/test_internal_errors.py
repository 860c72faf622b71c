"""A failure no rule foresaw — a bug between any two lines of gating an answer — is a 500 in
OpenAI's shape with the request's entry saying so, and nothing of the answer runs
(authority_sdk/engine.py: ``Engine.internal_d``). Faults are injected into the engine's own
steps; both of its paths (sync, and the async one the proxy runs) and streams are covered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import ScriptedServer, audit_entries, tool, user

from authority_sdk import AsyncAuthorityClient, AuthorityClient
from authority_sdk import engine as engine_module
from authority_sdk.audit import verify
from authority_sdk.engine import Engine
from authority_sdk.formats.chat import ChatCompletions

POLICY: dict[str, Any] = {
    "actions": {"send_note": {"executor": "rec", "mode": "auto_execute"}},
    "executors": {"rec": {"type": "python", "target": "sample_actions:record"}},
}
SCRIPT = 'CALL send_note {"text": "hi"}'


def _boom(*_: Any, **__: Any) -> Any:
    raise RuntimeError("a bug")


def _boom_d(*_: Any, **__: Any) -> Any:
    raise RuntimeError("a bug")
    yield  # a step of the engine: it fails when the engine runs it, as a bug in it would


# Where the fault lands: before the decision began (reading the answer), or after it began
# (gating its calls, once the request's entry is queued).
FAULTS: dict[str, tuple[Any, str]] = {
    "before": (ChatCompletions, "read_answer"),
    "after": (engine_module, "gate_d"),
}


def _call(client: Any, stream: bool) -> None:
    if isinstance(client, AsyncAuthorityClient):
        async def go() -> None:
            out = await client.chat.completions.create(
                model="gpt-4o-mini", messages=user(SCRIPT), tools=[tool("send_note")],
                stream=stream)
            if stream:
                async for _ in out:
                    pass
        asyncio.run(go())
        return
    out = client.chat.completions.create(model="gpt-4o-mini", messages=user(SCRIPT),
                                         tools=[tool("send_note")], stream=stream)
    if stream:
        for _ in out:
            pass


# A stream's answer is assembled, not read: its faults sit after the decision began.
CASES = [(where, door, stream) for where in sorted(FAULTS) for door in ("sync", "async")
         for stream in (False, True) if not (where == "before" and stream)]


@pytest.mark.parametrize(("where", "door", "stream"), CASES,
                         ids=[f"{w}-{d}-{'stream' if s else 'plain'}" for w, d, s in CASES])
def test_a_fault_in_gating_is_a_500_on_the_record_and_runs_nothing(
        write_policy: Callable[..., Path], effects: Path, gateways: list[Engine],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, door: str,
        stream: bool) -> None:
    eng = Engine(write_policy(POLICY))
    gateways.append(eng)
    client: Any = (AuthorityClient if door == "sync" else AsyncAuthorityClient)(
        gateway=eng, max_retries=0)
    owner, name = FAULTS[where]
    original = getattr(owner, name)
    monkeypatch.setattr(owner, name, _boom)
    with pytest.raises(openai.APIError) as ei:
        _call(client, stream)
    assert getattr(ei.value, "code", None) == "authority_error"
    assert "internal error in the gateway" in str(ei.value.message)
    if not stream:
        assert isinstance(ei.value, openai.InternalServerError)
        assert ei.value.response.headers["x-should-retry"] == "false"
    log = tmp_path / "audit.jsonl"
    entries = audit_entries(log, "request")
    last = entries[-1]
    assert (last["decision"], last["details"]["code"]) == ("error", "authority_error")
    if where == "after":
        # The decision's own entry went first; the failure is added, named.
        assert [e["decision"] for e in entries] == ["allow", "error"]
        assert "after its decision began (RuntimeError)" in last["reason"]
    else:
        assert len(entries) == 1
    assert not effects.exists() or effects.read_text() == ""
    assert verify(log).ok
    # The gateway keeps serving: the next request, the fault gone, runs as it should.
    monkeypatch.setattr(owner, name, original)
    answer = AuthorityClient(gateway=eng, max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=user(SCRIPT), tools=[tool("send_note")])
    assert json.loads(answer.model_dump_json())["authority"]["actions"][0]["status"] == \
        "executed"


@pytest.mark.parametrize("door", ["sync", "async"])
def test_a_fault_in_admission_is_a_500_on_the_record_and_nothing_is_sent(
        write_policy: Callable[..., Path], effects: Path, gateways: list[Engine],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: ScriptedServer,
        door: str) -> None:
    eng = Engine(write_policy(POLICY))
    gateways.append(eng)
    client: Any = (AuthorityClient if door == "sync" else AsyncAuthorityClient)(
        gateway=eng, max_retries=0)
    original = Engine.begin_d
    monkeypatch.setattr(Engine, "begin_d", _boom_d)
    before = upstream.chat_requests
    with pytest.raises(openai.InternalServerError) as ei:
        _call(client, stream=False)
    assert ei.value.code == "authority_error"
    assert upstream.chat_requests == before
    [entry] = audit_entries(tmp_path / "audit.jsonl", "request")
    assert (entry["decision"], entry["details"]["code"]) == ("error", "authority_error")
    assert "before the request was admitted (RuntimeError)" in entry["reason"]
    assert ei.value.response.headers["x-request-id"] == entry["request_id"]
    monkeypatch.setattr(Engine, "begin_d", original)
    _call(client, stream=False)
    assert upstream.chat_requests == before + 1
