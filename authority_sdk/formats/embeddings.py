"""OpenAI embeddings (``POST /embeddings``) as a wire format of the engine.

No output tokens and no calls: the model allowlist, the pre-call cost of the input
(litellm's price map), budgets, the kill switch, idempotency and the audit log apply
exactly as for chat. The answer gets the ``authority`` field like any other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ..errors import InvalidRequest, UpstreamError
from ..records import ActionOutcome
from .base import Answer, ParsedRequest, Stateless, load_body
from .chat import MAX_MODEL_CHARS

__all__ = ["Embeddings"]

MAX_INPUTS = 2048  # OpenAI's own cap on inputs per request


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_request")


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _inputs(value: Any) -> list[str | list[int]]:
    """The inputs as texts or token arrays; anything else is refused."""
    if isinstance(value, str):
        return [value]
    if value and _token_ids(value):
        return [value]  # one input given as tokens
    if not isinstance(value, list) or not value or len(value) > MAX_INPUTS:
        raise _bad(f"'input' must be a string, a list of 1 to {MAX_INPUTS} strings, or "
                   "token arrays")
    out: list[str | list[int]] = []
    for i, v in enumerate(value):
        if not (isinstance(v, str) or _token_ids(v)):
            raise _bad(f"input[{i}] must be a string or a list of token ids")
        out.append(v)
    return out


class Embeddings(Stateless):
    name = "embeddings"
    path = "/embeddings"
    followups_field = "followup_messages"

    def parse(self, body: bytes) -> ParsedRequest:
        data = load_body(body)
        if not isinstance(data, dict):
            raise _bad("the request body must be a JSON object")
        model = data.get("model")
        if not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS:
            raise _bad(f"'model' is required: a string of 1 to {MAX_MODEL_CHARS} characters")
        inputs = _inputs(data.get("input"))
        # Counted as one message per input: a few tokens more than the provider bills each,
        # an estimate that errs towards refusing, never towards overspending.
        messages = [{"role": "user", "content": v if isinstance(v, str) else " ".join(
            "x" for _ in v)} for v in inputs]
        return ParsedRequest(data=data, model=model, stream=False, n=1, explicit_limit=None,
                             limit_field="", tool_schemas={}, structured_output=True,
                             prompt_messages=messages, has_output=False)

    def upstream_body(self, req: ParsedRequest, original: bytes, changed: bool) -> bytes:
        return json.dumps(req.data).encode() if changed else original

    def read_answer(self, body: bytes, req: ParsedRequest | None = None) -> Answer:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise self._malformed("not JSON") from None
        return self.answer_from(data, req)

    def answer_from(self, data: Any, req: ParsedRequest | None = None) -> Answer:
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise self._malformed("'data' is missing or not a list")
        usage = data.get("usage")
        return Answer(data, [], usage if isinstance(usage, dict) else None)

    @staticmethod
    def _malformed(what: str) -> UpstreamError:
        return UpstreamError(f"the upstream answered with malformed embeddings: {what}",
                             code="upstream_malformed_response")

    def rewrite(self, answer: Answer, outcomes: list[ActionOutcome], *, summary: str | None,
                structured_output: bool) -> None:
        """Nothing to withhold: embeddings carry no calls."""

    def followups(self, answer: Answer, outcomes: list[ActionOutcome],
                  redact_names: list[str]) -> list[dict[str, Any]]:
        return []

    def assembler(self, req: ParsedRequest) -> Any:
        raise InvalidRequest("embeddings are not streamed")

    def synthesise_stream(self, body: dict[str, Any]) -> Iterator[bytes]:
        raise InvalidRequest("embeddings are not streamed")
