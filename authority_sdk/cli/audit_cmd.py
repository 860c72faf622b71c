"""``authority audit tail|verify|acknowledge|export|rotate|prune|status``.

``verify`` exits 0 when the chain is intact, 1 when it is broken (edited, forged, cut,
or the log deleted, as the head or the checkpoint show) or cannot be read, and 3 when
the chain is intact but records lost entries no one has acknowledged yet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..audit import AuditSink, FileSink, open_sink, verify_sink
from ..audit import acknowledge as acknowledge_losses
from ..audit import tail as tail_log
from ..audit.protocol import last_entries
from ..errors import AuthorityError
from ..policy import Policy
from .common import PolicyOpt, policy_or_exit

app = typer.Typer(no_args_is_help=True)

EXIT_BROKEN = 1
EXIT_UNACKNOWLEDGED_LOSS = 3

FileOpt = Annotated[
    Path | None,
    typer.Option("--file", "-f", help="Audit log to read (default: the policy's audit.path).",
                 dir_okay=False),
]


def _fail(message: str, code: int = EXIT_BROKEN) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def _open_store(policy: Policy) -> Any:
    from ..store import open_store

    try:
        return open_store(policy)
    except AuthorityError as exc:
        raise _fail(f"error: cannot open the state store: {exc.message}") from exc


def _sink(policy: Policy | None, file: Path | None, head: Any = None) -> AuditSink:
    if policy is None:
        assert file is not None
        return FileSink(file, fsync=False)
    try:
        if file is not None:  # the policy's key and checkpoint, another file
            from ..audit.registry import sink_options

            return FileSink(file, head=head, **sink_options(policy))
        return open_sink(policy, head)
    except AuthorityError as exc:
        raise _fail(f"error: {exc.message}") from exc


def _resolve(policy: str | None, file: Path | None) -> tuple[Path, Policy | None]:
    if file is not None and policy is None:
        return file, None
    pol = policy_or_exit(policy)
    return (file or pol.audit_path), pol


@app.command()
def verify(policy: PolicyOpt = None, file: FileOpt = None,
           against_stream: Annotated[Path | None, typer.Option(
               "--against-stream", help="A receiver's copy of the audit stream (JSON lines or "
               "syslog lines): every seq in it must be in the local chain with the same hash.",
               dir_okay=False)] = None) -> None:
    """Check the chain (across archived files too): hashes, MACs (with the policy's key), the
    head kept in the state store, the signed checkpoint and prune record. Exit 1 when broken,
    3 on an unacknowledged loss."""
    _, pol = _resolve(policy, file)
    head: tuple[int, str] | None = None
    notes: list[str] = []
    if pol is None:
        notes.append("head, key and checkpoint not checked: --file without --policy")
    else:
        store = _open_store(pol)
        try:
            head = store.get_audit_head()
        except AuthorityError as exc:
            raise _fail(f"error: cannot read the audit head from the state store: "
                        f"{exc.message}") from exc
        finally:
            store.close()
        if head is None:
            notes.append("head check skipped: the state store has no audit head yet")
    sink = _sink(pol, file)
    if pol is not None and sink.key is None:
        notes.append("MACs not checked: the policy names no audit key")
    if pol is not None and sink.checkpoints is None:
        notes.append("no checkpoint: the policy names no audit.checkpoint_path, so deleting "
                     "the log and the state together would not be caught")
    result = verify_sink(sink, head)
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    if not result.ok:
        where = f"line {result.first_bad_line}: " if result.first_bad_line else ""
        code = EXIT_UNACKNOWLEDGED_LOSS if result.kind == "lost" else EXIT_BROKEN
        raise _fail(f"FAIL: {sink.location}: {where}{result.reason}", code)
    checked = [name for name, on in (("head", head is not None), ("MACs", sink.key is not None),
                                     ("checkpoint", sink.checkpoints is not None)) if on]
    if against_stream is not None:
        _compare_stream(sink, against_stream)
        checked.append("stream copy")
    typer.echo(f"ok: {result.entries} entries, head seq {result.last_seq} hash "
               f"{result.last_hash[:16]}… (checked: {', '.join(checked) or 'hashes only'})")


def _compare_stream(sink: AuditSink, path: Path) -> None:
    from ..audit.stream_check import compare_with_stream, read_stream_copy

    pruned = getattr(sink, "prune_record", lambda: None)()
    try:
        cmp = compare_with_stream(sink.records(), read_stream_copy(path),
                                  pruned_through=pruned.seq if pruned else 0)
    except OSError as exc:
        raise _fail(f"error: cannot read {path}: {exc.strerror or exc}") from exc
    for note in cmp.notes:
        typer.echo(f"note: stream copy: {note}", err=True)
    if not cmp.ok:
        for problem in cmp.problems:
            typer.echo(f"FAIL: stream copy {path}: {problem}", err=True)
        raise typer.Exit(EXIT_BROKEN)
    typer.echo(f"stream copy {path}: {cmp.compared} entries match the local chain")


def _file_sink(pol: Policy, head: Any = None) -> FileSink:
    sink = _sink(pol, None, head)
    if not isinstance(sink, FileSink):
        raise _fail(f"error: rotation applies to audit.backend: file, not {pol.audit.backend}",
                    2)
    return sink


@app.command()
def rotate(policy: PolicyOpt = None,
           force: Annotated[bool, typer.Option(
               "--force", help="Rotate now even if the policy's limits are not reached.")] = False
           ) -> None:
    """Move the active audit file into the archive (when due, or now with --force); the
    chain continues in a new file. Compresses archived files when the policy says so."""
    pol = policy_or_exit(policy)
    store = _open_store(pol)
    try:
        sink = _file_sink(pol, store)
        if pol.audit.rotate is None and not force:
            raise _fail("error: the policy has no audit.rotate; use --force to rotate anyway", 2)
        try:
            archived = sink.rotate(force=force)
            compressed = (sink.compress_archives()
                          if pol.audit.rotate is not None and pol.audit.rotate.compress else 0)
        except AuthorityError as exc:
            raise _fail(f"error: {exc.message}") from exc
        finally:
            sink.close()
    finally:
        store.close()
    if archived is None:
        typer.echo("nothing to rotate: the active file is not due (or holds no entry)")
    else:
        typer.echo(f"rotated: seqs {archived.first}..{archived.last} -> {archived.path}")
    if compressed:
        typer.echo(f"compressed {compressed} archived file(s)")


@app.command()
def prune(policy: PolicyOpt = None) -> None:
    """Delete archived files (the table's oldest rows, with audit.backend: postgres) older
    than audit.retention, only what is checkpointed and streamed, after recording where the
    kept chain starts (a retention entry and a signed prune record), so `verify` passes."""
    from ..audit.lifecycle import can_prune, prune_now

    pol = policy_or_exit(policy)
    if not pol.audit.retention:
        raise _fail("error: the policy names no audit.retention", 2)
    store = _open_store(pol)
    try:
        sink = _sink(pol, None, store)
        if not can_prune(sink):
            raise _fail(f"error: audit.backend {pol.audit.backend} does not support retention",
                        2)
        try:
            result = prune_now(pol, sink, actor="cli")
        except AuthorityError as exc:
            raise _fail(f"error: {exc.message}") from exc
        finally:
            sink.close()
    finally:
        store.close()
    for name in result.deleted:
        typer.echo(f"deleted: {name}")
    if result.pruned_through is not None:
        typer.echo(f"pruned through seq {result.pruned_through}")
    else:
        typer.echo("nothing to prune")
    if result.held_back:
        typer.echo(f"note: {result.held_back}", err=True)


@app.command()
def status(policy: PolicyOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="As JSON.")] = False) -> None:
    """The log's files, what retention pruned, and each stream's position and lag."""
    from ..audit.lifecycle import lifecycle_status

    pol = policy_or_exit(policy)
    sink = _sink(pol, None)
    try:
        info = lifecycle_status(pol, sink)
    except (AuthorityError, OSError) as exc:
        raise _fail(f"error: {exc.message if isinstance(exc, AuthorityError) else exc}"
                    ) from exc
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"log: {info['location']} (last seq {info['last_seq']})")
    if "archives" in info:
        arch = info["archives"]
        span = f", seqs {arch[0]['first']}..{arch[-1]['last']}" if arch else ""
        typer.echo(f"active file: {info['active_bytes']} bytes; archived files: {len(arch)}"
                   f"{span}")
        if info.get("pruned_through"):
            typer.echo(f"pruned by retention through seq {info['pruned_through']}")
    for st in info["streams"]:
        state = f"failing ({st['failures']}x: {st['last_error']})" if st["failures"] else "ok"
        typer.echo(f"stream {st['name']} ({st['kind']}): sent through seq {st['seq']}, lag "
                   f"{st['lag']} entries, {state}")
        if st["divergence"]:
            typer.echo(f"warning: stream {st['name']}: {st['divergence']}", err=True)


@app.command()
def acknowledge(
    by: Annotated[str, typer.Option("--by", help="Who investigated the loss (recorded).")],
    reason: Annotated[str, typer.Option("--reason", help="What was found (recorded).")],
    policy: PolicyOpt = None,
) -> None:
    """Record that the losses the log shows were investigated: `verify` passes again on them.

    Writes one entry naming who, why and which recovery entries it settles. A chain broken
    for another reason (tampering) cannot be acknowledged: exit 1."""
    pol = policy_or_exit(policy)
    store = _open_store(pol)
    try:
        sink = _sink(pol, None, head=store)
        try:
            losses, entry = acknowledge_losses(sink, store, by=by, reason=reason)
        except AuthorityError as exc:
            raise _fail(f"error: {exc.message}") from exc
        finally:
            sink.close()
    finally:
        store.close()
    if entry is None:
        typer.echo("nothing to acknowledge: the log records no unacknowledged loss")
        return
    for loss in losses:
        typer.echo(f"acknowledged: {loss.describe()}")
    typer.echo(f"recorded as seq {entry['seq']} by {entry['actor']}")


@app.command()
def tail(
    n: Annotated[int, typer.Option("-n", "--lines", min=1, help="How many entries.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Raw JSON lines.")] = False,
    policy: PolicyOpt = None,
    file: FileOpt = None,
) -> None:
    """Show the last entries of the audit log."""
    path, pol = _resolve(policy, file)
    try:
        if file is None and pol is not None and pol.audit.backend != "file":
            entries = last_entries(_sink(pol, None).records_before(None), n)
        else:
            # The files themselves (the archive too): no key or store needed to read them.
            archive = pol.audit_archive_path if pol is not None and file is None else None
            log = FileSink(path, fsync=False, archive_dir=archive)
            if not log.exists():
                tail_log(path, n)  # raises the OSError of a missing log
            entries = last_entries(log.records_before(None), n)
    except OSError as exc:
        typer.echo(f"error: cannot read {path}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from exc
    if as_json:
        for entry in entries:
            typer.echo(json.dumps(entry, ensure_ascii=False))
        return
    _print_table(entries, path if pol is None or pol.audit.backend == "file"
                 else Path(pol.audit.backend))


def _print_table(entries: list[dict[str, Any]], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{path} (last {len(entries)})", title_justify="left")
    for col in ("seq", "time (UTC)", "event", "request", "env", "model / action", "decision",
                "status / reason", "actor", "cost $"):
        table.add_column(col, overflow="fold")
    for e in entries:
        if "invalid_line" in e:
            table.add_row("?", "", "[red]invalid line[/red]", "", "", "", "",
                          f"[red]{e['invalid_line'][:80]!r} at byte {e['offset']}[/red]",
                          "", "")
            continue
        decision = e.get("decision") or ""
        colour = {"allow": "green", "deny": "red", "error": "yellow"}.get(decision, "")
        status = e.get("approval_status") or (e.get("details") or {}).get("status")
        table.add_row(
            str(e.get("seq")),
            str(e.get("ts") or "").replace("T", " ").rstrip("Z"),
            str(e.get("event")),
            str(e.get("request_id") or ""),
            str(e.get("environment") or ""),
            str(e.get("action_type") or e.get("model") or ""),
            f"[{colour}]{decision}[/{colour}]" if colour else decision,
            " ".join(str(x) for x in (status, e.get("reason")) if x),
            str(e.get("actor") or ""),
            _cost(e),
        )
    Console().print(table)


def _cost(e: dict[str, Any]) -> str:
    cost = e.get("cost_actual_usd")
    if cost is None:
        cost = e.get("cost_estimate_usd")
    return f"{cost:.6f}" if isinstance(cost, int | float) else ""


@app.command()
def export(
    policy: PolicyOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl: the file sink's format.")] = "jsonl",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write here (default: standard output).", dir_okay=False)] = None,
) -> None:
    """Write the policy's audit chain (any sink: a file, the PostgreSQL table) as JSON Lines,
    byte for byte what the file sink would hold, so `authority audit verify --file` checks it
    and any JSONL tool reads it."""
    import json
    import sys

    if fmt != "jsonl":
        raise _fail(f"error: --format must be jsonl, not {fmt!r}", 2)
    sink = _sink(policy_or_exit(policy), None)
    out = output.open("w", encoding="utf-8", newline="\n") if output else sys.stdout
    count = 0
    try:
        for rec in sink.records():
            # An item that is not an entry is written as it stands: verify must see it too.
            line = (json.dumps(rec.entry, separators=(",", ":"), ensure_ascii=False)
                    if rec.entry is not None else str(rec.raw or ""))
            out.write(line + "\n")
            count += 1
    except (AuthorityError, OSError) as exc:
        raise _fail(f"error: cannot read {sink.location}: {exc}") from exc
    finally:
        if output:
            out.close()
    if output:
        typer.echo(f"exported {count} entries to {output}", err=True)
