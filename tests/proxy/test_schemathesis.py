"""Schemathesis against the real proxy's own OpenAPI document (issue 10, "Also").

Every operation, as every role (agent, dev agent, approver, scoped approver,
admin, scoped admin, no key), with data that fits the schema and data that does
not: never a 5xx, every answer as documented (status, content type, schema),
every error in OpenAI's shape. Bounded by example counts, not by time; marked
``slow`` so CI can run it as a stage of its own (``make test`` runs it too).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import proxy_env as keys
import pytest
import schemathesis
from helpers import ScriptedServer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from proxy_env import SCOPED_KEYS, RunningProxy, start_proxy
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

ROLES: dict[str, str | None] = {
    "agent": keys.AGENT_KEY, "dev-agent": keys.DEV_KEY, "approver": keys.APPROVER_KEY,
    "dev-approver": keys.DEV_APPROVER, "admin": keys.ADMIN_KEY, "prod-admin": keys.PROD_ADMIN,
    "no-key": None}
EXAMPLES = 12



@pytest.fixture(scope="module")
def px(upstream: ScriptedServer, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[RunningProxy]:
    with start_proxy(upstream, tmp_path_factory.mktemp("schemathesis"),
                     overrides={"keys": SCOPED_KEYS}) as rp:
        yield rp


def openai_shaped(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every refusal is ``{"error": {"message", "type", "code"}}``."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err.get("message"), str) and err["message"], body
    assert isinstance(err.get("type"), str) and isinstance(err.get("code"), str), body
    return None


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, openai_shaped]


def operations(px: RunningProxy) -> list[Any]:
    schema = schemathesis.openapi.from_url(px.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def _run(px: RunningProxy, operation: Any, mode: GenerationMode, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    checks = [*CHECKS, negative_data_rejection] if mode == GenerationMode.NEGATIVE else CHECKS

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        case.call_and_validate(base_url=px.url, headers=headers, checks=checks, timeout=30)

    try:
        run()
    except Unsatisfiable:
        # An operation with no parameter and no body has no invalid form to send.
        assert mode == GenerationMode.NEGATIVE


def test_every_operation_as_every_role_with_valid_data(px: RunningProxy) -> None:
    for operation in operations(px):
        for key in ROLES.values():
            _run(px, operation, GenerationMode.POSITIVE, key)


def test_every_operation_as_every_role_with_invalid_data(px: RunningProxy) -> None:
    for operation in operations(px):
        for key in ROLES.values():
            _run(px, operation, GenerationMode.NEGATIVE, key)


def test_the_proxy_is_still_whole_afterwards(px: RunningProxy) -> None:
    from authority_sdk.audit import verify

    assert px.http("GET", "/healthz").status_code == 200
    assert verify(px.directory / "audit.jsonl").ok
    assert "Traceback" not in px.process.output()
