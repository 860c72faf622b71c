"""The proxy's upstream pool on faults: timeout → 504, refused connection → 502, both audited."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from helpers import ScriptedServer, free_port, user
from proxy_env import AGENT_KEY, start_proxy


def _last_request_entry(directory: Path) -> dict[str, object]:
    lines = (directory / "audit.jsonl").read_text().splitlines()
    entries = [json.loads(x) for x in lines if x.strip()]
    return next(e for e in reversed(entries) if e["event"] == "request")


def test_slow_upstream_is_504(upstream: ScriptedServer, tmp_path: Path) -> None:
    with start_proxy(upstream, tmp_path, overrides={"upstream": {"timeout_s": 0.5}}) as rp:
        c = rp.client(AGENT_KEY)
        with pytest.raises(openai.APIStatusError) as ei:
            c.chat.completions.create(model="gpt-4o-mini", messages=user("SLEEP 2"))
        assert ei.value.status_code == 504 and ei.value.code == "upstream_timeout"
        entry = _last_request_entry(tmp_path)
        assert entry["decision"] == "error"
        # the pool recovers: the next call goes through
        r = c.chat.completions.create(model="gpt-4o-mini", messages=user("SAY fine"))
        assert r.choices[0].message.content == "fine"


def test_refused_upstream_is_502(upstream: ScriptedServer, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with start_proxy(upstream, tmp_path, overrides={"upstream": {"base_url": dead}}) as rp:
        with pytest.raises(openai.APIStatusError) as ei:
            rp.client(AGENT_KEY).chat.completions.create(model="gpt-4o-mini",
                                                         messages=user("hi"))
        assert ei.value.status_code == 502 and ei.value.code == "upstream_error"
        assert _last_request_entry(tmp_path)["decision"] == "error"
