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
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .policy import ActionPolicy, Policy, Rule

__all__ = [
    "Resolution",
    "describe_condition",
    "describe_rule",
    "lookup",
    "match_condition",
    "not_allowed_reason",
    "parse_arguments",
    "resolve_action",
    "rule_matches",
    "validate_arguments",
]

_MAX_MESSAGE = 500

_SYMBOLS: dict[str, str] = {
    "eq": "==", "ne": "!=", "lt": "<", "lte": "<=", "gt": ">", "gte": ">=",
    "in": "in", "not_in": "not in", "glob": "matches glob", "regex": "matches regex",
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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated key is rejected: the gateway and the executor's JSON parser could
    # otherwise each pick a different copy (`{"amount": 10, "amount": 5000}`).
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_arguments(arguments_json: str) -> tuple[dict[str, Any] | None, str | None]:
    """Parse a tool call's ``arguments`` string: ``(object, None)`` or ``(None, error)``.

    Strict JSON: no ``NaN``/``Infinity``, no repeated keys, and the top level
    must be an object.
    """
    if not isinstance(arguments_json, str):
        return None, f"arguments must be a JSON string, got {type(arguments_json).__name__}"
    try:
        value = json.loads(
            arguments_json, object_pairs_hook=_unique_keys, parse_constant=_no_constant
        )
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


def validate_arguments(args: Any, schema: Mapping[str, Any] | bool) -> str | None:
    """None if ``args`` is valid against ``schema``, else a one-line message.

    The draft is whatever ``$schema`` declares, Draft 2020-12 otherwise. A
    schema that is itself invalid, or whose ``$ref`` cannot be resolved
    locally, is reported as such (the caller denies: fail closed).
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
    return _clip(f"{path}: {error.message}" if path else error.message)


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


def _holds(op: str, value: Any, operand: Any) -> bool:
    if op == "eq":
        return _json_equal(value, operand)
    if op == "ne":
        return not _json_equal(value, operand)
    if op in ("lt", "lte", "gt", "gte"):
        if not _comparable(value, operand):
            return False
        if op == "lt":
            return bool(value < operand)
        if op == "lte":
            return bool(value <= operand)
        if op == "gt":
            return bool(value > operand)
        return bool(value >= operand)
    if op in ("in", "not_in"):
        if not isinstance(operand, list | tuple):
            return False
        found = any(_json_equal(value, item) for item in operand)
        return found if op == "in" else not found
    if op == "glob":
        return isinstance(value, str) and fnmatch.fnmatchcase(value, str(operand))
    if op == "regex":
        compiled = _regex(str(operand))
        return (isinstance(value, str) and compiled is not None
                and compiled.search(value) is not None)
    return False


def match_condition(args: Mapping[str, Any], field: str, conditions: Mapping[str, Any]) -> bool:
    """Whether every matcher in ``conditions`` holds for the argument ``field``.

    Matchers: ``eq ne lt lte gt gte in not_in glob regex``. Never raises and
    never evaluates code. Deliberate choices, all "fail safe": a condition
    that cannot be shown to hold does not match, so the action falls through
    to the later, usually stricter, steps:

    - a missing field matches nothing, not even ``ne`` or ``not_in`` (a
      missing amount proves nothing about the amount);
    - ordered comparisons need two numbers (booleans are not numbers) or two
      strings; ``"abc" > 5`` and ``true > 0`` do not match;
    - equality is JSON's: ``true`` is not ``1``, ``1`` is ``1.0``;
    - ``glob`` (``fnmatchcase``) and ``regex`` (``re.search``) match strings only;
    - an empty condition, an unknown matcher or a bad pattern matches nothing.
    """
    if not conditions:
        return False
    found, value = lookup(args, field)
    if not found:
        return False
    return all(_holds(op, value, operand) for op, operand in conditions.items())


def rule_matches(rule: Rule, args: Mapping[str, Any]) -> bool:
    """Whether every condition of the rule's ``if`` holds."""
    return bool(rule.if_) and all(
        match_condition(args, field, conds) for field, conds in rule.if_.items()
    )


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
        problem = validate_arguments(args, schema)
        if problem is not None:
            return done("deny", "validation", f"invalid arguments: {problem}", "invalid_arguments")

    env = policy.environments[environment]
    if env.force_mode is not None:
        return done(env.force_mode, "force_mode",
                    f"environment {environment} forces {env.force_mode}")

    for i, rule in enumerate(action.rules):
        if rule_matches(rule, args):
            return done(rule.mode, f"rule[{i}]", rule.reason or describe_rule(rule),
                        "denied_by_rule")

    if action.mode is not None:
        return done(action.mode, "action_mode", f"action {action_type} has mode {action.mode}")
    if env.default_mode is not None:
        return done(env.default_mode, "environment_default",
                    f"environment {environment} defaults to {env.default_mode}")
    return done(policy.defaults.mode, "global_default",
                f"policy default mode is {policy.defaults.mode}")
