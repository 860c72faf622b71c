"""Rate limits per key (issue 17, point 5), through the real proxy and the SDK: requests
and tokens a minute and requests in flight, shared through the store, refused with 429 and
``Retry-After`` in OpenAI's shape, audited, and nothing sent upstream."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import ScriptedServer, concurrently, user
from proxy_env import AGENT_KEY, DEV_KEY, sha, start_proxy

from authority_sdk import AuthorityClient, RateLimited
from authority_sdk.effects import run_on_store
from authority_sdk.engine import Engine
from authority_sdk.policy import RateLimit
from authority_sdk.rate_limits import admit_d, release_d


def _keys(**limit: Any) -> dict[str, Any]:
    return {"keys": [
        {"name": "support-agent", "secret_env": "PX_AGENT_KEY", "environment": "prod",
         "roles": ["agent"], "rate_limit": limit},
        {"name": "dev-agent", "secret_env": "PX_DEV_KEY", "environment": "dev"},
    ]}


def _ask(px: Any, text: str = "SAY hi", key: str = AGENT_KEY, **body: Any) -> Any:
    return px.http("POST", "/v1/chat/completions", key,
                   json={"model": "gpt-4o-mini", "messages": user(text), **body})


def test_requests_a_minute(upstream: ScriptedServer, tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path, overrides=_keys(requests_per_minute=3)) as px:
        # Not at the end of a minute: the three must share one window.
        if time.time() % 60 > 50:
            time.sleep(61 - time.time() % 60)
        before = px.upstream_stats()["chat_requests"]
        assert [_ask(px).status_code for _ in range(3)] == [200, 200, 200]
        refused = _ask(px)
        assert refused.status_code == 429
        err = refused.json()["error"]
        assert (err["code"], err["type"]) == ("rate_limited", "rate_limit_error")
        assert err["authority"]["decided_by"] == "rate_limit:requests_per_minute"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert "x-should-retry" not in refused.headers  # a retry later can help
        assert px.upstream_stats()["chat_requests"] - before == 3
        # Another key is not limited by this one's window.
        assert _ask(px, key=DEV_KEY).status_code == 200
        [entry] = [e for e in px.audit_entries()
                   if e["request_id"] == err["authority"]["request_id"]]
        assert (entry["decision"], entry["details"]["code"]) == ("deny", "rate_limited")
        assert entry["details"]["decided_by"] == "rate_limit:requests_per_minute"


def test_requests_in_flight(upstream: ScriptedServer, tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path, overrides=_keys(concurrent=2)) as px:
        codes = concurrently(lambda: _ask(px, "SLEEP 1.5\nSAY slow").status_code, n=5)
        assert sorted(codes) == [200, 200, 429, 429, 429]
        # The slots came back when the requests ended (answers, and failures too).
        assert _ask(px, "FAIL 500").status_code == 502
        assert sorted(concurrently(lambda: _ask(px).status_code, n=2)) == [200, 200]


def test_tokens_a_minute(upstream: ScriptedServer, tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path, overrides=_keys(tokens_per_minute=400)) as px:
        if time.time() % 60 > 50:
            time.sleep(61 - time.time() % 60)
        # Worse than the whole window allows: no waiting helps, so no Retry-After.
        big = _ask(px, max_tokens=1000)
        assert big.status_code == 429
        assert big.json()["error"]["code"] == "rate_limit_exceeds_window"
        assert "retry-after" not in big.headers
        # Reserved at the worst case (prompt + max_tokens), settled to what was used: the
        # small answers fit many times in 400 tokens, though each reserves ~110.
        oks = [_ask(px, max_tokens=100).status_code for _ in range(5)]
        assert oks == [200] * 5


def test_a_slot_left_by_a_dead_request_ends_with_its_lease(
        write_policy: Callable[..., Path]) -> None:
    eng = Engine(write_policy())
    try:
        limit = RateLimit(concurrent=1)
        held = run_on_store(admit_d(limit, "k", "req_crashed", None, slot_ttl_s=0.5),
                            eng.store)
        assert held is not None and held.slot is not None  # never released: its owner died
        with pytest.raises(RateLimited):
            run_on_store(admit_d(limit, "k", "req_next", None, slot_ttl_s=0.5), eng.store)
        time.sleep(0.6)
        again = run_on_store(admit_d(limit, "k", "req_later", None, slot_ttl_s=0.5),
                             eng.store)
        assert again is not None
        run_on_store(release_d(again), eng.store)
    finally:
        eng.close()


def test_the_sdk_door_is_limited_by_the_same_rule(write_policy: Callable[..., Path]) -> None:
    path = write_policy({"keys": [{"name": "sdk", "secret_sha256": sha("unused-secret"),
                                   "rate_limit": {"requests_per_minute": 1}}]})
    if time.time() % 60 > 55:
        time.sleep(61 - time.time() % 60)
    client = AuthorityClient(policy=path, caller="sdk", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=user("SAY once"))
    with pytest.raises(openai.RateLimitError) as ei:
        client.chat.completions.create(model="gpt-4o-mini", messages=user("SAY twice"))
    assert ei.value.code == "rate_limited"
    assert 1 <= int(ei.value.response.headers["retry-after"]) <= 60
