"""Several upstreams routed by model (issue 17, point 1): the policy's ``upstreams:``, its
validation, the reservation that covers a fallback chain, and routing in the SDK (which
rewrites URL and credentials only where the policy's upstream has its key set)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from helpers import BASE_POLICY, ScriptedServer, audit_entries, deep_merge, free_port, user
from servers import HttpReceiver

from authority_sdk import AsyncAuthorityClient, AuthorityClient, authority_of
from authority_sdk.costs import plan_cost
from authority_sdk.errors import BudgetExceeded, PolicyError
from authority_sdk.policy import parse_policy
from authority_sdk.pricing import PriceBook
from authority_sdk.store import open_store
from authority_sdk.tokens import default_counter

KEY_A, KEY_B = "sk-upstream-a-1111", "sk-upstream-b-2222"
APP_KEY = "sk-the-apps-own-key-3333"


@pytest.fixture(scope="module")
def second() -> Iterator[ScriptedServer]:
    """A second scripted model: the other upstream."""
    srv = ScriptedServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UP_KEY_A", KEY_A)
    monkeypatch.setenv("UP_KEY_B", KEY_B)


def _policy(directory: Path, upstreams: list[dict[str, Any]],
            overrides: dict[str, Any] | None = None) -> Path:
    data = deep_merge(BASE_POLICY, {
        "state": {"path": str(directory / "state")},
        "audit": {"path": str(directory / "audit.jsonl"), "fsync": False},
        "environments": {"prod": {"models": ["gpt-4o-mini", "gpt-4.1-*", "gpt-4o"]}},
    })
    data = deep_merge(data, overrides or {})
    data["upstreams"] = upstreams
    path = directory / "authority.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _two(a: str, b: str, **extra_b: Any) -> list[dict[str, Any]]:
    return [{"name": "a", "base_url": a, "api_key_env": "UP_KEY_A", "timeout_s": 5,
             "models": ["gpt-4o-mini"]},
            {"name": "b", "base_url": b, "api_key_env": "UP_KEY_B", "timeout_s": 5,
             "models": ["gpt-4.1-*"], **extra_b}]


def _client(policy: Path, **kw: Any) -> AuthorityClient:
    kw.setdefault("base_url", f"http://127.0.0.1:{free_port()}/v1")  # the app's own: unused
    return AuthorityClient(policy=str(policy), environment="prod", api_key=APP_KEY,
                           max_retries=0, **kw)


def _stats(srv: ScriptedServer) -> tuple[int, dict[str, Any] | None]:
    return srv.model.chat_requests, srv.model.last_request


# -- the policy -------------------------------------------------------------------------


def _errors(data: dict[str, Any]) -> str:
    with pytest.raises(PolicyError) as ei:
        parse_policy(data)
    return str(ei.value)


def test_upstream_is_shorthand_for_one_default_upstream_serving_every_model() -> None:
    pol = parse_policy({"upstream": {"base_url": "http://127.0.0.1:9/v1", "timeout_s": 7}})
    [only] = pol.routes
    assert (only.name, only.models, only.base_url, only.timeout_s) == (
        "default", ["*"], "http://127.0.0.1:9/v1", 7)
    assert pol.route("anything") == (only,)
    assert pol.max_call_s == 7
    assert parse_policy({}).routes[0].base_url == "https://api.openai.com/v1"


def test_first_matching_upstream_wins_and_brings_its_fallbacks_in_order() -> None:
    pol = parse_policy({"upstreams": [
        {"name": "mini", "base_url": "http://127.0.0.1:1/v1", "models": ["gpt-4o-mini"],
         "fallbacks": ["rest", "spare"], "timeout_s": 2},
        {"name": "rest", "base_url": "http://127.0.0.1:2/v1", "models": ["gpt-*"],
         "timeout_s": 3},
        {"name": "spare", "base_url": "http://127.0.0.1:3/v1", "timeout_s": 4},
    ]})
    assert [u.name for u in pol.route("gpt-4o-mini") or ()] == ["mini", "rest", "spare"]
    assert [u.name for u in pol.route("gpt-4o") or ()] == ["rest"]
    assert [u.name for u in pol.route("llama") or ()] == ["spare"]
    assert pol.max_call_s == 2 + 3 + 4


@pytest.mark.parametrize(("data", "message"), [
    ({"upstream": {"base_url": "http://x/v1"}, "upstreams": [{"name": "a"}]},
     "upstream and upstreams: give one or the other"),
    ({"upstreams": []}, "upstreams: list at least one upstream"),
    ({"upstreams": [{"name": "a"}, {"name": "a"}]},
     "upstreams.1.name: 'a' is already the name of upstreams.0"),
    ({"upstreams": [{"name": "a", "fallbacks": ["nope"]}]},
     "upstreams.0.fallbacks.0: unknown upstream 'nope' (defined: a)"),
    ({"upstreams": [{"name": "a", "fallbacks": ["a"]}]},
     "upstreams.0.fallbacks.0: 'a' cannot fall back to itself"),
    ({"upstreams": [{"name": "a", "fallbacks": ["b", "b"]}, {"name": "b"}]},
     "upstreams.0.fallbacks.1: 'b' is listed twice"),
    ({"upstreams": [{"base_url": "http://x/v1"}]}, "upstreams.0.name: required field missing"),
    ({"upstreams": [{"name": "a", "modles": ["*"]}]}, "upstreams.0.modles: unknown field"),
    ({"upstreams": [{"name": "a", "models": []}]}, "upstreams.0.models"),
    ({"upstreams": [{"name": "a", "headers": {"Authorization": "Bearer sk-in-the-file"}}]},
     "credentials come from api_key_env"),
    ({"upstreams": [{"name": "a", "headers": {"x-bad": "a\r\nb"}}]}, "line break"),
    ({"upstreams": [{"name": "a", "base_url": "http://x/v1?api-version=1"}]},
     "put query parameters under query:"),
    ({"upstream": {"base_url": "ftp://x"}}, "upstream.base_url: base_url must be an absolute"),
    ({"upstreams": [{"name": "a b"}]}, "upstreams.0.name"),
    ({"upstreams": [{"name": "a", "api_key_header": "content-length"}]},
     "upstreams.0.api_key_header"),
])
def test_invalid_upstreams_are_refused_with_the_path_and_the_reason(
        data: dict[str, Any], message: str) -> None:
    assert message in _errors(data)


def _example_with_upstreams() -> dict[str, Any]:
    """examples/policy.yaml with its commented `upstreams:` in place of `upstream:`."""
    text = (Path(__file__).parents[1] / "examples" / "policy.yaml").read_text()
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("# upstreams:"))
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:] if line.startswith("# ") else line[1:])
    data: dict[str, Any] = yaml.safe_load(text)
    del data["upstream"]
    data.update(yaml.safe_load("\n".join(block)))
    return data


def test_the_example_policy_s_two_upstreams_are_valid() -> None:
    """examples/policy.yaml keeps `upstream:` active (the demo runs on it) and shows two
    upstreams commented out: uncommented, in place of `upstream:`, they validate."""
    pol = parse_policy(_example_with_upstreams())
    assert len(pol.routes) == 2
    assert any(u.query for u in pol.routes) and any(u.fallbacks for u in pol.routes)


def test_the_demo_points_every_upstream_at_its_local_model(tmp_path: Path) -> None:
    from authority_sdk.demo.config import UPSTREAM_PLACEHOLDER_KEY, write_policy

    base = tmp_path / "base.yaml"
    data = _example_with_upstreams()
    base.write_text(yaml.safe_dump(data))
    (tmp_path / "out").mkdir()
    _, pol, env = write_policy(base, tmp_path / "out", model_url="http://127.0.0.1:9",
                               receiver_url="http://127.0.0.1:8")
    assert {u.base_url for u in pol.routes} == {"http://127.0.0.1:9/v1"}
    assert {k for k, v in env.items() if v == UPSTREAM_PLACEHOLDER_KEY} == {
        "OPENAI_API_KEY", "AZURE_OPENAI_API_KEY"}


# -- the reservation covers the chain ---------------------------------------------------


def _chain_policy(tmp_path: Path, budget_usd: float) -> Any:
    return parse_policy(deep_merge(BASE_POLICY, {
        "state": {"path": str(tmp_path / "state")},
        "environments": {"prod": {"budget": {"usd": budget_usd, "period": "day"},
                                  "ceilings": {"per_request_usd": 1.0}}},
        "upstreams": [{"name": "a", "fallbacks": ["b"]}, {"name": "b"}],
    }))


def test_the_reservation_covers_every_attempt_of_the_chain(tmp_path: Path) -> None:
    pol = _chain_policy(tmp_path, 10.0)
    store = open_store(pol)
    try:
        body = {"model": "gpt-4o-mini", "messages": user("hi"), "max_tokens": 1000}
        plan = plan_cost(pol, "prod", None, "k", body, store=store,
                         prices=PriceBook(pol.pricing), counter=default_counter)
        assert plan.attempts == 2
        assert plan.reserved_usd == pytest.approx(2 * plan.estimate_usd)
    finally:
        store.close()


def test_a_budget_that_pays_for_one_attempt_but_not_the_fallback_refuses(
        tmp_path: Path) -> None:
    pol = _chain_policy(tmp_path, 1.0)
    prices = PriceBook(pol.pricing)
    store = open_store(pol)
    try:
        body = {"model": "gpt-4o-mini", "messages": user("hi"), "max_tokens": 1000}
        one = plan_cost(pol.model_copy(update={"upstreams": None}), "prod", None, "k",
                        dict(body), store=store, prices=prices, counter=default_counter)
        store.close()
        # A fresh store whose budget fits one attempt's estimate, not two.
        pol = _chain_policy(tmp_path / "2", one.estimate_usd * 1.5)
        store = open_store(pol)
        with pytest.raises(BudgetExceeded) as ei:
            plan_cost(pol, "prod", None, "k", dict(body), store=store, prices=prices,
                      counter=default_counter)
        assert "2 attempts" in ei.value.message
    finally:
        store.close()


# -- the SDK ----------------------------------------------------------------------------


def test_the_sdk_routes_by_model_with_each_upstream_s_url_and_key(
        tmp_path: Path, upstream: ScriptedServer, second: ScriptedServer, keys: None) -> None:
    policy = _policy(tmp_path, _two(upstream.base_url, second.base_url))
    c = _client(policy)
    a0, b0 = _stats(upstream)[0], _stats(second)[0]
    r = c.chat.completions.create(model="gpt-4o-mini", messages=user("SAY from a"))
    assert r.choices[0].message.content == "from a"
    assert (_stats(upstream)[0], _stats(second)[0]) == (a0 + 1, b0)
    last = _stats(upstream)[1] or {}
    assert last["headers"]["authorization"] == f"Bearer {KEY_A}"
    r = c.chat.completions.create(model="gpt-4.1-mini", messages=user("SAY from b"))
    assert r.choices[0].message.content == "from b"
    assert (_stats(upstream)[0], _stats(second)[0]) == (a0 + 1, b0 + 1)
    last = _stats(second)[1] or {}
    assert last["headers"]["authorization"] == f"Bearer {KEY_B}"  # never the app's key
    served = [e["details"]["upstream"]
              for e in audit_entries(tmp_path / "audit.jsonl", "request")]
    assert served == ["a", "b"]


def test_without_the_upstream_s_key_the_app_s_own_base_url_and_key_stay(
        tmp_path: Path, upstream: ScriptedServer, second: ScriptedServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UP_KEY_B", raising=False)
    policy = _policy(tmp_path, _two(upstream.base_url, second.base_url))
    c = _client(policy, base_url=upstream.base_url)  # the app talks to the first model
    a0, b0 = _stats(upstream)[0], _stats(second)[0]
    c.chat.completions.create(model="gpt-4.1-mini", messages=user("hi"))
    assert (_stats(upstream)[0], _stats(second)[0]) == (a0 + 1, b0)
    assert (_stats(upstream)[1] or {})["headers"]["authorization"] == f"Bearer {APP_KEY}"
    [entry] = audit_entries(tmp_path / "audit.jsonl", "request")
    assert entry["details"]["upstream"] == "b"  # routed by the policy, sent the app's way


def test_the_sdk_sends_azure_style_query_and_headers(
        tmp_path: Path, upstream: ScriptedServer, keys: None) -> None:
    answer = {"id": "chatcmpl-az", "object": "chat.completion", "created": 0,
              "model": "gpt-4.1-mini", "choices": [{"index": 0, "finish_reason": "stop",
              "message": {"role": "assistant", "content": "from azure"}}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    with HttpReceiver() as az:
        az.reply(200, json=answer)
        policy = _policy(tmp_path, _two(
            upstream.base_url, az.url("/openai/deployments/mini"),
            query={"api-version": "2024-10-21"}, api_key_header="api-key",
            headers={"x-tenant": "t1"}))
        r = _client(policy).chat.completions.create(model="gpt-4.1-mini", messages=user("x"))
        assert r.choices[0].message.content == "from azure"
        [got] = az.requests
        assert got.path == "/openai/deployments/mini/chat/completions?api-version=2024-10-21"
        assert got.header("api-key") == KEY_B and got.header("authorization") is None
        assert got.header("x-tenant") == "t1"


def test_the_sdk_falls_back_on_a_5xx_once_and_audits_the_attempt(
        tmp_path: Path, second: ScriptedServer, keys: None) -> None:
    with HttpReceiver() as bad:
        bad.reply(503, json={"error": {"message": "overloaded"}})
        ups = _two(bad.url("/v1"), second.base_url)
        ups[0]["fallbacks"] = ["b"]
        policy = _policy(tmp_path, ups)
        b0 = _stats(second)[0]
        r = _client(policy).chat.completions.create(model="gpt-4o-mini",
                                                    messages=user("SAY rescued"))
        assert r.choices[0].message.content == "rescued"
        assert len(bad.requests) == 1 and _stats(second)[0] == b0 + 1
    [attempt] = audit_entries(tmp_path / "audit.jsonl", "upstream")
    assert attempt["details"]["upstream"] == "a" and attempt["details"]["status_code"] == 503
    assert attempt["details"]["fallback_to"] == "b"
    assert attempt["request_id"] == authority_of(r).request_id
    [req] = audit_entries(tmp_path / "audit.jsonl", "request")
    assert req["details"]["upstream"] == "b" and req["decision"] == "allow"


def test_the_async_sdk_falls_back_on_a_timeout(
        tmp_path: Path, second: ScriptedServer, keys: None) -> None:
    with HttpReceiver() as slow:
        slow.reply(200, json={}, delay_s=5)
        ups = _two(slow.url("/v1"), second.base_url)
        ups[0].update(fallbacks=["b"], timeout_s=0.5)
        policy = _policy(tmp_path, ups)
        c = AsyncAuthorityClient(policy=str(policy), environment="prod", api_key=APP_KEY,
                                 max_retries=0, base_url=f"http://127.0.0.1:{free_port()}/v1")
        r = asyncio.run(c.chat.completions.create(model="gpt-4o-mini",
                                                  messages=user("SAY late")))
        assert r.choices[0].message.content == "late"
        assert len(slow.requests) == 1
    [attempt] = audit_entries(tmp_path / "audit.jsonl", "upstream")
    assert attempt["details"]["code"] == "upstream_timeout"
    # It may have been billed: charged its estimate, and the request's cost includes it.
    [req] = audit_entries(tmp_path / "audit.jsonl", "request")
    assert attempt["cost_actual_usd"] == pytest.approx(req["cost_estimate_usd"])
    assert req["cost_actual_usd"] > attempt["cost_actual_usd"]


def test_a_model_no_upstream_serves_is_refused_before_anything_is_sent(
        tmp_path: Path, upstream: ScriptedServer, second: ScriptedServer, keys: None) -> None:
    policy = _policy(tmp_path, _two(upstream.base_url, second.base_url))
    a0, b0 = _stats(upstream)[0], _stats(second)[0]
    with pytest.raises(openai.PermissionDeniedError) as ei:
        _client(policy).chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert ei.value.code == "model_not_routed"
    assert "no upstream serves model 'gpt-4o'" in ei.value.message
    assert (_stats(upstream)[0], _stats(second)[0]) == (a0, b0)
    [entry] = audit_entries(tmp_path / "audit.jsonl", "request")
    assert entry["decision"] == "deny" and entry["details"]["code"] == "model_not_routed"
    assert entry["details"]["decided_by"] == "upstreams"


def test_the_sdk_skips_a_fallback_whose_key_it_lacks(
        tmp_path: Path, second: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UP_KEY_A", KEY_A)
    monkeypatch.delenv("UP_KEY_B", raising=False)
    with HttpReceiver() as bad:
        bad.reply(500, json={"error": {"message": "down"}})
        ups = _two(bad.url("/v1"), second.base_url)
        ups[0]["fallbacks"] = ["b"]
        b0 = _stats(second)[0]
        with pytest.raises(openai.InternalServerError):
            _client(_policy(tmp_path, ups)).chat.completions.create(
                model="gpt-4o-mini", messages=user("hi"))
        assert len(bad.requests) == 1 and _stats(second)[0] == b0
    assert audit_entries(tmp_path / "audit.jsonl", "upstream") == []


@pytest.mark.parametrize("library", ["httpx", "httpx2"])
def test_both_http_libraries_route_and_fall_back(
        library: str, tmp_path: Path, second: ScriptedServer, keys: None) -> None:
    """openai 2 runs on httpx, openai 3 on httpx2: the gate rewrites the request in
    either library's classes."""
    from authority_sdk import gated_http_client

    pytest.importorskip(library)
    with HttpReceiver() as bad:
        bad.reply(500, json={"error": {"message": "down"}})
        ups = _two(bad.url("/v1"), second.base_url)
        ups[0]["fallbacks"] = ["b"]
        client = gated_http_client(policy=str(_policy(tmp_path, ups)), environment="prod",
                                   http_library=library)
        with client:
            r = client.post(f"http://127.0.0.1:{free_port()}/v1/chat/completions",
                            headers={"authorization": f"Bearer {APP_KEY}"},
                            json={"model": "gpt-4o-mini", "messages": user("SAY both")})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "both"
        assert len(bad.requests) == 1
        assert bad.requests[0].header("authorization") == f"Bearer {KEY_A}"
        assert (_stats(second)[1] or {})["headers"]["authorization"] == f"Bearer {KEY_B}"
