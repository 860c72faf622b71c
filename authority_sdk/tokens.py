"""Prompt token counting for the pre-call cost estimate (DESIGN.md §2).

Encodings come from tiktoken, but their BPE files are read from the copies
litellm ships (``litellm/litellm_core_utils/tokenizers/``, named as tiktoken's
cache expects), so cl100k and o200k load with no network. litellm itself is
never imported: its folder is found with ``importlib.util.find_spec``.

Accounting follows OpenAI's cookbook (``num_tokens_from_messages``): 3 tokens
per message, plus every string field (role, content, name, tool_call_id…),
plus 1 per ``name``, plus 3 to prime the reply. Assistant ``tool_calls`` count
their function name and arguments. Content parts count their text; an image
part counts a fixed :data:`IMAGE_TOKENS` (85, OpenAI's low-detail price) since
its real size is not known without decoding it, so high-detail images are
under-counted. Audio and file parts count nothing. Each tool definition counts
the tokens of its canonical JSON, plus :data:`TOOLS_OVERHEAD` once.

Agents resend their whole conversation every turn, so each message's count is
cached by a hash of its canonical JSON in a bounded LRU: a turn pays only for
the messages that are new.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tiktoken import Encoding

__all__ = [
    "IMAGE_TOKENS",
    "TOOLS_OVERHEAD",
    "CounterStats",
    "TokenCounter",
    "default_counter",
    "encoding_for_model",
    "encoding_name_for_model",
    "litellm_package_dir",
]

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
IMAGE_TOKENS = 85
TOOLS_OVERHEAD = 9  # what OpenAI adds around the function namespace it renders

_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")

# Above this size a text is encoded in pieces cut at whitespace: some tiktoken versions are
# quadratic on long runs without a break, and a request body may be megabytes.
_CHUNK_CHARS = 16_384


def litellm_package_dir() -> Path | None:
    """litellm's installed folder, found without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec("litellm")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def encoding_name_for_model(model: str) -> str:
    """``o200k_base`` for the GPT-4o generation and later, ``cl100k_base`` for everything else."""
    name = model.rsplit("/", 1)[-1].lower()
    if name.startswith("ft:"):
        name = name[3:]
    return "o200k_base" if name.startswith(_O200K_PREFIXES) else "cl100k_base"


_encodings: dict[str, Encoding] = {}
_encodings_lock = threading.Lock()


def _point_tiktoken_at_litellm() -> None:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return  # the user chose a cache; respect it
    pkg = litellm_package_dir()
    if pkg is None:
        return
    folder = pkg / "litellm_core_utils" / "tokenizers"
    if folder.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)


def _encoding(name: str) -> Encoding:
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    with _encodings_lock:
        enc = _encodings.get(name)
        if enc is None:
            _point_tiktoken_at_litellm()
            import tiktoken  # deferred: loading it and its BPE files is the slow part

            enc = tiktoken.get_encoding(name)
            _encodings[name] = enc
    return enc


def encoding_for_model(model: str) -> Encoding:
    """The (lazily loaded, shared) tiktoken encoding used to count ``model``'s prompts."""
    return _encoding(encoding_name_for_model(model))


def _chunks(text: str) -> Iterable[str]:
    start, n = 0, len(text)
    while n - start > _CHUNK_CHARS:
        end = start + _CHUNK_CHARS
        cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
        if cut > start:
            end = cut
        yield text[start:end]
        start = end
    yield text[start:]


def _text_tokens(enc: Encoding, text: str) -> int:
    if len(text) <= _CHUNK_CHARS:
        return len(enc.encode_ordinary(text))
    return sum(len(enc.encode_ordinary(piece)) for piece in _chunks(text))


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


@dataclass(frozen=True)
class CounterStats:
    hits: int
    misses: int
    entries: int
    max_entries: int


class TokenCounter:
    """Counts prompt tokens, caching each message and tool definition by its content hash.

    Thread-safe. The cache is a bounded LRU, so memory stays flat however many
    conversations pass through.
    """

    def __init__(self, max_entries: int = 50_000, image_tokens: int = IMAGE_TOKENS) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.image_tokens = image_tokens
        self._cache: OrderedDict[bytes | int, int] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    # -- public -----------------------------------------------------------------------------

    def count_prompt(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> int:
        """Prompt tokens of a chat request: its messages, reply priming and tool definitions."""
        enc_name = encoding_name_for_model(model)
        total = REPLY_PRIMING
        for message in messages:
            total += self._cached(enc_name, "m", message, self._message_tokens)
        if tools:
            total += TOOLS_OVERHEAD
            for tool in tools:
                total += self._cached(enc_name, "t", tool, self._tool_tokens)
        return total

    def count_text(self, model: str, text: str) -> int:
        """Tokens of a plain string (no caching: callers use it for one-off text)."""
        return _text_tokens(_encoding(encoding_name_for_model(model)), text)

    def stats(self) -> CounterStats:
        with self._lock:
            return CounterStats(self._hits, self._misses, len(self._cache), self.max_entries)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    # -- internals --------------------------------------------------------------------------

    def _cached(
        self,
        enc_name: str,
        kind: str,
        obj: Mapping[str, Any],
        count: Callable[[Encoding, Mapping[str, Any], str], int],
    ) -> int:
        key: bytes | int
        if kind == "m" and all(type(v) is str for v in obj.values()):
            # Plain text messages (most of a conversation): Python's own 64-bit string hash,
            # computed once per string and cached by the interpreter, instead of sorted JSON
            # and blake2b, which cost more than the lookup they serve. A collision (2**-64)
            # would only misprice an estimate, never decide an action.
            key = hash((enc_name, tuple(obj.items())))
            canon = ""
        else:
            canon = _canonical(obj)
            key = hashlib.blake2b(
                f"{enc_name}\0{kind}\0{canon}".encode(), digest_size=16
            ).digest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self._hits += 1
                return hit
        # Encode outside the lock: two threads may both count a new message, which is harmless.
        n = count(_encoding(enc_name), obj, canon)
        with self._lock:
            self._misses += 1
            self._cache[key] = n
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return n

    def _message_tokens(self, enc: Encoding, message: Mapping[str, Any], _canon: str) -> int:
        n = TOKENS_PER_MESSAGE
        for key, value in message.items():
            if value is None:
                continue
            if key == "content" and not isinstance(value, str):
                n += self._content_tokens(enc, value)
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    if isinstance(call, Mapping):
                        n += _function_tokens(enc, call.get("function"))
            elif key == "function_call":
                n += _function_tokens(enc, value)
            elif isinstance(value, str):
                n += _text_tokens(enc, value)
                if key == "name":
                    n += TOKENS_PER_NAME
        return n

    def _content_tokens(self, enc: Encoding, content: Any) -> int:
        if not isinstance(content, list):
            return 0
        n = 0
        for part in content:
            if isinstance(part, str):
                n += _text_tokens(enc, part)
            elif isinstance(part, Mapping):
                kind = part.get("type")
                if kind == "text":
                    n += _text_tokens(enc, str(part.get("text") or ""))
                elif kind == "refusal":
                    n += _text_tokens(enc, str(part.get("refusal") or ""))
                elif kind in ("image_url", "image"):
                    n += self.image_tokens
        return n

    @staticmethod
    def _tool_tokens(enc: Encoding, tool: Mapping[str, Any], canon: str) -> int:
        fn = tool.get("function")
        text = _canonical(fn) if isinstance(fn, Mapping) else canon
        return _text_tokens(enc, text)


def _function_tokens(enc: Encoding, fn: Any) -> int:
    if not isinstance(fn, Mapping):
        return 0
    n = 0
    for field in ("name", "arguments"):
        value = fn.get(field)
        if value is not None:
            n += _text_tokens(enc, value if isinstance(value, str) else _canonical(value))
    return n


default_counter = TokenCounter()
