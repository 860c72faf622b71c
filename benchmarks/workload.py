"""The request bodies every benchmark sends: deterministic, about 1,000 prompt tokens.

A support-agent conversation (system prompt, a few turns) with one tool
declared, ``lookup_customer``, which the mock upstream always calls. ``nonce``
makes every message of a conversation distinct, so a token counter that
caches by message hash has to count it afresh (a new conversation); the same
nonce gives byte-identical bodies (a resent conversation).
"""

from __future__ import annotations

import json
from typing import Any

MODEL = "gpt-4o-mini"

TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "lookup_customer",
        "description": "Fetch a customer's account, plan and recent orders by customer id.",
        "parameters": {
            "type": "object",
            "properties": {
                "customer_id": {"type": "string", "description": "Customer id, e.g. C-1042"},
                "include_orders": {"type": "boolean", "default": True},
            },
            "required": ["customer_id"],
            "additionalProperties": False,
        },
    },
}

_VOCAB = (
    "account order refund invoice shipping delivery address payment card subscription plan "
    "upgrade downgrade cancel renewal discount coupon warranty replacement return label "
    "tracking parcel courier delay damaged missing item quantity price tax receipt support "
    "ticket escalation priority customer agent policy eligible window days business weekend "
    "holiday region europe germany france spain italy netherlands email phone chat callback "
    "morning afternoon evening confirm verify identity security password reset login device"
)
_WORDS = _VOCAB.split()

_SYSTEM_RULES = [
    "You are the support assistant of an online shop. Be brief, factual and polite.",
    "Always look a customer up with lookup_customer before you discuss their account.",
    "Never promise a refund: refunds above 50 EUR need a human approver.",
    "Quote order numbers exactly as the customer gave them.",
    "If the customer is upset, acknowledge it once and move on to the facts.",
    "Answer in the customer's language; default to English.",
]


def _prose(seed: int, n_words: int) -> str:
    # A linear congruential walk over a fixed vocabulary: varied, stable across runs.
    out: list[str] = []
    x = seed * 2654435761 % 4294967296 or 1
    for i in range(n_words):
        x = (1103515245 * x + 12345) % 2147483648
        word = _WORDS[x % len(_WORDS)]
        out.append(word.capitalize() if i % 14 == 0 else word)
        if i % 14 == 13:
            out[-1] += "."
    return " ".join(out) + "."


def base_messages(nonce: str = "") -> list[dict[str, Any]]:
    """About 1,000 tokens (o200k) of conversation; ``nonce`` tags every message."""
    tag = f" [conversation {nonce}]" if nonce else ""
    system = " ".join(_SYSTEM_RULES) + " Background notes: " + _prose(1, 240) + tag
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for turn in range(4):
        msgs.append({"role": "user", "content": _prose(10 + turn, 70) + tag})
        msgs.append({"role": "assistant", "content": _prose(20 + turn, 45) + tag})
    msgs.append({"role": "user", "content": "Please check account C-1042: where is my order "
                                            "#A-77812, and can I still return it?" + tag})
    return msgs


def chat_body(messages: list[dict[str, Any]] | None = None, *, stream: bool = False
              ) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": messages if messages is not None else base_messages(),
        "tools": [TOOL],
        "tool_choice": "auto",
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
    return body


def body_bytes(nonce: str = "", *, stream: bool = False) -> bytes:
    return json.dumps(chat_body(base_messages(nonce), stream=stream)).encode()


def agent_turn(messages: list[dict[str, Any]], turn: int, nonce: str) -> list[dict[str, Any]]:
    """The messages an agent sends on ``turn`` (2…): the previous tool call, its result, a
    follow-up from the user. About 200 new tokens per turn."""
    call_id = f"call_{nonce}_{turn}"
    result = {"customer_id": "C-1042", "turn": turn, "status": "active",
              "orders": [{"id": f"A-{77800 + turn}", "state": "in_transit",
                          "note": _prose(100 + turn, 40)}]}
    return [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": "lookup_customer",
                         "arguments": json.dumps({"customer_id": "C-1042"})}}]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
        {"role": "user", "content": _prose(200 + turn, 35) + f" [{nonce}]"},
    ]


def count_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                 ) -> int:
    """Prompt tokens as the gateway counts them (its own counter, no caching shared)."""
    from authority_sdk.tokens import TokenCounter

    return TokenCounter().count_prompt(MODEL, messages, tools)
