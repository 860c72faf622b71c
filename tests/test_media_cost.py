"""Images, audio, files and legacy functions in the prompt count as the provider bills them.

Expected numbers are computed here from the published formulas (OpenAI "Images and vision",
Anthropic "Vision"), never by calling the code under test.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from media_files import (
    data_url,
    gif,
    image_part,
    jpeg,
    png,
    png_header,
    wav,
    webp_vp8,
    webp_vp8l,
    webp_vp8x,
)

from authority_sdk.costs import plan_cost
from authority_sdk.errors import UnpriceableContent
from authority_sdk.mediasize import Payload, image_size
from authority_sdk.policy import parse_policy
from authority_sdk.pricing import PriceBook
from authority_sdk.store import DiskStore
from authority_sdk.tokens import TokenCounter, encoding_for_model


def published_tiles(w: float, h: float) -> int:
    """OpenAI: fit within 2048x2048, then scale so the shortest side is 768 (never up),
    then count 512-px squares."""
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = w * s, h * s
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = w * s, h * s
    return math.ceil(w / 512) * math.ceil(h / 512)


def published_patches(w: int, h: int, cap: int = 1536) -> int:
    """OpenAI patch models: 32-px patches, capped at the budget (the image is shrunk to fit)."""
    return min(math.ceil(w / 32) * math.ceil(h / 32), cap)


def image_tokens(model: str, part: dict[str, Any]) -> int:
    got = TokenCounter().count_request(model, {"messages": [
        {"role": "user", "content": [part]}]})
    assert got.unseen_parts == 0
    return got.image_tokens


# -- images: exact counts for known sizes ----------------------------------------------------


@pytest.mark.parametrize(("model", "base", "tile"), [
    ("gpt-4o", 85, 170), ("gpt-4o-2024-08-06", 85, 170), ("gpt-4.1", 85, 170),
    ("openai/gpt-4o", 85, 170), ("gpt-4o-mini", 2833, 5667), ("o1", 75, 150),
    ("o3-2025-04-16", 75, 150), ("gpt-5", 70, 140), ("computer-use-preview", 65, 129),
])
@pytest.mark.parametrize("size", [(1024, 1024), (2048, 4096), (512, 512), (128, 64), (800, 600),
                                  (4096, 1024), (3000, 7000), (1, 1)])
def test_tile_models_bill_base_plus_tiles_of_the_scaled_image(
        model: str, base: int, tile: int, size: tuple[int, int]) -> None:
    url = data_url(png(*size) if size[0] * size[1] <= 4096 * 1024 else png_header(*size))
    expected = base + tile * published_tiles(*size)
    assert image_tokens(model, image_part(url, "high")) == expected
    assert image_tokens(model, image_part(url)) == expected  # auto is priced as high
    assert image_tokens(model, image_part(url, "low")) == base


def test_the_documented_examples() -> None:
    # OpenAI's own worked examples for gpt-4o.
    assert image_tokens("gpt-4o", image_part(data_url(png(1024, 1024)), "high")) == 765
    assert image_tokens("gpt-4o", image_part(data_url(png_header(2048, 4096)), "high")) == 1105
    assert image_tokens("gpt-4o", image_part(data_url(png_header(4096, 8192)), "low")) == 85


@pytest.mark.parametrize(("model", "multiplier"), [
    ("gpt-4.1-nano", 2.46), ("gpt-5-mini", 1.62), ("gpt-5-nano", 2.46), ("o4-mini", 1.72),
])
@pytest.mark.parametrize("size", [(1024, 1024), (320, 240), (33, 31), (2048, 768)])
def test_patch_models_bill_patches_times_their_multiplier(
        model: str, multiplier: float, size: tuple[int, int]) -> None:
    part = image_part(data_url(png(*size)), "high")
    assert image_tokens(model, part) == math.ceil(published_patches(*size) * multiplier)
    # low detail does not lower what these models bill
    low = image_part(data_url(png(*size)), "low")
    assert image_tokens(model, low) == math.ceil(published_patches(*size) * multiplier)


def test_a_patch_model_above_its_budget_costs_at_most_the_budget() -> None:
    # OpenAI's example: 1800x2400 is shrunk to 1,452 patches; we bound it by the 1,536 cap.
    got = image_tokens("gpt-4.1-nano", image_part(data_url(png_header(1800, 2400))))
    assert math.ceil(1452 * 2.46) <= got == math.ceil(1536 * 2.46)


@pytest.mark.parametrize(("size", "expected"), [
    ((1000, 1000), math.ceil(1000 * 1000 / 750)),  # Anthropic's table: ~1,334
    ((200, 200), math.ceil(200 / 28) ** 2),  # its 28-px grid is above 200*200/750 = 54
    ((784, 1568), math.ceil(784 * 1568 / 750)),  # the largest size sent unscaled
    ((4000, 3000), 1640),  # scaled down: never above the ~1,600-token limit (+ rounding)
])
def test_claude_bills_by_area(size: tuple[int, int], expected: int) -> None:
    part = image_part(data_url(png_header(*size)))
    assert image_tokens("anthropic/claude-3-5-sonnet-20241022", part) == expected


def test_every_header_format_is_read() -> None:
    cases = {
        "png": (png(300, 200), (300, 200)),
        "jpeg": (jpeg(1920, 1080), (1920, 1080)),
        "jpeg with 60 KB of EXIF": (jpeg(4032, 3024, exif_bytes=60_000), (4032, 3024)),
        "progressive jpeg": (jpeg(640, 480, progressive=True), (640, 480)),
        "gif": (gif((100, 80), (0, 0, 100, 80)), (100, 80)),
        "gif frame overflowing its screen": (gif((100, 80), (50, 40, 900, 700)), (950, 740)),
        "webp VP8X": (webp_vp8x(5000, 3), (5000, 3)),
        "webp VP8": (webp_vp8(1024, 768), (1024, 768)),
        "webp VP8L": (webp_vp8l(16383, 1), (16383, 1)),
    }
    for name, (raw, size) in cases.items():
        b64 = base64.b64encode(raw).decode()
        assert image_size(Payload(b64)) == size, name
        assert image_size(Payload.from_bytes(raw)) == size, name
        assert image_tokens("gpt-4o", image_part(data_url(raw, "image/whatever"))) == (
            85 + 170 * published_tiles(*size)), name


def test_percent_encoded_data_url_is_read_too() -> None:
    from urllib.parse import quote_from_bytes

    url = "data:image/png," + quote_from_bytes(png(1024, 1024))
    assert image_tokens("gpt-4o", image_part(url, "high")) == 765


# -- images whose size cannot be seen ---------------------------------------------------------


@pytest.mark.parametrize(("model", "worst"), [
    ("gpt-4o", 85 + 8 * 170),  # 768x2048 after scaling: 8 tiles
    ("gpt-4o-mini", 2833 + 8 * 5667),
    ("gpt-5", 70 + 8 * 140),
    ("gpt-4.1-nano", math.ceil(1536 * 2.46)),
    ("claude-sonnet-4-5", 1640),
    ("claude-opus-4-7", 4784),
])
def test_an_image_by_url_costs_the_worst_case_for_its_detail(model: str, worst: int) -> None:
    # Never fetched (offline, no SSRF): the size is unknown.
    url = "http://169.254.169.254/latest/meta-data/cat.png"
    assert image_tokens(model, image_part(url, "high")) == worst
    assert image_tokens(model, {"type": "image_url", "image_url": url}) == worst


def test_a_url_image_on_a_model_with_no_limit_is_unseen() -> None:
    # gpt-6-astra reads "auto" as its original resolution, which has no patch budget.
    got = TokenCounter().count_request("gpt-6-astra", {"messages": [
        {"role": "user", "content": [image_part("https://example.com/big.png")]}]})
    assert got.unseen_parts == 1 and got.image_tokens == 0


def test_a_lying_header_is_priced_at_the_size_it_claims() -> None:
    # A decoder reads the same header, so the claim is what is billed, within each rule's caps.
    liar = data_url(png_header(2_000_000_000, 3))
    assert image_tokens("gpt-4o", image_part(liar, "high")) == 85 + 170 * 4 * 1
    huge = data_url(png_header(100_000, 100_000))
    assert image_tokens("gpt-4o", image_part(huge, "high")) == 85 + 170 * 4
    assert image_tokens("gpt-5.4", image_part(huge, "high")) == math.ceil(2500 * 1.2)


def test_unreadable_or_endless_headers_fall_back_to_the_worst_case() -> None:
    # 100,000 empty APP segments before any frame: the reader gives up after a bounded walk.
    endless = b"\xff\xd8" + b"\xff\xe0\x00\x02" * 100_000 + jpeg(10, 10)[2:]
    for raw in (endless, b"", b"\x89PNG\r\n\x1a\n", b"GIF89a\x01", b"RIFF\x00\x00\x00\x00WEBP",
                b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x10\x03"):  # height 0 (DNL)
        assert image_tokens("gpt-4o", image_part(data_url(raw), "high")) == 85 + 8 * 170
    bad_b64 = "data:image/png;base64,iVBO Rw0K GgoA"  # whitespace: not indexable
    assert image_tokens("gpt-4o", image_part(bad_b64, "high")) == 85 + 8 * 170


def test_a_huge_base64_image_is_read_by_its_header_only() -> None:
    # ~24 MB of base64 behind a real header: only the first bytes are decoded.
    raw = png_header(640, 480) + b"\x00" * (18 * 1024 * 1024)
    reads: list[tuple[int, int]] = []

    class Spy(Payload):
        def read(self, offset: int, length: int) -> bytes | None:
            reads.append((offset, length))
            return super().read(offset, length)

    assert image_size(Spy(base64.b64encode(raw).decode())) == (640, 480)
    assert sum(n for _, n in reads) <= 64
    assert image_tokens("gpt-4o", image_part(data_url(raw), "high")) == 85 + 170 * 2


_MODEL_BASES = {"gpt-4o": 85, "gpt-4o-mini": 2833, "o3": 75, "gpt-5": 70,
                "gpt-4.1-nano": 3, "claude-3-haiku": 1, "some-local-llava": 85}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=200).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
    st.binary(max_size=200).map(lambda b: b"\xff\xd8" + b),
    st.binary(max_size=200).map(lambda b: b"GIF89a" + b),
    st.binary(max_size=200).map(lambda b: b"RIFF\x00\x00\x00\x00WEBP" + b),
), detail=st.sampled_from(["low", "high", "auto", "original", "", "bogus"]),
   model=st.sampled_from(sorted(_MODEL_BASES)))
def test_any_bytes_as_an_image_never_crash_nor_cost_below_the_base(
        raw: bytes, detail: str, model: str) -> None:
    for url in (data_url(raw), "data:image/png," + raw.decode("latin-1")):
        got = TokenCounter().count_request(model, {"messages": [
            {"role": "user", "content": [image_part(url, detail)]}]})
        assert got.unseen_parts or got.image_tokens >= _MODEL_BASES[model]
        assert got.tokens >= got.image_tokens


@settings(max_examples=200, deadline=None)
@given(part=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "image_url", "url", "detail", "input_audio", "data", "format",
                         "file", "text", "image"]), inner, max_size=4),
    max_leaves=12))
def test_any_content_part_is_counted_without_crashing(part: Any) -> None:
    got = TokenCounter().count_request("gpt-4o", {"messages": [
        {"role": "user", "content": [part]}, {"role": "user", "content": part}]})
    assert got.tokens >= 3


# -- audio -----------------------------------------------------------------------------------


def _audio_part(raw: bytes, fmt: str) -> dict[str, Any]:
    return {"type": "input_audio",
            "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt}}


def test_wav_audio_costs_its_duration_at_the_highest_published_rate() -> None:
    raw = wav(3.0)  # 16 kHz mono 16-bit: 32,000 bytes a second
    got = TokenCounter().count_request("gpt-4o-audio-preview", {"messages": [
        {"role": "user", "content": [_audio_part(raw, "wav")]}]})
    # Bounded by the payload size (header included) at 32 tokens a second.
    seconds = math.ceil(len(raw) * 4 / 3 / 4) * 3 / 32_000
    assert got.audio_tokens == math.ceil(seconds * 32) and got.audio_tokens >= 3 * 32
    assert got.unseen_parts == 0


def test_mp3_audio_is_bounded_by_the_lowest_mpeg_bit_rate() -> None:
    raw = b"\xff\xfb\x90\x00" + b"\x00" * 9_996  # 10,000 bytes: at most 10 s at 8 kbit/s
    got = TokenCounter().count_request("gpt-4o-audio-preview", {"messages": [
        {"role": "user", "content": [_audio_part(raw, "mp3")]}]})
    assert got.audio_tokens == math.ceil(math.ceil(len(base64.b64encode(raw)) * 3 / 4)
                                         / 1000 * 32)


@pytest.mark.parametrize("raw", [
    b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + struct.pack("<HHIIHH", 2, 1, 8000, 4000, 2,
                                                                 4),  # ADPCM: not timeable
    b"not a wav at all", b"",
])
def test_audio_that_cannot_be_timed_is_unseen(raw: bytes) -> None:
    got = TokenCounter().count_request("gpt-4o", {"messages": [
        {"role": "user", "content": [_audio_part(raw, "wav"), _audio_part(raw, "flac")]}]})
    assert got.unseen_parts == 2


# -- legacy functions and forced choices -----------------------------------------------------

FN = {"name": "issue_refund", "description": "Refund an order. " * 40,
      "parameters": {"type": "object", "properties": {
          "order_id": {"type": "string"}, "amount": {"type": "number"}}}}


def test_legacy_functions_count_like_tools() -> None:
    c = TokenCounter()
    messages = [{"role": "user", "content": "refund order 42"}]
    bare = c.count_request("gpt-4o", {"messages": messages}).tokens
    with_tools = c.count_request("gpt-4o", {"messages": messages,
                                            "tools": [{"type": "function", "function": FN}]})
    with_functions = c.count_request("gpt-4o", {"messages": messages, "functions": [FN]})
    enc = encoding_for_model("gpt-4o")
    import json

    definition = len(enc.encode(json.dumps(FN, sort_keys=True, separators=(",", ":"),
                                           ensure_ascii=False)))
    assert with_functions.tokens == with_tools.tokens == bare + 9 + definition
    assert definition > 150  # the issue: this used to count as ~0
    assert c.count_prompt("gpt-4o", messages, functions=[FN]) == with_functions.tokens


def test_a_forced_function_or_tool_choice_counts_its_name() -> None:
    c = TokenCounter()
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "functions": [FN]}
    plain = c.count_request("gpt-4o", body).tokens
    name = len(encoding_for_model("gpt-4o").encode("issue_refund"))
    forced = c.count_request("gpt-4o", {**body, "function_call": {"name": "issue_refund"}})
    assert forced.tokens == plain + name + 4
    tool = c.count_request("gpt-4o", {**body, "tool_choice": {
        "type": "function", "function": {"name": "issue_refund"}}})
    assert tool.tokens == plain + name + 4
    assert c.count_request("gpt-4o", {**body, "function_call": "none"}).tokens == plain + 1
    assert c.count_request("gpt-4o", {**body, "function_call": "auto"}).tokens == plain


def test_non_object_tools_and_messages_are_counted_not_crashed() -> None:
    got = TokenCounter().count_request("gpt-4o", {
        "messages": [{"role": "user", "content": {"odd": "shape"}},
                     {"role": "assistant", "audio": {"id": "audio_123"}},
                     {"role": "assistant", "tool_calls": [1, "x"]}],
        "tools": [1, "two"], "functions": {"name": "not-a-list"}})
    assert got.tokens > 3 and got.unseen_parts == 1  # an earlier answer's audio, by id


# -- the cost plan: unseen content is bounded by the input window -----------------------------


def _plan(model: str, body: dict[str, Any], tmp_path: Any, **env: Any) -> Any:
    policy = parse_policy({"default_environment": "prod", "pricing": {
        "local-vision": {"input_per_1m_usd": 1, "output_per_1m_usd": 1}},
        "environments": {"prod": {"models": ["*"], **env}}})
    return plan_cost(policy, "prod", None, "k", {"model": model, **body},
                     store=DiskStore(tmp_path / "s"), prices=PriceBook(policy.pricing),
                     counter=TokenCounter())


FILE = {"type": "file", "file": {"filename": "q3.pdf",
                                 "file_data": data_url(b"%PDF-1.7\n" + b"x" * 200_000,
                                                       "application/pdf")}}


@pytest.mark.parametrize("part", [FILE, {"type": "file", "file": {"file_id": "file-abc"}},
                                  {"type": "video_url", "video_url": {"url": "x"}}])
def test_a_file_is_priced_as_the_whole_input_window(part: dict[str, Any], tmp_path: Any) -> None:
    window = PriceBook().lookup("gpt-4o")
    assert window is not None and window.max_input_tokens is not None
    plan = _plan("gpt-4o", {"messages": [{"role": "user", "content": [part]}]}, tmp_path)
    assert plan.prompt_tokens == window.max_input_tokens
    # gpt-4o-mini bills images at 5667/170 of their context: a file may too.
    mini = _plan("gpt-4o-mini", {"messages": [{"role": "user", "content": [part]}]}, tmp_path)
    assert mini.prompt_tokens == math.ceil(window.max_input_tokens * 5667 / 170)


def test_a_file_on_a_model_with_no_known_window_is_refused(tmp_path: Any) -> None:
    with pytest.raises(UnpriceableContent) as ei:
        _plan("local-vision", {"messages": [{"role": "user", "content": [FILE]}]}, tmp_path)
    assert ei.value.code == "unpriceable_content" and ei.value.status_code == 400
    # Text and images on the same model are priced as usual.
    plan = _plan("local-vision", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, image_part(data_url(png(512, 512)), "high")]}]},
        tmp_path)
    assert plan.prompt_tokens >= 85 + 170


def test_images_raise_the_estimate_by_their_tokens(tmp_path: Any) -> None:
    text = {"messages": [{"role": "user", "content": "describe"}], "max_tokens": 100}
    images = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "describe"},
        *[image_part(data_url(png(1024, 1024)), "high")] * 20]}], "max_tokens": 100}
    a, b = _plan("gpt-4o", text, tmp_path), _plan("gpt-4o", images, tmp_path)
    assert b.prompt_tokens - a.prompt_tokens == 20 * 765
    assert b.estimate_usd - a.estimate_usd >= 20 * 765 * 2.5e-6


def test_a_resent_image_message_is_served_from_the_cache() -> None:
    c = TokenCounter()
    image_msg = {"role": "user", "content": [image_part(data_url(png(1024, 1024)), "high")]}
    turn1 = [image_msg, {"role": "assistant", "content": "A black square."}]
    first = c.count_request("gpt-4o", {"messages": turn1})
    before = c.stats()
    turn2 = [*turn1, {"role": "user", "content": "And now?"}]
    second = c.count_request("gpt-4o", {"messages": turn2})
    after = c.stats()
    assert after.misses - before.misses == 1  # only the new message was counted
    assert second.image_tokens == first.image_tokens == 765


def test_a_body_nested_too_deeply_to_price_is_a_400() -> None:
    from authority_sdk.errors import InvalidRequest

    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(InvalidRequest) as ei:
        TokenCounter().count_request("gpt-4o", {"messages": [{"role": "user", "content": deep}]})
    assert ei.value.status_code == 400
