"""Wire formats of the engine, by the API path they serve."""

from __future__ import annotations

from .base import Answer, Call, ParsedRequest, StreamAssembler, WireFormat
from .chat import ChatCompletions
from .embeddings import Embeddings
from .responses import Responses

__all__ = ["Answer", "Call", "ChatCompletions", "Embeddings", "ParsedRequest", "Responses",
           "StreamAssembler",
           "WireFormat", "format_for_path"]

_BY_PATH: dict[str, WireFormat] = {}


def register(fmt: WireFormat) -> None:
    _BY_PATH[fmt.path] = fmt


register(ChatCompletions())
register(Embeddings())
register(Responses())


def format_for_path(path: str) -> WireFormat | None:
    """The format serving ``path`` (``/v1/chat/completions`` or ``/chat/completions``)."""
    p = path.rstrip("/")
    for suffix, fmt in _BY_PATH.items():
        if p.endswith(suffix):
            return fmt
    return None
