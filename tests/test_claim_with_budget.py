"""A keyed request's budget reservation goes with its idempotency claim (one write on
PostgreSQL, one after the other on diskcache): only a request whose claim was taken holds
budget, and every answer a keyed request got before still comes back the same way — on
both state backends, through ``AuthorityClient``."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from helpers import ScriptedServer, StoreBackend, user

from authority_sdk import AsyncAuthorityClient, AuthorityClient, Gateway
from authority_sdk.costs import budget_counter

BUDGET = {"usd": 5.0, "period": "day"}


def _gateway(write_policy: Any, store_backend: StoreBackend, gateways: list[Any],
             budget: dict[str, Any] = BUDGET) -> Gateway:
    gw = Gateway(write_policy({**store_backend.policy_overrides(),
                               "environments": {"prod": {"budget": budget}}}))
    gateways.append(gw)
    return gw


def _used(gw: Gateway) -> float:
    env = gw.policy.environments["prod"]
    assert env.budget is not None
    return gw.store.budget_used(budget_counter("env", "prod", env.budget))


def _ask(c: AuthorityClient, key: str, text: str = "SAY hello") -> Any:
    return c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=user(text), extra_headers={"Idempotency-Key": key})


def test_a_replay_holds_no_budget(write_policy: Any, store_backend: StoreBackend,
                                  gateways: list[Any], upstream: ScriptedServer) -> None:
    gw = _gateway(write_policy, store_backend, gateways)
    c = AuthorityClient(gateway=gw, environment="prod", max_retries=0)
    before = upstream.chat_requests
    first = _ask(c, "order-1")
    spent = _used(gw)
    assert 0 < spent < 0.05  # settled to the answer's actual cost
    again = _ask(c, "order-1")
    assert again.headers.get("idempotent-replayed") == "true"
    assert upstream.chat_requests == before + 1 and _used(gw) == spent
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content


def test_a_refused_request_holds_no_budget_and_an_earlier_answer_still_replays(
        write_policy: Any, store_backend: StoreBackend, gateways: list[Any]) -> None:
    gw = _gateway(write_policy, store_backend, gateways)
    c = AuthorityClient(gateway=gw, environment="prod", max_retries=0)
    _ask(c, "before-the-switch")
    spent = _used(gw)
    gw.store.set_kill_switch("*", True, reason="incident", actor="ops")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        _ask(c, "during-the-switch")
    assert "kill switch" in str(refused.value)
    # Answered before the switch: still the same answer (admission refuses new work only).
    assert _ask(c, "before-the-switch").headers.get("idempotent-replayed") == "true"
    assert _used(gw) == spent
    gw.store.set_kill_switch("*", False, reason=None, actor="ops")
    # The refused request's key was not left held: it runs now.
    assert _ask(c, "during-the-switch").headers.get("idempotent-replayed") != "true"


def test_a_budget_that_cannot_pay_refuses_without_holding_the_key(
        write_policy: Any, store_backend: StoreBackend, gateways: list[Any]) -> None:
    gw = _gateway(write_policy, store_backend, gateways, budget={"usd": 1e-9, "period": "day"})
    c = AuthorityClient(gateway=gw, environment="prod", max_retries=0)
    for _ in range(2):  # the same key again: refused the same way, never "in progress"
        with pytest.raises(openai.APIStatusError) as refused:
            _ask(c, "too-dear")
        assert refused.value.status_code == 403, refused.value
        assert "budget" in str(refused.value)
    assert _used(gw) == 0.0


def test_concurrent_requests_on_one_key_charge_the_budget_once(
        write_policy: Any, store_backend: StoreBackend, gateways: list[Any],
        upstream: ScriptedServer) -> None:
    gw = _gateway(write_policy, store_backend, gateways)
    before = upstream.chat_requests

    async def main() -> list[str]:
        c = AsyncAuthorityClient(gateway=gw, environment="prod", max_retries=0)

        async def one() -> str:
            try:
                raw = await c.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=user("SAY once"),
                    extra_headers={"Idempotency-Key": "shared"})
                return "replayed" if raw.headers.get("idempotent-replayed") else "fresh"
            except openai.ConflictError as exc:
                return str(exc.code)

        try:
            return await asyncio.gather(*(one() for _ in range(12)))
        finally:
            await c.close()

    results = asyncio.run(main())
    assert results.count("fresh") == 1, results
    assert upstream.chat_requests == before + 1
    one_answer = _used(gw)
    assert 0 < one_answer < 0.05  # one request's cost, settled; nobody else held any
