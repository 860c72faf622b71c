"""The prompt cost of a content part that is not text: images, audio, files (DESIGN.md §2).

Each part is priced as the provider bills it, from what the request itself shows and
nothing fetched:

* ``image_url`` (and the ``image``/``input_image`` spellings): by the model's image rule
  (:mod:`.vision`) at the part's ``detail``, with the size read from a data URL's header;
  an image by URL, or bytes we cannot read, costs the most that rule allows.
* ``input_audio``: :data:`AUDIO_TOKENS_PER_SECOND` times an upper bound on its duration
  (a WAV header's sample layout, an MP3's lowest legal bit rate).
* ``file`` (``file_data`` or ``file_id``), audio in another format, a previous answer's
  audio by id, and part types we do not know: *unseen*. The gateway cannot bound them from
  their bytes (a PDF is billed as its extracted text plus an image of each page, and its
  deflate streams can hold ~1,000x their size in text), so the cost plan prices them as
  the model's whole input window: the provider refuses, unbilled, a prompt that does not
  fit it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from .mediasize import Payload, audio_seconds, image_size, parse_data_url
from .vision import ImageRule

__all__ = ["AUDIO_TOKENS_PER_SECOND", "PartCost", "part_cost"]

# The highest published rate of audio input: Gemini bills 32 tokens per second
# (ai.google.dev/gemini-api/docs/tokens); OpenAI's audio models bill fewer (the Realtime
# guide: one token per 100 ms of user audio).
AUDIO_TOKENS_PER_SECOND = 32

_IMAGE_TYPES = frozenset({"image_url", "image", "input_image"})


class PartCost(NamedTuple):
    image_tokens: int = 0
    audio_tokens: int = 0
    unseen: int = 0  # 1 when the part can only be bounded by the model's input window


_UNSEEN = PartCost(unseen=1)


def part_cost(part: Mapping[str, Any], rule: ImageRule) -> PartCost:
    """What a non-text content part costs on a model billing images by ``rule``."""
    kind = part.get("type")
    if not isinstance(kind, str):
        return _UNSEEN
    if kind in _IMAGE_TYPES:
        return _image(part, rule)
    if kind == "input_audio":
        return _audio(part.get("input_audio"))
    return _UNSEEN  # "file", and any type we do not know how the provider bills


def _image(part: Mapping[str, Any], rule: ImageRule) -> PartCost:
    source: Any = part.get("image_url", part.get("image"))
    detail: Any = part.get("detail", "auto")
    if isinstance(source, Mapping):
        detail = source.get("detail", detail)
        source = source.get("url")
    if detail is None:
        detail = "auto"
    n = rule.tokens(_image_size(source, raw_b64=part.get("type") == "image"),
                    detail if isinstance(detail, str) else "?")
    return _UNSEEN if n is None else PartCost(image_tokens=n)


def _image_size(source: Any, *, raw_b64: bool) -> tuple[int, int] | None:
    if not isinstance(source, str):
        return None
    data = parse_data_url(source)
    if data is not None:
        return image_size(data.payload)
    if raw_b64:  # the legacy {"type": "image", "image": "<base64>"} form
        return image_size(Payload(source))
    return None  # a URL: its size is unknown and it is never fetched


def _audio(spec: Any) -> PartCost:
    if not isinstance(spec, Mapping):
        return _UNSEEN
    data, fmt = spec.get("data"), spec.get("format")
    if not isinstance(data, str) or not isinstance(fmt, str):
        return _UNSEEN
    seconds = audio_seconds(Payload(data), fmt.lower())
    if seconds is None:
        return _UNSEEN
    return PartCost(audio_tokens=math.ceil(seconds * AUDIO_TOKENS_PER_SECOND))
