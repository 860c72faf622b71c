"""Request-level decisions through AuthorityClient against a real scripted model."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import ScriptedServer, audit_entries, concurrently, free_port, tool, user

from authority_sdk import AsyncAuthorityClient, AuthorityClient, authority_of
from authority_sdk.audit import verify


@pytest.fixture
def policy_path(write_policy: Callable[..., Path]) -> Path:
    return write_policy()


def client(policy: Path, **kw: Any) -> AuthorityClient:
    kw.setdefault("max_retries", 0)
    return AuthorityClient(policy=str(policy), environment=kw.pop("environment", "prod"), **kw)


def test_allowed_completion_carries_authority_and_is_audited(policy_path: Path) -> None:
    c = client(policy_path)
    r = c.chat.completions.create(model="gpt-4o-mini", messages=user("hello"))
    assert r.choices[0].message.content == "Hello from the scripted model."
    info = authority_of(r)
    assert info.decision == "allow" and info.environment == "prod"
    assert info.cost is not None and info.cost.actual_usd is not None
    assert 0 < info.cost.actual_usd <= info.cost.estimate_usd <= 0.05
    entries = audit_entries(policy_path.parent / "audit.jsonl")
    req = [e for e in entries if e["event"] == "request"]
    assert req[-1]["request_id"] == info.request_id
    assert req[-1]["decision"] == "allow" and req[-1]["model"] == "gpt-4o-mini"
    assert req[-1]["cost_actual_usd"] == pytest.approx(info.cost.actual_usd, rel=1e-6)
    assert req[-1]["policy_hash"] == c.gateway.policy.hash
    assert verify(policy_path.parent / "audit.jsonl").ok


@pytest.mark.parametrize(
    ("overrides", "kwargs", "code", "status"),
    [
        ({}, {"model": "gpt-4o"}, "model_not_allowed", 403),
        ({"environments": {"prod": {"models": ["*"]}}}, {"model": "my-local-thing"},
         "model_price_unknown", 403),
        ({}, {"max_tokens": 200_000}, "cost_ceiling_exceeded", 403),
        ({"environments": {"prod": {"budget": {"usd": 0.0000001, "period": "day"}}}}, {},
         "budget_exceeded", 403),
    ],
)
def test_denials_raise_matching_openai_errors_and_never_reach_upstream(
        write_policy: Callable[..., Path], upstream: ScriptedServer, overrides: dict[str, Any],
        kwargs: dict[str, Any], code: str, status: int) -> None:
    c = client(write_policy(overrides))
    before = upstream.chat_requests
    args = {"model": "gpt-4o-mini", "messages": user("hi"), **kwargs}
    with pytest.raises(openai.PermissionDeniedError) as ei:
        c.chat.completions.create(**args)
    assert ei.value.code == code and ei.value.status_code == status
    assert ei.value.response.headers["x-should-retry"] == "false"
    assert upstream.chat_requests == before
    last = audit_entries(Path(c.gateway.policy.audit_path))[-1]
    assert last["event"] == "request" and last["decision"] == "deny"
    assert last["details"]["code"] == code


def test_policy_price_makes_unknown_model_usable(write_policy: Callable[..., Path]) -> None:
    c = client(write_policy({
        "environments": {"prod": {"models": ["my-local-model"]}},
        "pricing": {"my-local-model": {"input_per_1m_usd": 0.1, "output_per_1m_usd": 0.2}}}))
    r = c.chat.completions.create(model="my-local-model", messages=user("hi"))
    cost = authority_of(r).cost
    assert cost is not None
    usage = r.usage
    assert usage is not None
    assert cost.actual_usd == pytest.approx(
        (usage.prompt_tokens * 0.1 + usage.completion_tokens * 0.2) / 1e6, rel=1e-6)


def test_kill_switch_global_and_per_environment(policy_path: Path) -> None:
    from authority_sdk.control import set_kill_switch

    c = client(policy_path)
    set_kill_switch(c.gateway, True, actor="test", reason="incident 42", environment="prod")
    with pytest.raises(openai.PermissionDeniedError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
    assert ei.value.code == "kill_switch_engaged" and "incident 42" in str(ei.value)
    dev = client(policy_path, environment="dev")
    dev.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))  # other env runs
    set_kill_switch(c.gateway, False, actor="test", environment="prod")
    set_kill_switch(c.gateway, True, actor="test")
    with pytest.raises(openai.PermissionDeniedError):
        dev.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
    set_kill_switch(c.gateway, False, actor="test")
    c.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
    events = [e for e in audit_entries(policy_path.parent / "audit.jsonl")
              if e["event"] == "kill_switch"]
    assert [e["details"]["engaged"] for e in events] == [True, False, True, False]


def test_kill_switch_flipped_by_cli_reaches_a_running_client_process(policy_path: Path) -> None:
    script = f"""
import sys, time, openai
from authority_sdk import AuthorityClient
c = AuthorityClient(policy={str(policy_path)!r}, environment="prod", max_retries=0)
print("ready", flush=True)
for line in sys.stdin:
    try:
        c.chat.completions.create(model="gpt-4o-mini",
                                  messages=[{{"role": "user", "content": "hi"}}])
        print("ok", flush=True)
    except openai.PermissionDeniedError as e:
        print(e.code, flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin and proc.stdout

    def ask() -> str:
        assert proc.stdin and proc.stdout
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    try:
        assert proc.stdout.readline().strip() == "ready"
        assert ask() == "ok"
        cli = [sys.executable, "-m", "authority_sdk.cli", "kill-switch"]
        subprocess.run([*cli, "on", "--policy", str(policy_path), "--reason", "drill"],
                       check=True, capture_output=True)
        assert ask() == "kill_switch_engaged"
        subprocess.run([*cli, "off", "--policy", str(policy_path)], check=True,
                       capture_output=True)
        assert ask() == "ok"
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_idempotent_replay_conflict_and_single_upstream_call(policy_path: Path,
                                                             upstream: ScriptedServer) -> None:
    c = client(policy_path)
    before = upstream.chat_requests
    hdr = {"Idempotency-Key": "order-42"}
    raw1 = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=user("CALL send_note {\"text\": \"hi\"}"),
        tools=[tool("send_note")], extra_headers=hdr)
    raw2 = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=user("CALL send_note {\"text\": \"hi\"}"),
        tools=[tool("send_note")], extra_headers=hdr)
    assert upstream.chat_requests == before + 1
    assert raw2.headers.get("idempotent-replayed") == "true"
    a, b = raw1.parse(), raw2.parse()
    first, again = a.model_dump(), b.model_dump()
    # The replay is the stored answer, and says in its body that it is one.
    assert again["authority"].pop("original_request_id") == first["authority"]["request_id"]
    assert again["authority"]["idempotency"] == {"key": "order-42", "replayed": True}
    again["authority"]["idempotency"]["replayed"] = False
    assert first == again
    assert authority_of(a).actions[0].status == "executed"
    with pytest.raises(openai.UnprocessableEntityError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=user("something else"),
                                  extra_headers=hdr)
    assert ei.value.code == "idempotency_key_reused"
    entries = audit_entries(policy_path.parent / "audit.jsonl", intents=True)
    events = [e["event"] for e in entries]
    # The record before the effect: "executing", then its outcome; the replay runs nothing.
    assert events.count("replay") == 1
    assert [e["details"]["status"] for e in entries if e["event"] == "action"] == [
        "executing", "executed"]


def test_sixteen_threads_one_key_one_upstream_call(policy_path: Path,
                                                   upstream: ScriptedServer) -> None:
    c = client(policy_path)
    before = upstream.chat_requests
    msgs = user("SLEEP 0.5\nSAY done")

    def go() -> str:
        try:
            raw = c.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=msgs, extra_headers={"Idempotency-Key": "k16"})
            return "replayed" if raw.headers.get("idempotent-replayed") else "fresh"
        except openai.ConflictError as e:
            return str(e.code)

    results = concurrently(go)
    assert upstream.chat_requests == before + 1
    assert results.count("fresh") == 1
    assert set(results) <= {"fresh", "replayed", "idempotency_request_in_progress"}
    assert results.count("idempotency_request_in_progress") >= 1
    # once finished, everyone gets the same answer
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=msgs, extra_headers={"Idempotency-Key": "k16"})
    assert raw.headers.get("idempotent-replayed") == "true"


def test_idempotency_survives_restart(policy_path: Path, upstream: ScriptedServer) -> None:
    client(policy_path).chat.completions.create(
        model="gpt-4o-mini", messages=user("hi"), extra_headers={"Idempotency-Key": "r1"})
    before = upstream.chat_requests
    out = subprocess.run([sys.executable, "-c", f"""
from authority_sdk import AuthorityClient
c = AuthorityClient(policy={str(policy_path)!r}, environment="prod", max_retries=0)
raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini",
    messages=[{{"role": "user", "content": "hi"}}], extra_headers={{"Idempotency-Key": "r1"}})
print(raw.headers.get("idempotent-replayed"))
"""], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "true"
    assert upstream.chat_requests == before


def _budget_worker(policy: str, n: int, q: Any) -> None:
    from authority_sdk import AuthorityClient

    c = AuthorityClient(policy=policy, environment="prod", max_retries=0)
    ok = denied = 0
    for _ in range(n):
        try:
            c.chat.completions.create(model="gpt-4o-mini", messages=[
                {"role": "user", "content": "COMPLETION_TOKENS 100\nSAY x"}], max_tokens=100)
            ok += 1
        except openai.PermissionDeniedError as e:
            assert e.code == "budget_exceeded"
            denied += 1
    q.put((ok, denied))


def _budget_policy(write_policy: Callable[..., Path]) -> tuple[Path, float]:
    # gpt-4o-mini: 100 output tokens = $0.00006 + prompt; room for about 8 requests
    p = write_policy({"environments": {"prod": {"budget": {"usd": 0.0006, "period": "day"}}}})
    return p, 0.0006


def _spent(policy: Path) -> float:
    from authority_sdk.costs import budget_counter
    from authority_sdk.engine import Gateway

    gw = Gateway(str(policy))
    env = gw.policy.environments["prod"]
    assert env.budget is not None
    return gw.store.budget_used(budget_counter("env", "prod", env.budget))


def test_budget_holds_under_twenty_threads(write_policy: Callable[..., Path]) -> None:
    policy, limit = _budget_policy(write_policy)
    import queue

    q: queue.Queue[tuple[int, int]] = queue.Queue()
    threads = [threading.Thread(target=_budget_worker, args=(str(policy), 2, q))
               for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    oks = sum(q.get()[0] for _ in threads)
    assert 0 < oks < 40  # some ran, the budget stopped the rest
    assert _spent(policy) <= limit + 1e-12


def test_budget_holds_across_processes(write_policy: Callable[..., Path]) -> None:
    import multiprocessing as mp

    policy, limit = _budget_policy(write_policy)
    # fork: each child starts in milliseconds (spawn re-imports everything: ~25 s on 2 cores).
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_budget_worker, args=(str(policy), 5, q)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=240) for _ in procs]  # spawned children import everything anew
    for p in procs:
        p.join(30)
    oks = sum(r[0] for r in results)
    assert 0 < oks < 20
    assert _spent(policy) <= limit + 1e-12


def test_no_output_limit_gets_largest_affordable_one(write_policy: Callable[..., Path],
                                                     upstream: ScriptedServer) -> None:
    c = client(write_policy({"environments": {"prod": {"ceilings": {"per_request_usd": 0.001}}}}))
    r = c.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
    cost = authority_of(r).cost
    assert cost is not None and cost.max_output_tokens_set_by_gateway
    sent = upstream.model.last_request
    assert sent is not None
    limit = sent["body"]["max_tokens"]
    assert limit == cost.max_output_tokens
    # gpt-4o-mini output is $0.60/1M: about 1,600 tokens fit under $0.001, not the 16k window
    assert 1000 < limit < 1700
    assert cost.estimate_usd is not None and cost.estimate_usd <= 0.001


@pytest.mark.parametrize(("script", "code", "status"), [
    ("FAIL 500", "upstream_error", 502),
    ("GARBAGE", "upstream_malformed_response", 502),
])
def test_upstream_failures_are_audited_and_run_no_action(
        policy_path: Path, script: str, code: str, status: int) -> None:
    c = client(policy_path)
    with pytest.raises(openai.APIStatusError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=user(script),
                                  tools=[tool("send_note")])
    assert ei.value.status_code == status and ei.value.code == code
    entries = audit_entries(policy_path.parent / "audit.jsonl")
    assert entries[-1]["event"] == "request" and entries[-1]["decision"] == "error"
    assert not [e for e in entries if e["event"] == "action"]


def test_upstream_timeout_is_504(write_policy: Callable[..., Path]) -> None:
    c = client(write_policy(), timeout=httpx.Timeout(0.3))
    with pytest.raises(openai.APIStatusError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=user("SLEEP 2"))
    assert ei.value.status_code == 504 and ei.value.code == "upstream_timeout"


def test_upstream_rejection_passes_through(policy_path: Path) -> None:
    c = client(policy_path)
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=user("FAIL 400"))
    assert ei.value.status_code == 400


def test_connection_refused_is_502_and_budget_released(write_policy: Callable[..., Path]) -> None:
    # A real refused connection (nothing listens there): respx sees httpx only, not httpx2.
    policy = write_policy({"environments": {"prod": {"budget": {"usd": 1.0, "period": "day"}}},
                           "upstream": {"base_url": f"http://127.0.0.1:{free_port()}/v1"}})
    c = client(policy)
    with pytest.raises(openai.APIStatusError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
    assert ei.value.status_code == 502 and ei.value.code == "upstream_error"
    assert _spent(policy) == 0.0


@pytest.mark.parametrize("broken", ["audit", "state"])
def test_unwritable_audit_log_or_store_fails_closed(broken: str, write_policy: Callable[..., Path],
                                                    tmp_path: Path,
                                                    upstream: ScriptedServer) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    where = {"audit": {"path": str(blocker / "audit.jsonl")},
             "state": {"path": str(blocker / "state")}}[broken]
    c = client(write_policy({broken: where}))
    before = upstream.chat_requests
    with pytest.raises(openai.APIStatusError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=user("CALL send_note {}"),
                                  tools=[tool("send_note")])
    assert ei.value.status_code == 503 and ei.value.code == "authority_unavailable"
    assert upstream.chat_requests == before


def test_malformed_request_is_400_and_audited(policy_path: Path) -> None:
    c = client(policy_path)
    with pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=[])
    assert ei.value.code == "invalid_request"
    assert audit_entries(policy_path.parent / "audit.jsonl")[-1]["decision"] == "error"


def test_async_client(policy_path: Path) -> None:
    async def main() -> None:
        c = AsyncAuthorityClient(policy=str(policy_path), environment="prod", max_retries=0)
        r = await c.chat.completions.create(
            model="gpt-4o-mini", messages=user("CALL lookup_customer {\"id\": 7}"),
            tools=[tool("lookup_customer")])
        assert authority_of(r).actions[0].status == "allowed"
        assert r.choices[0].message.tool_calls
        with pytest.raises(openai.PermissionDeniedError) as ei:
            await c.chat.completions.create(model="gpt-4o", messages=user("hi"))
        assert ei.value.code == "model_not_allowed"
        rs = await asyncio.gather(*[c.chat.completions.create(
            model="gpt-4o-mini", messages=user(f"SAY n{i}")) for i in range(8)])
        assert [x.choices[0].message.content for x in rs] == [f"n{i}" for i in range(8)]

    asyncio.run(main())


def test_no_openai_path_bypasses_the_gate(policy_path: Path, upstream: ScriptedServer) -> None:
    """Every way openai can send a chat request goes through the gate."""
    from pydantic import BaseModel

    c = client(policy_path)
    denied = {"model": "gpt-4o", "messages": user("hi")}
    before = upstream.chat_requests
    paths: list[Callable[[], Any]] = [
        lambda: c.chat.completions.create(**denied),
        lambda: list(c.chat.completions.create(**denied, stream=True)),
        lambda: c.chat.completions.with_raw_response.create(**denied),
        lambda: c.chat.completions.with_streaming_response.create(**denied).__enter__(),
        lambda: c.with_options(timeout=5).chat.completions.create(**denied),
        lambda: c.copy(max_retries=0).chat.completions.create(**denied),
    ]

    class Answer(BaseModel):
        text: str

    paths.append(lambda: c.chat.completions.parse(**denied, response_format=Answer))

    def via_stream_helper() -> None:
        with c.chat.completions.stream(**denied) as s:
            for _ in s:
                pass

    paths.append(via_stream_helper)
    for p in paths:
        with pytest.raises(openai.PermissionDeniedError):
            p()
    assert upstream.chat_requests == before
    # other POST endpoints are refused, not silently passed through (test_client_paths.py
    # walks every resource of the installed openai)
    with pytest.raises(openai.NotFoundError) as ei:
        c.completions.create(model="gpt-4o-mini", prompt="x")
    assert ei.value.code == "endpoint_not_allowed"
    # embeddings are gated like chat: the allowlist refuses a model it does not name
    with pytest.raises(openai.PermissionDeniedError) as denied_ei:
        c.embeddings.create(model="text-embedding-3-small", input="x")
    assert denied_ei.value.code == "model_not_allowed"
    assert upstream.chat_requests == before


def test_core_modules_do_not_import_openai_or_httpx() -> None:
    code = ("import sys, authority_sdk, authority_sdk.modes, authority_sdk.policy, "
            "authority_sdk.pricing, authority_sdk.tokens, authority_sdk.costs, "
            "authority_sdk.wire, authority_sdk.errors, authority_sdk.types;"
            "print([m for m in ('openai', 'httpx', 'litellm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_public_api_is_exactly_all() -> None:
    # The module's real namespace, in a fresh interpreter, once every lazy name is loaded:
    # a public name missing from __all__ (or one that leaks in) fails here.
    code = ("import types, authority_sdk as m\n"
            "[getattr(m, n) for n in m.__all__]\n"
            "print(sorted(n for n, v in vars(m).items() if not n.startswith('_')"
            " and not isinstance(v, types.ModuleType)))\n"
            "print(sorted(m.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == out[1]
    import authority_sdk

    assert len(set(authority_sdk.__all__)) == len(authority_sdk.__all__)
    assert issubclass(AuthorityClient, openai.OpenAI)
    assert issubclass(AsyncAuthorityClient, openai.AsyncOpenAI)
