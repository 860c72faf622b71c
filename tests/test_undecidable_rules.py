"""A rule that cannot compare a present value falls to the stricter mode (issue 10 G6), and the
``recipients`` matcher (G1) — as pure mode resolution and through ``policy explain``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from authority_sdk.modes import (
    MODE_ORDER,
    Resolution,
    condition_verdict,
    resolve_action,
    rule_verdict,
    stricter,
)
from authority_sdk.policy import Policy, Rule, parse_policy

REFUND_RULES = [
    {"if": {"amount": {"lte": 50}}, "mode": "auto_execute"},
    {"if": {"amount": {"gt": 1000}}, "mode": "deny"},
]


def make_policy(rules: list[dict[str, Any]], *, mode: str | None = "require_human_approval",
                redact: list[str] | None = None) -> Policy:
    return parse_policy({
        "default_environment": "prod",
        "environments": {"prod": {}},
        "actions": {"act": {"rules": rules, **({"mode": mode} if mode else {})}},
        "redact": redact or [],
    })


def resolve(policy: Policy, args: dict[str, Any]) -> Resolution:
    return resolve_action(policy, "prod", "act", json.dumps(args))


def strictness(mode: str) -> int:
    return len(MODE_ORDER) - MODE_ORDER.index(mode)


# ---------------------------------------------------------------- the reported bypass


@pytest.mark.parametrize("amount", ["5000", [5000], {"v": 5000}, "5e3", "1e9", True, None,
                                    "10", " 5000 ", "NaN"])
def test_type_confusion_never_skips_a_deny_rule(amount: Any) -> None:
    r = resolve(make_policy(REFUND_RULES), {"amount": amount, "order_id": "A-1"})
    assert (r.mode, r.decision, r.code, r.decided_by) == (
        "deny", "deny", "denied_by_rule", "rule[1]:undecidable")
    assert r.reason is not None
    assert r.reason.startswith("rule[1] (amount > 1000 -> deny) cannot be decided: amount is ")
    assert "stricter mode" in r.reason
    # The value itself is never quoted (it may be a redacted field).
    if isinstance(amount, str) and amount.strip():
        assert amount.strip() not in r.reason.replace("1000", "")


def test_comparable_values_decide_as_before() -> None:
    policy = make_policy(REFUND_RULES)
    assert (resolve(policy, {"amount": 10}).mode, resolve(policy, {"amount": 10}).decided_by) == (
        "auto_execute", "rule[0]")
    assert resolve(policy, {"amount": 5000}).decided_by == "rule[1]"
    assert resolve(policy, {"amount": 500}).decided_by == "action_mode"
    assert resolve(policy, {"amount": 50.0}).mode == "auto_execute"


def test_a_missing_field_stays_no_match() -> None:
    r = resolve(make_policy(REFUND_RULES), {"order_id": "A-1"})
    assert (r.mode, r.decided_by) == ("require_human_approval", "action_mode")


def test_an_undecidable_rule_only_ever_makes_things_stricter() -> None:
    # rule[0] auto_execute is undecidable for "10": it must not auto-execute, and the outcome
    # stays at the fall-through mode (approval), not at the laxer rule's.
    policy = make_policy([{"if": {"amount": {"lte": 50}}, "mode": "auto_execute"}])
    r = resolve(policy, {"amount": "10"})
    assert (r.mode, r.decided_by) == ("require_human_approval", "action_mode")
    # With a laxer fall-through the stricter of the two still wins.
    lax = make_policy([{"if": {"amount": {"gt": 100}}, "mode": "simulation_only"}],
                      mode="auto_execute")
    r = resolve(lax, {"amount": "5000"})
    assert (r.mode, r.decided_by, r.decision) == ("simulation_only", "rule[0]:undecidable", "allow")
    assert r.code is None


def test_a_definite_match_wins_unless_an_earlier_undecidable_rule_is_stricter() -> None:
    rules = [
        {"if": {"amount": {"gt": 1000}}, "mode": "deny"},
        {"if": {"channel": {"eq": "web"}}, "mode": "auto_execute"},
        {"if": {"score": {"gt": 5}}, "mode": "deny"},  # after the first match: never read
    ]
    policy = make_policy(rules)
    r = resolve(policy, {"amount": "big", "channel": "web"})
    assert (r.mode, r.decided_by) == ("deny", "rule[0]:undecidable")
    r = resolve(policy, {"amount": 3, "channel": "web", "score": "high"})
    assert (r.mode, r.decided_by) == ("auto_execute", "rule[1]")
    # Two undecidable rules of the same mode: the earlier one is named.
    twice = make_policy([{"if": {"a": {"gt": 1}}, "mode": "deny"},
                         {"if": {"b": {"gt": 1}}, "mode": "deny"}])
    assert resolve(twice, {"a": "x", "b": "y"}).decided_by == "rule[0]:undecidable"


def test_kleene_and_a_surely_failing_condition_decides() -> None:
    rule = Rule.model_validate({"if": {"amount": {"gt": 1000}, "currency": {"eq": "USD"}},
                                "mode": "deny"})
    assert rule_verdict(rule, {"amount": "5000", "currency": "EUR"}).verdict == "no_match"
    got = rule_verdict(rule, {"amount": "5000", "currency": "USD"})
    assert (got.verdict, got.why) == ("undecidable", "amount is a string, not a number")
    assert rule_verdict(rule, {"amount": 5000, "currency": "USD"}).verdict == "match"
    assert condition_verdict({"a": 5}, "a", {"gt": 1, "lt": 3}) == ("no_match", None)


@pytest.mark.parametrize(("conds", "value", "verdict"), [
    ({"eq": 5}, "5", "no_match"), ({"ne": 5}, "5", "match"), ({"in": [5]}, "5", "no_match"),
    ({"not_in": [5]}, [5], "match"), ({"eq": None}, None, "match"),
    ({"glob": "*@x.org"}, ["a@x.org"], "undecidable"), ({"regex": "^a"}, 1, "undecidable"),
    ({"glob": "*@x.org"}, "a@x.org", "match"), ({"gte": 0}, False, "undecidable"),
    ({"lt": 1}, 1e308, "no_match"), ({"lt": 1}, -(10**400), "match"),
])
def test_equality_is_always_decidable_patterns_need_strings(conds: dict[str, Any], value: Any,
                                                            verdict: str) -> None:
    assert condition_verdict({"f": value}, "f", conds)[0] == verdict


def test_force_mode_and_validation_still_come_first() -> None:
    policy = parse_policy({
        "default_environment": "dev",
        "environments": {"dev": {"force_mode": "simulation_only"}},
        "actions": {"act": {"rules": REFUND_RULES, "parameters": {
            "type": "object", "properties": {"amount": {"type": "number"}}}}},
    })
    r = resolve_action(policy, "dev", "act", '{"amount": "5000"}')
    assert (r.code, r.decided_by) == ("invalid_arguments", "validation")
    r = resolve_action(policy, "dev", "act", '{"amount": 5000}')
    assert r.decided_by == "force_mode"


# ---------------------------------------------------------------- recipients (G1)

EMAIL_RULES = [{"if": {"recipients": {"domain_in": ["example.com", "*.corp.example"]}},
                "mode": "auto_execute", "reason": "internal mail"}]


@pytest.mark.parametrize(("args", "mode", "decided_by"), [
    ({"to": "boss@example.com"}, "auto_execute", "rule[0]"),
    ({"to": ["Boss <boss@EXAMPLE.com>", "a@mail.corp.example"], "cc": [], "bcc": None},
     "auto_execute", "rule[0]"),
    # Full width: the executor sends to example.com, so the rule sees example.com.
    ({"to": "boss@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com"}, "auto_execute", "rule[0]"),
    # The issue's attacks: none auto-sends.
    ({"to": "evil@attacker.com, boss@example.com"}, "require_human_approval", "action_mode"),
    ({"to": "boss@example.com", "cc": "evil@attacker.com"}, "require_human_approval",
     "action_mode"),
    ({"to": "boss@example.com", "bcc": ["evil@attacker.com"]}, "require_human_approval",
     "action_mode"),
    ({"to": "boss@example.com (evil@attacker.com)"}, "require_human_approval", "action_mode"),
    ({"to": '"boss@example.com" <evil@attacker.com>'}, "require_human_approval", "action_mode"),
    ({"to": "boss@example.com.attacker.com"}, "require_human_approval", "action_mode"),
    ({"to": "boss@corp.example"}, "require_human_approval", "action_mode"),  # *. is subdomains
    ({"to": "boss@ex\u0430mple.com"}, "require_human_approval", "action_mode"),  # Cyrillic a
    ({"to": 42}, "require_human_approval", "action_mode"),
    ({"subject": "no recipients"}, "require_human_approval", "action_mode"),
    ({"to": []}, "require_human_approval", "action_mode"),
])
def test_recipients_rule(args: dict[str, Any], mode: str, decided_by: str) -> None:
    r = resolve(make_policy(EMAIL_RULES), args)
    assert (r.mode, r.decided_by) == (mode, decided_by)


def test_an_unparseable_recipient_makes_a_deny_rule_deny() -> None:
    policy = make_policy([{"if": {"recipients": {"domain_in": ["example.com"]}},
                           "mode": "auto_execute"},
                          {"if": {"recipients": {"domain_in": ["competitor.example"]}},
                           "mode": "deny"}])
    r = resolve(policy, {"to": "ceo@competitor.example, boss@example.com"})
    assert (r.mode, r.decided_by) == ("deny", "rule[1]:undecidable")
    assert "to: one value must hold exactly one address" in (r.reason or "")
    assert resolve(policy, {"to": "ceo@competitor.example"}).decided_by == "rule[1]"


@pytest.mark.parametrize(("rule", "error"), [
    ({"recipients": {"eq": "a@b.c"}}, "recipients.eq: recipients (every address of to, cc and "
                                      "bcc, parsed) takes only domain_in"),
    ({"to": {"domain_in": ["example.com"]}}, "to.domain_in: recipients"),
    ({"recipients": {"domain_in": "example.com"}}, "recipients.domain_in: expected a non-empty "
                                                   "list of domains"),
    ({"recipients": {"domain_in": ["example.com", "exa mple.com"]}},
     "recipients.domain_in.1: the domain is not a host name"),
    ({"recipients": {"domain_in": ["*"]}}, "recipients.domain_in.0:"),
])
def test_recipients_policy_syntax_errors(rule: dict[str, Any], error: str) -> None:
    with pytest.raises(Exception) as ei:
        make_policy([{"if": rule, "mode": "auto_execute"}])
    assert error in str(ei.value)


def test_policy_schema_describes_recipients() -> None:
    schema = Policy.model_json_schema(by_alias=True)["$defs"]["Rule"]["properties"]["if"]
    assert schema["properties"]["recipients"]["properties"] == {
        "domain_in": {"type": "array", "items": {"type": "string"}, "minItems": 1}}
    assert "domain_in" not in schema["additionalProperties"]["properties"]
    assert set(schema["additionalProperties"]["properties"]) == {
        "eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in", "glob", "regex"}


# ---------------------------------------------------------------- properties

# Small alphabets keep generation cheap; the shapes (types, nesting) are what matter here.
_text = st.text("ax1. e-", max_size=4)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3000, 3000)
    | st.floats(-3000, 3000, allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from("vw"), inner,
                                                                max_size=2),
    max_leaves=4)
_number = st.integers(-2000, 2000) | st.floats(-2000, 2000, allow_nan=False)
_mode = st.sampled_from(MODE_ORDER)
_ORDERED = ("lt", "lte", "gt", "gte")


def _conditions(field: str) -> st.SearchStrategy[dict[str, Any]]:
    op = st.sampled_from(["eq", "ne", "in", "not_in", "glob", "regex", *_ORDERED])

    def operand(o: str) -> st.SearchStrategy[Any]:
        if o in _ORDERED:
            return _number
        if o in ("in", "not_in"):
            return st.lists(_json, max_size=3)
        if o == "glob":
            return st.sampled_from(["*", "a*", "*x*", "?", "[ab]*"])
        if o == "regex":
            return st.sampled_from(["^a", "x", r"\d", ""])
        return _json
    return st.dictionaries(op, st.just(None), min_size=1, max_size=2).flatmap(
        lambda ops: st.fixed_dictionaries({o: operand(o) for o in ops}))


def _ordered_conditions() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(_ORDERED), _number, min_size=1, max_size=2)


@st.composite
def policies(draw: st.DrawFn, *, ordered_only_on: str | None = None) -> Policy:
    rules = []
    for _ in range(draw(st.integers(1, 5))):
        fields = draw(st.lists(st.sampled_from(["a", "b", "c.d"]), min_size=1, max_size=2,
                               unique=True))
        cond = {f: draw(_ordered_conditions() if f == ordered_only_on else _conditions(f))
                for f in fields}
        rules.append({"if": cond, "mode": draw(_mode)})
    return make_policy(rules, mode=draw(st.none() | _mode))


_args = st.fixed_dictionaries({}, optional={"a": _json, "b": _json,
                                            "c": st.fixed_dictionaries({}, optional={"d": _json})})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(), args=_args, field=st.sampled_from(["a", "b", "c"]), value=_json)
def test_property_a_present_value_never_loosens_unless_a_rule_surely_matched(
        policy: Policy, args: dict[str, Any], field: str, value: Any) -> None:
    """For any JSON in any field: the mode is at least as strict as with the field removed,
    unless some rule definitely matched (a policy may say "this value: auto")."""
    args = {**args, field: {"d": value} if field == "c" else value}
    rules = policy.actions["act"].rules
    assume(not any(rule_verdict(rule, args).verdict == "match" for rule in rules))
    without = {k: v for k, v in args.items() if k != field}
    assert strictness(resolve(policy, args).mode) >= strictness(resolve(policy, without).mode)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies(ordered_only_on="a"), args=_args, value=_json, number=_number)
def test_property_no_spelling_of_a_number_gets_a_laxer_mode_than_any_number(
        policy: Policy, args: dict[str, Any], value: Any, number: float) -> None:
    """Where a field has only ordered matchers, a value that is not a number ("5000", [5000],
    {"v": 5000}, "5e3", null…) gets a mode at least as strict as every real number gets."""
    assume(isinstance(value, bool) or not isinstance(value, int | float))
    confused = resolve(policy, {**args, "a": value})
    real = resolve(policy, {**args, "a": number})
    assert strictness(confused.mode) >= strictness(real.mode), (confused, real)


def test_stricter() -> None:
    assert stricter("auto_execute", "deny") == "deny"
    assert stricter("require_human_approval", "simulation_only") == "require_human_approval"
    assert stricter("simulation_only", "auto_execute") == "simulation_only"


# ---------------------------------------------------------------- policy explain


@pytest.fixture()
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "authority.yaml"
    path.write_text(yaml.safe_dump({
        "default_environment": "prod", "environments": {"prod": {}},
        "actions": {"issue_refund": {"mode": "require_human_approval", "rules": REFUND_RULES},
                    "send_email": {"mode": "require_human_approval", "rules": EMAIL_RULES}},
        "redact": ["card_number"],
    }), encoding="utf-8")
    return path


def explain(policy_file: Path, action: str, args: dict[str, Any]) -> str:
    from authority_sdk.cli.policy_cmd import app

    res = CliRunner().invoke(app, ["explain", "--policy", str(policy_file), "-a", action,
                                   "--args", json.dumps(args)])
    assert res.exit_code == 0, res.output
    return res.output


def test_explain_says_a_rule_is_undecidable_and_that_it_decides(policy_file: Path) -> None:
    out = explain(policy_file, "issue_refund", {"amount": "5000", "card_number": "4111"})
    assert "decided by:  rule[1]:undecidable" in out
    assert "mode:        deny" in out and "code:        denied_by_rule" in out
    assert "a rule that cannot compare a value it meets is undecidable" in out
    assert ("rule[0] if amount <= 50 -> auto_execute: undecidable (its mode is not stricter "
            "than the outcome)") in out
    assert "rule[1] if amount > 1000 -> deny: undecidable  <- decides (the strictest mode met)" \
        in out
    assert "      cannot decide: amount > 1000 (amount is a string, not a number)" in out
    assert "4111" not in out


def test_explain_shows_the_parsed_recipients(policy_file: Path) -> None:
    out = explain(policy_file, "send_email", {"to": "boss@example.com",
                                              "cc": ["Eve <eve@attacker.com>"]})
    assert "decided by:  action_mode" in out
    assert ('fails: recipients all in domains ["example.com", "*.corp.example"] '
            '(recipients = ["boss@example.com", "eve@attacker.com"])') in out
    out = explain(policy_file, "send_email", {"to": "evil@attacker.com, boss@example.com"})
    assert "undecidable" in out and "to: one value must hold exactly one address" in out
    out = explain(policy_file, "send_email", {"to": ["boss@example.com"]})
    assert "decided by:  rule[0]" in out and "matched  <- decides" in out
