"""Shared fixtures: a real scripted model on loopback, and policies written to real files.
Plain helpers (imported by test files) live in helpers.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    AUDIT_SINKS,
    STORE_BACKENDS,
    AuditSinkBackend,
    ScriptedServer,
    StoreBackend,
    write_policy_file,
)


@pytest.fixture(scope="session")
def upstream() -> Iterator[ScriptedServer]:
    srv = ScriptedServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def write_policy(tmp_path: Path, upstream: ScriptedServer) -> Callable[..., Path]:
    """``write(overrides=None, name=...)``: a policy file under tmp_path (see
    ``write_policy_file``)."""

    def write(overrides: dict[str, Any] | None = None, name: str = "authority.yaml") -> Path:
        return write_policy_file(tmp_path, upstream, overrides, name)

    return write


@pytest.fixture
def rx() -> Iterator[Any]:
    """A real HTTP receiver standing in for a billing webhook (answers a refund id)."""
    from servers import HttpReceiver

    with HttpReceiver() as receiver:
        receiver.reply(200, json={"refund_id": "rf_1"})
        yield receiver


@pytest.fixture
def audit_chain_intact(tmp_path: Path) -> Iterator[None]:
    """After the test, the audit log it left (if any) still verifies."""
    from authority_sdk.audit import verify

    yield
    log = tmp_path / "audit.jsonl"
    if log.exists():
        result = verify(log)
        assert result.ok, result.reason


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Child processes a test starts (multiprocessing), killed after it if still alive."""
    started: list[Any] = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
            p.join(10)


@pytest.fixture
def effects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where ``sample_actions:record`` writes each effect it makes (one JSON line each)."""
    from sample_actions import EFFECTS_ENV

    path = tmp_path / "effects.jsonl"
    monkeypatch.setenv(EFFECTS_ENV, str(path))
    return path


@pytest.fixture
def gateways() -> Iterator[list[Any]]:
    """Gateways a test opens, closed after it."""
    opened: list[Any] = []
    yield opened
    for gw in opened:
        gw.close()


@pytest.fixture(params=sorted(STORE_BACKENDS))
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBackend]:
    backend = STORE_BACKENDS[request.param](tmp_path)
    yield backend
    backend.cleanup()


@pytest.fixture(params=sorted(AUDIT_SINKS))
def audit_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditSinkBackend]:
    """Each audit sink of ``AUDIT_SINKS`` (tests/helpers.py): the audit contract runs on all."""
    backend = AUDIT_SINKS[request.param](tmp_path)
    yield backend
    backend.cleanup()


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[Any]:
    """A PostgreSQL state backend of its own (a schema dropped after the test)."""
    from helpers import PostgresBackend

    backend = PostgresBackend(tmp_path)
    yield backend
    backend.cleanup()


@pytest.fixture
def pg_store(pg: Any) -> Iterator[Any]:
    """A ``PgStore`` on ``pg``'s schema, closed after the test."""
    s = pg.open()
    yield s
    s.close()
