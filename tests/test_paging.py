"""Pages of the control plane's lists, and stored data made printable (issue 10: G10, G13).

The control functions the CLI and the proxy share, on a real state store.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authority_sdk import control
from authority_sdk.engine import Gateway
from authority_sdk.errors import InvalidRequest
from authority_sdk.paging import MAX_LIMIT, decode_cursor, encode_cursor, paginate
from authority_sdk.render import clip_strings, printable


def approval(i: int, env: str, status: str = "pending", created: float | None = None
             ) -> dict[str, Any]:
    return {"id": f"apr_{i:06d}", "status": status, "environment": env,
            "action_type": "send_note", "arguments": {"text": f"note {i}"},
            "arguments_json": json.dumps({"text": f"note {i}"}),
            "created_at": created if created is not None else 1_000_000.0 + i // 3,
            "expires_at": time.time() + 3600}


@pytest.fixture
def gw(write_policy: Callable[..., Path], gateways: list[Any]) -> Gateway:
    g = Gateway(write_policy())
    gateways.append(g)
    return g


def walk(fetch: Callable[[str | None], control.Page]) -> list[str]:
    out: list[str] = []
    cursor = None
    for _ in range(1000):
        page = fetch(cursor)
        out += [a["id"] for a in page]
        cursor = page.next_cursor
        if cursor is None:
            return out
    raise AssertionError("pages never ended")


def test_approval_pages_cover_each_item_once_newest_first_within_scope(gw: Gateway) -> None:
    for i in range(260):
        gw.store.approval_create(approval(i, "dev" if i % 4 == 0 else "prod",
                                          "rejected" if i % 5 == 0 else "pending"))
    every = walk(lambda c: control.list_approvals(gw, limit=37, cursor=c))
    assert len(every) == len(set(every)) == 260
    created = {a["id"]: (a["created_at"], a["id"]) for a in gw.store.approval_list()}
    assert every == sorted(every, key=lambda i: created[i], reverse=True)

    dev = walk(lambda c: control.list_approvals(gw, "pending", limit=10, cursor=c,
                                                scope=control.Scope("dev")))
    assert dev and all(int(i[4:]) % 4 == 0 and int(i[4:]) % 5 != 0 for i in dev)
    assert len(dev) == len([i for i in range(260) if i % 4 == 0 and i % 5 != 0])

    several = control.list_approvals(gw, "rejected,pending", limit=MAX_LIMIT)
    assert len(several) == 260 and several.next_cursor is None
    first = control.list_approvals(gw)
    assert len(first) == 50 and first.next_cursor  # the default page


def test_items_created_between_pages_are_neither_repeated_nor_skipped(gw: Gateway) -> None:
    for i in range(30):
        gw.store.approval_create(approval(i, "prod", created=1000.0 + i))
    page1 = control.list_approvals(gw, limit=10)
    gw.store.approval_create(approval(99, "prod", created=5000.0))  # newer than all
    rest = walk(lambda c: control.list_approvals(gw, limit=10, cursor=c or page1.next_cursor))
    ids = [a["id"] for a in page1] + rest
    assert len(ids) == len(set(ids)) == 30 and "apr_000099" not in ids


@pytest.mark.parametrize("bad", [
    {"limit": 0}, {"limit": MAX_LIMIT + 1}, {"limit": True}, {"cursor": ""},
    {"cursor": "not-a-cursor"}, {"cursor": "x" * 600},
    {"cursor": encode_cursor("actions", (1.0, "a"))}, {"status": "pending,bogus"},
    {"status": ","}])
def test_bad_page_arguments_are_invalid_requests(gw: Gateway, bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        control.list_approvals(gw, **bad)
    if "status" in bad:
        return
    if bad.get("cursor") == encode_cursor("actions", (1.0, "a")):
        bad = {"cursor": encode_cursor("approvals", (1.0, "a"))}  # the other list's cursor
    with pytest.raises(InvalidRequest):
        control.list_executions(gw, **bad)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(times=st.lists(st.integers(0, 20), max_size=60), limit=st.integers(1, 25))
def test_pages_concatenate_to_the_sorted_list(times: list[int], limit: int) -> None:
    items = [{"id": f"i{n}", "t": float(t)} for n, t in enumerate(times)]

    def key(x: dict[str, Any]) -> tuple[float, str]:
        return x["t"], x["id"]

    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        page, cursor = paginate(items, key, kind="t", limit=limit, cursor=cursor)
        assert len(page) <= limit
        seen += page
        if cursor is None:
            break
    assert seen == sorted(items, key=key, reverse=True)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_cursor_string_is_a_key_or_an_invalid_request(cursor: str) -> None:
    with contextlib.suppress(InvalidRequest):
        decode_cursor("approvals", cursor)


# -- printable ---------------------------------------------------------------------------


def test_printable_escapes_lone_surrogates_everywhere_and_copies_nothing_otherwise() -> None:
    clean = {"a": ["b", {"c": 1}], "\u202e": "zero\u200bwidth"}
    assert printable(clean) is clean
    dirty = {"model": "gpt\ud800", "args": [{"k\udfff": "v"}], "n": 3}
    shown = printable(dirty)
    json.dumps(shown, ensure_ascii=False).encode("utf-8")
    assert shown == {"model": "gpt\\ud800", "args": [{"k\\udfff": "v"}], "n": 3}
    assert clip_strings({"s": "x" * 10}, 4) == {"s": "xxxx…[+6 chars]"}


def test_the_approver_sees_surrogates_escaped_not_a_crash(gw: Gateway) -> None:
    a = approval(1, "prod")
    a["arguments"] = {"text": "refund\ud800", "card_number": "4111"}
    shown = control.public_approval(gw, a)
    assert shown["arguments"] == {"text": "refund\\ud800", "card_number": "[REDACTED]"}
    json.dumps(shown, ensure_ascii=False).encode("utf-8")
