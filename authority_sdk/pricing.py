"""Model prices from litellm's bundled price map, without importing litellm (DESIGN.md §2).

The map is ``model_prices_and_context_window_backup.json`` inside the installed
litellm package (found with ``importlib.util.find_spec``, so none of litellm's
code runs). It is read once per process, on first use, and only the fields a
chat completion's cost depends on are kept.

:func:`actual_usd` reproduces litellm's ``generic_cost_per_token`` for chat
usage: text, cached-read and cache-write prompt tokens, audio/image/video
prompt and completion tokens, reasoning tokens (at
``output_cost_per_reasoning_token`` when the map has one, else the output
price), long-context thresholds (``*_above_200k_tokens`` …: the whole request
moves to the tier its prompt exceeds), ``tiered_pricing`` tables,
``off_peak_pricing`` windows, xAI's inclusive thresholds and folded reasoning
tokens, Fireworks' default cache-read rate, and Perplexity's own calculator.
Not covered: service tiers (flex/priority), batch prices, the 5-minute/1-hour
cache-write split, regional uplifts, costs a provider reports itself
(``usage.cost``) and per-request tool fees (web search, citations…).

Names resolve the way litellm resolves them for the common cases: the exact
key (case-insensitive, preferring ``<provider>/<name>`` where litellm would),
then the name without a provider prefix whose entry belongs to that provider
(``openai/gpt-4o`` → ``gpt-4o``), then an OpenAI fine-tune's base
(``ft:gpt-4o-mini-2024-07-18:org::id``) and a Gemini stable pin's model
(``gemini-2.5-flash-001``). A dated snapshot is found only when litellm lists
it as its own key: litellm would also try ``gpt-4o-2099-01-01`` as ``gpt-4o``,
but snapshots can be priced differently (``gpt-4o-2024-05-13`` is 2x
``gpt-4o``), so an unlisted one is an unknown price, never a guess.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .tokens import litellm_package_dir
from .wire import MAX_TOKENS

if TYPE_CHECKING:
    from .policy import ModelPrice

__all__ = [
    "ModelPricing",
    "OffPeakPricing",
    "PriceBook",
    "PriceThreshold",
    "PriceTier",
    "actual_usd",
    "estimate_usd",
    "max_affordable_output_tokens",
    "price_map_path",
]

log = logging.getLogger(__name__)

PRICE_MAP_NAME = "model_prices_and_context_window_backup.json"

_THRESHOLD_KEY = re.compile(
    r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost"
    r"|cache_creation_input_token_cost)_above_(\d+k?)_tokens$"
)
_FINETUNE_SUFFIX = re.compile(r"(:[^:]*){3}$")
_STABLE_VERSION = re.compile(r"-\d+$")
_FIREWORKS_CACHE_READ_RATIO = 0.5
_INCLUSIVE_THRESHOLD_PROVIDERS = frozenset({"xai"})
_WEEKDAYS = {
    "mon": 1, "monday": 1, "tue": 2, "tues": 2, "tuesday": 2, "wed": 3, "wednesday": 3,
    "thu": 4, "thur": 4, "thurs": 4, "thursday": 4, "fri": 5, "friday": 5,
    "sat": 6, "saturday": 6, "sun": 7, "sunday": 7,
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True, slots=True)
class PriceThreshold:
    """Rates for prompts above ``above_tokens``; ``None`` keeps the rate of the tier below."""

    above_tokens: float
    input: float | None = None
    output: float | None = None
    cache_read: float | None = None
    cache_creation: float | None = None


@dataclass(frozen=True, slots=True)
class PriceTier:
    """One row of a ``tiered_pricing`` table: every token of a request whose prompt size falls
    in ``(range_start, range_end]`` is billed at this row (above the last row: the last row)."""

    range_start: float
    range_end: float
    input: float | None
    output: float | None = None
    cache_read: float | None = None
    cache_creation: float | None = None
    reasoning: float | None = None


@dataclass(frozen=True, slots=True)
class OffPeakPricing:
    """Rates that replace the standard ones while a window is open (times in UTC)."""

    input: float | None = None
    output: float | None = None
    cache_read: float | None = None
    cache_creation: float | None = None
    reasoning: float | None = None
    hours_utc: tuple[tuple[time, time], ...] = ()  # every day
    windows: tuple[tuple[tuple[tuple[time, time], ...], frozenset[int] | None], ...] = ()
    weekday_timezone: str | None = None

    def is_open(self, when: datetime) -> bool:
        utc = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
        now = utc.time().replace(tzinfo=None)
        if _in_windows(self.hours_utc, now):
            return True
        if not self.windows:
            return False
        weekday = utc.astimezone(_zone(self.weekday_timezone)).isoweekday()
        return any(
            (days is None or weekday in days) and _in_windows(spans, now)
            for spans, days in self.windows
        )


@dataclass(frozen=True, slots=True)
class ModelPricing:
    """Per-token USD prices of one model. ``None`` on an optional rate: the map sets none."""

    model: str
    input_cost_per_token: float
    output_cost_per_token: float
    cache_read_input_token_cost: float | None = None
    cache_creation_input_token_cost: float | None = None
    output_cost_per_reasoning_token: float | None = None
    input_cost_per_audio_token: float | None = None
    input_cost_per_image_token: float | None = None
    input_cost_per_video_token: float | None = None
    output_cost_per_audio_token: float | None = None
    output_cost_per_image_token: float | None = None
    output_cost_per_video_token: float | None = None
    thresholds: tuple[PriceThreshold, ...] = ()
    tiers: tuple[PriceTier, ...] = ()
    off_peak: OffPeakPricing | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    provider: str | None = None
    source: Literal["litellm", "policy"] = "litellm"
    inclusive_thresholds: bool = field(default=False, repr=False)


@dataclass(frozen=True, slots=True)
class _Rates:
    input: float
    output: float
    cache_read: float
    cache_creation: float
    reasoning: float


# --------------------------------------------------------------------------------------------
# Loading litellm's map


@functools.cache
def price_map_path() -> Path | None:
    """Where litellm's bundled price map is (None when litellm is not installed)."""
    pkg = litellm_package_dir()
    if pkg is None:
        return None
    path = pkg / PRICE_MAP_NAME
    return path if path.is_file() else None


_KEEP = frozenset({
    "litellm_provider", "input_cost_per_token", "output_cost_per_token",
    "cache_read_input_token_cost", "cache_creation_input_token_cost",
    "output_cost_per_reasoning_token", "input_cost_per_audio_token",
    "input_cost_per_image_token", "input_cost_per_video_token", "output_cost_per_audio_token",
    "output_cost_per_image_token", "output_cost_per_video_token", "tiered_pricing",
    "off_peak_pricing", "max_input_tokens", "max_output_tokens",
})  # fmt: skip


class _Table:
    """litellm's map, trimmed to the fields that price a chat call; entries parse on first use."""

    def __init__(self, entries: dict[str, dict[str, Any]], load_ms: float) -> None:
        self.entries = entries
        self.lower: dict[str, str] = {}  # for litellm's case-insensitive fallback
        for key in entries:
            self.lower.setdefault(key.lower(), key)
        self.load_ms = load_ms
        self._parsed: dict[str, ModelPricing | None] = {}

    def key(self, name: str) -> str | None:
        """The map's key for ``name``: exact, else case-insensitive (as litellm looks up)."""
        return name if name in self.entries else self.lower.get(name.lower())

    def provider(self, key: str) -> str:
        provider: str = self.entries[key]["litellm_provider"]
        return provider

    def price(self, key: str) -> ModelPricing | None:
        if key not in self._parsed:
            # Parsing is pure, so two threads racing here store equal values.
            self._parsed[key] = _parse_entry(key, self.entries[key])
        return self._parsed[key]


_tables: dict[Path, _Table] = {}
_tables_lock = threading.Lock()


def _table(path: Path) -> _Table:
    table = _tables.get(path)
    if table is not None:
        return table
    with _tables_lock:
        table = _tables.get(path)
        if table is None:
            table = _load_table(path)
            _tables[path] = table
    return table


def _load_table(path: Path) -> _Table:
    import time as _time

    started = _time.perf_counter()
    with open(path, "rb") as f:
        raw = json.load(f)
    entries: dict[str, dict[str, Any]] = {}
    for key, entry in raw.items():
        if key == "sample_spec" or not isinstance(entry, dict):
            continue  # the schema's documentation, fallback_generalizations
        if not isinstance(entry.get("litellm_provider"), str):
            continue
        entries[key] = {
            k: v for k, v in entry.items() if k in _KEEP or ("_above_" in k and k[-7:] == "_tokens")
        }
    return _Table(entries, (_time.perf_counter() - started) * 1000)


def _num(value: Any) -> float | None:
    """A rate as litellm's ``get_cost_per_unit`` reads it: numbers and numeric strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _parse_entry(key: str, e: dict[str, Any]) -> ModelPricing | None:
    provider: str = e["litellm_provider"]
    tiers = _parse_tiers(e.get("tiered_pricing"))
    flat_priced = _num(e.get("input_cost_per_token")) is not None and (
        _num(e.get("output_cost_per_token")) is not None
    )
    if not flat_priced and not any(t.input is not None for t in tiers):
        return None  # not priced per token: an unknown price, never a guessed zero
    input_rate = _num(e.get("input_cost_per_token")) or 0.0
    output_rate = _num(e.get("output_cost_per_token")) or 0.0
    cache_read = _num(e.get("cache_read_input_token_cost"))
    off_peak = _parse_off_peak(e.get("off_peak_pricing"))
    if provider == "fireworks_ai" and cache_read is None:
        # litellm bills Fireworks cache hits at half the input rate when the map sets none.
        cache_read = input_rate * _FIREWORKS_CACHE_READ_RATIO
        if off_peak is not None and off_peak.cache_read is None:
            rate = (
                off_peak.input * _FIREWORKS_CACHE_READ_RATIO
                if off_peak.input is not None
                else cache_read
            )
            off_peak = _replace_off_peak_cache_read(off_peak, rate)
    return ModelPricing(
        model=key,
        input_cost_per_token=input_rate,
        output_cost_per_token=output_rate,
        cache_read_input_token_cost=cache_read,
        cache_creation_input_token_cost=_num(e.get("cache_creation_input_token_cost")),
        output_cost_per_reasoning_token=_num(e.get("output_cost_per_reasoning_token")),
        input_cost_per_audio_token=_num(e.get("input_cost_per_audio_token")),
        input_cost_per_image_token=_num(e.get("input_cost_per_image_token")),
        input_cost_per_video_token=_num(e.get("input_cost_per_video_token")),
        output_cost_per_audio_token=_num(e.get("output_cost_per_audio_token")),
        output_cost_per_image_token=_num(e.get("output_cost_per_image_token")),
        output_cost_per_video_token=_num(e.get("output_cost_per_video_token")),
        thresholds=_parse_thresholds(e),
        tiers=tiers,
        off_peak=off_peak,
        max_input_tokens=_int(e.get("max_input_tokens")),
        max_output_tokens=_int(e.get("max_output_tokens")),
        provider=provider,
        source="litellm",
        inclusive_thresholds=provider in _INCLUSIVE_THRESHOLD_PROVIDERS,
    )


def _parse_thresholds(e: dict[str, Any]) -> tuple[PriceThreshold, ...]:
    found: dict[str, dict[str, float]] = {}
    for k, v in e.items():
        m = _THRESHOLD_KEY.match(k)
        rate = _num(v) if m else None
        if m and rate is not None:
            found.setdefault(m.group(2), {})[m.group(1)] = rate
    out = [
        PriceThreshold(
            above_tokens=float(t.replace("k", "")) * (1000 if "k" in t else 1),
            input=r.get("input_cost_per_token"),
            output=r.get("output_cost_per_token"),
            cache_read=r.get("cache_read_input_token_cost"),
            cache_creation=r.get("cache_creation_input_token_cost"),
        )
        for t, r in found.items()
    ]
    return tuple(sorted(out, key=lambda t: t.above_tokens))


def _parse_tiers(raw: Any) -> tuple[PriceTier, ...]:
    if not isinstance(raw, list):
        return ()
    tiers = []
    for row in raw:
        if not isinstance(row, dict):
            continue
        rng = row.get("range")
        if not isinstance(rng, list | tuple) or len(rng) != 2:
            continue  # litellm ignores rows without a two-number range
        tiers.append(
            PriceTier(
                range_start=float(rng[0]),
                range_end=float(rng[1]),
                # litellm prices a row only if it names an input rate (a null one reads as 0)
                input=(_num(row["input_cost_per_token"]) or 0.0)
                if "input_cost_per_token" in row
                else None,
                output=_tier_num(row, "output_cost_per_token"),
                cache_read=_tier_num(row, "cache_read_input_token_cost"),
                cache_creation=_tier_num(row, "cache_creation_input_token_cost"),
                reasoning=_tier_num(row, "output_cost_per_reasoning_token"),
            )
        )
    return tuple(sorted(tiers, key=lambda t: t.range_start))


def _tier_num(row: dict[str, Any], key: str) -> float | None:
    # litellm's tier_rate: a present value is coerced (an unparsable one reads as 0).
    value = row.get(key)
    if value is None:
        return None
    return _num(value) or 0.0


def _parse_off_peak(raw: Any) -> OffPeakPricing | None:
    if not isinstance(raw, Mapping):
        return None
    windows = raw.get("windows")
    rules: list[tuple[tuple[tuple[time, time], ...], frozenset[int] | None]] = []
    if isinstance(windows, list | tuple):
        for rule in windows:
            if not isinstance(rule, Mapping):
                continue
            spans = _parse_spans(rule.get("hours_utc"))
            if spans:
                rules.append((spans, _parse_weekdays(rule.get("weekdays"))))
    tz = raw.get("weekday_timezone")
    return OffPeakPricing(
        input=_num(raw.get("input_cost_per_token")),
        output=_num(raw.get("output_cost_per_token")),
        cache_read=_num(raw.get("cache_read_input_token_cost")),
        cache_creation=_num(raw.get("cache_creation_input_token_cost")),
        reasoning=_num(raw.get("output_cost_per_reasoning_token")),
        hours_utc=_parse_spans(raw.get("hours_utc")),
        windows=tuple(rules),
        weekday_timezone=tz.strip() if isinstance(tz, str) and tz.strip() else None,
    )


def _replace_off_peak_cache_read(op: OffPeakPricing, rate: float) -> OffPeakPricing:
    return OffPeakPricing(
        op.input, op.output, rate, op.cache_creation, op.reasoning,
        op.hours_utc, op.windows, op.weekday_timezone,
    )  # fmt: skip


def _parse_spans(value: Any) -> tuple[tuple[time, time], ...]:
    items = (value,) if isinstance(value, str) else value if isinstance(value, list | tuple) else ()
    spans = []
    for item in items:
        if not isinstance(item, str):
            continue
        try:
            start_s, end_s = item.split("-")
            start = datetime.strptime(start_s.strip(), "%H:%M").time()
            end = datetime.strptime(end_s.strip(), "%H:%M").time()
        except ValueError:
            continue  # litellm ignores malformed windows
        spans.append((start, end))
    return tuple(spans)


def _parse_weekdays(value: Any) -> frozenset[int] | None:
    if value is None:
        return None  # every day
    if isinstance(value, str) or not isinstance(value, list | tuple):
        return frozenset()  # litellm treats a malformed list as matching no day
    days = set()
    for v in value:
        if isinstance(v, bool):
            continue
        if isinstance(v, int) and 1 <= v <= 7:
            days.add(v)
        elif isinstance(v, str) and v.strip().lower() in _WEEKDAYS:
            days.add(_WEEKDAYS[v.strip().lower()])
    return frozenset(days)


def _in_windows(spans: tuple[tuple[time, time], ...], now: time) -> bool:
    for start, end in spans:
        if start < end:
            if start <= now < end:
                return True
        elif now >= start or now < end:  # wraps past midnight; start == end is the whole day
            return True
    return False


def _zone(name: str | None) -> tzinfo:
    if name is None:
        return UTC
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ValueError, ZoneInfoNotFoundError):
        return UTC


# --------------------------------------------------------------------------------------------
# Name resolution


@functools.cache
def _warn_no_map() -> None:
    log.warning("litellm's price map was not found: only policy prices are known")


def _provider_matches(prefix: str, provider: str) -> bool:
    # litellm's _check_provider_match for the families it treats as one provider.
    if prefix == provider:
        return True
    return any(
        prefix.startswith(fam) and provider.startswith(fam)
        for fam in ("vertex_ai", "bedrock", "fireworks_ai")
    )


class PriceBook:
    """Prices by model name: the policy's ``pricing`` overrides first, then litellm's map."""

    def __init__(
        self,
        overrides: Mapping[str, ModelPrice] | None = None,
        *,
        price_map: str | Path | None = None,
    ) -> None:
        self._overrides = dict(overrides or {})
        self._path = Path(price_map) if price_map is not None else None
        self._resolved: dict[str, ModelPricing | None] = {}
        self._lock = threading.Lock()

    @property
    def price_map(self) -> Path | None:
        return self._path if self._path is not None else price_map_path()

    def load_ms(self) -> float | None:
        """Milliseconds the price map took to read and index (loading it if needed)."""
        table = self._litellm()
        return table.load_ms if table is not None else None

    def lookup(self, model: str) -> ModelPricing | None:
        """The model's prices, or ``None`` when neither the policy nor litellm prices it."""
        if model in self._resolved:
            return self._resolved[model]
        found = self._resolve(model)
        with self._lock:
            if len(self._resolved) > 10_000:  # request-controlled names: keep the memo bounded
                self._resolved.clear()
            self._resolved[model] = found
        return found

    def _litellm(self) -> _Table | None:
        path = self.price_map
        if path is None:
            _warn_no_map()
            return None
        return _table(path)

    def _resolve(self, model: str) -> ModelPricing | None:
        name = self._override_key(model)
        table = self._litellm()
        known = self._from_litellm(table, model) if table is not None else None
        if name is None:
            return known
        price = _override_pricing(name, self._overrides[name])
        if known is None:
            return price
        return _with_limits(price, known)

    def _override_key(self, model: str) -> str | None:
        if model in self._overrides:
            return model
        _, sep, rest = model.partition("/")
        return rest if sep and rest in self._overrides else None

    def _from_litellm(self, t: _Table, model: str) -> ModelPricing | None:
        key = t.key(model) or _stable_version_base(t, model)
        if key is not None:
            provider = t.provider(key)
            combined = f"{provider}/{key}"
            if "/" not in key and combined in t.entries and t.provider(combined) == provider:
                key = combined  # litellm tries "<provider>/<name>" before the bare name
            return t.price(key)
        prefix, sep, rest = model.partition("/")
        if sep:
            inner = t.key(rest) or _finetune_base(t, rest) or _stable_version_base(t, rest)
            if inner is not None and _provider_matches(prefix, t.provider(inner)):
                return t.price(inner)
            return None
        base = _finetune_base(t, model)
        return t.price(base) if base is not None else None


def _finetune_base(t: _Table, model: str) -> str | None:
    # ft:gpt-4o-mini-2024-07-18:org:suffix:id is billed at ft:gpt-4o-mini-2024-07-18's price.
    if not model.startswith("ft:"):
        return None
    base = _FINETUNE_SUFFIX.sub("", model)
    return t.key(base) if base != model else None


def _stable_version_base(t: _Table, model: str) -> str | None:
    # Google's stable pins (gemini-2.5-flash-001) share their model's price; litellm strips them
    # for Gemini and Vertex AI only.
    base = _STABLE_VERSION.sub("", model)
    key = t.key(base) if base != model else None
    if key is not None and t.provider(key).startswith(("gemini", "vertex_ai")):
        return key
    return None


def _override_pricing(model: str, price: ModelPrice) -> ModelPricing:
    cached = price.cached_input_per_1m_usd
    return ModelPricing(
        model=model,
        input_cost_per_token=price.input_per_1m_usd / 1e6,
        output_cost_per_token=price.output_per_1m_usd / 1e6,
        cache_read_input_token_cost=cached / 1e6 if cached is not None else None,
        source="policy",
    )


def _with_limits(price: ModelPricing, known: ModelPricing) -> ModelPricing:
    # A policy price replaces litellm's rates but the model's token limits still hold.
    return ModelPricing(
        model=price.model,
        input_cost_per_token=price.input_cost_per_token,
        output_cost_per_token=price.output_cost_per_token,
        cache_read_input_token_cost=price.cache_read_input_token_cost,
        max_input_tokens=known.max_input_tokens,
        max_output_tokens=known.max_output_tokens,
        provider=known.provider,
        source="policy",
    )


# --------------------------------------------------------------------------------------------
# Rates and costs


def _select_tier(p: ModelPricing, prompt_tokens: int) -> PriceTier | None:
    if not p.tiers or prompt_tokens <= 0:
        return None
    tier = next(
        (t for t in p.tiers if t.range_start < prompt_tokens <= t.range_end), p.tiers[-1]
    )
    return tier if tier.input is not None else None


def _rates(p: ModelPricing, prompt_tokens: int, off_peak_open: bool) -> _Rates:
    """The per-token rates litellm bills a request of ``prompt_tokens`` at."""
    op = p.off_peak if off_peak_open else None
    tier = _select_tier(p, prompt_tokens)
    if tier is not None:
        inp = tier.input if tier.input is not None else 0.0
        out = tier.output if tier.output is not None else p.output_cost_per_token
        read = tier.cache_read if tier.cache_read is not None else inp
        write = tier.cache_creation if tier.cache_creation is not None else inp
    else:
        inp = p.input_cost_per_token
        out = p.output_cost_per_token
        if out == 0.0 and p.output_cost_per_image_token is not None:
            out = p.output_cost_per_image_token  # image models price all output as image tokens
        read_opt = p.cache_read_input_token_cost
        write_opt = p.cache_creation_input_token_cost
        for th in p.thresholds:
            if prompt_tokens > th.above_tokens or (
                p.inclusive_thresholds and prompt_tokens == th.above_tokens
            ):
                inp = th.input if th.input is not None else inp
                out = th.output if th.output is not None else out
                read_opt = th.cache_read if th.cache_read is not None else read_opt
                write_opt = th.cache_creation if th.cache_creation is not None else write_opt
        # A map with no cache price bills cache tokens as ordinary input.
        fallback = op.input if op is not None and op.input is not None else inp
        read = read_opt if read_opt is not None else fallback
        write = write_opt if write_opt is not None else fallback
    if op is not None:
        inp = op.input if op.input is not None else inp
        out = op.output if op.output is not None else out
        read = op.cache_read if op.cache_read is not None else read
        write = op.cache_creation if op.cache_creation is not None else write
    if op is not None and op.reasoning is not None:
        reasoning = op.reasoning
    elif tier is not None and (tier.reasoning is not None or tier.output is not None):
        reasoning = tier.reasoning if tier.reasoning is not None else (tier.output or 0.0)
    elif p.output_cost_per_reasoning_token is not None:
        reasoning = p.output_cost_per_reasoning_token
    else:
        reasoning = out
    return _Rates(inp, out, read, write, reasoning)


def _tok(details: Mapping[str, Any] | None, key: str) -> int:
    if not details:
        return 0
    # A count past MAX_TOKENS is the most any answer can use: billed in full, never overflowing.
    v = details.get(key)
    return min(v, MAX_TOKENS) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _details(value: Any) -> dict[str, Any] | None:
    if isinstance(value, Mapping) and value:
        return dict(value)
    if value is not None and hasattr(value, "model_dump"):  # an openai/pydantic usage object
        dumped = value.model_dump()
        return dumped if isinstance(dumped, dict) and dumped else None
    return None


def _usage_dict(usage: Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(usage, Mapping):
        return dict(usage)
    if hasattr(usage, "model_dump"):
        dumped = usage.model_dump()
        if isinstance(dumped, dict):
            return dumped
    raise TypeError("usage must be a mapping (an OpenAI `usage` block)")


def actual_usd(
    pricing: ModelPricing, usage: Mapping[str, Any], *, at: datetime | None = None
) -> float:
    """The USD cost of a finished request from its OpenAI ``usage`` block, as litellm bills it.

    ``usage`` is the block as a mapping (an openai ``CompletionUsage`` object works too).

    ``at`` is the moment the request is billed at (default: now); it matters only for
    models with off-peak prices.
    """
    u = _usage_dict(usage)
    prompt = _count(u.get("prompt_tokens"))
    completion = _count(u.get("completion_tokens"))
    ptd = _details(u.get("prompt_tokens_details"))
    ctd = _details(u.get("completion_tokens_details"))

    # litellm's Usage() folds the provider-specific cache fields into prompt_tokens_details.
    for src, dst in (
        ("prompt_cache_hit_tokens", "cached_tokens"),
        ("cache_read_input_tokens", "cached_tokens"),
        ("cache_creation_input_tokens", "cache_write_tokens"),
    ):
        v = u.get(src)
        if isinstance(v, int) and not isinstance(v, bool):
            ptd = ptd or {}
            ptd[dst] = v
    top_reasoning = _count(u.get("reasoning_tokens"))
    if top_reasoning:
        ctd = ctd or {}
        if ctd.get("reasoning_tokens") is None:
            ctd["reasoning_tokens"] = top_reasoning
        if ctd.get("text_tokens") is None:
            ctd["text_tokens"] = max(
                0, completion - top_reasoning - (ctd.get("image_tokens") or 0)
                - (ctd.get("audio_tokens") or 0),
            )

    if pricing.provider in _INCLUSIVE_THRESHOLD_PROVIDERS:
        # xAI reports reasoning outside completion_tokens unless the total says otherwise;
        # litellm folds it in and bills the lot at the output rate.
        reasoning = _tok(ctd, "reasoning_tokens")
        total = _count(u.get("total_tokens"))
        if total != prompt + completion:
            completion += reasoning
        ctd = None

    when = at if at is not None else datetime.now(UTC)
    op_open = pricing.off_peak is not None and pricing.off_peak.is_open(when)
    if pricing.provider == "perplexity":
        return _perplexity_cost(pricing, prompt, completion, ctd, op_open)
    r = _rates(pricing, prompt, op_open)
    return _prompt_cost(pricing, r, prompt, ptd) + _completion_cost(pricing, r, completion, ctd)


def _perplexity_cost(
    p: ModelPricing, prompt: int, completion: int, ctd: dict[str, Any] | None, op_open: bool
) -> float:
    # litellm's Perplexity calculator: no cache discounts or thresholds, and reasoning tokens
    # come out of completion_tokens only when the map prices them separately.
    inp, out = p.input_cost_per_token, p.output_cost_per_token
    if op_open and p.off_peak is not None:
        inp = p.off_peak.input if p.off_peak.input is not None else inp
        out = p.off_peak.output if p.off_peak.output is not None else out
    reasoning = _tok(ctd, "reasoning_tokens")
    if reasoning and p.output_cost_per_reasoning_token is not None:
        completion_cost = max(0, completion - reasoning) * out
        completion_cost += reasoning * p.output_cost_per_reasoning_token
    else:
        completion_cost = completion * out
    return prompt * inp + completion_cost


def _count(v: Any) -> int:
    # A negative count would be a refund: read it as nothing. A count past MAX_TOKENS is the
    # most any answer can use (billed in full: the budget over-counts, never overflows).
    return min(v, MAX_TOKENS) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def _prompt_cost(p: ModelPricing, r: _Rates, prompt: int, ptd: dict[str, Any] | None) -> float:
    cache_hit = _tok(ptd, "cached_tokens")
    cache_write = _tok(ptd, "cache_write_tokens") or _tok(ptd, "cache_creation_tokens")
    if ptd is not None:
        text, audio = _tok(ptd, "text_tokens"), _tok(ptd, "audio_tokens")
        image, video = _tok(ptd, "image_tokens"), _tok(ptd, "video_tokens")
    else:
        text, audio, image, video = prompt, 0, 0, 0
    detailed = text + cache_hit + audio + cache_write + image + video
    if (cache_hit or cache_write) and detailed > prompt:
        # The breakdown overlaps the cache counts: modalities bill only what the cache missed.
        uncached = max(prompt - cache_hit - cache_write, 0)
        audio = min(audio, uncached)
        image = min(image, uncached - audio)
        video = min(video, uncached - audio - image)
        text = uncached - audio - image - video
    elif text == 0:
        text = max(prompt - cache_hit - audio - cache_write - image - video, 0)
    cost = text * r.input + cache_hit * r.cache_read
    for n, rate in (
        (audio, p.input_cost_per_audio_token),
        (image, p.input_cost_per_image_token),
        (video, p.input_cost_per_video_token),
    ):
        if n:
            cost += n * (rate if rate is not None else r.input)
    if cache_write:
        cost += cache_write * r.cache_creation
    return cost


def _completion_cost(
    p: ModelPricing, r: _Rates, completion: int, ctd: dict[str, Any] | None
) -> float:
    text = audio = reasoning = image = video = 0
    if ctd is not None:
        audio, reasoning = _tok(ctd, "audio_tokens"), _tok(ctd, "reasoning_tokens")
        image, video = _tok(ctd, "image_tokens"), _tok(ctd, "video_tokens")
        reported = _tok(ctd, "text_tokens")
        # Some providers count reasoning inside text_tokens too: take it out once.
        overlap = reported + reasoning + audio + image + video - completion
        nested = min(reasoning, reported, max(overlap, 0))
        text = reported - nested
    if text == 0:
        if audio or reasoning or image or video:
            text = max(0, completion - reasoning - audio - image - video)
        else:
            return completion * r.output
    cost = text * r.output
    for n, rate in (
        (audio, p.output_cost_per_audio_token),
        (image, p.output_cost_per_image_token),
        (video, p.output_cost_per_video_token),
    ):
        if n:
            cost += n * (rate if rate is not None else r.output)
    if reasoning:
        cost += reasoning * r.reasoning
    return cost


def _worst_rates(pricing: ModelPricing, prompt_tokens: int) -> tuple[float, float]:
    """(input, output) per-token rates no request of this prompt size can exceed."""
    candidates = [_rates(pricing, prompt_tokens, False)]
    if pricing.off_peak is not None:
        candidates.append(_rates(pricing, prompt_tokens, True))
    inp = max(r.input for r in candidates)
    out = max(max(r.output, r.reasoning) for r in candidates)
    for modal in (
        pricing.output_cost_per_audio_token,
        pricing.output_cost_per_image_token,
        pricing.output_cost_per_video_token,
    ):
        if modal is not None:
            out = max(out, modal)
    return inp, out


def estimate_usd(
    pricing: ModelPricing,
    prompt_tokens: int,
    max_output_tokens: int,
    *,
    image_tokens: int = 0,
    audio_tokens: int = 0,
    unseen_tokens: int = 0,
) -> float:
    """Worst-case USD cost before the call: the whole prompt at the input rate of the tier its
    size lands in, plus ``max_output_tokens`` at the dearest output rate (text, reasoning,
    audio…), at standard or off-peak prices, whichever is higher.

    ``image_tokens``, ``audio_tokens`` and ``unseen_tokens`` are parts of ``prompt_tokens``:
    images and audio at their own input rate when the model has one (never below the text
    rate), and ``unseen_tokens`` (content priced by the input window, whose kind is unknown)
    at the dearest input rate of any kind.

    Cache-write premiums (e.g. Anthropic's 1.25x for ``cache_control`` prompts) are not
    included: the prompt is priced as plain input.
    """
    prompt = max(prompt_tokens, 0)
    inp, out = _worst_rates(pricing, prompt)
    cost = prompt * inp + max(max_output_tokens, 0) * out
    if image_tokens > 0 or audio_tokens > 0 or unseen_tokens > 0:
        image, audio = _modal_rate(pricing.input_cost_per_image_token, inp), _modal_rate(
            pricing.input_cost_per_audio_token, inp)
        video = _modal_rate(pricing.input_cost_per_video_token, inp)
        cost += max(image_tokens, 0) * (image - inp) + max(audio_tokens, 0) * (audio - inp)
        cost += max(unseen_tokens, 0) * (max(image, audio, video) - inp)
    return cost


def _modal_rate(rate: float | None, text_rate: float) -> float:
    return max(rate, text_rate) if rate is not None else text_rate


def max_affordable_output_tokens(
    pricing: ModelPricing,
    prompt_tokens: int,
    budget_usd: float,
    *,
    image_tokens: int = 0,
    audio_tokens: int = 0,
    unseen_tokens: int = 0,
) -> int:
    """The largest output limit whose :func:`estimate_usd` fits ``budget_usd``, capped at the
    model's ``max_output_tokens`` (0 when even the prompt does not fit).

    When output is free and the model states no limit, there is nothing to cap and the
    answer is ``sys.maxsize``.
    """
    import sys

    def est(n: int) -> float:
        return estimate_usd(pricing, prompt_tokens, n, image_tokens=image_tokens,
                            audio_tokens=audio_tokens, unseen_tokens=unseen_tokens)

    cap = pricing.max_output_tokens
    if math.isnan(budget_usd):
        return 0
    if math.isinf(budget_usd):
        return 0 if budget_usd < 0 else cap if cap is not None else sys.maxsize
    if est(0) > budget_usd:
        return 0
    _, out = _worst_rates(pricing, max(prompt_tokens, 0))
    if out <= 0:
        return cap if cap is not None else sys.maxsize
    room = budget_usd - est(0)
    n = math.floor(room / out) if math.isfinite(room / out) else sys.maxsize
    if cap is not None:
        n = min(n, cap)
    # Float rounding can put the division one token either side of the true limit.
    while n > 0 and est(n) > budget_usd:
        n -= 1
    while (cap is None or n < cap) and est(n + 1) <= budget_usd:
        n += 1
    return max(n, 0)
