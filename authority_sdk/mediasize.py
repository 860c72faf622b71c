"""Sizes of inline media read from their headers, without decoding the payload.

An image's dimensions (PNG, JPEG, GIF, WebP) and a WAV file's byte rate are all a
cost estimate needs; they sit in the first bytes (JPEG: in the segment headers
before its frame). :class:`Payload` gives random access to the bytes of a data
URL's base64 text, so a 20 MB image costs a few small decodes, not one big one.

Every parser is bounded (a fixed number of reads however the bytes are crafted)
and answers ``None`` when it cannot be sure; callers then price the worst case.
A header that lies about the size is what the provider's decoder reads too, so
it can only make the estimate match or exceed what is billed.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

__all__ = ["Payload", "audio_seconds", "image_size", "parse_data_url"]

# How far into a data URL its header (``data:image/png;base64,``) may reach.
_MAX_DATA_URL_HEADER = 256
# A non-base64 data URL is percent-decoded only this far: headers live at the start.
_MAX_PLAIN_PREFIX = 64 * 1024
# Markers/blocks a JPEG or GIF parser walks before it gives up (each costs one small read).
_MAX_HOPS = 4096


class Payload:
    """The bytes of a base64 text (or of plain bytes), read by offset without decoding all."""

    __slots__ = ("_b64", "_raw", "_start")

    def __init__(self, b64: str | None = None, start: int = 0, raw: bytes | None = None) -> None:
        self._b64 = b64
        self._start = start
        self._raw = raw

    @classmethod
    def from_bytes(cls, raw: bytes) -> Payload:
        return cls(raw=raw)

    @property
    def max_size(self) -> int:
        """An upper bound on the number of bytes (base64 padding and whitespace ignored)."""
        if self._raw is not None:
            return len(self._raw)
        assert self._b64 is not None
        return -(-(len(self._b64) - self._start) * 3 // 4)

    def read(self, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` (fewer at the end); ``None`` if not strict base64."""
        if offset < 0 or length <= 0:
            return b""
        if self._raw is not None:
            return self._raw[offset:offset + length]
        assert self._b64 is not None
        # Every 4 characters hold 3 bytes, so any byte range maps onto whole quads.
        first, last = offset // 3, -(-(offset + length) // 3)
        lo = self._start + 4 * first
        chunk = self._b64[lo:self._start + 4 * last]
        if not chunk:
            return b""
        if len(chunk) % 4:
            chunk += "=" * (-len(chunk) % 4)  # the text's last quad, unpadded
        try:
            raw = base64.b64decode(chunk, validate=True)
        except (binascii.Error, ValueError):
            return None  # whitespace, URL-safe alphabet, non-ASCII…: not what we can index
        skip = offset - 3 * first
        return raw[skip:skip + length]


@dataclass(frozen=True, slots=True)
class DataUrl:
    media_type: str  # lower-cased, without parameters ("" when absent)
    payload: Payload


def parse_data_url(url: str) -> DataUrl | None:
    """A ``data:`` URL's media type and payload; ``None`` when ``url`` is not one."""
    if url[:5].lower() != "data:":
        return None
    comma = url.find(",", 5, _MAX_DATA_URL_HEADER)
    if comma < 0:
        return None
    header = url[5:comma].lower()
    params = header.split(";")
    media = params[0].strip()
    if params[-1].strip() == "base64":
        return DataUrl(media, Payload(url, comma + 1))
    raw = unquote_to_bytes(url[comma + 1:comma + 1 + _MAX_PLAIN_PREFIX])
    return DataUrl(media, Payload.from_bytes(raw))


# --------------------------------------------------------------------------------------------
# Images


def image_size(data: Payload) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, GIF or WebP header; ``None`` if not one of those
    or not readable with confidence."""
    head = data.read(0, 32)
    if not head:
        return None
    try:
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png(head)
        if head.startswith(b"\xff\xd8"):
            return _jpeg(data)
        if head[:6] in (b"GIF87a", b"GIF89a"):
            return _gif(data, head)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(head)
    except (struct.error, IndexError):
        return None
    return None


def _positive(w: int, h: int) -> tuple[int, int] | None:
    return (w, h) if w > 0 and h > 0 else None


def _png(head: bytes) -> tuple[int, int] | None:
    if len(head) < 24 or head[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", head[16:24])
    return _positive(w, h)


def _jpeg(data: Payload) -> tuple[int, int] | None:
    pos = 2
    for _ in range(_MAX_HOPS):
        seg = data.read(pos, 9)
        if seg is None or len(seg) < 2 or seg[0] != 0xFF:
            return None
        marker = seg[1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if len(seg) < 4:
            return None
        length = struct.unpack(">H", seg[2:4])[0]
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if len(seg) < 9:
                return None
            h, w = struct.unpack(">HH", seg[5:9])
            return _positive(w, h)  # height 0 (set later by a DNL marker): not sure
        pos += 2 + length
    return None


def _gif(data: Payload, head: bytes) -> tuple[int, int] | None:
    if len(head) < 13:
        return None
    w, h = struct.unpack("<HH", head[6:10])
    flags = head[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    # Decoders grow the canvas to hold the first frame when it is larger than the screen.
    for _ in range(_MAX_HOPS):
        b = data.read(pos, 10)
        if not b:
            return None
        if b[0] == 0x2C:  # image descriptor
            if len(b) < 10:
                return None
            left, top, fw, fh = struct.unpack("<HHHH", b[1:9])
            return _positive(max(w, left + fw), max(h, top + fh))
        if b[0] == 0x3B:  # trailer: no frame at all
            return _positive(w, h)
        if b[0] != 0x21 or len(b) < 2:
            return None
        pos += 2  # extension introducer and label, then data sub-blocks
        for _ in range(_MAX_HOPS):
            n = data.read(pos, 1)
            if not n:
                return None
            pos += 1 + n[0]
            if n[0] == 0:
                break
        else:
            return None
    return None


def _webp(head: bytes) -> tuple[int, int] | None:
    kind = head[12:16]
    if kind == b"VP8X" and len(head) >= 30:
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    if kind == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", head[26:30])
        return _positive(w & 0x3FFF, h & 0x3FFF)
    if kind == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


# --------------------------------------------------------------------------------------------
# Audio

# The lowest bit rate the MPEG audio layers define (MPEG-2.5 Layer III, 8 kbit/s): an MP3 of
# N bytes lasts at most N / 1000 seconds.
_MP3_MIN_BYTES_PER_S = 1000
# WAV encodings whose byte rate follows from the header alone: PCM, IEEE float, A-law, µ-law,
# and WAVE_FORMAT_EXTENSIBLE (whose sub-format we do not trust further than its bit depth).
_WAV_PLAIN_FORMATS = frozenset({1, 3, 6, 7, 0xFFFE})


def audio_seconds(data: Payload, fmt: str) -> float | None:
    """An upper bound on the duration of ``wav`` or ``mp3`` audio; ``None`` when none can be
    given from the header (another format, a compressed WAV, a broken header)."""
    size = data.max_size
    if fmt == "mp3":
        return size / _MP3_MIN_BYTES_PER_S
    if fmt != "wav":
        return None
    rate = _wav_bytes_per_second(data)
    return size / rate if rate else None


def _wav_bytes_per_second(data: Payload) -> int | None:
    head = data.read(0, 12)
    if head is None or len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    for _ in range(64):  # the fmt chunk comes early; a list of junk chunks ahead of it is odd
        chunk = data.read(pos, 24)
        if chunk is None or len(chunk) < 8:
            return None
        size = struct.unpack("<I", chunk[4:8])[0]
        if chunk[:4] == b"fmt ":
            if len(chunk) < 24:
                return None
            fmt, channels, rate, declared, _align, bits = struct.unpack("<HHIIHH", chunk[8:24])
            if fmt not in _WAV_PLAIN_FORMATS:
                return None
            per_second = rate * channels * (-(-bits // 8))
            if 0 < declared < per_second:
                per_second = declared  # the slower of the two gives the longer (safer) bound
            return per_second if per_second > 0 else None
        pos += 8 + size + (size & 1)
    return None
