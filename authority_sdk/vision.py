"""What an input image costs in prompt tokens, per model family (DESIGN.md §2 step 5).

Three published ways of billing an image, one table mapping model names onto them:

* **Tiles** (OpenAI GPT-4o/4.1/4.5/5/5.1, o1, o3): ``detail: low`` costs the base; otherwise
  the image is scaled down to fit 2048x2048, then down so its shortest side is at most 768,
  and each 512-px tile covering it costs the tile price, plus the base once.
* **Patches** (OpenAI's mini/nano models and GPT-5.2 on): one token per 32-px patch covering
  the image (after fitting a maximum dimension), capped at a patch budget that depends on
  ``detail``, times a per-model multiplier.
* **Area** (Anthropic Claude): one token per 28x28 px (≈ width x height / 750), after
  fitting a maximum long edge, capped at a token budget.

An image whose size is not known (given by URL: never fetched, offline and no SSRF; or
bytes we cannot read) costs the most its rule allows at its detail; a rule with no such
bound answers ``None`` and the caller falls back to the model's whole input window.

Rounding: where a provider rounds a scaled side, we take the ceiling, so an estimate can
exceed the bill by a tile on an edge case but never fall short of it. Where sources
disagree, the larger count wins.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

__all__ = [
    "AreaRule",
    "ImageRule",
    "PatchRule",
    "TileRule",
    "image_rule",
]

Size = tuple[int, int]


@dataclass(frozen=True, slots=True)
class TileRule:
    name: str
    base: int
    tile: int
    # Billed image tokens per token of context: gpt-4o-mini bills ~33x its tokens so that an
    # image costs what it costs on gpt-4o.
    window_factor: Fraction = Fraction(1)

    def tokens(self, size: Size | None, detail: str) -> int | None:
        if detail == "low":
            return self.base
        if size is None:
            return self.base + self.tile * 8  # 768x2048 after scaling: 2 x 4 tiles
        w, h = size
        scale = min(Fraction(1), Fraction(2048, max(w, h)), Fraction(768, min(w, h)))
        tiles = math.ceil(w * scale / 512) * math.ceil(h * scale / 512)
        return self.base + self.tile * tiles


@dataclass(frozen=True, slots=True)
class PatchRule:
    name: str
    multiplier: Fraction
    # detail -> (max dimension the image is fitted into, patch budget); None: no limit.
    limits: Mapping[str, tuple[int | None, int | None]]
    auto: str = "high"  # what ``detail: auto`` (or no detail) means for this model

    @property
    def window_factor(self) -> Fraction:
        return max(self.multiplier, Fraction(1))

    def tokens(self, size: Size | None, detail: str) -> int | None:
        key = self.auto if detail in ("auto", "") else detail
        if key in self.limits:
            patches = _patches(size, *self.limits[key])
        else:  # a detail level we do not know: the dearest one the model has
            counts = [_patches(size, *lim) for lim in self.limits.values()]
            patches = None if None in counts else max(c for c in counts if c is not None)
        return None if patches is None else math.ceil(patches * self.multiplier)


def _patches(size: Size | None, max_dim: int | None, budget: int | None) -> int | None:
    if size is None:
        if max_dim is None:
            return budget
        side = math.ceil(max_dim / 32)
        return side * side if budget is None else min(side * side, budget)
    w, h = size
    if max_dim is not None and max(w, h) > max_dim:
        scale = Fraction(max_dim, max(w, h))
        w, h = math.ceil(w * scale), math.ceil(h * scale)
    n = math.ceil(w / 32) * math.ceil(h / 32)
    return n if budget is None else min(n, budget)


@dataclass(frozen=True, slots=True)
class AreaRule:
    name: str
    max_edge: int
    budget: int
    window_factor: Fraction = Fraction(1)

    def tokens(self, size: Size | None, detail: str) -> int | None:
        if size is None:
            return self.budget
        w, h = size
        if max(w, h) > self.max_edge:
            scale = Fraction(self.max_edge, max(w, h))
            w, h = math.ceil(w * scale), math.ceil(h * scale)
        # Anthropic documents w*h/750; its 28-px patch grid is larger for small images.
        n = max(math.ceil(w * h / 750), math.ceil(w / 28) * math.ceil(h / 28))
        return min(n, self.budget)


@dataclass(frozen=True, slots=True)
class _MaxRule:
    """For a model in no family we know: the dearest of the bounded rules below."""

    name: str
    rules: tuple[TileRule | PatchRule | AreaRule, ...]
    window_factor: Fraction = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "window_factor", max(r.window_factor for r in self.rules))

    def tokens(self, size: Size | None, detail: str) -> int | None:
        counts = [r.tokens(size, detail) for r in self.rules]
        return None if None in counts else max(c for c in counts if c is not None)


ImageRule = TileRule | PatchRule | AreaRule | _MaxRule

# --------------------------------------------------------------------------------------------
# The table. Sources, as published when this was written (checked again on each update):
#   [O] OpenAI, "Images and vision", sections "Calculating costs" and "Model sizing behavior":
#       https://platform.openai.com/docs/guides/images-vision#calculating-costs
#   [L] litellm 1.110, litellm/litellm_core_utils/token_counter.py: _TILE_IMAGE_TOKEN_COSTS,
#       _PATCH_IMAGE_MULTIPLIERS, _patch_image_limits, _ANTHROPIC_IMAGE_LIMITS (it encodes
#       [O]'s per-model patch budgets for the GPT-5.2+ generation).
#   [A] Anthropic, "Vision", section "Evaluate image size":
#       https://docs.anthropic.com/en/docs/build-with-claude/vision
# Where [O] and [L] disagree (gpt-4.1-mini: [O] caps at 1,536 patches, [L] fits 2,048 px and
# allows 6,144) the larger wins. Low detail on the older patch models is ignored by the API
# (it bills the same as high), so their limits do not depend on detail.

_GPT4O = TileRule("gpt-4o", 85, 170)  # [O] gpt-4o, gpt-4.1, gpt-4.5, gpt-4-turbo
_GPT4O_MINI = TileRule("gpt-4o-mini", 2833, 5667, Fraction(5667, 170))  # [O]
_GPT5 = TileRule("gpt-5", 70, 140)  # [O] gpt-5, gpt-5-chat-latest; [L] gpt-5.1
_O_SERIES = TileRule("o1/o3", 75, 150)  # [O] o1, o1-pro, o3
_CUA = TileRule("computer-use-preview", 65, 129)  # [O]

_ANY_1536 = {"low": (None, 1536), "high": (None, 1536), "original": (None, 1536)}
_GPT41_MINI = PatchRule("gpt-4.1-mini", Fraction("1.62"),  # [O] 1.62 x patches; [L] limits
                        {"low": (2048, 6144), "high": (2048, 6144), "original": (None, None)})
_GPT41_NANO = PatchRule("gpt-4.1-nano", Fraction("2.46"), _ANY_1536)  # [O]
_GPT5_MINI = PatchRule("gpt-5-mini", Fraction("1.62"), _ANY_1536)  # [O]
_GPT5_NANO = PatchRule("gpt-5-nano", Fraction("2.46"), _ANY_1536)  # [O]
_O4_MINI = PatchRule("o4-mini", Fraction("1.72"), _ANY_1536)  # [O] o4-mini, codex-mini
_GPT52 = PatchRule("gpt-5.2", Fraction("1.2"),  # [L]
                   {"low": (2048, 6144), "high": (2048, 6144), "original": (None, None)})
_GPT54 = PatchRule("gpt-5.4", Fraction("1.2"),  # [L] gpt-5.4, -mini, -nano (and gpt-5.3)
                   {"low": (2048, 6144), "high": (2048, 2500), "original": (6000, 10_000)})
_GPT55 = PatchRule("gpt-5.5", Fraction("1.2"),  # [L]; auto means original
                   {"low": (512, None), "high": (2048, 2500), "original": (6000, 10_000)},
                   auto="original")
_GPT56 = PatchRule("gpt-5.6/gpt-6", Fraction("1.2"),  # [L] gpt-5.6-*, gpt-6-astra: original
                   {"low": (512, None), "high": (None, 2500), "original": (None, None)},
                   auto="original")  # has no budget, so a URL image is priced at the window

_CLAUDE = AreaRule("claude", 1568, 1640)  # [A] 1568 px long edge; 784x1568 is 1,639 tokens
_CLAUDE_HIGH = AreaRule("claude-4.7+", 2576, 4784)  # [L] Opus 4.7 and later

_PREFIXES: dict[str, ImageRule] = {
    "gpt-4o-mini": _GPT4O_MINI,
    "gpt-4o": _GPT4O, "chatgpt-4o": _GPT4O, "gpt-4-turbo": _GPT4O, "gpt-4-vision": _GPT4O,
    "gpt-4-1106-vision": _GPT4O, "gpt-4.5": _GPT4O, "gpt-4.1": _GPT4O,
    "gpt-4.1-mini": _GPT41_MINI, "gpt-4.1-nano": _GPT41_NANO,
    "gpt-5": _GPT5, "gpt-5.1": _GPT5,
    "gpt-5-mini": _GPT5_MINI, "gpt-5-nano": _GPT5_NANO,
    "gpt-5.2": _GPT52, "gpt-5.3": _GPT54, "gpt-5.4": _GPT54, "gpt-5.5": _GPT55,
    "gpt-5.6": _GPT56, "gpt-6": _GPT56,
    "o1": _O_SERIES, "o3": _O_SERIES, "o4-mini": _O4_MINI, "codex-mini": _O4_MINI,
    "computer-use-preview": _CUA,
}  # fmt: skip
# Longest prefix first, so "gpt-4o-mini" wins over "gpt-4o" and "gpt-5.4" over "gpt-5".
_ORDERED = sorted(_PREFIXES.items(), key=lambda kv: -len(kv[0]))
_VERSION_CHARS = frozenset("0123456789.")

# Any other model: the dearest bounded rule we know, so an unknown family is not priced
# below what the families we know would bill for the same image.
DEFAULT_RULE = _MaxRule("unknown", (_GPT4O, _GPT41_NANO, _CLAUDE_HIGH))

# A newer GPT than the table knows: the newest generation's rule, which is the dearest.
_NEWER_GPT = re.compile(r"gpt-(?:5\.\d|[6-9])")
_CLAUDE_VERSION = re.compile(r"claude-(?:(?:haiku|sonnet|opus)-)?(\d+)(?:[-.](\d{1,2})(?!\d))?")


@functools.lru_cache(maxsize=4096)
def image_rule(model: str) -> ImageRule:
    """The image-billing rule of ``model`` (provider prefixes and ``ft:`` are ignored)."""
    name = model.rsplit("/", 1)[-1].lower()
    if name.startswith("ft:"):
        name = name[3:]
    for prefix, rule in _ORDERED:
        # "gpt-5" must not take "gpt-5.7" nor "gpt-4.1" take "gpt-4.10".
        if name.startswith(prefix) and name[len(prefix):len(prefix) + 1] not in _VERSION_CHARS:
            return rule
    if _NEWER_GPT.match(name):
        return _GPT56
    if "claude" in name:
        m = _CLAUDE_VERSION.search(name)
        if m is not None and (int(m[1]), int(m[2] or 0)) < (4, 7):
            return _CLAUDE
        return _CLAUDE_HIGH  # 4.7 and later, or a name we cannot read: the larger limits
    return DEFAULT_RULE
