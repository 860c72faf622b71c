"""Pages of the management lists: a bounded ``limit`` and an opaque cursor.

Lists are ordered newest first by a sort key (a timestamp, then an id to break
ties). A cursor names the last item of a page by that key, so the next page
starts strictly after it: items created meanwhile land before the cursor and
are neither repeated nor skipped. The cursor is opaque to clients
(base64url of a small JSON array) and checked when it comes back; a bad one
is a 400, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable
from typing import Any

from .errors import InvalidRequest

__all__ = ["DEFAULT_LIMIT", "MAX_CURSOR_CHARS", "MAX_LIMIT", "Page", "check_limit",
           "decode_cursor", "encode_cursor", "paginate"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_CURSOR_CHARS = 512

SortKey = tuple[float, str]


class Page(list[dict[str, Any]]):
    """One page of a list: the items (it *is* that list, so callers that want a list
    keep working) and ``next_cursor``, the cursor of the following page or None."""

    def __init__(self, items: Iterable[dict[str, Any]] = (),
                 next_cursor: str | None = None) -> None:
        super().__init__(items)
        self.next_cursor = next_cursor


def check_limit(limit: int | None, *, default: int = DEFAULT_LIMIT,
                maximum: int = MAX_LIMIT) -> int:
    if limit is None:
        return default
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= maximum:
        raise InvalidRequest(f"limit must be an integer from 1 to {maximum}")
    return limit


def encode_cursor(kind: str, key: SortKey) -> str:
    raw = json.dumps([kind, key[0], key[1]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str) -> SortKey:
    """The sort key a cursor of this ``kind`` names; InvalidRequest for anything else."""
    bad = InvalidRequest(f"invalid cursor for this list (pass back the next_cursor of a "
                         f"{kind} page unchanged)")
    if not isinstance(cursor, str) or not cursor or len(cursor) > MAX_CURSOR_CHARS:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (ValueError, binascii.Error) as exc:
        raise bad from exc
    if (not isinstance(value, list) or len(value) != 3 or value[0] != kind
            or isinstance(value[1], bool) or not isinstance(value[1], int | float)
            or not isinstance(value[2], str)):
        raise bad
    return float(value[1]), value[2]


def paginate(items: Iterable[dict[str, Any]], sort_key: Callable[[dict[str, Any]], SortKey],
             *, kind: str, limit: int, cursor: str | None) -> tuple[list[dict[str, Any]],
                                                                    str | None]:
    """The page of ``items`` (newest first by ``sort_key``) after ``cursor``, and the
    cursor of the page after it (None when this is the last)."""
    after = decode_cursor(kind, cursor) if cursor is not None else None
    ordered = sorted(items, key=sort_key, reverse=True)
    if after is not None:
        ordered = [item for item in ordered if sort_key(item) < after]
    page = ordered[:limit]
    more = len(ordered) > limit
    return page, (encode_cursor(kind, sort_key(page[-1])) if more and page else None)
