"""The Responses API's stream (``response.*`` events), gated.

``message`` events pass through as they arrive; everything from the first item of any
other kind is held until ``response.completed`` and then streamed again from the gated
answer (:func:`item_events`), so a withheld call never has an event, later items are
renumbered and ``sequence_number`` keeps increasing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import UpstreamError
from .base import Answer, ParsedRequest
from .sse import DONE, event_json, sse

if TYPE_CHECKING:
    from .responses import Responses

__all__ = ["EventSequence", "ResponsesStream", "final_type", "item_events", "malformed"]
# What passes before the hold, rebuilt from these keys only (an upstream's other fields —
# a forged "authority", chat-chunk "choices" a library would read as calls — never reach
# the app): the lifecycle events, and a message's own events at its index.
_LIFECYCLE = ("response.created", "response.in_progress", "response.queued")
_MESSAGE_EVENTS: dict[str, tuple[str, ...]] = {
    "response.output_item.added": ("item",),
    "response.output_item.done": ("item",),
    "response.content_part.added": ("item_id", "content_index", "part"),
    "response.content_part.done": ("item_id", "content_index", "part"),
    "response.output_text.delta": ("item_id", "content_index", "delta", "logprobs",
                                   "obfuscation"),
    "response.output_text.done": ("item_id", "content_index", "text", "logprobs"),
    "response.output_text.annotation.added": ("item_id", "content_index", "annotation_index",
                                              "annotation"),
    "response.refusal.delta": ("item_id", "content_index", "delta"),
    "response.refusal.done": ("item_id", "content_index", "refusal"),
}


def malformed(what: str) -> UpstreamError:
    return UpstreamError(f"the upstream answered with a malformed response: {what}",
                         code="upstream_malformed_response")


def final_type(body: dict[str, Any]) -> str:
    return "response.incomplete" if body.get("status") == "incomplete" else "response.completed"


class EventSequence:
    """The stream's ``sequence_number``: increasing over every event the client gets."""

    def __init__(self) -> None:
        self.n = 0

    def event(self, obj: dict[str, Any]) -> bytes:
        obj["sequence_number"] = self.n
        self.n += 1
        return sse(obj)


def item_events(seq: EventSequence, index: int, item: dict[str, Any]) -> Iterator[bytes]:
    """One finished output item as the events that stream it (its place in ``output``)."""
    kind = item.get("type")
    iid = item.get("id")
    base = {"item_id": iid, "output_index": index}
    if kind == "function_call":
        yield seq.event({"type": "response.output_item.added", "output_index": index,
                         "item": {**item, "arguments": "", "status": "in_progress"}})
        args = item.get("arguments") or ""
        yield seq.event({"type": "response.function_call_arguments.delta", **base,
                         "delta": args})
        yield seq.event({"type": "response.function_call_arguments.done", **base,
                         "arguments": args, "name": item.get("name")})
    elif kind == "custom_tool_call":
        yield seq.event({"type": "response.output_item.added", "output_index": index,
                         "item": {**item, "input": ""}})
        text = item.get("input") or ""
        yield seq.event({"type": "response.custom_tool_call_input.delta", **base,
                         "delta": text})
        yield seq.event({"type": "response.custom_tool_call_input.done", **base,
                         "input": text})
    elif kind == "message":
        yield seq.event({"type": "response.output_item.added", "output_index": index,
                         "item": {**item, "content": [], "status": "in_progress"}})
        for ci, part in enumerate(item.get("content") or []):
            where = {**base, "content_index": ci}
            if not isinstance(part, dict) or part.get("type") != "output_text":
                yield seq.event({"type": "response.content_part.added", **where,
                                 "part": part})
                yield seq.event({"type": "response.content_part.done", **where,
                                 "part": part})
                continue
            text = part.get("text") or ""
            yield seq.event({"type": "response.content_part.added", **where,
                             "part": {**part, "text": ""}})
            yield seq.event({"type": "response.output_text.delta", **where, "delta": text,
                             "logprobs": []})
            yield seq.event({"type": "response.output_text.done", **where, "text": text,
                             "logprobs": []})
            yield seq.event({"type": "response.content_part.done", **where, "part": part})
    else:
        yield seq.event({"type": "response.output_item.added", "output_index": index,
                         "item": item})
    yield seq.event({"type": "response.output_item.done", "output_index": index,
                     "item": item})


class ResponsesStream:
    """Events of ``message`` items pass through as they arrive; from the first item of any
    other type (a call, reasoning, a type unknown here) every event is held until
    ``response.completed``, whose response is the answer gated. The held part is then
    streamed again from the rewritten answer: a withheld item has no event at all, later
    items are renumbered and ``sequence_number`` keeps increasing."""

    def __init__(self, fmt: Responses, req: ParsedRequest) -> None:
        self.fmt = fmt
        self.req = req
        self.seq = EventSequence()
        self.kinds: list[str] = []  # the type of each output item announced so far
        self.hold_from: int | None = None
        self.final: dict[str, Any] | None = None
        self.finished = False

    def feed(self, payload: str) -> list[bytes]:
        try:
            event = event_json(payload, "a stream event")
        except ValueError as exc:
            raise malformed(str(exc)) from None
        if event is DONE:
            self.finished = True
            return []
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise malformed("a stream event is not an object with a 'type'")
        kind = event["type"]
        if kind in ("error", "response.failed") or event.get("error"):
            # An event of any other kind carrying an error is the upstream failing too (the
            # client's library would raise on it, with no code and nothing on the record).
            response = event.get("response")
            err = event.get("error") or (response.get("error") if isinstance(response, dict)
                                         else None)
            msg = err.get("message", "error") if isinstance(err, dict) else str(err)
            raise UpstreamError(f"the upstream failed mid-stream: {str(msg)[:500]}")
        if kind in ("response.completed", "response.incomplete"):
            if not isinstance(event.get("response"), dict):
                raise malformed(f"'{kind}' carries no response")
            self.final = event["response"]
            self.finished = True
            return []
        if kind in _LIFECYCLE:
            response = event.get("response")
            if not isinstance(response, dict):
                raise malformed(f"'{kind}' carries no response")
            if response.get("output"):
                # Output here would reach the app before the gate.
                raise malformed(f"'{kind}' already carries output items")
            return [self.seq.event({"type": kind, "response": {
                k: v for k, v in response.items() if k != "authority"}})]
        index = event.get("output_index")
        if isinstance(index, bool) or not isinstance(index, int):
            return []  # an event about nothing the client needs: not passed on
        if kind == "response.output_item.added":
            item = event.get("item")
            if index != len(self.kinds) or not isinstance(item, dict):
                raise malformed("output items were announced out of order")
            self.kinds.append(str(item.get("type")))
            if item.get("type") != "message" and self.hold_from is None:
                self.hold_from = index
        elif not 0 <= index < len(self.kinds):
            raise malformed("an event refers to an output item never announced")
        if self.hold_from is not None and index >= self.hold_from:
            return []
        item = event.get("item")
        if item is not None and (not isinstance(item, dict)
                                 or item.get("type") != self.kinds[index]):
            # Only messages pass before the hold: an event re-typing one as a call would
            # hand the app that call ungated.
            raise malformed(f"an event re-types output item {index} announced as "
                            f"{self.kinds[index][:64]!r}")
        keys = _MESSAGE_EVENTS.get(kind)
        if keys is None:
            return []  # not a message's event (a call's arguments at a message's index…)
        return [self.seq.event({"type": kind, "output_index": index,
                                **{k: event[k] for k in keys if k in event}})]

    def answer(self) -> Answer:
        if self.final is None:
            raise malformed("the stream ended before 'response.completed'")
        answer = self.fmt.answer_from(self.final, self.req)
        passed = len(self.kinds) if self.hold_from is None else self.hold_from
        output = answer.body["output"]
        if len(output) < passed or any(output[i].get("type") != "message"
                                       for i in range(passed)):
            # What was streamed must be what is gated: a final response that disagrees
            # with its own events is refused.
            raise malformed("'response.completed' disagrees with the streamed items")
        return answer

    def closing(self, answer: Answer, authority: dict[str, Any]) -> list[bytes]:
        body = answer.body
        body["authority"] = authority
        passed = len(self.kinds) if self.hold_from is None else self.hold_from
        out: list[bytes] = []
        for i, item in enumerate(body["output"]):
            if i >= passed:
                out.extend(item_events(self.seq, i, item))
        out.append(self.seq.event({"type": final_type(body), "response": body}))
        return out
