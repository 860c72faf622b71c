"""Prompt token counting for the pre-call cost estimate (DESIGN.md §2).

Encodings come from tiktoken, but their BPE files are read from the copies
litellm ships (``litellm/litellm_core_utils/tokenizers/``, named as tiktoken's
cache expects), so cl100k and o200k load with no network. litellm itself is
never imported: its folder is found with ``importlib.util.find_spec``.

Accounting follows OpenAI's cookbook (``num_tokens_from_messages``): 3 tokens
per message, plus every string field (role, content, name, tool_call_id…),
plus 1 per ``name``, plus 3 to prime the reply. Assistant ``tool_calls`` count
their function name and arguments. Content parts count their text; images and
audio count as the provider bills them (:mod:`.media`, :mod:`.vision`), and
what only the model's input window bounds (files…) is reported in
:attr:`PromptCount.unseen_parts` for the cost plan to price. Each tool
definition, and each legacy ``functions`` entry (rendered the same way),
counts the tokens of its canonical JSON, plus :data:`TOOLS_OVERHEAD` once; a
forced ``tool_choice``/``function_call`` counts its name.

Agents resend their whole conversation every turn, so each message's count is
cached in a bounded LRU (plain text messages by the interpreter's string hash,
others by a digest of their canonical JSON and the model's image family): a
turn pays only for the messages that are new.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequest
from .media import part_cost
from .vision import ImageRule, image_rule

if TYPE_CHECKING:
    from tiktoken import Encoding

__all__ = [
    "TOOLS_OVERHEAD",
    "CounterStats",
    "PromptCount",
    "TokenCounter",
    "default_counter",
    "encoding_for_model",
    "encoding_name_for_model",
    "litellm_package_dir",
]

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
TOOLS_OVERHEAD = 9  # what OpenAI adds around the function namespace it renders
CHOICE_OVERHEAD = 4  # a forced function choice, besides the function's name

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


@dataclass(frozen=True, slots=True)
class PromptCount:
    """The prompt of one request as the gateway counts it."""

    tokens: int  # every token counted: text, tool definitions, images, audio
    image_tokens: int = 0  # of which image tokens (billed at the model's image rate, if any)
    audio_tokens: int = 0  # of which audio tokens (billed at the model's audio rate)
    unseen_parts: int = 0  # content only the model's input window bounds (see .media)


# A message with content parts: (tokens, image tokens, audio tokens, unseen parts).
_Rich = tuple[int, int, int, int]
_STR_ONLY = frozenset((str,))
# A cache key, the function that counts on a miss, and its arguments.
_Job = tuple[int, "Callable[..., int | _Rich]", tuple[Any, ...]]


class TokenCounter:
    """Counts prompt tokens, caching each message and tool definition by its content hash.

    Thread-safe. The cache is a bounded LRU, so memory stays flat however many
    conversations pass through.
    """

    def __init__(self, max_entries: int = 50_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._cache: OrderedDict[int, int | _Rich] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    # -- public -----------------------------------------------------------------------------

    def count_request(self, model: str, body: Mapping[str, Any]) -> PromptCount:
        """The prompt of a chat completion request: messages, reply priming, tool and legacy
        function definitions, and a forced tool or function choice."""
        messages = body.get("messages")
        return self._count(
            model, messages if isinstance(messages, list) else [], body.get("tools"),
            body.get("functions"), (body.get("tool_choice"), body.get("function_call")),
        )

    def count_prompt(
        self,
        model: str,
        messages: Sequence[Any],
        tools: Sequence[Any] | None = None,
        functions: Sequence[Any] | None = None,
    ) -> int:
        """Prompt tokens of a chat request: its messages, reply priming and tool definitions
        (``functions``, the legacy spelling, count like tools). Content the gateway cannot
        see (:attr:`PromptCount.unseen_parts`) is not in this number."""
        return self._count(model, messages, tools, functions, ()).tokens

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

    def _count(self, model: str, messages: Sequence[Any], tools: Any, functions: Any,
               choices: tuple[Any, ...]) -> PromptCount:
        try:
            return self._count_unguarded(model, messages, tools, functions, choices)
        except RecursionError:
            raise InvalidRequest("the request is nested too deeply to be priced") from None

    def _count_unguarded(self, model: str, messages: Sequence[Any], tools: Any,
                         functions: Any, choices: tuple[Any, ...]) -> PromptCount:
        enc_name = encoding_name_for_model(model)
        jobs: list[_Job] = []
        rule: ImageRule | None = None
        for message in messages:
            if type(message) is dict and set(map(type, message.values())) <= _STR_ONLY:
                # Plain text messages (most of a conversation): Python's own 64-bit string
                # hash, computed once per string and cached by the interpreter, instead of
                # sorted JSON and blake2b, which cost more than the lookup they serve. A
                # collision (2**-64) would only misprice an estimate, never decide an action.
                jobs.append((hash((enc_name, tuple(message.items()))), _plain_tokens,
                             (enc_name, message)))
                continue
            if rule is None:
                rule = image_rule(model)
            # Image tokens depend on the model's family, not only on its encoding. The key is
            # the interpreter's hash of the message's structure, as for plain messages: a
            # digest of its JSON would cost ~40 ms for a 4 MB image, every turn.
            key = hash((enc_name, rule.name, "m", _freeze(message)))
            jobs.append((key, _rich_tokens, (enc_name, rule, message)))
        definitions = [*_as_list(tools), *(_as_tool(fn) for fn in _as_list(functions))]
        for tool in definitions:
            jobs.append((hash((enc_name, "t", _freeze(tool))), _tool_tokens, (enc_name, tool)))
        total = REPLY_PRIMING + (TOOLS_OVERHEAD if definitions else 0)
        image = audio = unseen = 0
        for value in self._lookup(jobs):
            if type(value) is int:
                total += value
            else:
                assert isinstance(value, tuple)
                total += value[0]
                image += value[1]
                audio += value[2]
                unseen += value[3]
        for choice in choices:
            if choice is not None and choice != "auto":
                total += _choice_tokens(_encoding(enc_name), choice)
        return PromptCount(total, image, audio, unseen)

    def _lookup(self, jobs: list[_Job]) -> list[int | _Rich]:
        """Each job's count: cached ones under one lock, the rest counted outside it."""
        out: list[int | _Rich | None] = []
        missing: list[int] = []
        with self._lock:
            cache = self._cache
            for i, (key, _, _) in enumerate(jobs):
                hit = cache.get(key)
                if hit is None:
                    missing.append(i)
                else:
                    cache.move_to_end(key)
                out.append(hit)
            self._hits += len(jobs) - len(missing)
        if missing:
            # Two threads may both count a new message, which is harmless.
            for i in missing:
                _, count, args = jobs[i]
                out[i] = count(*args)
            with self._lock:
                self._misses += len(missing)
                for i in missing:
                    key = jobs[i][0]
                    value = out[i]
                    assert value is not None
                    cache[key] = value
                    cache.move_to_end(key)
                while len(cache) > self.max_entries:
                    cache.popitem(last=False)
        return out  # type: ignore[return-value]  # every None was filled in above


def _plain_tokens(enc_name: str, message: Mapping[str, str]) -> int:
    enc = _encoding(enc_name)
    n = TOKENS_PER_MESSAGE
    for key, value in message.items():
        n += _text_tokens(enc, value)
        if key == "name":
            n += TOKENS_PER_NAME
    return n


def _rich_tokens(enc_name: str, rule: ImageRule, message: Any) -> _Rich:
    enc = _encoding(enc_name)
    if not isinstance(message, Mapping):
        return TOKENS_PER_MESSAGE + _text_tokens(enc, _canonical(message)), 0, 0, 0
    n = TOKENS_PER_MESSAGE
    image = audio = unseen = 0
    for key, value in message.items():
        if value is None:
            continue
        if key == "content" and isinstance(value, list):
            for part in value:
                if isinstance(part, str):
                    n += _text_tokens(enc, part)
                    continue
                if not isinstance(part, Mapping):
                    n += _text_tokens(enc, _canonical(part))
                    continue
                kind = part.get("type")
                if kind in ("text", "refusal"):
                    n += _text_tokens(enc, _as_text(part.get(kind)))
                    continue
                cost = part_cost(part, rule)
                n += cost.image_tokens + cost.audio_tokens
                image += cost.image_tokens
                audio += cost.audio_tokens
                unseen += cost.unseen
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                if isinstance(call, Mapping):
                    n += _function_tokens(enc, call.get("function"))
                else:
                    n += _text_tokens(enc, _canonical(call))
        elif key == "function_call":
            n += _function_tokens(enc, value)
        elif key == "audio":
            unseen += 1  # an earlier answer's audio, by id: its length is not in the request
        elif isinstance(value, str):
            n += _text_tokens(enc, value)
            if key == "name":
                n += TOKENS_PER_NAME
        else:
            # Any other structured field: its JSON is an upper bound on the text it adds.
            n += _text_tokens(enc, _canonical(value))
    return n, image, audio, unseen


def _freeze(obj: Any) -> Any:
    """A hashable image of a JSON value; equal values give equal images (bool and float are
    tagged so that ``true``, ``1`` and ``1.0`` stay apart)."""
    t = type(obj)
    if t is dict:
        return ("{", *((k, _freeze(v)) for k, v in obj.items()))
    if t is list:
        return ("[", *(_freeze(v) for v in obj))
    if t is bool or t is float:
        return t, obj
    if t is str or t is int or obj is None:
        return obj
    return repr(obj)  # not from JSON (a caller's own object): its text is its identity


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _as_tool(fn: Any) -> Any:
    # A legacy function definition is rendered exactly like a tool's function.
    return {"type": "function", "function": fn}


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else _canonical(value)


def _tool_tokens(enc_name: str, tool: Any) -> int:
    fn = tool.get("function") if isinstance(tool, Mapping) else None
    text = _canonical(fn if isinstance(fn, Mapping) else tool)
    return _text_tokens(_encoding(enc_name), text)


def _function_tokens(enc: Encoding, fn: Any) -> int:
    if not isinstance(fn, Mapping):
        return 0 if fn is None else _text_tokens(enc, _canonical(fn))
    n = 0
    for field in ("name", "arguments"):
        value = fn.get(field)
        if value is not None:
            n += _text_tokens(enc, value if isinstance(value, str) else _canonical(value))
    return n


def _choice_tokens(enc: Encoding, choice: Any) -> int:
    """A forced ``tool_choice``/``function_call``: OpenAI adds 1 token for "none" and the
    name plus 4 for a named function (measured by hmarr/openai-chat-tokens)."""
    if choice == "none":
        return 1
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else choice.get("name")
        return CHOICE_OVERHEAD + _text_tokens(enc, _as_text(name))
    return CHOICE_OVERHEAD  # "required", or a value the upstream will refuse


default_counter = TokenCounter()
