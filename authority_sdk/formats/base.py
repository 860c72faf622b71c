"""What a wire format must provide to the engine (DESIGN.md §10 "Wire formats").

Chat completions and the Responses API are two formats of one engine. A format
parses a request (the model, the prompt to count, the output-limit field), finds
the calls in an answer, rewrites the answer (withhold, summarise, attach
``authority``) and its stream, and builds the follow-ups an aware app sends
next. Policy, modes, executors, approvals and audit never see which format
carried an action: they see :class:`Call`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..effects import Decision
    from ..records import ActionOutcome

__all__ = ["Answer", "Call", "ParsedRequest", "Stateless", "StreamAssembler", "WireFormat",
           "load_body"]


@dataclass
class ParsedRequest:
    """A client's request, parsed strictly, with what the engine decides on."""

    data: dict[str, Any]  # the body as parsed (the engine may add an output limit)
    model: str
    stream: bool
    n: int
    explicit_limit: int | None  # the output limit the client set, if any
    limit_field: str  # where the gateway writes an output limit it chooses
    tool_schemas: dict[str, dict[str, Any]]  # tool name -> JSON schema the request declares
    structured_output: bool  # the answer's content must stay valid (response_format …)
    # Prompt parts to count: (messages, tools) in the chat shape the token counter takes.
    prompt_messages: list[Any] = field(default_factory=list)
    prompt_tools: list[Any] | None = None
    client_wants_usage: bool = False
    has_output: bool = True  # False: priced by its input alone (embeddings)
    # Tokens of a server-side history the request continues (billed again, not in the body).
    history_tokens: int = 0
    hosted_tools: list[str] = field(default_factory=list)  # provider-run tools it offers
    mcp_servers: dict[str, str] = field(default_factory=dict)  # MCP server label -> server
    rewritten: bool = False  # the gateway changed ``data``: send it re-serialised
    # Held actions decided since the app last heard (held_turns): told in the answer.
    approval_updates: list[dict[str, Any]] = field(default_factory=list)

    def count_body(self) -> dict[str, Any]:
        """The prompt in the chat shape the token counter reads (messages, tools, a forced
        tool choice): a chat body as it is; other formats translate theirs."""
        body: dict[str, Any] = {"messages": self.prompt_messages}
        if self.prompt_tools:
            body["tools"] = self.prompt_tools
        for name in ("tool_choice", "function_call"):
            if self.data.get(name) is not None:
                body[name] = self.data[name]
        return body


@dataclass
class Call:
    """One call-like item of an answer: a candidate action."""

    choice: int  # which alternative (chat ``choices[i]``); 0 for single-output formats
    position: int  # order within its choice
    kind: str  # tool_call | function_call | custom | …
    call_id: str | None
    name: str
    arguments: str  # JSON text as the model wrote it (custom tools: {"input": text})
    problem: str | None = None  # a shape the gateway cannot read: denied as invalid
    problem_code: str | None = None  # the denial's code (default: invalid_arguments)


@dataclass
class Answer:
    """An upstream answer, validated where gating reads it."""

    body: dict[str, Any]
    calls: list[Call]
    usage: dict[str, Any] | None


class StreamAssembler(Protocol):
    """Turns upstream stream events into pass-through bytes and, at the end, an Answer."""

    finished: bool

    def feed(self, payload: str) -> list[bytes]:
        """One SSE ``data`` payload in; the bytes that may go to the client now out."""
        ...

    def answer(self) -> Answer:
        """The assembled answer once the stream ended (``[DONE]`` or EOF)."""
        ...

    def closing(self, answer: Answer, authority: dict[str, Any]) -> list[bytes]:
        """The events after gating: calls kept, the summary, usage, ``authority``, end."""
        ...


class WireFormat(Protocol):
    name: str
    path: str  # the API path it serves, e.g. "/chat/completions"
    followups_field: str  # where ``authority`` carries what an aware app sends next

    def parse(self, body: bytes) -> ParsedRequest:
        """Strictly parse and validate a request; ``InvalidRequest`` on anything wrong."""
        ...

    def upstream_body(self, req: ParsedRequest, original: bytes, changed: bool) -> bytes:
        """Exactly the bytes the gateway decided on (re-serialised only when it changed
        something: an output limit it chose, usage it needs from a stream)."""
        ...

    def read_answer(self, body: bytes, req: ParsedRequest | None = None) -> Answer:
        """Parse and validate an upstream answer (to ``req``); ``UpstreamError`` with code
        ``upstream_malformed_response`` when gating cannot read it."""
        ...

    def answer_from(self, data: Any, req: ParsedRequest | None = None) -> Answer:
        """The same, from an already parsed body (a stored answer re-gated)."""
        ...

    def rewrite(self, answer: Answer, outcomes: list[ActionOutcome], *,
                summary: str | None, structured_output: bool) -> None:
        """Withhold every call the app may not run now; put the summary in the content."""
        ...

    def followups(self, answer: Answer, outcomes: list[ActionOutcome],
                  redact_names: list[str]) -> list[dict[str, Any]]:
        """What an aware app sends next to continue the conversation."""
        ...

    def assembler(self, req: ParsedRequest) -> StreamAssembler:
        ...

    def synthesise_stream(self, body: dict[str, Any]) -> Iterator[bytes]:
        """A finished answer as a stream (a takeover re-gates a stored answer)."""
        ...

    def prepare_d(self, req: ParsedRequest, *, caller: str,
                  environment: str) -> Decision[None]:
        """Read the server-side state a request continues, before it is priced (may set
        ``history_tokens``, or change ``data`` and set ``rewritten``)."""
        ...

    def record_d(self, req: ParsedRequest, answer: Answer, authority: dict[str, Any], *,
                 caller: str, environment: str, ttl_s: float) -> Decision[None]:
        """Keep what a later request may continue (after the answer is gated)."""
        ...


class Stateless:
    """A format with no server-side state: nothing to read before, nothing to record."""

    def prepare_d(self, req: ParsedRequest, *, caller: str,
                  environment: str) -> Decision[None]:
        yield from ()

    def record_d(self, req: ParsedRequest, answer: Answer, authority: dict[str, Any], *,
                 caller: str, environment: str, ttl_s: float) -> Decision[None]:
        yield from ()


def load_body(body: bytes) -> Any:
    """A request body parsed strictly (``strictjson``), or a 400 saying what is wrong."""
    from .. import strictjson
    from ..errors import InvalidRequest

    try:
        return strictjson.loads(body)
    except strictjson.StrictJSONError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
