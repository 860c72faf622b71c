"""Plain data helpers the engine's hot path uses (authority_sdk/wire.py)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from authority_sdk.wire import copy_json

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=30)


def _containers(value: Any) -> list[Any]:
    out: list[Any] = []
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict | list):
            out.append(node)
            stack.extend(node.values() if isinstance(node, dict) else node)
    return out


@settings(max_examples=300, deadline=None)
@given(_json)
def test_copy_json_is_an_equal_copy_sharing_no_container(value: Any) -> None:
    copied = copy_json(value)
    assert json.dumps(copied) == json.dumps(value)
    assert not {id(c) for c in _containers(copied)} & {id(c) for c in _containers(value)}


def test_copy_json_deep_copies_what_is_not_json() -> None:
    class Box:
        def __init__(self) -> None:
            self.items = [1]

    original = {"box": Box(), "pair": (1, [2])}
    copied = copy_json(original)
    copied["box"].items.append(2)
    copied["pair"][1].append(3)
    assert original["box"].items == [1]
    assert original["pair"] == (1, [2])
