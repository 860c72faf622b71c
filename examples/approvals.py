"""Approve or reject held actions over HTTP, as an approval UI or a chat bot would.

    python examples/approvals.py --url http://127.0.0.1:8787 --key <approver key> list
    python examples/approvals.py ... show apr_…
    python examples/approvals.py ... approve apr_… --reason "checked with the customer"
    python examples/approvals.py ... reject apr_… --reason "duplicate ticket"

``--url`` defaults to ``$AUTHORITY_URL``, ``--key`` to ``$AUTHORITY_KEY``.
The key needs the ``approver`` role, and cannot approve what its own requests
created. Approving a gateway-dispatched action executes it, once, right then;
the answer says how it went. Errors come in OpenAI's shape, with a ``code``
(``approval_executed``, ``kill_switch_engaged``, ``insufficient_role``…).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx


def _line(a: dict[str, Any]) -> str:
    return (f"{a['id']}  {a['status']:<8} {a.get('environment')}  {a['action_type']} "
            f"{json.dumps(a.get('arguments'))}  requested by {a.get('requested_by')}"
            + (f": {a['reason']}" if a.get("reason") else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Approve held actions over HTTP.")
    ap.add_argument("--url", default=os.environ.get("AUTHORITY_URL", "http://127.0.0.1:8787"))
    ap.add_argument("--key", default=os.environ.get("AUTHORITY_KEY"))
    sub = ap.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="pending approvals (or --status)")
    ls.add_argument("--status", default="pending")
    for name in ("show", "approve", "reject"):
        p = sub.add_parser(name)
        p.add_argument("approval_id")
        if name != "show":
            p.add_argument("--reason")
    a = ap.parse_args(argv)
    if not a.key:
        ap.error("give --key or set $AUTHORITY_KEY")

    with httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {a.key}"},
                      timeout=30.0) as http:
        if a.command == "list":
            r = http.get("/authority/approvals", params={"status": a.status})
        elif a.command == "show":
            r = http.get(f"/authority/approvals/{a.approval_id}")
        else:
            r = http.post(f"/authority/approvals/{a.approval_id}/{a.command}",
                          json={"reason": a.reason})
    body = r.json()
    if r.status_code >= 400:
        err = body.get("error", {})
        print(f"refused: {r.status_code} {err.get('code')}: {err.get('message')}",
              file=sys.stderr)
        return 1
    if a.command == "list":
        for item in body["data"]:
            print(_line(item))
        print(f"{len(body['data'])} {a.status}")
    elif a.command == "show":
        print(json.dumps(body, indent=2))
    else:
        print(_line(body))
        if body.get("status") in ("executed", "failed", "in_doubt"):
            print(f"execution: {body['status']} -> {json.dumps(body.get('result'))}"
                  + (f" ({body['error']})" if body.get("error") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
