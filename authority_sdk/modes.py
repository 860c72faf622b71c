"""The mode of one action (tool call), DESIGN.md §3: a pure function over plain data.

It runs for every tool call, so it does no I/O and keeps imports light: the
``jsonschema`` import (about 60 ms) is paid on the first schema validation, and
compiled validators and regexes are cached.

Resolution, first step that applies wins:

1. kill switch engaged → ``deny`` (``kill_switch_engaged``);
   an undefined tool named in ``output_tools`` (its call is the model's structured
   answer) → allowed for the app, never executed (``decided_by="output_tool"``), once
   its arguments parse as a JSON object;
2. action type not allowed in the environment → ``deny`` (``action_not_allowed``);
   an action type the policy does not define is never allowed (fail closed);
3. arguments not a JSON object, or not valid against the JSON schema (the
   policy's ``parameters`` if given, else the tool schema the request declared)
   → ``deny`` (``invalid_arguments``);
4. the environment's ``force_mode``;
5. the action's rules, first match wins (``denied_by_rule`` for a deny);
6. the action's ``mode``, then the environment's ``default_mode``, then the
   policy's ``defaults.mode`` (``denied_by_policy`` for a deny from 4 or 6).

A rule is *undecidable* when a condition meets a present value it cannot
compare (an ordered matcher on anything but a number, ``glob``/``regex`` on a
non-string, ``recipients`` with an address that does not parse). Modes are
ordered strictest first — ``deny``, ``require_human_approval``,
``simulation_only``, ``auto_execute`` — and the mode of steps 5 and 6 is the
strictest of the first definite match (or the fall-through mode) and the mode of
every undecidable rule met before it: a value a rule cannot compare moves the
action towards the strict end, never away from it. A string is never turned
into a number (``"5e3"`` is not comparable with 100); a missing field proves
nothing and matches nothing; equality (``eq ne in not_in``) is JSON's and is
always decidable.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from .policy import RECIPIENTS, ActionPolicy, Policy, Rule
from .strictjson import no_constant, unique_pairs

__all__ = [
    "MODE_ORDER",
    "Resolution",
    "RuleVerdict",
    "Verdict",
    "condition_verdict",
    "describe_condition",
    "describe_rule",
    "lookup",
    "match_condition",
    "not_allowed_reason",
    "parse_arguments",
    "resolve_action",
    "rule_matches",
    "rule_verdict",
    "stricter",
    "validate_arguments",
]

# Strictest first (DESIGN.md §10): what an undecidable rule or a limit may only move towards.
MODE_ORDER: tuple[str, ...] = ("deny", "require_human_approval", "simulation_only",
                               "auto_execute")
_STRICTNESS = {mode: len(MODE_ORDER) - i for i, mode in enumerate(MODE_ORDER)}

# A condition or a rule either holds, does not hold, or cannot be decided on this value.
Verdict = Literal["match", "no_match", "undecidable"]

_MAX_MESSAGE = 500

_SYMBOLS: dict[str, str] = {
    "eq": "==", "ne": "!=", "lt": "<", "lte": "<=", "gt": ">", "gte": ">=",
    "in": "in", "not_in": "not in", "glob": "matches glob", "regex": "matches regex",
    "domain_in": "all in domains",
}


@dataclass(frozen=True, slots=True)
class Resolution:
    """What the gateway decided for one action, and which step decided it."""

    action_type: str
    mode: str  # auto_execute | require_human_approval | simulation_only | deny
    decision: str  # "allow" | "deny"; deny iff mode == "deny"
    reason: str | None
    code: str | None  # set for denials only
    decided_by: str  # kill_switch | environment_allowlist | validation | force_mode | rule[i] | …
    arguments: dict[str, Any] | None  # None when the arguments were not a JSON object
    executor: str | None  # None: the app runs the action itself
    dispatch: str  # "gateway" | "client"


# ---------------------------------------------------------------- arguments


def parse_arguments(arguments_json: str) -> tuple[dict[str, Any] | None, str | None]:
    """Parse a tool call's ``arguments`` string: ``(object, None)`` or ``(None, error)``.

    Strict JSON: no ``NaN``/``Infinity``, no repeated keys, and the top level
    must be an object.
    """
    if not isinstance(arguments_json, str):
        return None, f"arguments must be a JSON string, got {type(arguments_json).__name__}"
    try:
        # A repeated key is rejected: the gateway and the executor's JSON parser could
        # otherwise each pick a different copy (`{"amount": 10, "amount": 5000}`).
        value = json.loads(arguments_json, object_pairs_hook=unique_pairs,
                           parse_constant=no_constant)
    except RecursionError:
        return None, "arguments are not valid JSON: nested too deeply"
    except ValueError as exc:
        return None, _clip(f"arguments are not valid JSON: {exc}")
    if not isinstance(value, dict):
        return None, f"arguments must be a JSON object, got {_json_type(value)}"
    return value, None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


@lru_cache(maxsize=256)
def _compiled(canonical_schema: str) -> tuple[Any, str | None]:
    """(validator, None) or (None, why the schema itself is invalid); keyed by canonical JSON."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for
    from jsonschema_specifications import REGISTRY

    schema = json.loads(canonical_schema)
    if not isinstance(schema, dict | bool):
        return None, f"the JSON schema is invalid: expected an object, got {_json_type(schema)}"
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        return None, _clip(f"the JSON schema is invalid: {exc.message}")
    # The registry holds only the meta-schemas: jsonschema's default one would
    # fetch a remote `$ref` over the network, which the hot path must never do.
    return cls(schema, registry=REGISTRY, format_checker=cls.FORMAT_CHECKER), None


def validate_arguments(args: Any, schema: Mapping[str, Any] | bool,
                       redact: Iterable[str] = ()) -> str | None:
    """None if ``args`` is valid against ``schema``, else a one-line message.

    The draft is whatever ``$schema`` declares, Draft 2020-12 otherwise. A
    schema that is itself invalid, or whose ``$ref`` cannot be resolved
    locally, is reported as such (the caller denies: fail closed).

    ``redact``: field names whose values must never appear in the message
    (the policy's ``redact`` list). jsonschema's messages quote the failing
    value (``'4111…' is not of type 'integer'``), so when the error's path
    crosses a redacted name, or the failing value holds one, the message is
    built from the path and the failed keyword only.
    """
    try:
        canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"the JSON schema is invalid: not JSON ({exc})"
    validator, schema_error = _compiled(canonical)
    if schema_error is not None:
        return schema_error
    from jsonschema.exceptions import best_match

    try:
        # Valid is the common case; best_match's error ranking is only worth it for a denial.
        if validator.is_valid(args):
            return None
        error = best_match(validator.iter_errors(args))
    except RecursionError:
        return "arguments are nested too deeply to validate"
    except Exception as exc:  # e.g. an unresolvable $ref: the schema, not the data, is broken
        return _clip(f"the JSON schema is invalid: {type(exc).__name__}: {exc}")
    if error is None:
        return None
    path = ".".join(str(p) for p in error.absolute_path)
    message = error.message
    wanted = frozenset(n.lower() for n in redact)
    if wanted and (any(str(p).lower() in wanted for p in error.absolute_path)
                   or _holds_name(error.instance, wanted)):
        message = f"does not satisfy the schema's {error.validator!r} constraint (value redacted)"
    return _clip(f"{path}: {message}" if path else message)


def _holds_name(value: Any, wanted: frozenset[str], depth: int = 0) -> bool:
    """Whether ``value`` has a key named in ``wanted`` at any depth (bounded: fail towards
    yes, which only makes a message less specific)."""
    if depth > 64:
        return True
    if isinstance(value, Mapping):
        return any((isinstance(k, str) and k.lower() in wanted) or _holds_name(v, wanted, depth + 1)
                   for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_name(v, wanted, depth + 1) for v in value)
    return False


# ---------------------------------------------------------------- matchers


def lookup(args: Mapping[str, Any], field: str) -> tuple[bool, Any]:
    """``(found, value)`` for a field name; dots reach into nested objects.

    ``customer.tier`` always means ``args["customer"]["tier"]`` (a key that
    itself contains a dot cannot be addressed), so the model cannot choose
    between a flat and a nested spelling. A decimal segment indexes an array
    (``items.0.sku``).
    """
    current: Any = args
    for part in field.split("."):
        if isinstance(current, Mapping):
            if part not in current:
                return False, None
            current = current[part]
        elif isinstance(current, list) and part.isascii() and part.isdigit():
            index = int(part)
            if index >= len(current):
                return False, None
            current = current[index]
        else:
            return False, None
    return True, current


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_equal(a: Any, b: Any) -> bool:
    # JSON equality, not Python's: true is not 1, but 1 is 1.0.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def _comparable(a: Any, b: Any) -> bool:
    return (_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str))


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _kind(value: Any) -> str:
    """A value's JSON type with an article, for saying why a rule cannot compare it."""
    kind = _json_type(value)
    return {"null": "null", "array": "an array", "object": "an object",
            "boolean": "a boolean"}.get(kind, f"a {kind}")


def _value_verdict(op: str, value: Any, operand: Any) -> tuple[Verdict, str | None]:
    """One matcher on a present value, and why it cannot be decided when it cannot."""
    if op in ("eq", "ne"):
        return ("match" if _json_equal(value, operand) == (op == "eq") else "no_match"), None
    if op in ("in", "not_in"):
        if not isinstance(operand, list | tuple):
            return "undecidable", f"the policy's {op} operand is not a list"
        found = any(_json_equal(value, item) for item in operand)
        return ("match" if found == (op == "in") else "no_match"), None
    if op in ("lt", "lte", "gt", "gte"):
        if not _comparable(value, operand):
            want = "a number" if _is_number(operand) else _kind(operand)
            return "undecidable", f"is {_kind(value)}, not {want}"
        if op == "lt":
            held = value < operand
        elif op == "lte":
            held = value <= operand
        elif op == "gt":
            held = value > operand
        else:
            held = value >= operand
        return ("match" if held else "no_match"), None
    if op in ("glob", "regex"):
        if not isinstance(value, str):
            return "undecidable", f"is {_kind(value)}, not a string"
        if op == "glob":
            held = fnmatch.fnmatchcase(value, str(operand))
        else:
            compiled = _regex(str(operand))
            if compiled is None:
                return "undecidable", "the policy's regex does not compile"
            held = compiled.search(value) is not None
        return ("match" if held else "no_match"), None
    return "undecidable", f"{op!r} is not a matcher"


def _recipients_verdict(args: Mapping[str, Any],
                        conditions: Mapping[str, Any]) -> tuple[Verdict, str | None]:
    # The executor's own parser: the rule sees exactly the recipients that would be sent to.
    from .addresses import AddressError, domain_matches, parse_recipients

    try:
        by_field = parse_recipients(args)
    except AddressError as exc:
        return "undecidable", f"{exc.field}: {exc.problem}"
    recipients = [r for rs in by_field.values() for r in rs]
    if not recipients:
        return "no_match", None  # no recipient at all proves nothing about recipients
    verdict: Verdict = "match"
    for op, operand in conditions.items():
        if op != "domain_in":
            return "undecidable", f"{op!r} is not an address matcher"
        patterns = _domain_patterns(operand)
        if patterns is None:
            return "undecidable", "the policy's domain list is invalid"
        if not all(domain_matches(r.domain, patterns) for r in recipients):
            verdict = "no_match"
    return verdict, None


def _domain_patterns(operand: Any) -> tuple[str, ...] | None:
    if not isinstance(operand, list | tuple):
        return None
    try:
        return _normalised_patterns(tuple(operand))
    except (ValueError, TypeError):
        return None


@lru_cache(maxsize=256)
def _normalised_patterns(entries: tuple[Any, ...]) -> tuple[str, ...]:
    from .addresses import normalise_domain_pattern

    return tuple(normalise_domain_pattern(e) for e in entries)


def condition_verdict(args: Mapping[str, Any], field: str,
                      conditions: Mapping[str, Any]) -> tuple[Verdict, str | None]:
    """Whether every matcher in ``conditions`` holds for ``field``: ``(verdict, why)``.

    ``why`` says, for an undecidable condition, what could not be compared
    (never the value itself: it may be a redacted one). Three-valued (Kleene)
    logic: one matcher that surely fails makes the condition fail, whatever the
    others; otherwise one that cannot be decided makes it undecidable.

    - a missing field matches nothing, not even ``ne`` or ``not_in`` (a missing
      amount proves nothing about the amount);
    - ordered matchers compare two numbers (booleans are not numbers; a string
      is never parsed as one) or two strings; anything else present is undecidable;
    - equality is JSON's: ``true`` is not ``1``, ``1`` is ``1.0``; always decidable;
    - ``glob`` (``fnmatchcase``) and ``regex`` (``re.search``) decide strings only;
    - ``recipients`` parses ``to``, ``cc`` and ``bcc`` with the smtp executor's
      parser: ``domain_in`` holds when there is at least one recipient and every
      one's domain is listed (exactly, or under a listed ``*.domain``); an
      address that does not parse makes it undecidable;
    - an empty condition matches nothing; an unknown matcher or a bad pattern
      (only possible when a policy skipped validation) is undecidable.
    """
    if not conditions:
        return "no_match", None
    if field == RECIPIENTS:
        return _recipients_verdict(args, conditions)
    found, value = lookup(args, field)
    if not found:
        return "no_match", None
    undecided: str | None = None
    for op, operand in conditions.items():
        verdict, why = _value_verdict(op, value, operand)
        if verdict == "no_match":
            return "no_match", None
        if verdict == "undecidable" and undecided is None:
            undecided = f"{field} {why}"
    return ("undecidable", undecided) if undecided is not None else ("match", None)


def match_condition(args: Mapping[str, Any], field: str, conditions: Mapping[str, Any]) -> bool:
    """Whether every matcher in ``conditions`` surely holds for the argument ``field``
    (``condition_verdict`` has the rules; an undecidable condition is not a match)."""
    return condition_verdict(args, field, conditions)[0] == "match"


@dataclass(frozen=True, slots=True)
class RuleVerdict:
    verdict: Verdict
    why: str | None = None  # for "undecidable": which condition could not be compared


def rule_verdict(rule: Rule, args: Mapping[str, Any]) -> RuleVerdict:
    """A rule's verdict on ``args``: every condition of its ``if`` must hold (Kleene and)."""
    if not rule.if_:
        return RuleVerdict("no_match")
    undecided: str | None = None
    for field, conds in rule.if_.items():
        verdict, why = condition_verdict(args, field, conds)
        if verdict == "no_match":
            return RuleVerdict("no_match")
        if verdict == "undecidable" and undecided is None:
            undecided = why
    return RuleVerdict("undecidable", undecided) if undecided is not None else RuleVerdict("match")


def rule_matches(rule: Rule, args: Mapping[str, Any]) -> bool:
    """Whether every condition of the rule's ``if`` surely holds."""
    return rule_verdict(rule, args).verdict == "match"


def stricter(a: str, b: str) -> str:
    """The stricter of two modes (``a`` on a tie)."""
    return b if _STRICTNESS.get(b, 0) > _STRICTNESS.get(a, 0) else a


def describe_condition(field: str, conditions: Mapping[str, Any]) -> str:
    """One field's matchers as text, e.g. ``amount > 50 and amount <= 1000``."""
    return " and ".join(
        f"{field} {_SYMBOLS.get(op, op)} {json.dumps(operand, ensure_ascii=False, default=str)}"
        for op, operand in conditions.items()
    )


def describe_rule(rule: Rule) -> str:
    """The rule's condition as text, e.g. ``amount > 50 and customer.tier == "gold"``."""
    return " and ".join(describe_condition(field, conds) for field, conds in rule.if_.items())


# ---------------------------------------------------------------- resolution


def _undefined_reason(action_type: str) -> str:
    return (f"action type {action_type!r} is not defined in the policy: add it to actions: "
            "to allow it, or to output_tools: if its call is the app's structured answer")


def not_allowed_reason(policy: Policy, environment: str, action_type: str) -> str | None:
    """None if the action type may run in ``environment``, else why not."""
    env = policy.environments.get(environment)
    if env is None:
        return f"environment {environment!r} is not defined in the policy"
    action = policy.actions.get(action_type)
    if action is None:
        return _undefined_reason(action_type)
    if action.environments is not None and environment not in action.environments:
        return (f"action type {action_type!r} is not allowed in {environment} "
                "(not in the action's environments)")
    if env.actions is not None and action_type not in env.actions:
        return (f"action type {action_type!r} is not allowed in {environment} "
                "(not in the environment's actions)")
    return None


def resolve_action(
    policy: Policy,
    environment: str,
    action_type: str,
    arguments_json: str,
    *,
    tool_schema: dict[str, Any] | None = None,
    kill_switch_engaged: bool = False,
) -> Resolution:
    """Resolve one tool call to its mode (module docstring has the order). Never raises."""
    action: ActionPolicy | None = policy.actions.get(action_type)
    executor = action.executor if action is not None else None
    args, parse_error = parse_arguments(arguments_json)

    def done(mode: str, decided_by: str, reason: str, code: str | None = None) -> Resolution:
        deny = mode == "deny"
        return Resolution(
            action_type=action_type,
            mode=mode,
            decision="deny" if deny else "allow",
            reason=reason,
            code=(code or "denied_by_policy") if deny else None,
            decided_by=decided_by,
            arguments=args,
            executor=executor,
            dispatch="gateway" if executor else "client",
        )

    if kill_switch_engaged:
        return done("deny", "kill_switch", "kill switch engaged", "kill_switch_engaged")

    output_pattern = policy.output_tool_pattern(action_type) if action is None else None
    if output_pattern is not None:
        if args is None:
            return done("deny", "validation", parse_error or "invalid arguments",
                        "invalid_arguments")
        return done("auto_execute", "output_tool",
                    f"{action_type} is an output tool (output_tools: {output_pattern}): "
                    "its call is the answer, passed to the app")

    refused = not_allowed_reason(policy, environment, action_type)
    if refused is not None or action is None:
        reason = refused or _undefined_reason(action_type)
        return done("deny", "environment_allowlist", reason, "action_not_allowed")

    if args is None:
        return done("deny", "validation", parse_error or "invalid arguments", "invalid_arguments")
    schema = action.parameters if action.parameters is not None else tool_schema
    if schema is not None:
        problem = validate_arguments(args, schema, policy.redact)
        if problem is not None:
            return done("deny", "validation", f"invalid arguments: {problem}", "invalid_arguments")

    env = policy.environments[environment]
    if env.force_mode is not None:
        return done(env.force_mode, "force_mode",
                    f"environment {environment} forces {env.force_mode}")

    # Rules that cannot compare a value, met before the deciding step: each may only make
    # the outcome stricter.
    undecided: list[tuple[int, Rule, str | None]] = []
    decision: tuple[str, str, str] | None = None
    for i, rule in enumerate(action.rules):
        verdict = rule_verdict(rule, args)
        if verdict.verdict == "match":
            decision = (rule.mode, f"rule[{i}]", rule.reason or describe_rule(rule))
            break
        if verdict.verdict == "undecidable":
            undecided.append((i, rule, verdict.why))
    if decision is None:
        decision = _fall_through(policy, action, action_type, environment)
    mode, decided_by, reason = decision
    for i, rule, why in undecided:
        if stricter(mode, rule.mode) != mode:
            mode, decided_by = rule.mode, f"rule[{i}]:undecidable"
            reason = (f"rule[{i}] ({rule.reason or describe_rule(rule)} -> {rule.mode}) cannot "
                      f"be decided: {why or 'a value cannot be compared'}; a value a rule "
                      "cannot compare gets the stricter mode")
    code = "denied_by_rule" if decided_by.startswith("rule[") else "denied_by_policy"
    return done(mode, decided_by, reason, code)


def _fall_through(policy: Policy, action: ActionPolicy, action_type: str,
                  environment: str) -> tuple[str, str, str]:
    """Step 6: the mode when no rule matched, and which setting gave it."""
    if action.mode is not None:
        return action.mode, "action_mode", f"action {action_type} has mode {action.mode}"
    env = policy.environments[environment]
    if env.default_mode is not None:
        return (env.default_mode, "environment_default",
                f"environment {environment} defaults to {env.default_mode}")
    return (policy.defaults.mode, "global_default",
            f"policy default mode is {policy.defaults.mode}")
