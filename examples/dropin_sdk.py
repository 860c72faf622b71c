"""The SDK swap: ``OpenAI()`` becomes ``AuthorityClient(...)``, and an agent loop keeps working.

Every completion and every tool call passes the policy in this process. The
loop below is an ordinary tool-calling loop with one change: instead of
running every tool call itself, the app appends
``authority.followup_messages`` (the assistant turn plus the result of each
action the gateway handled: executed, held for approval, denied, simulated)
and runs only the calls left in ``message.tool_calls``, which are the ones the
policy lets the app run itself.

    python examples/dropin_sdk.py --policy .authority/demo-<stamp>/policy.yaml

(``authority demo --keep`` prints that path.) Against a real provider, write
the task in plain words with ``--task``; the scripted model follows the
``CALL`` lines of the default task.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from authority_sdk.client import AuthorityClient
from authority_sdk.types import authority_of

TOOLS: list[Any] = [
    {"type": "function", "function": {
        "name": "lookup_customer", "description": "Find a customer and their recent orders.",
        "parameters": {"type": "object", "properties": {"customer_id": {"type": "string"}},
                       "required": ["customer_id"]}}},
    {"type": "function", "function": {
        "name": "issue_refund", "description": "Refund part or all of an order.",
        "parameters": {"type": "object", "properties": {
            "order_id": {"type": "string"}, "amount": {"type": "number"}},
            "required": ["order_id", "amount"]}}},
]

TASK = """Customer C-17 says orders B-2001 and B-2002 arrived broken. Refund both.
CALL lookup_customer {"customer_id": "C-17"}
CALL issue_refund {"order_id": "B-2001", "amount": 25}
CALL issue_refund {"order_id": "B-2002", "amount": 400}"""


def lookup_customer(args: dict[str, Any]) -> dict[str, Any]:
    """A client-dispatched tool: the policy allows it, the app runs it."""
    return {"customer_id": args.get("customer_id"), "tier": "gold",
            "orders": [{"order_id": "B-2001", "total": 25}, {"order_id": "B-2002", "total": 400}]}


LOCAL_TOOLS = {"lookup_customer": lookup_customer}


def run_agent(client: AuthorityClient, task: str, *, model: str = "gpt-4o-mini",
              max_turns: int = 5) -> list[str]:
    """Run the loop; return the approval ids still waiting for a person."""
    messages: list[Any] = [
        {"role": "system", "content": "You are a support agent. Use the tools."},
        {"role": "user", "content": task},
    ]
    pending: list[str] = []
    for turn in range(1, max_turns + 1):
        resp = client.chat.completions.create(model=model, messages=messages, tools=TOOLS)
        info = authority_of(resp)
        message = resp.choices[0].message
        if not info.actions:
            print(f"turn {turn}: assistant: {message.content}")
            break
        print(f"turn {turn}: the model asked for {len(info.actions)} tool call(s)")
        for action in info.actions:
            detail = action.approval_id or action.code or ""
            print(f"  {action.action_type} {action.tool_call.arguments} -> {action.status}"
                  + (f" ({detail})" if detail else ""))
            if action.status == "pending_approval" and action.approval_id:
                pending.append(action.approval_id)
        # The assistant turn and the gateway's results, ready to append.
        messages += info.followup_messages
        # What is left in tool_calls is ours to run.
        for call in message.tool_calls or []:
            if call.type != "function":
                continue
            fn = call.function
            result = LOCAL_TOOLS[fn.name](json.loads(fn.arguments))
            print(f"  ran {fn.name} here: {json.dumps(result)}")
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": json.dumps(result)})
    return pending


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="An agent loop on AuthorityClient.")
    ap.add_argument("--policy", default=str(Path(__file__).with_name("policy.yaml")))
    ap.add_argument("--environment", default="prod")
    ap.add_argument("--task", default=TASK)
    a = ap.parse_args(argv)

    # The only line that differs from a plain openai app: OpenAI() -> AuthorityClient(...).
    client = AuthorityClient(policy=a.policy, environment=a.environment, caller="support-bot")
    print(f"user: {a.task.splitlines()[0]}")
    pending = run_agent(client, a.task)
    for approval_id in pending:
        print(f"waiting for a person: authority approvals approve {approval_id} "
              f"--policy {a.policy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
