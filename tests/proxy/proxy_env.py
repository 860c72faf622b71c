"""A real proxy (``authority serve`` as a child process) in front of the scripted model.

``start_proxy(upstream, directory, workers=1, overrides=None)`` writes a policy
with the keys below into ``directory`` and starts the proxy on a free loopback
port; use it as a context manager. The stock ``openai`` clients talk to it with
``rp.client(KEY)`` / ``rp.aclient(KEY)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from helpers import BASE_POLICY, ScriptedServer, deep_merge

from authority_sdk.demo.processes import ProxyProcess

AGENT_KEY = "sk-agent-prod-0123456789"
DEV_KEY = "sk-agent-dev-0123456789"
HYBRID_KEY = "sk-agent-and-approver-0123"
APPROVER_KEY = "sk-approver-0123456789"
ADMIN_KEY = "sk-admin-0123456789"
UPSTREAM_KEY = "sk-upstream-never-shown-7f3a9c"

PROXY_ENV = {"PX_AGENT_KEY": AGENT_KEY, "PX_DEV_KEY": DEV_KEY, "PX_HYBRID_KEY": HYBRID_KEY,
             "PX_UPSTREAM_KEY": UPSTREAM_KEY}


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# Keys bound to one environment (and one unbound of each role), for scoping tests.
DEV_APPROVER = "sk-dev-approver-0123456789"
PROD_ADMIN = "sk-prod-admin-0123456789"
DEV_ADMIN = "sk-dev-admin-0123456789"
SCOPED_KEYS = [
    {"name": "support-agent", "secret_env": "PX_AGENT_KEY", "environment": "prod",
     "roles": ["agent"]},
    {"name": "dev-agent", "secret_env": "PX_DEV_KEY", "environment": "dev"},
    {"name": "approver", "secret_sha256": sha(APPROVER_KEY), "roles": ["approver"]},
    {"name": "ops-admin", "secret_sha256": sha(ADMIN_KEY), "roles": ["admin"]},
    {"name": "dev-approver", "secret_sha256": sha(DEV_APPROVER), "environment": "dev",
     "roles": ["approver"]},
    {"name": "prod-admin", "secret_sha256": sha(PROD_ADMIN), "environment": "prod",
     "roles": ["admin"]},
    {"name": "dev-admin", "secret_sha256": sha(DEV_ADMIN), "environment": "dev",
     "roles": ["admin", "approver"]},
]


def write_proxy_policy(upstream: ScriptedServer, directory: Path,
                       overrides: dict[str, Any] | None = None) -> Path:
    data = deep_merge(BASE_POLICY, {
        "upstream": {"base_url": upstream.base_url, "api_key_env": "PX_UPSTREAM_KEY",
                     "timeout_s": 10},
        "state": {"path": str(directory / "state")},
        "audit": {"path": str(directory / "audit.jsonl"), "fsync": False},
        "actions": {
            "send_note": {"executor": "dry", "mode": "require_human_approval"},
            "delete_account": {"mode": "deny"},
        },
        "keys": [
            {"name": "support-agent", "secret_env": "PX_AGENT_KEY", "environment": "prod",
             "roles": ["agent"]},
            {"name": "dev-agent", "secret_env": "PX_DEV_KEY", "environment": "dev"},
            {"name": "agent-approver", "secret_env": "PX_HYBRID_KEY", "environment": "prod",
             "roles": ["agent", "approver"]},
            {"name": "approver", "secret_sha256": sha(APPROVER_KEY), "roles": ["approver"]},
            {"name": "ops-admin", "secret_sha256": sha(ADMIN_KEY), "roles": ["admin"]},
        ],
        "proxy": {"max_body_bytes": 64 * 1024},
    })
    data = deep_merge(data, overrides or {})
    path = directory / "authority.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class RunningProxy:
    process: ProxyProcess
    policy_path: Path
    directory: Path
    upstream: ScriptedServer

    @property
    def url(self) -> str:
        return self.process.url

    def client(self, key: str = AGENT_KEY, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def aclient(self, key: str = AGENT_KEY, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def http(self, method: str, path: str, key: str | None = None,
             **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kw)

    def audit_entries(self) -> list[dict[str, Any]]:
        path = self.directory / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]

    def upstream_stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"http://127.0.0.1:{self.upstream.port}/_stats").json())


@contextmanager
def start_proxy(upstream: ScriptedServer, directory: Path, *, workers: int = 1,
                overrides: dict[str, Any] | None = None,
                serve_args: list[str] | None = None,
                env: dict[str, str] | None = None) -> Iterator[RunningProxy]:
    policy = write_proxy_policy(upstream, directory, overrides)
    proc = ProxyProcess(policy, workers=workers, env={**PROXY_ENV, **(env or {})},
                        log_path=directory / "proxy.log", extra_args=serve_args)
    proc.start()
    try:
        yield RunningProxy(proc, policy, directory, upstream)
    finally:
        proc.stop()
