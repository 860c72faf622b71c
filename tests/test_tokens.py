"""Prompt token counting: cookbook accounting, the per-message cache, offline encodings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from authority_sdk.tokens import (
    TOOLS_OVERHEAD,
    TokenCounter,
    default_counter,
    encoding_for_model,
    encoding_name_for_model,
    litellm_package_dir,
)

REPO = Path(__file__).resolve().parents[1]
DESIGN = Path("/work/shared/DESIGN.md")


def enc(name: str) -> Any:
    import tiktoken

    encoding_for_model("gpt-4o")  # points tiktoken at litellm's files first
    return tiktoken.get_encoding(name)


def n_tokens(text: str, name: str = "o200k_base") -> int:
    return len(enc(name).encode(text, disallowed_special=()))


TOOL = {
    "type": "function",
    "function": {
        "name": "issue_refund",
        "description": "Issue a refund for an order",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
            "required": ["order_id", "amount"],
        },
    },
}


@pytest.mark.parametrize(
    ("model", "encoding"),
    [("gpt-4o", "o200k_base"), ("gpt-4o-mini-2024-07-18", "o200k_base"),
     ("openai/gpt-4.1-mini", "o200k_base"), ("gpt-4.5-preview", "o200k_base"),
     ("gpt-5", "o200k_base"), ("o1", "o200k_base"), ("o3-mini", "o200k_base"),
     ("o4-mini", "o200k_base"), ("chatgpt-4o-latest", "o200k_base"),
     ("ft:gpt-4o-mini-2024-07-18:org::id", "o200k_base"), ("azure/GPT-4o", "o200k_base"),
     ("gpt-4", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"),
     ("claude-sonnet-4-5", "cl100k_base"), ("gemini/gemini-2.5-pro", "cl100k_base"),
     ("my-local-model", "cl100k_base")],
)  # fmt: skip
def test_encoding_choice(model: str, encoding: str) -> None:
    assert encoding_name_for_model(model) == encoding
    assert encoding_for_model(model).name == encoding


def test_plain_messages_follow_the_cookbook() -> None:
    counter = TokenCounter()
    system, user = "You are a helpful assistant.", "What is the capital of France?"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    for model, name in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")):
        expected = (
            3 + n_tokens("system", name) + n_tokens(system, name)
            + 3 + n_tokens("user", name) + n_tokens(user, name)
            + 3
        )  # fmt: skip
        assert counter.count_prompt(model, messages) == expected


def test_name_tool_calls_and_tool_results() -> None:
    counter = TokenCounter()
    args = '{"order_id": "42", "amount": 19.99}'
    named = [{"role": "user", "name": "alice", "content": "hi"}]
    assert counter.count_prompt("gpt-4o", named) == (
        3 + n_tokens("user") + n_tokens("alice") + 1 + n_tokens("hi") + 3
    )
    call = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "issue_refund", "arguments": args}}]}]  # fmt: skip
    assert counter.count_prompt("gpt-4o", call) == (
        3 + n_tokens("assistant") + n_tokens("issue_refund") + n_tokens(args) + 3
    )
    result = [{"role": "tool", "tool_call_id": "call_1", "content": '{"ok": true}'}]
    assert counter.count_prompt("gpt-4o", result) == (
        3 + n_tokens("tool") + n_tokens("call_1") + n_tokens('{"ok": true}') + 3
    )


def test_content_parts_count_text_and_images_by_the_models_rule() -> None:
    counter = TokenCounter()
    parts = [{"role": "user", "content": [
        {"type": "text", "text": "Describe this picture."},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]  # fmt: skip
    text = 3 + n_tokens("user") + n_tokens("Describe this picture.") + 3
    # gpt-4o: a URL image (size unknown, detail auto = high) costs the most a 768x2048 image
    # can, 85 + 8 x 170; a low-detail one the base, 85. The audio has no readable header:
    # it is unseen content, left to the cost plan (the model's input window).
    got = counter.count_request("gpt-4o", {"messages": parts})
    assert got.tokens == text + (85 + 8 * 170) + 85
    assert got.image_tokens == (85 + 8 * 170) + 85
    assert got.unseen_parts == 1
    assert counter.count_prompt("gpt-4o", parts) == got.tokens
    # The same message on gpt-4o-mini bills images at ~33x the tokens: counted again, not
    # served from the gpt-4o entry although both share the o200k encoding.
    mini = counter.count_request("gpt-4o-mini", {"messages": parts})
    assert mini.image_tokens == (2833 + 8 * 5667) + 2833


def test_tools_count_their_json_plus_a_fixed_overhead() -> None:
    counter = TokenCounter()
    messages = [{"role": "user", "content": "refund order 42"}]
    bare = counter.count_prompt("gpt-4o", messages)
    canonical = json.dumps(TOOL["function"], sort_keys=True, separators=(",", ":"))
    assert counter.count_prompt("gpt-4o", messages, [TOOL]) == (
        bare + TOOLS_OVERHEAD + n_tokens(canonical)
    )
    # Key order does not change a definition's count.
    reordered = {"function": dict(reversed(list(TOOL["function"].items()))), "type": "function"}
    assert counter.count_prompt("gpt-4o", messages, [reordered]) == counter.count_prompt(
        "gpt-4o", messages, [TOOL]
    )


def test_empty_prompt_is_the_reply_priming() -> None:
    assert TokenCounter().count_prompt("gpt-4o", []) == 3


def test_a_growing_conversation_encodes_each_message_once() -> None:
    counter = TokenCounter()
    conversation: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    requests = 0
    for turn in range(50):
        conversation.append({"role": "user", "content": f"Question {turn}: what is {turn} + 1?"})
        total = counter.count_prompt("gpt-4o", conversation, [TOOL])
        requests += len(conversation)
        # The cache must not change the answer: a fresh counter computes it from scratch.
        assert total == TokenCounter().count_prompt("gpt-4o", conversation, [TOOL])
        conversation.append({"role": "assistant", "content": f"{turn + 1}."})
    stats = counter.stats()
    distinct = 1 + 50  # system + 50 user messages counted (each assistant reply came after)
    distinct += 49  # assistant replies that were part of a later request
    assert stats.misses == distinct + 1  # + the tool definition
    assert stats.hits == requests - distinct + 49  # + the tool definition on turns 2..50
    assert stats.entries == distinct + 1


def test_cache_is_bounded_and_per_encoding() -> None:
    counter = TokenCounter(max_entries=10)
    for i in range(50):
        counter.count_prompt("gpt-4o", [{"role": "user", "content": f"message {i}"}])
    assert counter.stats().entries == 10
    counter.clear()
    message = [{"role": "user", "content": "Ελληνικά κείμενα " * 10}]
    a = counter.count_prompt("gpt-4o", message)
    b = counter.count_prompt("gpt-4", message)
    assert a != b  # o200k and cl100k split this differently: one cache entry each
    assert counter.stats().misses == 2
    assert counter.count_prompt("gpt-4o", message) == a
    assert counter.stats().hits == 1
    with pytest.raises(ValueError):
        TokenCounter(max_entries=0)


def test_long_text_is_counted_in_pieces_without_drift_on_prose() -> None:
    text = DESIGN.read_text() * 6  # ~90k characters: encoded in whitespace-cut pieces
    counter = TokenCounter()
    exact = n_tokens(text)
    assert abs(counter.count_text("gpt-4o", text) - exact) <= 2
    assert counter.count_text("gpt-4o", "." * 200_000) == n_tokens("." * 200_000)


def test_threads_share_a_counter_safely() -> None:
    counter = TokenCounter(max_entries=100)
    conversations = [
        [{"role": "user", "content": f"thread {t} message {i} " * 5} for i in range(30)]
        for t in range(8)
    ]
    expected = [TokenCounter().count_prompt("gpt-4o", c) for c in conversations]
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        barrier.wait()
        results[t] = [counter.count_prompt("gpt-4o", conversations[t]) for _ in range(20)]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(results[t] == [expected[t]] * 20 for t in range(8))
    assert counter.stats().entries <= 100


def test_default_counter_is_shared() -> None:
    assert isinstance(default_counter, TokenCounter)
    assert default_counter.count_prompt("gpt-4o", [{"role": "user", "content": "hi"}]) > 3


# ---------------------------------------------------------------------------------------------
# No network


def offline_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR",
                                                            "DATA_GYM_CACHE_DIR")}  # fmt: skip
    # Every HTTP(S) request tiktoken could make goes to a closed local port.
    env.update(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9",
               NO_PROXY="", no_proxy="", **extra)  # fmt: skip
    return env


LOAD_BOTH = (
    "import os\n"
    "from authority_sdk.tokens import TokenCounter\n"
    "c = TokenCounter()\n"
    "print(c.count_prompt('gpt-4o', [{'role': 'user', 'content': 'hello world'}]))\n"
    "print(c.count_prompt('gpt-4', [{'role': 'user', 'content': 'hello world'}]))\n"
    "print(os.environ['TIKTOKEN_CACHE_DIR'])\n"
)


def test_both_encodings_load_with_no_network(tmp_path: Path) -> None:
    # A fresh temp dir, so no data-gym-cache left by another run can serve the files.
    out = subprocess.run([sys.executable, "-c", LOAD_BOTH], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env=offline_env(TMPDIR=str(tmp_path)))  # fmt: skip
    assert out.returncode == 0, out.stderr
    o200k, cl100k, cache_dir = out.stdout.split("\n")[:3]
    assert int(o200k) == 3 + 1 + n_tokens("hello world") + 3
    assert int(cl100k) == 3 + 1 + n_tokens("hello world", "cl100k_base") + 3
    pkg = litellm_package_dir()
    assert pkg is not None
    assert Path(cache_dir) == pkg / "litellm_core_utils" / "tokenizers"


def test_a_users_tiktoken_cache_dir_is_respected(tmp_path: Path) -> None:
    pkg = litellm_package_dir()
    assert pkg is not None
    mine = tmp_path / "my-cache"
    shutil.copytree(pkg / "litellm_core_utils" / "tokenizers", mine)
    out = subprocess.run([sys.executable, "-c", LOAD_BOTH], cwd=REPO, capture_output=True,
                         text=True, timeout=60,
                         env=offline_env(TIKTOKEN_CACHE_DIR=str(mine)))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[2] == str(mine)


# ---------------------------------------------------------------------------------------------
# How close to litellm.token_counter


CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "plain": [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "What is the capital of France? One word."}],
    "multi_turn_named": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "name": "alice", "content": "Summarise Hamlet in two sentences."},
        {"role": "assistant", "content": "A prince avenges his father. Almost everyone dies."},
        {"role": "user", "content": "And Macbeth?"}],
    "long_document": [{"role": "user", "content": DESIGN.read_text()}],
}  # fmt: skip


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-4.1", "gpt-4"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_close_to_litellm_token_counter(model: str, name: str) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    messages = CONVERSATIONS[name]
    ours = TokenCounter().count_prompt(model, messages)
    theirs = litellm.token_counter(model=model, messages=messages)
    if name == "long_document":
        # litellm encodes in 1,024-character chunks, adding up to a token per chunk; we don't.
        assert ours <= theirs <= ours + len(DESIGN.read_text()) // 1024 + 1
    else:
        assert ours == theirs


def test_tool_definitions_overestimate_litellm_boundedly() -> None:
    import litellm

    messages = [{"role": "user", "content": "Refund order 42, it arrived broken."}]
    ours = TokenCounter().count_prompt("gpt-4o", messages, [TOOL])
    theirs = litellm.token_counter(model="gpt-4o", messages=messages, tools=[TOOL])
    # JSON costs more tokens than the TypeScript-like form OpenAI renders: a safe overestimate.
    assert theirs <= ours <= theirs * 1.5
