"""The policy file (DESIGN.md §8): pydantic models that reject unknown keys.

A typo is an error naming its path (``environments.prod.ceilings.per_requst_usd:
unknown field``), never a silently ignored rule.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from .errors import PolicyError

__all__ = [
    "MATCHERS",
    "ActionPolicy",
    "AuditConfig",
    "AuditRotate",
    "Budget",
    "Ceilings",
    "Defaults",
    "Environment",
    "ExecutorConfig",
    "HttpStream",
    "KeyConfig",
    "Limit",
    "LogExecutor",
    "Mode",
    "ModelPrice",
    "NamedUpstream",
    "NotificationsConfig",
    "Policy",
    "PythonExecutor",
    "Rule",
    "SmtpExecutor",
    "StateConfig",
    "SyslogStream",
    "TelemetryConfig",
    "UpstreamConfig",
    "WebhookExecutor",
    "load_policy",
]

Mode = Literal["auto_execute", "require_human_approval", "simulation_only", "deny"]
Role = Literal["agent", "approver", "admin"]
NotifyEvent = Literal["held", "approved", "rejected", "expired", "executed", "failed"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = ("held", "approved", "rejected", "expired", "executed",
                                          "failed")
MODES: tuple[str, ...] = ("auto_execute", "require_human_approval", "simulation_only", "deny")
# Matchers on one argument's value.
VALUE_MATCHERS: tuple[str, ...] = ("eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in", "glob",
                                   "regex")
# Matchers on the parsed recipient list of an email (the ``recipients`` condition).
ADDRESS_MATCHERS: tuple[str, ...] = ("domain_in",)
MATCHERS: tuple[str, ...] = VALUE_MATCHERS + ADDRESS_MATCHERS
# The condition name that stands for every recipient of to, cc and bcc, parsed.
RECIPIENTS = "recipients"

_OPERAND_SCHEMA: dict[str, Any] = {
    "eq": {}, "ne": {},
    "lt": {"type": "number"}, "lte": {"type": "number"},
    "gt": {"type": "number"}, "gte": {"type": "number"},
    "in": {"type": "array"}, "not_in": {"type": "array"},
    "glob": {"type": "string"}, "regex": {"type": "string"},
    "domain_in": {"type": "array", "items": {"type": "string"}, "minItems": 1},
}
_IF_SCHEMA: dict[str, Any] = {
    "type": "object",
    "minProperties": 1,
    "description": (
        "Argument name (dotted for nested fields) to {matcher: operand}; every condition must "
        "hold. The name 'recipients' stands for every address of to, cc and bcc, parsed, and "
        "takes only domain_in."),
    "properties": {RECIPIENTS: {
        "type": "object", "minProperties": 1, "additionalProperties": False,
        "properties": {op: _OPERAND_SCHEMA[op] for op in ADDRESS_MATCHERS}}},
    "additionalProperties": {
        "type": "object", "minProperties": 1, "additionalProperties": False,
        "properties": {op: _OPERAND_SCHEMA[op] for op in VALUE_MATCHERS}},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Set by the gateway from the request or from api_key_env: a policy may not pin them.
_RESERVED_HEADERS = frozenset({"authorization", "api-key", "content-length", "content-type",
                               "host", "transfer-encoding", "connection", "accept",
                               "accept-encoding", "x-request-id"})


def _check_header(name: str, value: str) -> None:
    import re

    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
        raise ValueError(f"headers: {name!r} is not a valid header name")
    if name.lower() in _RESERVED_HEADERS:
        raise ValueError(f"headers: {name!r} is set by the gateway (credentials come from "
                         "api_key_env, never from the policy file)")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"headers.{name}: a value may not hold a line break")


class UpstreamConfig(_Strict):
    """One OpenAI-compatible endpoint. ``upstream:`` in a policy is one of these, serving
    every model under the name ``default``."""

    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = "OPENAI_API_KEY"
    api_key_header: str = Field(
        "authorization", description="Where the key goes: 'authorization' sends "
        "'Bearer <key>'; any other name (Azure's 'api-key') sends the key as it is")
    timeout_s: float = Field(60.0, gt=0)
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra headers on every request to this upstream "
        "(no credentials: those come from api_key_env)")
    query: dict[str, str] = Field(
        default_factory=dict, description="Query parameters on every request to this "
        "upstream (Azure's api-version)")

    @field_validator("base_url")
    @classmethod
    def _absolute_http(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query \
                or parts.fragment:
            raise ValueError("base_url must be an absolute http(s) URL with no query (put "
                             "query parameters under query:)")
        return v.rstrip("/")

    @field_validator("api_key_header")
    @classmethod
    def _key_header(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", v):
            raise ValueError(f"{v!r} is not a valid header name")
        if v.lower() in _RESERVED_HEADERS - {"authorization", "api-key"}:
            raise ValueError(f"{v!r} is set by the gateway; name the header the provider "
                             "reads the key from ('authorization', 'api-key', …)")
        return v.lower()

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            _check_header(name, value)
        return v

    @model_validator(mode="after")
    def _key_header_not_extra(self) -> UpstreamConfig:
        if self.api_key_header in {h.lower() for h in self.headers}:
            raise ValueError(f"headers: {self.api_key_header!r} carries the key from "
                             "api_key_env")
        return self

    def api_key(self) -> str | None:
        """The upstream's key from the environment (None: not set)."""
        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None

    def auth_headers(self, key: str) -> dict[str, str]:
        if self.api_key_header == "authorization":
            return {"authorization": f"Bearer {key}"}
        return {self.api_key_header: key}


class NamedUpstream(UpstreamConfig):
    """An entry of ``upstreams:``: the models it serves (first match wins) and the
    upstreams tried after it on a 5xx, a connection error or a timeout, in order."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1,
                              description="Globs of the models this upstream serves")
    fallbacks: list[str] = Field(default_factory=list, description="Upstreams (by name) "
                                 "tried in order when this one fails with a 5xx, a "
                                 "connection error or a timeout, before anything was "
                                 "streamed")

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, glob) for glob in self.models)


class StateConfig(_Strict):
    backend: Literal["diskcache", "postgres"] = Field(
        "diskcache", description="diskcache: a local folder (one machine); postgres: shared by "
        "replicas")
    path: str = Field(".authority/state", description="diskcache: the state folder")
    dsn_env: str | None = Field(
        None, description="postgres: the environment variable holding the DSN "
        "(e.g. postgresql://user@127.0.0.1:5432/authority)")

    @model_validator(mode="after")
    def _dsn_for_postgres(self) -> StateConfig:
        if self.backend == "postgres" and not self.dsn_env:
            raise ValueError("backend postgres needs dsn_env (the variable holding the DSN)")
        return self


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration_s(text: str) -> float:
    """Seconds in a duration written ``90d``, ``12h``, ``30m``, ``45s`` or ``2w``."""
    t = text.strip()
    if len(t) < 2 or t[-1] not in _DURATION_UNITS:
        raise ValueError(f"{text!r} is not a duration (a number and s, m, h, d or w: 90d)")
    try:
        n = float(t[:-1])
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (a number and s, m, h, d or w: 90d)"
                         ) from None
    if not n > 0 or n != n or n == float("inf"):
        raise ValueError(f"{text!r}: a duration must be positive")
    return n * _DURATION_UNITS[t[-1]]


def _check_duration(v: str | None) -> str | None:
    if v is not None:
        duration_s(v)
    return v


class AuditRotate(_Strict):
    max_bytes: int | None = Field(
        None, ge=1, description="Rotate once the active file holds at least this many bytes")
    every: str | None = Field(
        None, description="Rotate once the active file's first entry is this old (1d, 12h)")
    compress: bool = Field(False, description="gzip archived files")

    _every = field_validator("every")(_check_duration)

    @model_validator(mode="after")
    def _a_trigger(self) -> AuditRotate:
        if self.max_bytes is None and self.every is None:
            raise ValueError("rotate needs max_bytes, every, or both")
        return self

    @property
    def every_s(self) -> float | None:
        return duration_s(self.every) if self.every else None


class SyslogStream(_Strict):
    kind: Literal["syslog"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Names the "
                             "stream's cursor (default: derived from the address)")
    address: str = Field(description="host:port, or a local socket path such as /dev/log")
    protocol: Literal["udp", "tcp"] = "udp"
    facility: Literal["kern", "user", "daemon", "auth", "authpriv", "local0", "local1",
                      "local2", "local3", "local4", "local5", "local6", "local7"] = "local0"
    app_name: str = Field("authority", pattern=r"^[!-~]{1,48}$")  # RFC 5424 APP-NAME
    timeout_s: float = Field(5.0, gt=0)

    @field_validator("address")
    @classmethod
    def _host_port_or_path(cls, v: str) -> str:
        if v.startswith("/"):
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{v!r}: give host:port (127.0.0.1:514) or a socket path (/dev/log)")
        return v


class HttpStream(_Strict):
    kind: Literal["http"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    headers_env: dict[str, str] = Field(
        default_factory=dict, description="Header name: the environment variable holding its "
        "value (secrets stay out of the policy file)")
    timeout_s: float = Field(10.0, gt=0)
    batch: int = Field(100, ge=1, le=10000, description="Entries per POST")


StreamTarget = Annotated[SyslogStream | HttpStream, Field(discriminator="kind")]


def stream_name(target: SyslogStream | HttpStream) -> str:
    """The name a stream's cursor is kept under: given, or derived from where it sends."""
    if target.name:
        return target.name
    where = target.address if isinstance(target, SyslogStream) else target.url
    return f"{target.kind}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


class AuditConfig(_Strict):
    backend: Literal["file", "postgres"] = Field(
        "file", description="file: JSONL at path; postgres: one chain in a table for all "
        "replicas")
    path: str = ".authority/audit.jsonl"
    fsync: bool = True
    dsn_env: str | None = Field(
        None, description="postgres: the DSN's variable (default: the state store's)")
    hmac_key_env: str | None = Field(
        None, description="The environment variable holding the key that MACs every entry and "
        "signs checkpoints (at least 16 bytes)")
    hmac_key_file: str | None = Field(
        None, description="A file holding that key instead; it must lie outside the state folder "
        "and the audit log's folder")
    checkpoint_path: str | None = Field(
        None, description="Signed checkpoints (the chain's seq and hash) go to this file, in a "
        "directory outside the state folder and the audit log's folder; verify compares the log "
        "against it, so deleting the log and the state store together is caught. Needs a key")
    checkpoint_every: int = Field(
        1000, ge=1, description="Write a checkpoint every this many entries (and at shutdown)")
    rotate: AuditRotate | None = Field(
        None, description="file: move the active file into the archive folder past a size or "
        "an age; the chain continues across files")
    archive_dir: str | None = Field(
        None, description="file: where rotated files go (default: archive/ beside the log)")
    retention: str | None = Field(
        None, description="Delete archived files whose newest entry is older than this (90d), "
        "only once checkpointed and streamed; a signed prune record keeps the chain verifiable")
    stream: list[StreamTarget] = Field(
        default_factory=list, description="Send every entry, once durable, to these sinks "
        "(syslog, HTTP), resuming from a durable cursor")

    _retention = field_validator("retention")(_check_duration)

    @model_validator(mode="after")
    def _one_key_source(self) -> AuditConfig:
        if self.hmac_key_env and self.hmac_key_file:
            raise ValueError("give hmac_key_env or hmac_key_file, not both")
        if self.checkpoint_path and not (self.hmac_key_env or self.hmac_key_file):
            raise ValueError("checkpoint_path needs hmac_key_env or hmac_key_file: an unsigned "
                             "checkpoint can be rewritten along with the log")
        if self.backend != "file" and (self.rotate is not None or self.archive_dir):
            raise ValueError("rotate and archive_dir apply to backend: file (the table has no "
                             "files to rotate; retention and stream apply to both)")
        if self.backend == "file" and self.retention and self.rotate is None:
            raise ValueError("retention deletes archived files: it needs rotate (max_bytes or "
                             "every), or nothing is ever archived")
        names = [t.name or stream_name(t) for t in self.stream]
        if len(names) != len(set(names)):
            raise ValueError("stream: two targets share a name; give each a distinct name")
        return self


class Defaults(_Strict):
    mode: Mode = "require_human_approval"
    approval_ttl_s: float = Field(86400.0, gt=0)
    idempotency_ttl_s: float = Field(86400.0, gt=0)
    retry_window_s: float = Field(
        600.0, gt=0, description="How long the gateway remembers a request it keyed itself "
        "(an SDK retry key, or a keyless request an openai client may retry), so an automatic "
        "retry replays instead of running actions again")
    max_tool_calls_per_answer: int = Field(
        32, ge=1, description="Calls beyond this in one answer are denied (too_many_tool_calls)")
    max_pending_approvals: int = Field(
        1000, ge=1, description="A new approval beyond this many pending is refused "
        "(approval_queue_full)")
    served_response_ttl_s: float = Field(
        30 * 86400.0, gt=0, description="How long the gateway keeps the record of a response "
        "it served (Responses API): a previous_response_id older than this is unknown")


class Ceilings(_Strict):
    per_request_usd: float | None = Field(None, ge=0)


class Budget(_Strict):
    usd: float = Field(ge=0)
    period: Literal["hour", "day", "month"] = "day"


HostedTool = Literal["web_search", "file_search", "code_interpreter", "image_generation"]


class Environment(_Strict):
    models: list[str] = Field(default_factory=lambda: ["*"])
    hosted_tools: list[HostedTool] = Field(
        default_factory=list, description="Responses API tools the provider runs itself "
        "(their calls happen before the gateway sees them) that requests may offer here; "
        "any other is refused (tool_not_allowed)")
    mcp_servers: list[str] = Field(
        default_factory=list, description="Remote MCP servers requests may offer here: globs "
        "of a server_url, or 'connector:<id>' / 'tunnel:<id>'. Their calls come back for "
        "approval (the gateway forces require_approval) as actions named "
        "mcp.<server_label>.<tool>")
    actions: list[str] | None = None  # allowlist of action types; None: any the policy defines
    force_mode: Mode | None = None
    default_mode: Mode | None = None
    ceilings: Ceilings = Field(default_factory=Ceilings)
    budget: Budget | None = None


class Rule(_Strict):
    """``if`` maps an argument name (dotted for nested) to ``{matcher: operand}``.

    ``recipients`` is not an argument: it is the parsed recipient list of the
    ``to``, ``cc`` and ``bcc`` arguments together, and takes address matchers
    (``domain_in``) only, which take nothing else.
    """

    if_: dict[str, dict[str, Any]] = Field(alias="if", json_schema_extra=_IF_SCHEMA)
    mode: Mode
    reason: str | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("if_")
    @classmethod
    def _known_matchers(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        import re

        if not v:
            raise ValueError("a rule needs at least one condition")
        for field, conds in v.items():
            if not isinstance(conds, dict) or not conds:
                raise ValueError(
                    f"{field}: expected a mapping of matcher to value, e.g. {{lte: 50}}"
                )
            for op, operand in conds.items():
                if op not in MATCHERS:
                    raise ValueError(
                        f"{field}: unknown matcher {op!r} (one of {', '.join(MATCHERS)})"
                    )
                if (field == RECIPIENTS) != (op in ADDRESS_MATCHERS):
                    raise ValueError(
                        f"{field}.{op}: {RECIPIENTS} (every address of to, cc and bcc, parsed) "
                        f"takes only {', '.join(ADDRESS_MATCHERS)}, and "
                        f"{', '.join(ADDRESS_MATCHERS)} applies only to {RECIPIENTS}"
                    )
                if op == "domain_in":
                    _check_domains(field, operand)
                if op in ("in", "not_in") and not isinstance(operand, list):
                    raise ValueError(f"{field}.{op}: expected a list")
                if op in ("lt", "lte", "gt", "gte") and (
                    isinstance(operand, bool) or not isinstance(operand, int | float)
                ):
                    raise ValueError(f"{field}.{op}: expected a number")
                if op == "regex":
                    try:
                        re.compile(str(operand))
                    except re.error as exc:
                        raise ValueError(f"{field}.regex: invalid pattern: {exc}") from exc
        return v


class Limit(_Strict):
    """A cap over time on one action type: on the number of calls (``max_calls``) and/or the
    sum of a numeric argument (``sum`` + ``max``), per answer or per period, counted per
    environment or per key. Exceeded, the action falls to ``then`` (never to a laxer mode)."""

    per: Literal["answer", "hour", "day", "month"]
    scope: Literal["environment", "key"] = "environment"
    max_calls: int | None = Field(None, ge=0)
    sum: str | None = Field(None, description="Argument whose values are summed (dotted name)")
    max: float | None = Field(None, ge=0, description="Cap on the sum")
    then: Mode = "require_human_approval"

    @model_validator(mode="after")
    def _something_to_count(self) -> Limit:
        if self.max_calls is None and self.sum is None:
            raise ValueError("a limit needs max_calls, or sum with max")
        if (self.sum is None) != (self.max is None):
            raise ValueError("sum and max go together")
        if self.then == "auto_execute":
            raise ValueError("then: auto_execute would let an exceeded limit pass")
        return self


def _check_domains(field: str, operand: Any) -> None:
    from .addresses import AddressError, normalise_domain_pattern

    if not isinstance(operand, list) or not operand:
        raise ValueError(f"{field}.domain_in: expected a non-empty list of domains")
    for i, entry in enumerate(operand):
        try:
            normalise_domain_pattern(entry)
        except AddressError as exc:
            raise ValueError(f"{field}.domain_in.{i}: {exc.problem} (write example.com, or "
                             "*.example.com for its subdomains)") from None


class ActionPolicy(_Strict):
    executor: str | None = None
    mode: Mode | None = None
    dedupe_on: list[str] = Field(default_factory=list)
    environments: list[str] | None = None
    rules: list[Rule] = Field(default_factory=list)
    # JSON schema of the arguments; overrides the one the request declares.
    parameters: dict[str, Any] | None = None
    description: str | None = None
    limits: list[Limit] = Field(default_factory=list)


class WebhookExecutor(_Strict):
    type: Literal["webhook"]
    url: str
    timeout_s: float = Field(10.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)


class SmtpExecutor(_Strict):
    type: Literal["smtp"]
    host: str = "127.0.0.1"
    port: int = 25
    sender: str
    timeout_s: float = Field(10.0, gt=0)
    starttls: bool = False
    username_env: str | None = None
    password_env: str | None = None


class PythonExecutor(_Strict):
    type: Literal["python"]
    target: str
    idempotent: bool = False  # the function dedupes on the action key it is given

    @field_validator("target")
    @classmethod
    def _module_colon_function(cls, v: str) -> str:
        mod, sep, fn = v.partition(":")
        if not sep or not mod or not fn:
            raise ValueError("target must look like 'package.module:function'")
        return v


class LogExecutor(_Strict):
    type: Literal["log"]


ExecutorConfig = Annotated[
    WebhookExecutor | SmtpExecutor | PythonExecutor | LogExecutor, Field(discriminator="type")
]


class RateLimit(_Strict):
    """Per key, shared by every process and replica (``rate_limits.py``)."""

    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    concurrent: int | None = Field(None, ge=1, le=1000)


class KeyCallback(_Strict):
    """Where an app learns the fate of the actions its key's requests had held: a signed
    webhook (the same signature as a webhook channel), never with a decision link."""

    url: str
    secret_env: str
    timeout_s: float = Field(10.0, gt=0)
    events: list[NotifyEvent] = Field(default_factory=lambda: list[NotifyEvent](
        ["approved", "rejected", "expired", "executed", "failed"]))


class KeyConfig(_Strict):
    name: str
    secret_env: str | None = None
    secret_sha256: str | None = None
    environment: str | None = None
    roles: list[Role] = Field(default_factory=lambda: list[Role](["agent"]))
    budget: Budget | None = None  # per-key spend limit, on top of the environment's
    rate_limit: RateLimit | None = None
    callback: KeyCallback | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if bool(self.secret_env) == bool(self.secret_sha256):
            raise ValueError("give exactly one of secret_env or secret_sha256")
        if self.secret_sha256 is not None:
            h = self.secret_sha256.lower()
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError("secret_sha256 must be 64 hex digits")
        return self


class ModelPrice(_Strict):
    input_per_1m_usd: float = Field(ge=0)
    output_per_1m_usd: float = Field(ge=0)
    cached_input_per_1m_usd: float | None = Field(None, ge=0)


class WorkerConfig(_Strict):
    interval_s: float = Field(
        2.0, gt=0, le=3600, description="How often the background worker runs: recovery of "
        "interrupted executions (also after the kill switch is released), parked audit "
        "entries, approval expiry")




class _Channel(_Strict):
    """Who is told, about what: filters (``None``: every one) and the events to send."""

    environments: list[str] | None = None
    actions: list[str] | None = None
    events: list[NotifyEvent] = Field(default_factory=lambda: list(NOTIFY_EVENTS))
    approver: str | None = Field(
        None, description="The approver key this recipient is: its messages carry one-time "
        "decision links, and a decision taken by link is recorded as this key")


class WebhookChannel(_Channel):
    type: Literal["webhook"]
    url: str
    secret_env: str = Field(description="Environment variable holding the HMAC-SHA256 secret")
    timeout_s: float = Field(10.0, gt=0)


class SlackChannel(_Channel):
    type: Literal["slack"]
    url_env: str = Field(description="Environment variable holding the incoming-webhook URL "
                         "(it is a secret: whoever has it posts to the channel)")
    timeout_s: float = Field(10.0, gt=0)


class EmailChannel(_Channel):
    type: Literal["email"]
    executor: str = Field(description="An smtp executor of this policy")
    to: list[str] = Field(min_length=1)


ChannelConfig = Annotated[WebhookChannel | SlackChannel | EmailChannel,
                          Field(discriminator="type")]


class NotificationsConfig(_Strict):
    public_base_url: str | None = Field(
        None, description="Where people reach the proxy (https://gateway.example.com): links "
        "are built from it, never from the bind address. Without it, messages carry no link")
    link_ttl_s: float = Field(1800.0, gt=0, le=7 * 86400)
    max_attempts: int = Field(8, ge=1, le=100)
    backoff_s: float = Field(2.0, gt=0, le=3600, description="First retry delay; doubles "
                             "after each failure, at most 300 s")
    channels: dict[str, ChannelConfig] = Field(default_factory=dict)

    @field_validator("public_base_url")
    @classmethod
    def _absolute_http(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query \
                or parts.fragment:
            raise ValueError("public_base_url must be an absolute http(s) URL with no query")
        return v.rstrip("/")


class ProxyConfig(_Strict):
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)


class TelemetryConfig(_Strict):
    """OpenTelemetry traces and metrics (``authority_sdk.telemetry``). Off unless asked for:
    by ``otel: true`` here, or by ``$OTEL_EXPORTER_OTLP_ENDPOINT`` when ``otel`` is unset."""

    otel: StrictBool | None = Field(None, description=(
        "true: export spans and metrics (the 'otel' extra must be installed); false: never, "
        "whatever the environment says; unset: on when $OTEL_EXPORTER_OTLP_ENDPOINT is set"))
    endpoint: str | None = Field(None, description=(
        "The OTLP/HTTP collector (http://collector:4318); unset: the standard OTEL_EXPORTER_"
        "OTLP_* variables decide, or an exporter the application configured itself"))
    capture_content: StrictBool = Field(False, description=(
        "Put prompts, answers and tool-call arguments (redacted by 'redact') in spans. Off: "
        "spans carry names, ids, counts and decisions only"))
    service_name: str = Field("ai-authority-gateway", min_length=1, max_length=200,
                              description="service.name, unless $OTEL_SERVICE_NAME is set")
    provider_name: str | None = Field(None, min_length=1, max_length=100, description=(
        "gen_ai.provider.name; unset: from the upstream's host (openai, azure.ai.openai…)"))

    @field_validator("endpoint")
    @classmethod
    def _collector_url(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query \
                or parts.fragment or parts.username or parts.password:
            raise ValueError("telemetry.endpoint must be an http(s) URL with no query, "
                             "fragment or credentials (put credentials in "
                             "$OTEL_EXPORTER_OTLP_HEADERS)")
        return v.rstrip("/")


class Policy(_Strict):
    version: Literal[1] = 1
    default_environment: str = "dev"
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig, description=(
        "One upstream for every model (shorthand for upstreams: [{name: default, …}])"))
    upstreams: list[NamedUpstream] | None = Field(None, description=(
        "Several upstreams, routed by the request's model (first match of models: wins); "
        "not together with upstream:"))
    state: StateConfig = Field(default_factory=StateConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    defaults: Defaults = Field(default_factory=Defaults)
    environments: dict[str, Environment] = Field(default_factory=lambda: {"dev": Environment()})
    actions: dict[str, ActionPolicy] = Field(default_factory=dict)
    executors: dict[str, ExecutorConfig] = Field(default_factory=dict)
    keys: list[KeyConfig] = Field(default_factory=list)
    pricing: dict[str, ModelPrice] = Field(default_factory=dict)
    redact: list[str] = Field(default_factory=list)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    notifications: NotificationsConfig = Field(default_factory=NotificationsConfig)
    output_tools: list[str] = Field(default_factory=list, description=(
        "Tools whose call is the model's answer, not an action: names or globs (e.g. "
        "final_result, final_result_*). Libraries ask for structured output this way "
        "(instructor's TOOLS mode, pydantic-ai's output_type, LangChain's "
        "with_structured_output(method='function_calling'), LlamaIndex's "
        "structured_predict). A matching call is passed to the app as allowed (client "
        "dispatch), never executed by the gateway; its arguments must still be a JSON "
        "object, and the kill switch still denies it. An action defined in actions: may "
        "not also match. Empty by default: an undefined tool call is denied (fail closed)."))

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _cross_references(self) -> Policy:
        problems: list[str] = []
        if (self.audit.backend == "postgres" and not self.audit.dsn_env
                and not self.state.dsn_env):
            problems.append("audit.backend: postgres needs audit.dsn_env, or a postgres state "
                            "store whose database it shares")
        if self.default_environment not in self.environments:
            problems.append(
                f"default_environment: {self.default_environment!r} is not in environments"
            )
        for name, action in self.actions.items():
            if action.executor is not None and action.executor not in self.executors:
                problems.append(f"actions.{name}.executor: unknown executor {action.executor!r}")
            for env in action.environments or []:
                if env not in self.environments:
                    problems.append(f"actions.{name}.environments: unknown environment {env!r}")
        for env_name, env_cfg in self.environments.items():
            for act in env_cfg.actions or []:
                if act not in self.actions:
                    problems.append(f"environments.{env_name}.actions: unknown action {act!r}")
        for i, key in enumerate(self.keys):
            if key.environment is not None and key.environment not in self.environments:
                problems.append(f"keys.{i}.environment: unknown environment {key.environment!r}")
        for i, pattern in enumerate(self.output_tools):
            clash = sorted(a for a in self.actions if fnmatch.fnmatchcase(a, pattern))
            if clash:
                problems.append(f"output_tools.{i}: {pattern!r} matches the defined action(s) "
                                f"{', '.join(clash)}; an output tool has no executor or rules, "
                                "so a name is one or the other")
        problems.extend(self._upstream_problems())
        problems.extend(self._audit_path_problems())
        problems.extend(self._channel_problems())
        names = [k.name for k in self.keys]
        if len(names) != len(set(names)):
            problems.append("keys: key names must be unique")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _upstream_problems(self) -> list[str]:
        if self.upstreams is None:
            return []
        if "upstream" in self.model_fields_set:
            return ["upstream and upstreams: give one or the other (upstream: is shorthand "
                    "for a single upstream named 'default' serving every model)"]
        if not self.upstreams:
            return ["upstreams: list at least one upstream"]
        out: list[str] = []
        names = [u.name for u in self.upstreams]
        for i, up in enumerate(self.upstreams):
            if names.index(up.name) != i:
                out.append(f"upstreams.{i}.name: {up.name!r} is already the name of "
                           f"upstreams.{names.index(up.name)}")
            for j, fb in enumerate(up.fallbacks):
                if fb not in names:
                    out.append(f"upstreams.{i}.fallbacks.{j}: unknown upstream {fb!r} "
                               f"(defined: {', '.join(names)})")
                elif fb == up.name:
                    out.append(f"upstreams.{i}.fallbacks.{j}: {fb!r} cannot fall back to "
                               "itself")
                elif up.fallbacks.index(fb) != j:
                    out.append(f"upstreams.{i}.fallbacks.{j}: {fb!r} is listed twice")
        return out

    @cached_property
    def routes(self) -> tuple[NamedUpstream, ...]:
        """The upstreams in routing order (``upstream:`` is the one named ``default``)."""
        if self.upstreams is not None:
            return tuple(self.upstreams)
        return (NamedUpstream(name="default", models=["*"],
                              **self.upstream.model_dump(exclude_defaults=False)),)

    def upstream_named(self, name: str) -> NamedUpstream:
        return next(u for u in self.routes if u.name == name)

    def route(self, model: str) -> tuple[NamedUpstream, ...] | None:
        """The upstream serving ``model`` and then its fallbacks, in order; None when no
        upstream serves it."""
        for up in self.routes:
            if up.serves(model):
                return (up, *(self.upstream_named(fb) for fb in up.fallbacks))
        return None

    @cached_property
    def max_call_s(self) -> float:
        """The longest a model call can take: the slowest chain of an upstream and its
        fallbacks, each attempt up to its own timeout (leases and shutdown wait this)."""
        return max(sum(u.timeout_s for u in (up, *(self.upstream_named(fb)
                                                   for fb in up.fallbacks)))
                   for up in self.routes)

    def _audit_path_problems(self) -> list[str]:
        """The key and the checkpoint must survive whoever can write the state and the log:
        a key beside the log lets a forger sign, a checkpoint beside it goes with it."""
        writable = []
        if self.state.backend == "diskcache":
            writable.append(("the state folder", self.state_path.resolve()))
        if self.audit.backend == "file":
            writable.append(("the audit log's folder", self.audit_path.resolve().parent))
        out = []
        for field in ("hmac_key_file", "checkpoint_path"):
            value = getattr(self.audit, field)
            if not value:
                continue
            where = self.resolve_path(value).resolve()
            for label, folder in writable:
                if where == folder or folder in where.parents:
                    out.append(f"audit.{field}: {value!r} is inside {label} ({folder}); "
                               "keep it in a directory the gateway's state does not share")
                    break
        return out

    @property
    def checkpoint_file(self) -> Path | None:
        return self.resolve_path(self.audit.checkpoint_path) if self.audit.checkpoint_path \
            else None


    def _channel_problems(self) -> list[str]:
        out: list[str] = []
        approvers = {k.name for k in self.keys if "approver" in k.roles}
        for name, ch in self.notifications.channels.items():
            where = f"notifications.channels.{name}"
            for env in ch.environments or []:
                if env not in self.environments:
                    out.append(f"{where}.environments: unknown environment {env!r}")
            for act in ch.actions or []:
                if act not in self.actions:
                    out.append(f"{where}.actions: unknown action {act!r}")
            if ch.approver is not None and ch.approver not in approvers:
                out.append(f"{where}.approver: {ch.approver!r} is not a key with the approver "
                           "role")
            if isinstance(ch, EmailChannel) and not isinstance(
                    self.executors.get(ch.executor), SmtpExecutor):
                out.append(f"{where}.executor: {ch.executor!r} is not an smtp executor")
        return out

    def output_tool_pattern(self, name: str) -> str | None:
        """The ``output_tools`` entry that ``name`` matches, if any."""
        for pattern in self.output_tools:
            if fnmatch.fnmatchcase(name, pattern):
                return pattern
        return None

    @cached_property
    def hash(self) -> str:
        """SHA-256 of the canonical policy: recorded in every audit entry it decided."""
        canon = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True,
                           separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    # Paths in the policy are relative to the policy file's folder, set by load_policy.
    base_dir: SkipJsonSchema[str | None] = Field(default=None, exclude=True, repr=False)

    def resolve_path(self, p: str) -> Path:
        path = Path(os.path.expanduser(p))
        if not path.is_absolute() and self.base_dir:
            path = Path(self.base_dir) / path
        return path

    @property
    def state_path(self) -> Path:
        return self.resolve_path(self.state.path)

    @property
    def audit_path(self) -> Path:
        return self.resolve_path(self.audit.path)

    @property
    def audit_archive_path(self) -> Path:
        """Where rotated audit files go: ``audit.archive_dir``, or ``archive/`` beside the log."""
        if self.audit.archive_dir:
            return self.resolve_path(self.audit.archive_dir)
        return self.audit_path.parent / "archive"


def _format_errors(exc: ValidationError) -> list[str]:
    out: list[str] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "missing":
            msg = "required field missing"
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
        out.append(f"{loc}: {msg}" if loc else msg)
    return out


def _is_union_tag(part: object) -> bool:
    # Discriminated unions add the tag ("webhook", …) to the location; it is noise to a user.
    return isinstance(part, str) and part in ("webhook", "smtp", "python", "log")


def parse_policy(data: Any, *, base_dir: str | None = None, source: str = "policy") -> Policy:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: the policy must be a mapping at the top level")
    try:
        policy = Policy.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        errors = _format_errors(exc)
        raise PolicyError(f"{source}: invalid policy:\n  " + "\n  ".join(errors), errors) from exc
    return policy


POLICY_ENV = "AUTHORITY_POLICY"
DEFAULT_POLICY_FILE = "authority.yaml"


def default_policy_path(given: str | os.PathLike[str] | None = None) -> str:
    """The policy file to use: the one given, else ``$AUTHORITY_POLICY``, else
    ``authority.yaml`` (one rule for the SDK, the CLI and the proxy)."""
    return str(given or os.environ.get(POLICY_ENV) or DEFAULT_POLICY_FILE)


def load_policy(path: str | os.PathLike[str] | Policy | None = None) -> Policy:
    """Load and validate a policy file (:func:`default_policy_path` when none is given)."""
    if isinstance(path, Policy):
        return path
    p = Path(default_policy_path(path))
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read policy file: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{p}: not valid YAML: {exc}") from exc
    return parse_policy(data, base_dir=str(p.resolve().parent), source=str(p))
