"""Cost planning: budget windows, and the largest affordable output limit."""

from __future__ import annotations

import calendar
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from helpers import user

from authority_sdk import AuthorityClient
from authority_sdk.costs import budget_counter
from authority_sdk.policy import Budget


@pytest.mark.parametrize(("period", "window"), [
    ("hour", "2026-11-24T05"), ("day", "2026-11-24"), ("month", "2026-11")])
def test_budget_windows_follow_the_period(period: str, window: str) -> None:
    t = calendar.timegm((2026, 11, 24, 5, 59, 59, 0, 0, 0))
    key = budget_counter("env", "prod", Budget(usd=1, period=period), now=t)  # type: ignore[arg-type]
    assert key == f"budget:env:prod:{period}:{window}"
    nxt = budget_counter("env", "prod", Budget(usd=1, period=period),  # type: ignore[arg-type]
                         now=t + (1 if period == "hour" else 86400 * 7))
    assert nxt != key  # a new window starts a fresh counter


def test_prompt_that_leaves_no_room_is_refused(write_policy: Callable[..., Path]) -> None:
    c = AuthorityClient(policy=str(write_policy(
        {"environments": {"prod": {"ceilings": {"per_request_usd": 0.0001}}}})),
        environment="prod", max_retries=0)
    big = "word " * 800  # ~800 prompt tokens = $0.00012 on gpt-4o-mini, over the ceiling
    with pytest.raises(openai.PermissionDeniedError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=user(big))
    assert ei.value.code == "cost_ceiling_exceeded"
    assert "leaves no room" in str(ei.value)
    # a short prompt under the same ceiling runs, with the output limit cut to fit
    r = c.chat.completions.create(model="gpt-4o-mini", messages=user("hi"))
    assert r.model_extra is not None
    assert r.model_extra["authority"]["cost"]["max_output_tokens_set_by_gateway"] is True
