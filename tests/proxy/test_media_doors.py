"""Images and files are priced before the call, the same through both doors (issue 10, G11).

The issue's case: a $0.0004 budget was spent to $0.003 by one request with 20 high-detail
images, counted as 1,707 tokens. Now the images are counted as the provider bills them and
the request is refused before it reaches the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import ScriptedServer
from media_files import data_url, image_part, png
from proxy_env import start_proxy, write_proxy_policy

from authority_sdk import AuthorityClient
from authority_sdk.costs import budget_counter
from authority_sdk.engine import Gateway

OVERRIDES: dict[str, Any] = {
    "pricing": {"house-vision": {"input_per_1m_usd": 1.0, "output_per_1m_usd": 2.0}},
    "environments": {"prod": {
        "models": ["gpt-4o-mini", "house-vision"],
        "ceilings": {"per_request_usd": 1.0},
        "budget": {"usd": 0.0004, "period": "day"}}},
    "proxy": {"max_body_bytes": 1024 * 1024},
}

TWENTY_IMAGES: list[Any] = [{"role": "user", "content": [
    {"type": "text", "text": "Compare these pictures."},
    *[image_part(data_url(png(1024, 1024)), "high")] * 20]}]
PDF: list[Any] = [{"role": "user", "content": [
    {"type": "text", "text": "Summarise."},
    {"type": "file", "file": {"filename": "q3.pdf", "file_data": data_url(
        b"%PDF-1.7\n" + b"0" * 200_000, "application/pdf")}}]}]


@contextmanager
def sdk_door(upstream: ScriptedServer, directory: Path) -> Iterator[tuple[openai.OpenAI, Path]]:
    policy = write_proxy_policy(upstream, directory, OVERRIDES)
    yield AuthorityClient(policy=str(policy), environment="prod", max_retries=0), policy


@contextmanager
def proxy_door(upstream: ScriptedServer, directory: Path
               ) -> Iterator[tuple[openai.OpenAI, Path]]:
    with start_proxy(upstream, directory, overrides=OVERRIDES) as rp:
        yield rp.client(), rp.policy_path


DOORS: dict[str, Callable[[ScriptedServer, Path], Any]] = {"sdk": sdk_door, "proxy": proxy_door}


@pytest.fixture(params=sorted(DOORS))
def door(request: pytest.FixtureRequest, upstream: ScriptedServer, tmp_path: Path
         ) -> Iterator[tuple[openai.OpenAI, Path]]:
    with DOORS[request.param](upstream, tmp_path) as opened:
        yield opened


def _spent(policy: Path) -> float:
    gw = Gateway(str(policy))
    budget = gw.policy.environments["prod"].budget
    assert budget is not None
    return gw.store.budget_used(budget_counter("env", "prod", budget))


def _last_request_entry(policy: Path) -> dict[str, Any]:
    import json

    audit = policy.parent / "audit.jsonl"
    entries = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    return [e for e in entries if e["event"] == "request"][-1]


def test_twenty_high_detail_images_cannot_overspend_a_tiny_budget(
        door: tuple[openai.OpenAI, Path], upstream: ScriptedServer) -> None:
    client, policy = door
    before = upstream.chat_requests
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.chat.completions.create(model="gpt-4o-mini", messages=TWENTY_IMAGES)
    assert ei.value.code == "budget_exceeded" and ei.value.status_code == 403
    assert upstream.chat_requests == before  # never reached the model
    entry = _last_request_entry(policy)
    assert entry["decision"] == "deny" and entry["details"]["code"] == "budget_exceeded"
    # 20 x (2833 + 4 x 5667) tokens on gpt-4o-mini: the refusal says what it priced.
    assert f"{20 * (2833 + 4 * 5667)} for images" in str(ei.value)
    assert _spent(policy) == 0
    # The same budget pays for the text alone: it is the images that did not fit.
    ok = client.chat.completions.create(model="gpt-4o-mini", messages=[
        {"role": "user", "content": "Compare these pictures."}])
    assert ok.choices[0].message is not None
    assert 0 < _spent(policy) <= 0.0004


def test_a_file_is_priced_by_the_model_input_window(
        door: tuple[openai.OpenAI, Path], upstream: ScriptedServer) -> None:
    client, policy = door
    before = upstream.chat_requests
    # gpt-4o-mini: its 128k-token window x 5667/170 (its image billing factor), ~$0.66.
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.chat.completions.create(model="gpt-4o-mini", messages=PDF)
    assert ei.value.code == "budget_exceeded"
    assert f"prompt ~{math.ceil(128_000 * 5667 / 170)} tokens" in str(ei.value)
    assert "bounding files or other content by the input window" in str(ei.value)
    assert upstream.chat_requests == before
    assert _last_request_entry(policy)["details"]["code"] == "budget_exceeded"
    assert _spent(policy) == 0


def test_a_file_that_nothing_bounds_is_refused_as_unpriceable(
        door: tuple[openai.OpenAI, Path], upstream: ScriptedServer) -> None:
    client, policy = door
    before = upstream.chat_requests
    # Priced in the policy, unknown to the price map: no input window to bound the file.
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="house-vision", messages=PDF)
    assert ei.value.code == "unpriceable_content" and ei.value.status_code == 400
    assert upstream.chat_requests == before
    entry = _last_request_entry(policy)
    assert entry["decision"] == "error" and entry["details"]["code"] == "unpriceable_content"
