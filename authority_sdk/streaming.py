"""Gate a streamed answer (DESIGN.md §3 "Streaming"), for any wire format.

What may go to the client at once (content) passes through as it arrives; calls
are held until the stream has ended — the moment each call is complete *and*
the usage is known, so the post-call ceiling can still stop them — then gated
by exactly the decision that gates a plain answer (``Engine.finalize_d``), and
emitted or withheld by the format's closing events. The upstream is always asked
for usage; the client gets it only if it asked.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from .effects import arun, run
from .errors import AuthorityError, UpstreamError
from .formats.sse import SSEDecoder
from .wire import GatewayResponse, error_response

if TYPE_CHECKING:
    from .engine import CallContext, Engine, UpstreamReply

log = logging.getLogger("authority.engine")

__all__ = ["StreamGate"]


class StreamGate:
    def __init__(self, engine: Engine, ctx: CallContext, reply: UpstreamReply) -> None:
        assert ctx.fmt is not None and ctx.parsed is not None
        self.engine = engine
        self.ctx = ctx
        self.reply = reply
        self.decoder = SSEDecoder()
        self.stream = ctx.fmt.assembler(ctx.parsed)
        self.emitted: list[bytes] = []
        self.finished = False

    def _record(self, parts: list[bytes]) -> list[bytes]:
        if self.ctx.claim is not None:
            self.emitted.extend(parts)
        return parts

    def _headers(self) -> dict[str, str]:
        return {"content-type": "text/event-stream", "cache-control": "no-cache",
                "x-request-id": self.ctx.request_id}

    def _internal(self, err: AuthorityError) -> bytes:
        """The event that ends a stream the gateway failed after its decision began (the
        decision's entry may be written; ``Engine.internal_d`` added one saying so)."""
        log.exception("internal error in streamed request %s", self.ctx.request_id)
        return b"data: " + error_response(err, request_id=self.ctx.request_id).body + b"\n\n"

    def _feed(self, raw: bytes) -> list[bytes]:
        try:
            payloads = self.decoder.feed(raw)
        except ValueError as exc:
            raise UpstreamError(f"the upstream stream is malformed: {exc}",
                                code="upstream_malformed_response") from None
        out: list[bytes] = []
        for payload in payloads:
            if not self.stream.finished:
                out.extend(self.stream.feed(payload))
        return self._record(out)

    # -- sync ---------------------------------------------------------------------------

    def _iter(self) -> Iterator[bytes]:
        assert self.reply.chunks is not None
        rt = self.engine.runtime
        try:
            for raw in self.reply.chunks:
                yield from self._feed(raw)
            yield from self._feed(b"\n\n")
            answer = self.stream.answer()
            authority = run(self.engine.finalize_d(self.ctx, answer), rt)
            self.finished = True
            tail = self._record(self.stream.closing(answer, authority))
            # Stored before the last chunks go out: openai's Stream stops reading at [DONE]
            # and closes the response, so code after the final yield may never run.
            run(self.engine.store_answer_d(self.ctx, 200, self._headers(),
                                           b"".join(self.emitted)), rt)
            yield from tail
        except AuthorityError as exc:
            yield run(self.engine.stream_error_d(self.ctx, exc), rt)
        except Exception as exc:  # a broken connection mid-stream, or a failure of ours
            if self.ctx.done:
                yield self._internal(run(self.engine.internal_d(self.ctx, exc), rt))
            else:
                yield run(self.engine.stream_error_d(self.ctx, UpstreamError(
                    f"the upstream stream broke: {type(exc).__name__}")), rt)
        finally:
            if not self.finished and not self.ctx.done:
                # The client stopped reading before the end: none of this answer's actions
                # runs, and the request still gets its audit entry and releases its claims.
                run(self.engine.stream_error_d(self.ctx, UpstreamError(
                    "the client closed the stream before its end", code="client_closed_stream")),
                    rt)
            if self.reply.close:
                self.reply.close()
            if self.ctx.trace is not None:
                self.ctx.trace.finish(200)  # an error event set its code

    # -- async --------------------------------------------------------------------------

    async def _aiter(self) -> AsyncIterator[bytes]:
        assert self.reply.achunks is not None
        rt = self.engine.runtime
        # Still in flight: Engine.ahandle returned when the stream began, and while this
        # one streams, another request's writes must not block the loop on their sync.
        rt.in_flight += 1
        try:
            async for raw in self.reply.achunks:
                for part in self._feed(raw):
                    yield part
            tail_in = self._feed(b"\n\n")
            answer = self.stream.answer()
            authority = await arun(self.engine.finalize_d(self.ctx, answer), rt)
            self.finished = True
            tail = tail_in + self._record(self.stream.closing(answer, authority))
            await arun(self.engine.store_answer_d(self.ctx, 200, self._headers(),
                                                  b"".join(self.emitted)), rt)
            for part in tail:
                yield part
        except AuthorityError as exc:
            yield await arun(self.engine.stream_error_d(self.ctx, exc), rt)
        except Exception as exc:
            if self.ctx.done:
                yield self._internal(await arun(self.engine.internal_d(self.ctx, exc), rt))
            else:
                yield await arun(self.engine.stream_error_d(self.ctx, UpstreamError(
                    f"the upstream stream broke: {type(exc).__name__}")), rt)
        finally:
            try:
                if not self.finished and not self.ctx.done:
                    await arun(self.engine.stream_error_d(self.ctx, UpstreamError(
                        "the client closed the stream before its end",
                        code="client_closed_stream")), rt)
                if self.reply.close:
                    res = self.reply.close()
                    if hasattr(res, "__await__"):
                        await res
                if self.ctx.trace is not None:
                    self.ctx.trace.finish(200)  # an error event set its code
            finally:
                rt.in_flight -= 1

    def response(self) -> GatewayResponse:
        return GatewayResponse(200, self._headers(), stream=self._iter(),
                               request_id=self.ctx.request_id, decision="allow")

    def aresponse(self) -> GatewayResponse:
        return GatewayResponse(200, self._headers(), astream=self._aiter(),
                               request_id=self.ctx.request_id, decision="allow")
