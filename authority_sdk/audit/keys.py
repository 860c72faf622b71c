"""The audit key: from the variable or the file the policy names, never from the state.

The key MACs every entry and signs checkpoints. It lives outside what the gateway
writes (the policy refuses a key file inside the state folder or the log's folder), so
someone who can write the log and the state store still cannot forge an entry.
A key that is configured but missing or too short stops the gateway (fail closed).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import AuthorityUnavailable

if TYPE_CHECKING:
    from ..policy import Policy

__all__ = ["MIN_KEY_BYTES", "load_key"]

MIN_KEY_BYTES = 16


def load_key(policy: Policy) -> bytes | None:
    """The policy's audit key, or None when it names none."""
    cfg = policy.audit
    if cfg.hmac_key_env:
        value = os.environ.get(cfg.hmac_key_env)
        if not value:
            raise AuthorityUnavailable(
                f"audit key unavailable: audit.hmac_key_env names ${cfg.hmac_key_env}, "
                "which is not set")
        return _checked(value.encode("utf-8"), f"${cfg.hmac_key_env}")
    if cfg.hmac_key_file:
        path = policy.resolve_path(cfg.hmac_key_file)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AuthorityUnavailable(
                f"audit key unavailable: cannot read audit.hmac_key_file {path}: "
                f"{exc.strerror or exc}") from exc
        return _checked(data.strip(), str(path))
    return None


def _checked(key: bytes, source: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise AuthorityUnavailable(
            f"audit key unavailable: {source} holds {len(key)} bytes; the audit key needs at "
            f"least {MIN_KEY_BYTES}")
    return key
