"""The OpenAI-compatible proxy: the gateway's second front door (DESIGN.md §1, §9)."""

from __future__ import annotations

from .app import create_app
from .server import ProxyProcess, run

__all__ = ["ProxyProcess", "create_app", "run"]
