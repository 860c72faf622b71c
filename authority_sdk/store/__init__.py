"""The state store (DESIGN.md §7): one interface of atomic primitives, several backends.

``Store`` (in :mod:`.protocol`) is what the engine codes against, split by
concern; ``open_store(policy)`` opens the backend ``state.backend`` names.
"""

from __future__ import annotations

from .disk import DiskStore
from .protocol import (
    ApprovalStore,
    ChainHeadStore,
    ControlStore,
    CounterStore,
    DedupeStore,
    IdempotencyStore,
    JournalStore,
    LeaseStore,
    OutboxStore,
    Store,
)
from .registry import backends, open_store, register_backend

__all__ = [
    "ApprovalStore",
    "ChainHeadStore",
    "ControlStore",
    "CounterStore",
    "DedupeStore",
    "DiskStore",
    "IdempotencyStore",
    "JournalStore",
    "LeaseStore",
    "OutboxStore",
    "Store",
    "backends",
    "open_store",
    "register_backend",
]
