"""Structured output through a tool call: ``output_tools`` in the policy.

instructor, pydantic-ai, LangChain and LlamaIndex ask for structured output by sending a
tool whose call *is* the answer. Such a call is passed to the app (never executed);
everything else undefined stays denied (fail closed).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import tool, user
from hypothesis import given, settings
from hypothesis import strategies as st

from authority_sdk import AuthorityClient, PolicyError, authority_of
from authority_sdk.modes import resolve_action
from authority_sdk.policy import Policy, parse_policy

OUTPUT = {"output_tools": ["final_result", "final_result_*", "Answer"]}


def _policy(extra: dict[str, Any] | None = None) -> Policy:
    data: dict[str, Any] = {
        "version": 1, "default_environment": "prod",
        "environments": {"prod": {}, "dev": {"force_mode": "simulation_only"},
                         "staging": {"actions": ["lookup"]}},
        "actions": {"lookup": {"mode": "auto_execute"}},
        **OUTPUT, **(extra or {})}
    return parse_policy(data)


@pytest.mark.parametrize("name", ["final_result", "final_result_Weather", "Answer"])
@pytest.mark.parametrize("env", ["prod", "dev", "staging"])
def test_output_tool_is_allowed_for_the_app(name: str, env: str) -> None:
    r = resolve_action(_policy(), env, name, '{"city": "Paris"}')
    assert (r.decision, r.mode, r.dispatch, r.decided_by) == (
        "allow", "auto_execute", "client", "output_tool")
    assert r.executor is None and r.arguments == {"city": "Paris"}
    assert "output tool" in r.reason


def test_kill_switch_still_denies_an_output_tool() -> None:
    r = resolve_action(_policy(), "prod", "final_result", "{}", kill_switch_engaged=True)
    assert r.decision == "deny" and r.code == "kill_switch_engaged"


@pytest.mark.parametrize("args", ["not json", "[1, 2]", "", '"a string"'])
def test_output_tool_arguments_are_still_parsed(args: str) -> None:
    r = resolve_action(_policy(), "prod", "final_result", args)
    assert r.decision == "deny" and r.code == "invalid_arguments"


def test_undefined_tool_denial_says_how_to_allow_it() -> None:
    r = resolve_action(_policy(), "prod", "final_answer", "{}")
    assert r.decision == "deny" and r.code == "action_not_allowed"
    assert "actions:" in r.reason and "output_tools:" in r.reason
    plain = parse_policy({"version": 1, "default_environment": "prod",
                          "environments": {"prod": {}}})
    assert resolve_action(plain, "prod", "final_result", "{}").decision == "deny"  # default


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_only_matching_names_pass(name: str) -> None:
    import fnmatch

    r = resolve_action(_policy(), "prod", name, "{}")
    matches = any(fnmatch.fnmatchcase(name, p) for p in OUTPUT["output_tools"])
    if name == "lookup":
        assert r.decided_by == "action_mode"
    elif matches:
        assert r.decision == "allow" and r.decided_by == "output_tool"
    else:
        assert r.decision == "deny" and r.code == "action_not_allowed"


def test_an_output_tool_cannot_shadow_a_defined_action() -> None:
    with pytest.raises(PolicyError, match=r"output_tools\.0.*lookup"):
        _policy({"output_tools": ["look*"]})


def test_output_tools_is_strict_and_documented_in_the_schema() -> None:
    with pytest.raises(PolicyError):
        _policy({"output_tools": "final_result"})
    with pytest.raises(PolicyError):
        _policy({"output_tool": ["final_result"]})  # a typo is an error, not ignored
    desc = Policy.model_json_schema()["properties"]["output_tools"]["description"]
    assert "final_result" in desc and "never executed" in desc


def test_examples_policy_names_the_common_output_tools() -> None:
    text = (Path(__file__).parents[1] / "examples" / "policy.yaml").read_text()
    for name in ("final_result", "instructor", "LangChain", "LlamaIndex"):
        assert name in text


# -- both doors, end to end with the scripted model ---------------------------------------------

FINAL = tool("final_result", {"city": {"type": "string"}, "temp": {"type": "number"}},
             ["city"])
SCRIPT = 'CALL final_result {"city": "Paris", "temp": 21}'


def _assert_passed_to_app(r: Any) -> None:
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "final_result"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "temp": 21}
    assert r.choices[0].finish_reason == "tool_calls"
    action = authority_of(r).actions[0]
    assert action.status == "allowed" and action.dispatch == "client"
    assert "output tool" in (action.reason or "")


def test_sdk_passes_the_output_tool_call(write_policy: Callable[..., Path]) -> None:
    c = AuthorityClient(policy=str(write_policy(OUTPUT)), environment="prod", max_retries=0)
    _assert_passed_to_app(c.chat.completions.create(
        model="gpt-4o-mini", messages=user(SCRIPT), tools=[FINAL],
        tool_choice={"type": "function", "function": {"name": "final_result"}}))
    dev = AuthorityClient(policy=str(write_policy(OUTPUT)), environment="dev", max_retries=0)
    _assert_passed_to_app(dev.chat.completions.create(  # dev simulates actions, not answers
        model="gpt-4o-mini", messages=user(SCRIPT), tools=[FINAL]))
    with c.chat.completions.stream(model="gpt-4o-mini", messages=user(SCRIPT),
                                   tools=[FINAL]) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.name == "final_result"


def test_sdk_withholds_an_undeclared_output_tool(write_policy: Callable[..., Path]) -> None:
    c = AuthorityClient(policy=str(write_policy()), environment="prod", max_retries=0)
    r = c.chat.completions.create(model="gpt-4o-mini", messages=user(SCRIPT), tools=[FINAL])
    assert not r.choices[0].message.tool_calls
    action = authority_of(r).actions[0]
    assert action.status == "denied" and "output_tools:" in (action.reason or "")
