"""What an answer's usage settles a key's token rate limit with (authority_sdk/rate_limits.py)."""

from __future__ import annotations

from typing import Any

import pytest

from authority_sdk.rate_limits import usage_tokens


@pytest.mark.parametrize(("usage", "tokens"), [
    ({"total_tokens": 30, "prompt_tokens": 10}, 30.0),
    ({"prompt_tokens": 10, "completion_tokens": 20}, 30.0),
    ({"input_tokens": 7, "output_tokens": 5}, 12.0),
    # Nothing an answer can really report: the reservation stands instead.
    ({"total_tokens": 10**400}, None),
    ({"total_tokens": float("nan")}, None),
    ({"total_tokens": -5}, None),
    ({"total_tokens": True}, None),
    ({"total_tokens": "30"}, None),
    ({"prompt_tokens": 10**400, "completion_tokens": 4}, 4.0),
    (None, None),
    ([1], None),
])
def test_only_a_count_an_answer_can_report_settles_the_limit(usage: Any,
                                                             tokens: float | None) -> None:
    assert usage_tokens(usage) == tokens
