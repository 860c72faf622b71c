"""The OpenAI-compatible proxy: the gateway's second front door (DESIGN.md §1, §9)."""

from __future__ import annotations

from .app import create_app
from .server import run

__all__ = ["create_app", "run"]
