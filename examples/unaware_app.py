"""An app that knows nothing of the gateway: the stock openai client, pointed at the proxy.

Nothing in this file mentions the gateway. Point the standard environment
variables at the proxy and use a key from its policy::

    OPENAI_BASE_URL=http://127.0.0.1:8787/v1 OPENAI_API_KEY=<a key from the policy> \\
        python examples/unaware_app.py

(``authority demo --keep`` prints the exact command.) What the app sees: a
normal completion; a tool call it is not allowed to run simply is not there
(``finish_reason`` becomes ``stop`` and the content says why); a denied
request is the ``openai.PermissionDeniedError`` it already knows how to catch.
"""

from __future__ import annotations

import sys
from typing import Any

import openai

REFUND_TOOL: Any = {"type": "function", "function": {
    "name": "issue_refund",
    "parameters": {"type": "object", "properties": {
        "order_id": {"type": "string"}, "amount": {"type": "number"}},
        "required": ["order_id", "amount"]}}}


def main() -> int:
    client = openai.OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY come from the environment

    r = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "SAY Hello! How can I help you today?"}])
    print(f"1. answer: {r.choices[0].message.content}")

    r = client.chat.completions.create(
        model="gpt-4o-mini", tools=[REFUND_TOOL],
        messages=[{"role": "user", "content":
                   'Refund order C-3001 in full.\n'
                   'CALL issue_refund {"order_id": "C-3001", "amount": 400}'}])
    choice = r.choices[0]
    print(f"2. finish_reason={choice.finish_reason} tool_calls={choice.message.tool_calls} "
          f"content={choice.message.content!r}")

    try:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "SAY hi"}])
        print("3. gpt-4o: allowed")
    except openai.PermissionDeniedError as exc:
        print(f"3. gpt-4o: refused, {exc.status_code} {exc.code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
