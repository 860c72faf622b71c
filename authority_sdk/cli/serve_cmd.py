"""``authority serve``: the OpenAI-compatible proxy on uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import AuthorityError
from .common import PolicyOpt, policy_or_exit

_LEVELS = ("debug", "info", "warning", "error")


def serve(
    policy: PolicyOpt = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8787,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (state is shared "
                                                     "through the store).")] = 1,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[str, typer.Option(help="text, or json (one object per line).")
                          ] = "text",
) -> None:
    """Serve /v1/chat/completions, /v1/models and the management API (DESIGN.md §9)."""
    level = log_level.lower()
    if level not in _LEVELS:
        typer.echo(f"error: --log-level must be one of {', '.join(_LEVELS)}", err=True)
        raise typer.Exit(2)
    if log_format not in ("text", "json"):
        typer.echo("error: --log-format must be text or json", err=True)
        raise typer.Exit(2)
    from ..policy import default_policy_path

    path = default_policy_path(policy)
    policy_or_exit(path)  # a broken policy is a clear message and exit 2, not a traceback
    from proxy.server import run

    try:
        code = run(path, host=host, port=port, workers=workers, log_level=level,
                   log_format=log_format)
    except AuthorityError as exc:  # e.g. the state store cannot be opened: fail closed, clearly
        typer.echo(f"error: {exc.message} [{exc.code}]", err=True)
        raise typer.Exit(1) from exc
    raise typer.Exit(code)


def worker(
    policy: PolicyOpt = None,
    once: Annotated[bool, typer.Option("--once", help="Run one round and exit.")] = False,
) -> None:
    """Run the background worker (recovery, parked audit entries, approval expiry) where
    only the SDK runs; `authority serve` runs it itself. A lease lets one process work."""
    import json
    import logging

    from ..engine import Engine
    from ..worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    engine = Engine(policy_or_exit(policy))
    w = Worker(engine, interval_s=engine.policy.worker.interval_s)
    try:
        if once:
            typer.echo(json.dumps(w.tick(), default=str))
            return
        w.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        w.stop()
        engine.close()
