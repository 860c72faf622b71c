"""AI Authority Gateway: every chat completion and tool call passes policy first."""

from __future__ import annotations

from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .policy import Policy, load_policy

__all__ = [*_errors_all, "Policy", "load_policy"]
