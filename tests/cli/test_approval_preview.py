"""``authority approvals show`` prints what approving runs: the executor's parsed preview."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import typer
from helpers import user
from servers import SmtpSink
from typer.testing import CliRunner

from authority_sdk import control
from authority_sdk.cli import control_cmd
from authority_sdk.client import AuthorityClient


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(control_cmd.approvals_app, name="approvals")
    return app


def test_show_prints_the_parsed_recipients_as_text(write_policy: Callable[..., Path]) -> None:
    with SmtpSink() as sink:
        path = write_policy({
            "actions": {"send_email": {"executor": "email", "mode": "require_human_approval"}},
            "executors": {"email": {"type": "smtp", "host": "127.0.0.1", "port": sink.port,
                                    "sender": "agent@example.com"}},
        })
        client = AuthorityClient(policy=str(path), environment="prod", max_retries=0)
        try:
            args = {"to": ['"Smith, John" <john@example.com>'], "cc": '"[bold]Eve" <e@x.org>',
                    "subject": "numbers", "body": "[white on white]hidden[/]"}
            r = client.chat.completions.create(
                model="gpt-4o-mini", messages=user(f"CALL send_email {json.dumps(args)}"))
            approval_id = r.to_dict()["authority"]["actions"][0]["approval_id"]  # type: ignore[index]
            # Listing shows the preview of pending approvals too, as the console reads them.
            [listed] = control.list_approvals(client.gateway, "pending")
            assert listed["would_execute"]["recipients"] == {
                "to": ['"Smith, John" <john@example.com>'], "cc": ['"[bold]Eve" <e@x.org>']}
        finally:
            client.gateway.close()
        res = CliRunner().invoke(_cli(), ["approvals", "show", approval_id, "--policy", str(path)],
                                 env={"COLUMNS": "200"})
        as_json = CliRunner().invoke(_cli(), ["approvals", "show", approval_id, "--json",
                                              "--policy", str(path)])
    assert res.exit_code == 0, res.output
    assert "would execute" in res.output
    assert '\\"Smith, John\\" <john@example.com>' in res.output
    # Model-written text is shown as written, never read as console markup.
    assert '\\"[bold]Eve\\" <e@x.org>' in res.output
    assert "[white on white]hidden[/]" in res.output
    shown = json.loads(as_json.output)
    assert shown["would_execute"]["envelope"]["rcpt_to"] == ["john@example.com", "e@x.org"]
