"""``authority demo [--keep] [--policy FILE]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["demo"]


def demo(
    keep: Annotated[bool, typer.Option(
        "--keep", help="Leave the proxy, the scripted model and the webhook receiver running "
        "afterwards and print how to try them by hand (Ctrl-C stops them).")] = False,
    policy: Annotated[Path | None, typer.Option(
        "--policy", "-p", dir_okay=False, exists=True,
        help="Policy to run the story on (default: examples/policy.yaml). Its upstream, "
        "webhook URLs, state and audit paths are replaced by the demo's own.")] = None,
) -> None:
    """Walk through every decision the gateway makes, on loopback, with no API key.

    Starts a scripted model, a webhook receiver and the real proxy on free loopback
    ports; exits non-zero if any step's outcome differs from what the policy says.
    """
    from ..demo.runner import run_demo

    raise typer.Exit(run_demo(keep=keep, policy=policy))
