"""Pricing from litellm's bundled map, checked against litellm itself as the oracle.

litellm is imported here (once per module, ~5 s) only to compare results; the
package under test never imports it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import concurrently

from authority_sdk.policy import ModelPrice
from authority_sdk.pricing import (
    ModelPricing,
    PriceBook,
    actual_usd,
    estimate_usd,
    max_affordable_output_tokens,
    price_map_path,
)

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before litellm is imported: no fetch


class _Lazy:
    """litellm (the oracle) is imported on first use, not at collection: importing it
    takes seconds, and every xdist worker collects every test module."""

    def __init__(self, module: str) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        import importlib

        return getattr(importlib.import_module(self._module), name)


litellm = _Lazy("litellm")


def pinned_billing_time(at: datetime) -> Any:
    return _Lazy("litellm._internal_context").pinned_billing_time(at)

REPO = Path(__file__).resolve().parents[1]
BOOK = PriceBook()
PEAK = datetime(2026, 3, 5, 2, 15, tzinfo=UTC)  # a Thursday, outside DeepSeek's off-peak hours
OFF_PEAK = datetime(2026, 3, 7, 3, 0, tzinfo=UTC)  # a Saturday: off-peak all day

MODELS = [
    # OpenAI
    "gpt-4o", "gpt-4o-mini", "gpt-4o-2024-05-13", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano",
    "o1", "o3", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-5.1",
    "gpt-5.6",  # above_272k tier
    "gpt-audio",  # audio token rates
    # Anthropic (cache writes), incl. an above_100k tier
    "claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-5", "claude-haiku-5-5",
    # Google: above_200k (AI Studio and Vertex), reasoning + audio rates, above_128k
    "gemini/gemini-2.5-pro", "gemini-2.5-pro", "gemini/gemini-2.5-flash",
    "gemini/gemini-2.5-flash-lite", "gemini/gemma-3-27b-it",
    # Others: Mistral, DeepSeek (off-peak), xAI (inclusive tiers), Qwen (tiered_pricing
    # table, distinct reasoning rate), Fireworks (default cache-read), Perplexity, Groq,
    # MiniMax (above_512k), Azure
    "mistral/mistral-large-latest", "mistral/mistral-small-latest",
    "deepseek/deepseek-chat", "deepseek/deepseek-v4-pro",
    "xai/grok-4.3",
    "dashscope/qwen-plus-2025-07-28", "dashscope/qwen-turbo",
    "fireworks_ai/accounts/fireworks/models/deepseek-v3",
    "perplexity/sonar-deep-research",
    "groq/openai/gpt-oss-120b",
    "minimax/MiniMax-M3",
    "azure/gpt-4o",
]  # fmt: skip

USAGES: dict[str, dict[str, Any]] = {
    "plain": {"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801},
    "openai_cached_reasoning": {
        "prompt_tokens": 5000, "completion_tokens": 800, "total_tokens": 5800,
        "prompt_tokens_details": {"cached_tokens": 3000, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 500, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        },
    },
    "above_200k": {
        "prompt_tokens": 250_000, "completion_tokens": 1000, "total_tokens": 251_000,
        "prompt_tokens_details": {"cached_tokens": 100_000},
        "completion_tokens_details": {"reasoning_tokens": 300},
    },
    "exactly_200k": {"prompt_tokens": 200_000, "completion_tokens": 50, "total_tokens": 200_050},
    "above_272k": {"prompt_tokens": 300_000, "completion_tokens": 40, "total_tokens": 300_040},
    "above_512k": {"prompt_tokens": 600_000, "completion_tokens": 100, "total_tokens": 600_100},
    "above_100k_cache_write": {
        "prompt_tokens": 150_000, "completion_tokens": 50, "total_tokens": 150_050,
        "prompt_tokens_details": {"cached_tokens": 50_000, "cache_creation_tokens": 1000},
    },
    "anthropic_cache_fields": {
        "prompt_tokens": 9000, "completion_tokens": 10, "total_tokens": 9010,
        "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 2000,
    },
    "audio": {
        "prompt_tokens": 700, "completion_tokens": 300, "total_tokens": 1000,
        "prompt_tokens_details": {"audio_tokens": 200, "cached_tokens": 0},
        "completion_tokens_details": {"audio_tokens": 100, "reasoning_tokens": 0},
    },
    "reasoning_outside_completion": {  # xAI's raw shape: total > prompt + completion
        "prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1500,
        "completion_tokens_details": {"reasoning_tokens": 400},
    },
    "deepseek_cache_hit": {
        "prompt_tokens": 3000, "completion_tokens": 500, "total_tokens": 3500,
        "prompt_cache_hit_tokens": 2000, "prompt_cache_miss_tokens": 1000,
    },
    "explicit_text_tokens": {
        "prompt_tokens": 3000, "completion_tokens": 500, "total_tokens": 3500,
        "prompt_tokens_details": {"text_tokens": 2500, "cached_tokens": 1000},
        "completion_tokens_details": {"text_tokens": 500, "reasoning_tokens": 300},
    },
    "empty": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
}  # fmt: skip


def litellm_cost(model: str, usage: dict[str, Any], at: datetime = PEAK) -> float:
    with pinned_billing_time(at):
        prompt, completion = litellm.cost_per_token(
            model=model, usage_object=litellm.Usage(**usage)
        )
    return prompt + completion


def priced(model: str) -> ModelPricing:
    p = BOOK.lookup(model)
    assert p is not None, f"{model} should be priced"
    return p


# ---------------------------------------------------------------------------------------------
# actual_usd == litellm


@pytest.mark.parametrize("usage_name", list(USAGES))
@pytest.mark.parametrize("model", MODELS)
def test_actual_cost_equals_litellm(model: str, usage_name: str) -> None:
    usage = USAGES[usage_name]
    assert actual_usd(priced(model), usage, at=PEAK) == pytest.approx(
        litellm_cost(model, usage), rel=1e-9, abs=1e-15
    )


def test_the_usage_shapes_exercise_distinct_rates() -> None:
    # Guards the table above: if these collapsed to one price, the oracle test would prove little.
    gpt4o = priced("gpt-4o")
    plain = {"prompt_tokens": 5000, "completion_tokens": 800}
    cached = {**plain, "prompt_tokens_details": {"cached_tokens": 3000}}
    assert actual_usd(gpt4o, cached) < actual_usd(gpt4o, plain)
    pro = priced("gemini/gemini-2.5-pro")
    small = actual_usd(pro, {"prompt_tokens": 200_000, "completion_tokens": 0})
    big = actual_usd(pro, {"prompt_tokens": 200_001, "completion_tokens": 0})
    assert big > 1.9 * small  # the whole prompt moved to the above_200k rate
    turbo = priced("dashscope/qwen-turbo")
    thinking = {"prompt_tokens": 10, "completion_tokens": 100,
                "completion_tokens_details": {"reasoning_tokens": 100}}  # fmt: skip
    assert actual_usd(turbo, thinking) > actual_usd(turbo, {"prompt_tokens": 10,
                                                            "completion_tokens": 100})


@pytest.mark.parametrize("model", ["xai/grok-4.3"])
def test_xai_threshold_is_inclusive(model: str) -> None:
    p = priced(model)
    at = actual_usd(p, {"prompt_tokens": 200_000, "completion_tokens": 0, "total_tokens": 200_000})
    below = actual_usd(p, {"prompt_tokens": 199_999, "completion_tokens": 0,
                           "total_tokens": 199_999})  # fmt: skip
    assert at / 200_000 > 1.9 * below / 199_999


def test_off_peak_prices_follow_the_clock() -> None:
    model = "deepseek/deepseek-v4-pro"
    p = priced(model)
    usage = USAGES["deepseek_cache_hit"]
    peak, off = actual_usd(p, usage, at=PEAK), actual_usd(p, usage, at=OFF_PEAK)
    assert off < peak
    assert peak == pytest.approx(litellm_cost(model, usage, PEAK), rel=1e-9)
    assert off == pytest.approx(litellm_cost(model, usage, OFF_PEAK), rel=1e-9)
    # A naive datetime is read as UTC, as litellm reads it.
    assert actual_usd(p, usage, at=OFF_PEAK.replace(tzinfo=None)) == off


SWEEP_PROVIDERS = ("openai", "anthropic", "gemini", "deepseek", "mistral", "xai", "groq")


def test_every_priced_model_of_the_main_providers_matches_litellm() -> None:
    path = price_map_path()
    assert path is not None
    raw = json.loads(path.read_text())
    usage = USAGES["above_200k"] | {
        "prompt_tokens_details": {"cached_tokens": 100_000, "cache_creation_tokens": 5000,
                                  "audio_tokens": 100},
    }  # fmt: skip
    checked = 0
    for key, entry in raw.items():
        if not isinstance(entry, dict) or entry.get("mode") != "chat":
            continue
        if entry.get("litellm_provider") not in SWEEP_PROVIDERS:
            continue
        p = BOOK.lookup(key)
        if p is None:
            continue
        with pinned_billing_time(PEAK):
            ref = sum(litellm.cost_per_token(model=key, custom_llm_provider=p.provider,
                                             usage_object=litellm.Usage(**usage)))  # fmt: skip
        assert actual_usd(p, usage, at=PEAK) == pytest.approx(ref, rel=1e-9, abs=1e-15), key
        checked += 1
    assert checked > 200


# ---------------------------------------------------------------------------------------------
# Name resolution


def test_provider_prefix_is_stripped_when_the_provider_matches() -> None:
    assert BOOK.lookup("openai/gpt-4o") == BOOK.lookup("gpt-4o")
    assert BOOK.lookup("anthropic/claude-sonnet-4-5") == BOOK.lookup("claude-sonnet-4-5")
    assert BOOK.lookup("vertex_ai/gemini-2.5-pro") == BOOK.lookup("gemini-2.5-pro")
    # gpt-4o is OpenAI's: Groq does not sell it at that price.
    assert BOOK.lookup("groq/gpt-4o") is None


@pytest.mark.parametrize(
    "name",
    ["gpt-4o", "openai/gpt-4o", "anthropic/claude-sonnet-4-5", "gemini/gemini-2.5-flash-001",
     "ft:gpt-4o-mini-2024-07-18:my-org::abc123", "openai/ft:gpt-4o-mini-2024-07-18:org:sfx:id",
     "bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0", "azure/gpt-4o"],
)  # fmt: skip
def test_resolved_names_price_like_litellm(name: str) -> None:
    usage = USAGES["openai_cached_reasoning"]
    p = BOOK.lookup(name)
    assert p is not None
    assert actual_usd(p, usage, at=PEAK) == pytest.approx(litellm_cost(name, usage), rel=1e-9)


def test_dated_snapshots_are_their_own_keys_and_never_guessed() -> None:
    assert priced("gpt-4o-2024-05-13").input_cost_per_token != priced("gpt-4o").input_cost_per_token
    assert BOOK.lookup("gpt-4o-2099-01-01") is None


def test_bare_name_prefers_the_provider_key_as_litellm_does() -> None:
    # deepseek-chat and deepseek/deepseek-chat are both listed; litellm reads the latter.
    assert priced("deepseek-chat").model == "deepseek/deepseek-chat"
    assert priced("GPT-4o").model == "gpt-4o"


@pytest.mark.parametrize("name", ["made-up-model", "dall-e-3", "", "openai/", "/gpt-4o"])
def test_unknown_or_unpriced_models_are_none(name: str) -> None:
    assert BOOK.lookup(name) is None


def test_limits_come_from_the_map() -> None:
    p = priced("gpt-4o")
    assert (p.max_input_tokens, p.max_output_tokens) == (128_000, 16_384)
    assert p.source == "litellm" and p.provider == "openai"


# ---------------------------------------------------------------------------------------------
# Policy overrides


def test_policy_overrides_win_and_keep_the_models_limits() -> None:
    book = PriceBook({"gpt-4o": ModelPrice(input_per_1m_usd=1.0, output_per_1m_usd=2.0,
                                           cached_input_per_1m_usd=0.5)})  # fmt: skip
    p = book.lookup("gpt-4o")
    assert p is not None and p.source == "policy"
    assert p.input_cost_per_token == pytest.approx(1e-6)
    assert p.output_cost_per_token == pytest.approx(2e-6)
    assert p.max_output_tokens == 16_384
    usage = {"prompt_tokens": 1000, "completion_tokens": 100,
             "prompt_tokens_details": {"cached_tokens": 400}}  # fmt: skip
    assert actual_usd(p, usage) == pytest.approx(600 * 1e-6 + 400 * 0.5e-6 + 100 * 2e-6)
    assert book.lookup("openai/gpt-4o") == p


def test_policy_prices_a_model_litellm_does_not_know() -> None:
    book = PriceBook({"my-local-model": ModelPrice(input_per_1m_usd=0.1, output_per_1m_usd=0.2)})
    p = book.lookup("my-local-model")
    assert p is not None and p.max_output_tokens is None
    usage = {"prompt_tokens": 1000, "completion_tokens": 500,
             "prompt_tokens_details": {"cached_tokens": 1000}}  # fmt: skip
    # No cached price given: cache hits cost what input costs.
    assert actual_usd(p, usage) == pytest.approx(1000 * 0.1e-6 + 500 * 0.2e-6)
    assert PriceBook().lookup("my-local-model") is None


# ---------------------------------------------------------------------------------------------
# A price map of our own: the loader reads a real file


def write_map(path: Path) -> Path:
    entries = {
        "sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
                        "litellm_provider": "one of …", "mode": "chat"},
        "acme/tiny": {"litellm_provider": "acme", "mode": "chat", "input_cost_per_token": 1e-6,
                      "output_cost_per_token": 2e-6, "cache_read_input_token_cost": 1e-7,
                      "input_cost_per_token_above_1k_tokens": 3e-6,
                      "output_cost_per_token_above_1k_tokens": "4e-6",
                      "input_cost_per_token_above_2k_tokens_priority": 9.0,
                      "max_output_tokens": 1000, "max_input_tokens": 4000, "unused": [1, 2]},
        "acme/tiered": {"litellm_provider": "acme", "mode": "chat", "tiered_pricing": [
            {"range": [0, 100], "input_cost_per_token": 1e-6, "output_cost_per_token": 1e-5},
            {"range": [100, 1000], "input_cost_per_token": 2e-6}]},
        "acme/embed": {"litellm_provider": "acme", "mode": "embedding",
                       "input_cost_per_token": 1e-6},
        "fallback_generalizations": {"rules": []},
    }  # fmt: skip
    path.write_text(json.dumps(entries))
    return path


def test_loader_keeps_only_what_prices_a_chat_call(tmp_path: Path) -> None:
    book = PriceBook(price_map=write_map(tmp_path / "map.json"))
    assert book.lookup("sample_spec") is None
    assert book.lookup("acme/embed") is None  # no output price: unknown, never zero
    tiny = book.lookup("acme/tiny")
    assert tiny is not None
    assert (tiny.max_output_tokens, tiny.max_input_tokens) == (1000, 4000)
    [th] = tiny.thresholds  # the service-tier key is not a standard threshold
    assert (th.above_tokens, th.input, th.output) == (1000.0, 3e-6, 4e-6)
    assert actual_usd(tiny, {"prompt_tokens": 1000, "completion_tokens": 10}) == pytest.approx(
        1000 * 1e-6 + 10 * 2e-6
    )
    assert actual_usd(tiny, {"prompt_tokens": 1001, "completion_tokens": 10}) == pytest.approx(
        1001 * 3e-6 + 10 * 4e-6
    )
    tiered = book.lookup("acme/tiered")
    assert tiered is not None and len(tiered.tiers) == 2
    # The second row names no output rate: the model's own (none here: 0) stands in.
    assert actual_usd(tiered, {"prompt_tokens": 50, "completion_tokens": 10}) == pytest.approx(
        50 * 1e-6 + 10 * 1e-5
    )
    assert actual_usd(tiered, {"prompt_tokens": 500, "completion_tokens": 10}) == pytest.approx(
        500 * 2e-6
    )
    assert book.load_ms() is not None and book.load_ms() >= 0  # type: ignore[operator]


def test_concurrent_first_lookups_load_one_table(tmp_path: Path) -> None:
    book = PriceBook(price_map=write_map(tmp_path / "map.json"))
    results = concurrently(lambda: book.lookup("acme/tiny"), n=8)
    assert len(results) == 8 and all(r is results[0] and r is not None for r in results)


# ---------------------------------------------------------------------------------------------
# Estimates and affordable output


@pytest.mark.parametrize(
    ("model", "prompt", "output"),
    [("gpt-4o", 1000, 500), ("gpt-4o-mini", 20_000, 4096), ("claude-sonnet-4-5", 3000, 1000),
     ("gemini/gemini-2.5-pro", 150_000, 8000), ("gemini/gemini-2.5-pro", 250_000, 8000),
     ("gpt-5.6", 300_000, 1000), ("mistral/mistral-large-latest", 10, 10)],
)  # fmt: skip
def test_estimate_is_the_price_of_the_prompt_plus_the_full_output(
    model: str, prompt: int, output: int
) -> None:
    # For text models the worst case is every output token billed: litellm prices exactly that.
    with pinned_billing_time(PEAK):
        ref = sum(litellm.cost_per_token(model=model, prompt_tokens=prompt,
                                         completion_tokens=output))  # fmt: skip
    assert estimate_usd(priced(model), prompt, output) == pytest.approx(ref, rel=1e-9)


def test_estimate_takes_the_dearest_output_rate() -> None:
    turbo = priced("dashscope/qwen-turbo")  # reasoning costs 2.5x plain output
    all_reasoning = {"prompt_tokens": 100, "completion_tokens": 1000,
                     "completion_tokens_details": {"reasoning_tokens": 1000}}  # fmt: skip
    assert estimate_usd(turbo, 100, 1000) == pytest.approx(actual_usd(turbo, all_reasoning))
    audio = priced("gpt-audio")
    spoken = {"prompt_tokens": 100, "completion_tokens": 1000,
              "completion_tokens_details": {"audio_tokens": 1000}}  # fmt: skip
    assert estimate_usd(audio, 100, 1000) == pytest.approx(actual_usd(audio, spoken))
    deepseek = priced("deepseek/deepseek-v4-pro")  # off-peak is cheaper: the estimate is not
    plain = {"prompt_tokens": 100, "completion_tokens": 1000}
    assert estimate_usd(deepseek, 100, 1000) == pytest.approx(actual_usd(deepseek, plain, at=PEAK))


def test_no_completion_within_the_limits_costs_more_than_its_estimate() -> None:
    path = price_map_path()
    assert path is not None
    models = [k for k, v in json.loads(path.read_text()).items()
              if isinstance(v, dict) and v.get("mode") == "chat"]  # fmt: skip
    checked = 0
    for model in models:
        p = BOOK.lookup(model)
        if p is None or p.provider == "xai":  # xAI bills reasoning outside the output limit
            continue
        for prompt in (1000, 199_999, 250_000, 600_000):
            for out, reasoning, cached in ((800, 0, 0), (800, 800, 0), (800, 300, prompt // 2)):
                usage = {"prompt_tokens": prompt, "completion_tokens": out,
                         "prompt_tokens_details": {"cached_tokens": cached},
                         "completion_tokens_details": {"reasoning_tokens": reasoning}}  # fmt: skip
                for at in (PEAK, OFF_PEAK):
                    assert actual_usd(p, usage, at=at) <= estimate_usd(p, prompt, out) * (
                        1 + 1e-12
                    ), (model, usage)
        checked += 1
    assert checked > 2000


@pytest.mark.parametrize("model", ["gpt-4o", "claude-haiku-4-5", "gemini/gemini-2.5-pro",
                                   "dashscope/qwen-turbo", "deepseek/deepseek-v4-pro"])  # fmt: skip
@pytest.mark.parametrize("budget", [0.0, 1e-4, 0.0123, 0.05, 0.5])
def test_max_affordable_output_is_the_largest_limit_that_fits(model: str, budget: float) -> None:
    p = priced(model)
    prompt = 2000
    n = max_affordable_output_tokens(p, prompt, budget)
    if estimate_usd(p, prompt, 0) > budget:
        assert n == 0
        return
    assert 0 <= n <= (p.max_output_tokens or n)
    assert estimate_usd(p, prompt, n) <= budget
    if n != p.max_output_tokens:
        assert estimate_usd(p, prompt, n + 1) > budget


def test_max_affordable_output_edges() -> None:
    p = priced("gpt-4o")  # 2.5e-6 in, 1e-5 out, at most 16384 out
    assert max_affordable_output_tokens(p, 1000, 1000 * 2.5e-6 - 1e-9) == 0  # prompt alone too dear
    assert max_affordable_output_tokens(p, 1000, 1000 * 2.5e-6 + 100 * 1e-5) == 100
    assert max_affordable_output_tokens(p, 1000, 1e6) == 16_384
    assert max_affordable_output_tokens(p, 1000, math.inf) == 16_384
    assert max_affordable_output_tokens(p, 1000, math.nan) == 0
    free = ModelPricing(model="free", input_cost_per_token=1e-6, output_cost_per_token=0.0,
                        max_output_tokens=777)  # fmt: skip
    assert max_affordable_output_tokens(free, 10, 1.0) == 777
    unlimited = ModelPricing(model="x", input_cost_per_token=0.0, output_cost_per_token=1e-6)
    assert max_affordable_output_tokens(unlimited, 10, 0.001) == 1000


# ---------------------------------------------------------------------------------------------
# Import hygiene


def test_import_does_not_load_litellm_openai_or_httpx() -> None:
    code = (
        "import sys\n"
        "from authority_sdk.pricing import PriceBook, actual_usd, estimate_usd\n"
        "from authority_sdk.tokens import default_counter\n"
        "p = PriceBook().lookup('gpt-4o')\n"
        "assert p is not None and actual_usd(p, {'prompt_tokens': 10}) > 0\n"
        "assert default_counter.count_prompt('gpt-4o', [{'role': 'user', 'content': 'hi'}]) > 0\n"
        "bad = sorted(m for m in ('litellm', 'openai', 'httpx') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_openai_usage_objects_are_accepted() -> None:
    from openai.types import CompletionUsage

    raw = USAGES["openai_cached_reasoning"]
    usage = CompletionUsage.model_validate(raw)
    p = priced("o4-mini")
    assert actual_usd(p, usage) == pytest.approx(actual_usd(p, raw))  # type: ignore[arg-type]
    assert actual_usd(p, {"prompt_tokens": -5, "completion_tokens": 10}) == pytest.approx(
        10 * p.output_cost_per_token
    )
