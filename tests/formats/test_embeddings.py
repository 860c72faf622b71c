"""Embeddings through both doors (authority_sdk/formats/embeddings.py): the allowlist, the
input's cost against the ceiling and the budget, the audit log — the same answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import ScriptedServer, write_policy_file

from authority_sdk import AuthorityClient, control
from authority_sdk.demo.processes import ProxyProcess
from authority_sdk.engine import Engine

KEY = "sk-embed-agent-0123"
MODEL = "text-embedding-3-small"


@pytest.fixture(scope="module")
def doors(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("embeddings")
    policy = write_policy_file(folder, upstream, {
        "environments": {"prod": {"models": ["gpt-4o-mini", "text-embedding-3-*"],
                                  "ceilings": {"per_request_usd": 0.0001},
                                  "budget": {"usd": 1.0, "period": "day"}}},
        "keys": [{"name": "embedder", "secret_env": "EMBED_KEY", "environment": "prod"}]})
    engine = Engine(policy)
    proc = ProxyProcess(policy, env={"EMBED_KEY": KEY}, log_path=folder / "proxy.log").start()
    try:
        yield {"sdk": AuthorityClient(gateway=engine, environment="prod", caller="embedder",
                                      max_retries=0),
               "proxy": openai.OpenAI(base_url=proc.url + "/v1", api_key=KEY, max_retries=0),
               "log": folder / "audit.jsonl", "engine": engine}
    finally:
        proc.stop()
        engine.close()


@pytest.mark.parametrize("door", ["sdk", "proxy"])
def test_embeddings_are_priced_audited_and_carry_authority(doors: dict[str, Any],
                                                           door: str) -> None:
    resp = doors[door].embeddings.create(model=MODEL, input=["refund policy", "returns"])
    assert len(resp.data) == 2
    authority = (resp.model_extra or {})["authority"]
    assert authority["actions"] == [] and authority["cost"]["estimate_usd"] > 0
    assert authority["cost"]["actual_usd"] > 0
    entries = [json.loads(x) for x in Path(doors["log"]).read_text().split("\n") if x.strip()]
    [entry] = [e for e in entries if e["request_id"] == authority["request_id"]]
    assert entry["event"] == "request" and entry["details"]["format"] == "embeddings"


@pytest.mark.parametrize("door", ["sdk", "proxy"])
def test_embeddings_refusals_match_chat(doors: dict[str, Any], door: str) -> None:
    client = doors[door]
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.embeddings.create(model="text-search-ada-doc-001", input="x")
    assert ei.value.code == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError) as ei:
        client.embeddings.create(model=MODEL, input=["word " * 2000] * 3)
    assert ei.value.code == "cost_ceiling_exceeded"
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model=MODEL, input=[{"not": "text"}])  # type: ignore[list-item]
    assert bad.value.code == "invalid_request"


def test_the_kill_switch_stops_embeddings_too(doors: dict[str, Any]) -> None:
    control.set_kill_switch(doors["engine"], True, actor="ops", reason="drill")
    try:
        for door in ("sdk", "proxy"):
            with pytest.raises(openai.PermissionDeniedError) as ei:
                doors[door].embeddings.create(model=MODEL, input="x")
            assert ei.value.code == "kill_switch_engaged"
    finally:
        control.set_kill_switch(doors["engine"], False, actor="ops")
