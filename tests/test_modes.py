"""Mode resolution for one action (DESIGN.md §3) and ``authority policy explain``."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from authority_sdk.modes import (
    Resolution,
    describe_rule,
    lookup,
    match_condition,
    parse_arguments,
    resolve_action,
    rule_matches,
    validate_arguments,
)
from authority_sdk.policy import Policy, Rule, parse_policy

POLICY: dict[str, Any] = {
    "version": 1,
    "default_environment": "dev",
    "defaults": {"mode": "require_human_approval"},
    "environments": {
        "dev": {"force_mode": "simulation_only"},
        "prod": {"default_mode": "auto_execute"},
        "staging": {"actions": ["issue_refund", "lookup_customer"]},
        "locked": {"force_mode": "deny"},
    },
    "actions": {
        "issue_refund": {
            "executor": "billing",
            "mode": "require_human_approval",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "order_id": {"type": "string"},
                    "customer": {"type": "object"},
                },
                "required": ["amount"],
            },
            "rules": [
                {"if": {"amount": {"lte": 50}}, "mode": "auto_execute"},
                {"if": {"amount": {"gt": 1000}}, "mode": "deny"},
                {"if": {"customer.tier": {"eq": "gold"}}, "mode": "auto_execute",
                 "reason": "gold customers are trusted"},
                {"if": {"amount": {"gt": 500}}, "mode": "simulation_only"},
            ],
        },
        "send_email": {"executor": "email", "mode": "auto_execute", "environments": ["dev"]},
        "lookup_customer": {},
        "wipe_disk": {"mode": "deny"},
        "note": {"rules": [{"if": {"text": {"regex": "^DROP"}}, "mode": "deny"}]},
    },
    "executors": {
        "billing": {"type": "webhook", "url": "http://127.0.0.1:9/refunds"},
        "email": {"type": "smtp", "sender": "agent@example.com"},
    },
}


def make_policy(**overrides: Any) -> Policy:
    data = json.loads(json.dumps(POLICY))
    data.update(overrides)
    return parse_policy(data)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return make_policy()


def resolve(policy: Policy, env: str, action: str, args: Any = None, **kw: Any) -> Resolution:
    text = args if isinstance(args, str) else json.dumps({} if args is None else args)
    return resolve_action(policy, env, action, text, **kw)


# ---------------------------------------------------------------- order of the steps


def test_kill_switch_wins_over_everything(policy: Policy) -> None:
    # Even an undefined action with broken arguments: the kill switch is step 1.
    for env, action, args in [("prod", "issue_refund", {"amount": 5}),
                              ("prod", "nope", "not json"), ("dev", "send_email", {})]:
        r = resolve(policy, env, action, args, kill_switch_engaged=True)
        assert (r.mode, r.decision, r.code, r.decided_by) == (
            "deny", "deny", "kill_switch_engaged", "kill_switch")


def test_allowlist_wins_over_validation_and_force_mode(policy: Policy) -> None:
    # send_email is dev-only; prod refuses it before looking at its arguments.
    r = resolve(policy, "prod", "send_email", "{broken")
    assert (r.mode, r.code, r.decided_by) == ("deny", "action_not_allowed", "environment_allowlist")
    assert "prod" in (r.reason or "")
    assert resolve(policy, "dev", "send_email", {}).decision == "allow"


def test_undefined_action_type_is_not_allowed(policy: Policy) -> None:
    r = resolve(policy, "prod", "launch_missiles", {"target": "x"})
    assert (r.decision, r.code) == ("deny", "action_not_allowed")
    assert "not defined" in (r.reason or "")
    assert r.executor is None and r.dispatch == "client"


def test_unknown_environment_fails_closed(policy: Policy) -> None:
    r = resolve(policy, "moon", "lookup_customer", {})
    assert (r.decision, r.code) == ("deny", "action_not_allowed")


def test_environment_action_allowlist(policy: Policy) -> None:
    assert resolve(policy, "staging", "lookup_customer", {}).decision == "allow"
    r = resolve(policy, "staging", "note", {"text": "hi"})
    assert (r.decision, r.code) == ("deny", "action_not_allowed")
    assert "environment's actions" in (r.reason or "")
    # The action's own environments list and the environment's allowlist both apply.
    r = resolve(policy, "staging", "send_email", {})
    assert r.code == "action_not_allowed"


def test_validation_wins_over_force_mode_and_rules(policy: Policy) -> None:
    r = resolve(policy, "dev", "issue_refund", {"amount": "five"})
    assert (r.mode, r.code, r.decided_by) == ("deny", "invalid_arguments", "validation")
    assert "amount" in (r.reason or "") and "number" in (r.reason or "")
    assert r.arguments == {"amount": "five"}  # valid JSON: kept for the audit
    r = resolve(policy, "dev", "issue_refund", {})
    assert r.code == "invalid_arguments" and "required" in (r.reason or "")


def test_force_mode_wins_over_rules_and_action_mode(policy: Policy) -> None:
    # In prod, amount 10 would be auto_execute (rule 0) and 5000 a deny (rule 1).
    for amount in (10, 5000):
        r = resolve(policy, "dev", "issue_refund", {"amount": amount})
        assert (r.mode, r.decision, r.code, r.decided_by) == (
            "simulation_only", "allow", None, "force_mode")
        assert r.reason == "environment dev forces simulation_only"


def test_force_mode_deny_is_a_policy_denial(policy: Policy) -> None:
    r = resolve(policy, "locked", "lookup_customer", {})
    assert (r.decision, r.code, r.decided_by) == ("deny", "denied_by_policy", "force_mode")


def test_rules_first_match_wins(policy: Policy) -> None:
    cases = [
        ({"amount": 50}, "auto_execute", "rule[0]", "amount <= 50"),
        ({"amount": 1000.5}, "deny", "rule[1]", "amount > 1000"),
        # Rule 2 (gold) and rule 3 (> 500) both match 600: the earlier one wins.
        ({"amount": 600, "customer": {"tier": "gold"}}, "auto_execute", "rule[2]",
         "gold customers are trusted"),
        ({"amount": 600, "customer": {"tier": "silver"}}, "simulation_only", "rule[3]",
         "amount > 500"),
        # Rule 0 beats the gold rule.
        ({"amount": 1, "customer": {"tier": "gold"}}, "auto_execute", "rule[0]", "amount <= 50"),
    ]
    for args, mode, by, reason in cases:
        r = resolve(policy, "prod", "issue_refund", args)
        assert (r.mode, r.decided_by, r.reason) == (mode, by, reason), args
        assert r.dispatch == "gateway" and r.executor == "billing"


def test_deny_rule_code(policy: Policy) -> None:
    r = resolve(policy, "prod", "issue_refund", {"amount": 5000})
    assert (r.decision, r.code) == ("deny", "denied_by_rule")
    r = resolve(policy, "prod", "note", {"text": "DROP TABLE users"})
    assert (r.decision, r.code, r.decided_by) == ("deny", "denied_by_rule", "rule[0]")


def test_action_mode_wins_over_environment_default(policy: Policy) -> None:
    # prod's default is auto_execute; the action's own mode says approval.
    r = resolve(policy, "prod", "issue_refund", {"amount": 200})
    assert (r.mode, r.decided_by) == ("require_human_approval", "action_mode")
    r = resolve(policy, "prod", "wipe_disk", {})
    assert (r.decision, r.code, r.decided_by) == ("deny", "denied_by_policy", "action_mode")


def test_environment_default_then_global_default(policy: Policy) -> None:
    r = resolve(policy, "prod", "lookup_customer", {})
    assert (r.mode, r.decided_by, r.dispatch) == ("auto_execute", "environment_default", "client")
    r = resolve(policy, "staging", "lookup_customer", {})
    assert (r.mode, r.decided_by) == ("require_human_approval", "global_default")
    p = make_policy(defaults={"mode": "deny"})
    r = resolve(p, "staging", "lookup_customer", {})
    assert (r.decision, r.code, r.decided_by) == ("deny", "denied_by_policy", "global_default")


def test_global_default_is_approval_when_unset() -> None:
    p = parse_policy({"environments": {"dev": {}}, "actions": {"a": {}}})
    r = resolve(p, "dev", "a", {})
    assert (r.mode, r.decision, r.decided_by) == (
        "require_human_approval", "allow", "global_default")


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ('{"amount": NaN}', "not valid JSON"),
    ('{"amount": 10, "amount": 5000}', "duplicate key"),
    ("[1, 2]", "JSON object, got array"),
    ('"text"', "JSON object, got string"),
    ("42", "JSON object, got number"),
    ("null", "JSON object, got null"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
])
def test_invalid_json_arguments(policy: Policy, text: str, fragment: str) -> None:
    r = resolve_action(policy, "prod", "lookup_customer", text)
    assert (r.decision, r.code, r.decided_by) == ("deny", "invalid_arguments", "validation")
    assert fragment in (r.reason or "")
    assert r.arguments is None


def test_parse_arguments() -> None:
    assert parse_arguments('{"a": {"b": [1, 2.5, true, null]}}') == (
        {"a": {"b": [1, 2.5, True, None]}}, None)
    assert parse_arguments("{}") == ({}, None)
    args, err = parse_arguments("[]")
    assert args is None and err is not None


def test_request_tool_schema_is_used_without_policy_schema(policy: Policy) -> None:
    schema = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
              "additionalProperties": False}
    assert resolve(policy, "prod", "lookup_customer", {"id": 7}, tool_schema=schema).decision \
        == "allow"
    for bad in ({"id": "7"}, {}, {"id": 7, "extra": 1}):
        r = resolve(policy, "prod", "lookup_customer", bad, tool_schema=schema)
        assert r.code == "invalid_arguments", bad
    # Without any schema, any object passes validation.
    assert resolve(policy, "prod", "lookup_customer", {"id": "7"}).decision == "allow"


def test_policy_schema_wins_over_request_schema(policy: Policy) -> None:
    # The request's schema would accept a string amount and reject a number; the policy's rules.
    lax = {"type": "object", "properties": {"amount": {"type": "string"}}}
    r = resolve(policy, "prod", "issue_refund", {"amount": "lots"}, tool_schema=lax)
    assert r.code == "invalid_arguments"
    r = resolve(policy, "prod", "issue_refund", {"amount": 20}, tool_schema=lax)
    assert (r.mode, r.decided_by) == ("auto_execute", "rule[0]")


def test_invalid_schema_denies(policy: Policy) -> None:
    r = resolve(policy, "prod", "lookup_customer", {}, tool_schema={"type": "banana"})
    assert r.code == "invalid_arguments" and "schema is invalid" in (r.reason or "")


def test_remote_ref_is_never_fetched(policy: Policy) -> None:
    # jsonschema's default registry would fetch this (and then allow); the hot path does no I/O,
    # so the $ref is unresolvable and the action is denied.
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body = b'{"type": "object"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = {"$ref": f"http://127.0.0.1:{server.server_port}/schema.json"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            r = resolve(policy, "prod", "lookup_customer", {}, tool_schema=remote)
    finally:
        server.shutdown()
        server.server_close()
    assert r.code == "invalid_arguments" and "schema is invalid" in (r.reason or "")
    assert hits == []


def test_schema_draft_declared_by_schema() -> None:
    # Draft 4's exclusiveMaximum is a boolean modifier; in 2020-12 it is a number.
    d4 = {"$schema": "http://json-schema.org/draft-04/schema#",
          "properties": {"n": {"maximum": 5, "exclusiveMaximum": True}}}
    assert validate_arguments({"n": 4}, d4) is None
    assert validate_arguments({"n": 5}, d4) is not None
    # The same schema is invalid under the default draft (exclusiveMaximum must be a number).
    no_draft = {"properties": {"n": {"maximum": 5, "exclusiveMaximum": True}}}
    assert "schema is invalid" in (validate_arguments({"n": 4}, no_draft) or "")


def test_validation_message_names_nested_path() -> None:
    schema = {"type": "object", "properties": {"customer": {
        "type": "object", "properties": {"tier": {"enum": ["gold", "silver"]}}}}}
    msg = validate_arguments({"customer": {"tier": "platinum"}}, schema)
    assert msg is not None and msg.startswith("customer.tier:")
    # Equal schemas with keys in another order share one compiled validator and one answer.
    reordered = json.loads(json.dumps(schema, sort_keys=True))
    assert validate_arguments({"customer": {"tier": "platinum"}}, reordered) == msg


# ---------------------------------------------------------------- matchers


ARGS: dict[str, Any] = {
    "amount": 100, "price": 9.5, "flag": True, "name": "alice@example.com", "none": None,
    "tags": ["a", "b"], "customer": {"tier": "gold", "address": {"country": "FR"}},
    "items": [{"sku": "X-1"}, {"sku": "Y-2"}], "dotted.key": "flat",
}


@pytest.mark.parametrize("field, conds, expected", [
    ("amount", {"eq": 100}, True), ("amount", {"eq": 100.0}, True), ("amount", {"eq": 99}, False),
    ("amount", {"eq": "100"}, False), ("flag", {"eq": True}, True), ("flag", {"eq": 1}, False),
    ("amount", {"eq": True}, False), ("none", {"eq": None}, True),
    ("tags", {"eq": ["a", "b"]}, True), ("tags", {"eq": ["b", "a"]}, False),
    ("amount", {"ne": 5}, True), ("amount", {"ne": 100}, False), ("name", {"ne": 5}, True),
    ("flag", {"ne": 1}, True),
    ("amount", {"lt": 101}, True), ("amount", {"lt": 100}, False),
    ("amount", {"lte": 100}, True), ("amount", {"lte": 99.9}, False),
    ("amount", {"gt": 99.9}, True), ("amount", {"gt": 100}, False),
    ("amount", {"gte": 100}, True), ("amount", {"gte": 100.1}, False),
    ("price", {"gt": 9, "lt": 10}, True), ("price", {"gt": 9, "lt": 9.4}, False),
    ("amount", {"in": [1, 100]}, True), ("amount", {"in": [1, 2]}, False),
    ("flag", {"in": [1]}, False), ("name", {"in": ["alice@example.com"]}, True),
    ("amount", {"not_in": [1, 2]}, True), ("amount", {"not_in": [100]}, False),
    ("flag", {"not_in": [1, 0]}, True),
    ("name", {"glob": "*@example.com"}, True), ("name", {"glob": "*@EXAMPLE.com"}, False),
    ("name", {"glob": "bob*"}, False), ("amount", {"glob": "1*"}, False),
    ("name", {"regex": r"@example\.(com|org)$"}, True), ("name", {"regex": "^bob"}, False),
    ("name", {"regex": "example"}, True),  # search, not fullmatch
    ("amount", {"regex": "1"}, False), ("tags", {"regex": "a"}, False),
    ("customer.tier", {"eq": "gold"}, True), ("customer.address.country", {"in": ["FR"]}, True),
    ("customer.address.city", {"eq": "Paris"}, False), ("items.1.sku", {"glob": "Y-*"}, True),
    ("items.2.sku", {"eq": "Z"}, False), ("amount.x", {"eq": 1}, False),
    ("dotted.key", {"eq": "flat"}, False),  # dots always mean nesting
])
def test_match_condition(field: str, conds: dict[str, Any], expected: bool) -> None:
    assert match_condition(ARGS, field, conds) is expected


@pytest.mark.parametrize("field, conds", [
    ("name", {"gt": 5}), ("name", {"lte": 5}), ("flag", {"gt": 0}), ("flag", {"lt": 2}),
    ("none", {"gte": 0}), ("tags", {"lt": 5}), ("customer", {"gt": 0}), ("amount", {"gt": "5"}),
])
def test_type_mismatch_in_ordered_comparison_never_matches(field: str,
                                                           conds: dict[str, Any]) -> None:
    assert match_condition(ARGS, field, conds) is False


@pytest.mark.parametrize("op, operand", [
    ("eq", 1), ("ne", 1), ("lt", 1), ("gt", 1), ("in", [1]), ("not_in", [1]), ("glob", "*"),
    ("regex", ".*"),
])
def test_missing_field_never_matches(op: str, operand: Any) -> None:
    # Fail safe: ne / not_in on a missing field do not match either.
    assert match_condition(ARGS, "missing", {op: operand}) is False
    assert match_condition(ARGS, "customer.missing", {op: operand}) is False


def test_matchers_never_raise_on_odd_input() -> None:
    assert match_condition(ARGS, "name", {"regex": "(unclosed"}) is False
    assert match_condition(ARGS, "amount", {"nonsense": 1}) is False
    assert match_condition(ARGS, "amount", {}) is False
    assert match_condition(ARGS, "amount", {"in": "not a list"}) is False


def test_rule_conditions_all_hold() -> None:
    rule = Rule.model_validate({"if": {"amount": {"gte": 100}, "customer.tier": {"eq": "gold"}},
                                "mode": "auto_execute"})
    assert rule_matches(rule, ARGS)
    assert not rule_matches(rule, {**ARGS, "amount": 99})
    assert not rule_matches(rule, {**ARGS, "customer": {"tier": "silver"}})
    assert not rule_matches(rule, {"amount": 100})
    assert describe_rule(rule) == 'amount >= 100 and customer.tier == "gold"'


def test_describe_rule_symbols() -> None:
    rule = Rule.model_validate({"if": {"a": {"in": [1, "x"]}, "b": {"not_in": [2]},
                                       "c": {"glob": "x*"}, "d": {"regex": "^y"},
                                       "e": {"ne": None}, "f": {"lt": 3}}, "mode": "deny"})
    assert describe_rule(rule) == ('a in [1, "x"] and b not in [2] and c matches glob "x*" '
                                   'and d matches regex "^y" and e != null and f < 3')


def test_lookup() -> None:
    assert lookup(ARGS, "customer.address.country") == (True, "FR")
    assert lookup(ARGS, "none") == (True, None)
    assert lookup(ARGS, "items.0") == (True, {"sku": "X-1"})
    assert lookup(ARGS, "items.-1.sku") == (False, None)
    assert lookup(ARGS, "nope") == (False, None)


def test_decision_module_imports_no_http_stack() -> None:
    # jsonschema too: it is imported on the first validation, not at import time.
    code = ("import sys, authority_sdk.modes;"
            "print(sorted(x for x in ('openai', 'httpx', 'typer', 'rich', 'fastapi', 'jsonschema')"
            " if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- explain CLI


@pytest.fixture()
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "authority.yaml"
    path.write_text(yaml.safe_dump(POLICY), encoding="utf-8")
    return path


def run_explain(policy_file: Path, *extra: str) -> Any:
    from authority_sdk.cli.policy_cmd import app

    return CliRunner().invoke(app, ["explain", "--policy", str(policy_file), *extra])


def test_explain_rule_decides(policy_file: Path) -> None:
    res = run_explain(policy_file, "--environment", "prod", "--action", "issue_refund",
                      "--args", '{"amount": 600, "customer": {"tier": "gold"}}')
    assert res.exit_code == 0, res.output
    out = res.output
    assert "mode:        auto_execute" in out
    assert "decision:    allow" in out
    assert "gateway (executor: billing)" in out
    assert "decided by:  rule[2]" in out
    assert "reason:      gold customers are trusted" in out
    lines = out.splitlines()
    rule_lines = [ln for ln in lines if ln.strip().startswith("rule[")]
    assert len(rule_lines) == 4
    assert rule_lines[0].endswith("no match") and "amount <= 50" in rule_lines[0]
    assert rule_lines[2].endswith("matched  <- decides")
    assert "an earlier rule decided" in rule_lines[3]
    assert "      fails: amount <= 50 (amount = 600)" in out


def test_explain_deny_exits_zero(policy_file: Path) -> None:
    res = run_explain(policy_file, "-e", "prod", "-a", "issue_refund", "--args", '{"amount": 5000}')
    assert res.exit_code == 0, res.output
    assert "decision:    deny" in res.output and "code:        denied_by_rule" in res.output
    assert "reason:      amount > 1000" in res.output


def test_explain_kill_switch_and_force_mode(policy_file: Path) -> None:
    res = run_explain(policy_file, "-e", "prod", "-a", "issue_refund", "--args", '{"amount": 1}',
                      "--kill-switch")
    assert res.exit_code == 0
    assert "decided by:  kill_switch" in res.output and "kill_switch_engaged" in res.output
    assert "not reached: kill_switch decided" in res.output  # rule 0 matched but was not reached
    # The policy's default environment is dev, which forces simulation.
    res = run_explain(policy_file, "-a", "issue_refund", "--args", '{"amount": 1}')
    assert "environment:  dev" not in res.output and "environment: dev" in res.output
    assert "decided by:  force_mode" in res.output and "mode:        simulation_only" in res.output


def test_explain_undefined_action_and_schema_failure(policy_file: Path) -> None:
    res = run_explain(policy_file, "-e", "prod", "-a", "nope")
    assert res.exit_code == 0 and "action_not_allowed" in res.output
    assert "rules" not in res.output
    res = run_explain(policy_file, "-e", "prod", "-a", "issue_refund", "--args", "[1]")
    assert res.exit_code == 0 and "invalid_arguments" in res.output
    assert "not evaluated" in res.output
    res = run_explain(policy_file, "-e", "prod", "-a", "lookup_customer", "--args", '{"id": "x"}',
                      "--tool-schema", '{"properties": {"id": {"type": "integer"}}}')
    assert res.exit_code == 0 and "invalid_arguments" in res.output
    assert "rules: none" in res.output


def test_explain_usage_errors(policy_file: Path, tmp_path: Path) -> None:
    res = run_explain(policy_file, "-e", "prod", "-a", "issue_refund", "--args", "{oops")
    assert res.exit_code == 2 and "--args is not valid JSON" in res.output
    res = run_explain(policy_file, "-e", "mars", "-a", "issue_refund")
    assert res.exit_code == 2 and "unknown environment 'mars'" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("environments: {dev: {force_mode: maybe}}\n", encoding="utf-8")
    res = run_explain(bad, "-a", "x")
    assert res.exit_code == 2
