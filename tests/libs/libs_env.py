"""The libraries built on openai, against both doors, with the scripted model.

Each library's tests run only where it is installed: ``make test-libs`` builds one venv
per openai major from ``constraints/openai{2,3}.txt``. A library missing from the core
venv is skipped with the reason; ``AUTHORITY_REQUIRE_LIBS`` (set by the Makefile for the
library runs: comma-separated top-level module names) turns that skip into a failure, so CI cannot
pass by skipping what it was meant to run.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from helpers import ScriptedServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))

from proxy_env import AGENT_KEY, PROXY_ENV, RunningProxy, write_proxy_policy

from authority_sdk import (
    AsyncAuthorityClient,
    AuthorityClient,
    gated_async_http_client,
    gated_http_client,
)
from authority_sdk.demo.processes import ProxyProcess
from authority_sdk.engine import Gateway

OPENAI_MAJOR = int(openai.__version__.split(".")[0])

LIBS_POLICY: dict[str, Any] = {
    "actions": {
        "tag_ticket": {"executor": "dry", "mode": "auto_execute"},       # the gateway runs it
        "send_note": {"executor": "dry", "mode": "require_human_approval"},  # held
        "delete_account": {"mode": "deny"},                              # denied
        "lookup_customer": {"mode": "auto_execute"},                     # the app runs it
    },
    # structured output through a tool call: pydantic-ai, LangChain, LlamaIndex, instructor
    "output_tools": ["final_result", "final_result_*", "Weather"],
}


def need(module: str) -> Any:
    """Import a library or skip, unless the run requires it (then fail)."""
    required = {m.strip() for m in os.environ.get("AUTHORITY_REQUIRE_LIBS", "").split(",")
                if m.strip()}
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if module.split(".")[0] in required:
            pytest.fail(f"{module} is required in this run (AUTHORITY_REQUIRE_LIBS) but "
                        f"cannot be imported: {exc}", pytrace=False)
        pytest.skip(f"{module} is not installed here (`make test-libs` and `make test-openai2` "
                    "run it in the venv of the openai major it supports)")


@pytest.fixture(scope="session", name="libs_proxy")
def libs_proxy_fixture(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[RunningProxy]:
    directory = tmp_path_factory.mktemp("libs-proxy")
    policy = write_proxy_policy(upstream, directory, LIBS_POLICY)
    proc = ProxyProcess(policy, env=PROXY_ENV, log_path=directory / "proxy.log")
    proc.start(timeout_s=90)  # a fresh venv compiles every module on the first start
    try:
        yield RunningProxy(proc, policy, directory, upstream)
    finally:
        proc.stop()


@dataclass
class Door:
    """One way in: the proxy (stock openai client, base_url changed) or the SDK."""

    name: str
    proxy: RunningProxy
    gateway: Gateway | None = None

    def client(self) -> openai.OpenAI:
        if self.name == "proxy":
            return self.proxy.client(AGENT_KEY)
        return AuthorityClient(gateway=self.gateway, environment="prod", max_retries=0)

    def aclient(self) -> openai.AsyncOpenAI:
        if self.name == "proxy":
            return self.proxy.aclient(AGENT_KEY)
        return AsyncAuthorityClient(gateway=self.gateway, environment="prod", max_retries=0)

    @property
    def base_url(self) -> str:
        return self.proxy.url + "/v1" if self.name == "proxy" else self.proxy.upstream.base_url

    @property
    def api_key(self) -> str:
        return AGENT_KEY if self.name == "proxy" else "unused"

    def http_clients(self) -> tuple[Any, Any]:
        """(sync, async) HTTP clients for libraries that take ``http_client=``."""
        if self.name == "proxy":
            return None, None
        return (gated_http_client(gateway=self.gateway, environment="prod"),
                gated_async_http_client(gateway=self.gateway, environment="prod"))

    def audit(self) -> list[dict[str, Any]]:
        return self.proxy.audit_entries()

    def last_actions(self, n: int = 1) -> list[dict[str, Any]]:
        return [e for e in self.audit() if e["event"] == "action"][-n:]


@pytest.fixture(scope="session", name="sdk_gateway")
def sdk_gateway_fixture(libs_proxy: RunningProxy) -> Iterator[Gateway]:
    # The proxy's own policy, state and audit log: both doors write one record.
    gw = Gateway(str(libs_proxy.policy_path))
    yield gw
    gw.close()


@pytest.fixture(params=["proxy", "sdk"], name="door")
def door_fixture(request: pytest.FixtureRequest, libs_proxy: RunningProxy,
         sdk_gateway: Gateway) -> Door:
    return Door(request.param, libs_proxy, sdk_gateway if request.param == "sdk" else None)


def say(text: str) -> str:
    return f"SAY {text}"


def call(name: str, args: str) -> str:
    return f"CALL {name} {args}"
