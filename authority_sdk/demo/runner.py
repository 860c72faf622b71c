"""``authority demo``: start everything on loopback, walk through the story, clean up.

Children: the webhook receiver (``examples/webhook_receiver.py``, standing in
for the billing system), the scripted model (standing in for OpenAI) and the
real proxy (``authority serve``) on the demo's copy of the policy. They log to
the demo folder, next to the state and the audit log they write.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from ..errors import PolicyError
from .config import DemoKeys, examples_dir, make_folder, pick_keys, write_policy
from .output import StepTable
from .processes import Child, free_port, start_child, start_demo_model
from .steps import Walkthrough

if TYPE_CHECKING:
    from .processes import ProxyProcess

__all__ = ["run_demo"]


def _start_proxy(policy_path: Path, env: dict[str, str], log_path: Path, port: int,
                 attempts: int = 3) -> ProxyProcess:
    from .processes import ProxyProcess

    last: Exception | None = None
    for _ in range(attempts):
        try:
            # The port the policy's links name (notifications.public_base_url).
            return ProxyProcess(policy_path, env=env, log_path=log_path,
                                port=port).start(timeout_s=30.0)
        except RuntimeError as exc:
            last = exc
    raise RuntimeError(f"the proxy would not start: {last}")


def _audit_summary(path: Path) -> str:
    events: collections.Counter[str] = collections.Counter()
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    events[json.loads(line)["event"]] += 1
                except (ValueError, KeyError, TypeError):
                    events["unreadable"] += 1
    except OSError:
        return "not written"
    return f"{sum(events.values())} entries (" + ", ".join(
        f"{n} {e}" for e, n in sorted(events.items())) + ")"


def _no_proxy() -> str:
    current = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    return ",".join(p for p in ("127.0.0.1", "localhost", current) if p)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(*, keep: bool = False, policy: Path | None = None, root: Path | None = None,
             console: Console | None = None) -> int:
    """Run the walkthrough; 0 when every step behaved as the policy says, else 1."""
    con = console or Console(highlight=False)
    examples = examples_dir()
    if examples is None:
        con.print("[red]authority demo needs the examples/ folder of a source checkout "
                  "(git clone, then `make demo`).[/red]")
        return 2
    base = policy or examples / "policy.yaml"
    folder = make_folder((root or Path.cwd()) / ".authority")
    shown = _shown(folder)
    con.print(f"[bold]AI Authority Gateway demo[/bold]: policy {_shown(base)}, "
              f"state and audit in {shown}/")
    # SIGTERM (a supervisor, a test) cleans up like Ctrl-C does; SIGINT is set explicitly
    # because a shell starts background jobs with it ignored.
    previous = {sig: signal.signal(sig, _raise_interrupt)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(con, examples, base, folder, keep)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(con: Console, examples: Path, base: Path, folder: Path, keep: bool) -> int:
    shown = _shown(folder)
    with ExitStack() as stack:
        try:
            receiver = start_child(
                "webhook receiver",
                lambda p: [sys.executable, "-u", str(examples / "webhook_receiver.py"),
                           "--port", str(p)],
                folder / "receiver.log", ready_path="/received")
            stack.callback(receiver.stop)
            model = start_demo_model(folder)
            stack.callback(model.stop)
            port = free_port()
            policy_path, pol, secrets = write_policy(base, folder, model_url=model.url,
                                                     receiver_url=receiver.url,
                                                     proxy_url=f"http://127.0.0.1:{port}")
            keys = pick_keys(pol)
            env = {**secrets, "PYTHONPATH": str(examples),
                   "AUTHORITY_NOTES_FILE": str(folder / "notes.jsonl"),
                   # Loopback traffic must not be sent to a proxy configured for the internet.
                   "NO_PROXY": _no_proxy(), "no_proxy": _no_proxy()}
            proxy = _start_proxy(policy_path, env, folder / "proxy.log", port)
            stack.callback(proxy.stop)
        except PolicyError as exc:
            con.print(f"[red]{escape(str(exc))}[/red]")
            return 2
        except (RuntimeError, OSError) as exc:
            con.print(f"[red]could not start the demo: {escape(str(exc))}[/red]")
            return 2
        except KeyboardInterrupt:
            return 130
        proxy_url = proxy.url
        con.print(f"  scripted model    {model.url}/v1   stands in for OpenAI: no API key, "
                  "no network")
        con.print(f"  webhook receiver  {receiver.url}   stands in for the billing system")
        con.print(f"  gateway proxy     {proxy_url}   authority serve --policy "
                  f"{_shown(policy_path)}")
        con.print()
        table = StepTable(con)
        table.header()
        walk = Walkthrough(proxy_url=proxy_url, model_url=model.url, receiver_url=receiver.url,
                           keys=keys, policy_path=policy_path)
        stack.callback(walk.http.close)
        try:
            steps = walk.run(table.row)
        except KeyboardInterrupt:
            return 130
        failed = [s for s in steps if not s.ok]
        con.print()
        if failed:
            con.print(f"[bold red]✘ {len(failed)} of {len(steps)} steps did not behave as "
                      "the policy says[/bold red]")
        else:
            con.print(f"[bold green]✔ all {len(steps)} steps behaved as the policy says"
                      "[/bold green]")
        con.print(f"  audit log  {_shown(pol.audit_path)}  {_audit_summary(pol.audit_path)}")
        con.print(f"  state      {_shown(pol.state_path)}/")
        con.print(f"  policy     {_shown(policy_path)}")
        con.print(f"  logs       {shown}/proxy.log, model.log, receiver.log")
        code = 1 if failed else 0
        if keep:
            _keep(con, proxy, model, receiver, keys, policy_path, examples)
        return code


def _shown(path: Path) -> str:
    """A path as short as it can be shown: relative to the current folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _keep(con: Console, proxy: ProxyProcess, model: Child, receiver: Child, keys: DemoKeys,
          policy_path: Path, examples: Path) -> None:
    proxy_url = proxy.url
    base = proxy_url + "/v1"
    pol = _shown(policy_path)
    ex = _shown(examples)
    lines = [
        "",
        "Still running (Ctrl-C stops everything):",
        f"  base_url          {base}",
        f"  scripted model    {model.url}/v1",
        f"  webhook receiver  {receiver.url}   (GET /received lists what it got)",
        "  keys:",
        *[f"    {k.name:<15} {k.secret:<26} environment {k.environment}, roles "
          f"{', '.join(k.roles)}" for k in keys.all],
        "",
        "The scripted model follows directives in the last user message: SAY <text>, "
        "CALL <tool> <json args>, COMPLETION_TOKENS <n>, SLEEP <s>, FAIL <status>.",
        "",
        "curl:",
        f"  curl -s {base}/chat/completions -H 'Authorization: Bearer {keys.agent.secret}' "
        "-H 'Content-Type: application/json' -d '{\"model\": \"gpt-4o-mini\", \"messages\": "
        "[{\"role\": \"user\", \"content\": \"CALL issue_refund "
        "{\\\"order_id\\\": \\\"B-1\\\", \\\"amount\\\": 400}\"}]}'",
        f"  curl -s '{proxy_url}/authority/approvals?status=pending' "
        f"-H 'Authorization: Bearer {keys.ops.secret}'",
        f"  curl -s -X POST {proxy_url}/authority/approvals/<approval_id>/approve "
        f"-H 'Authorization: Bearer {keys.ops.secret}'",
        f"  curl -s -X POST {proxy_url}/authority/kill-switch "
        f"-H 'Authorization: Bearer {keys.ops.secret}' -H 'Content-Type: application/json' "
        "-d '{\"engaged\": true, \"reason\": \"trying it\"}'",
        "",
        "Python (the stock openai client):",
        "  from openai import OpenAI",
        f"  client = OpenAI(base_url=\"{base}\", api_key=\"{keys.agent.secret}\")",
        "  r = client.chat.completions.create(model=\"gpt-4o-mini\", messages=[{\"role\": "
        "\"user\", \"content\": 'CALL issue_refund {\"order_id\": \"B-2\", \"amount\": 20}'}])",
        "  print(r.choices[0].message.content, r.model_extra[\"authority\"][\"actions\"])",
        "",
        "The examples, against this gateway:",
        f"  OPENAI_BASE_URL={base} OPENAI_API_KEY={keys.agent.secret} "
        f"python {ex}/unaware_app.py",
        f"  python {ex}/dropin_sdk.py --policy {pol}",
        f"  python {ex}/approvals.py --url {proxy_url} --key {keys.ops.secret} list",
        "",
        "The command line, on the same state (or on the proxy with --url and --key):",
        f"  authority approvals list --policy {pol}",
        f"  authority approvals approve <approval_id> --url {proxy_url} --key {keys.ops.secret}",
        f"  authority kill-switch status --policy {pol}",
        f"  authority budget --policy {pol}",
        f"  authority audit tail --policy {pol}",
    ]
    for line in lines:
        con.print(line, markup=False, highlight=False, soft_wrap=True)
    try:
        while model.alive() and receiver.alive() and proxy.proc and proxy.proc.poll() is None:
            time.sleep(0.5)
        con.print("[red]a child process exited; stopping[/red]")
    except KeyboardInterrupt:
        con.print("stopping…")
