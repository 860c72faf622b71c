"""Callers of the proxy: API keys from the policy, mapped to a Caller and its roles.

A key's secret is never kept in the clear: ``secret_env`` keys are hashed when
the keyring is built, and every presented key is hashed and compared with every
configured digest in constant time, so neither the match nor its position leaks
through timing. The key alone decides the caller's environment; no header can
pick a laxer one (DESIGN.md §2).

A key has two environments, kept apart on purpose: ``caller.environment`` is
where its chat requests run (its ``environment``, else the policy's default),
and ``scope`` is what it may manage (its ``environment``, else every one). An
approver or admin key with no ``environment`` is unscoped for management even
though its chat calls, if it also has ``agent``, run in the default environment.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from authority_sdk.control import Scope
from authority_sdk.errors import AuthenticationFailed, Forbidden
from authority_sdk.policy import KeyConfig, Policy
from authority_sdk.wire import Caller

__all__ = ["Identity", "KeyRing", "bearer_token"]

log = logging.getLogger("authority.proxy")


@dataclass(frozen=True)
class Identity:
    key: KeyConfig
    caller: Caller

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def scope(self) -> Scope:
        """What this key may read and act on through the management API."""
        return Scope(self.key.environment)

    def require(self, *roles: str) -> None:
        """Raise 403 ``insufficient_role`` unless the key has one of ``roles``."""
        if not self.caller.roles.intersection(roles):
            raise Forbidden(
                f"key {self.name!r} lacks the {' or '.join(roles)} role "
                f"(it has: {', '.join(sorted(self.caller.roles)) or 'none'})")


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class KeyRing:
    def __init__(self, policy: Policy, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ
        self._entries = self._read(policy)

    def replace(self, policy: Policy) -> None:
        """The keys of a reloaded policy, in force for the next request (one assignment)."""
        self._entries = self._read(policy)

    def _read(self, policy: Policy) -> list[tuple[bytes, Identity]]:
        env = os.environ if self._environ is None else self._environ
        entries: list[tuple[bytes, Identity]] = []
        for key in policy.keys:
            if key.secret_sha256 is not None:
                digest = bytes.fromhex(key.secret_sha256)
            else:
                assert key.secret_env is not None
                secret = env.get(key.secret_env)
                if not secret:
                    # Refusing to start would take every other key down with this one.
                    log.warning("key %r is disabled: $%s is not set", key.name, key.secret_env)
                    continue
                digest = hashlib.sha256(secret.encode()).digest()
            caller = Caller(name=key.name,
                            environment=key.environment or policy.default_environment,
                            roles=frozenset(key.roles))
            entries.append((digest, Identity(key, caller)))
        return entries

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, authorization: str | None) -> Identity:
        token = bearer_token(authorization)
        if token is None:
            raise AuthenticationFailed(
                "missing API key: send it as 'Authorization: Bearer <key>'")
        presented = hashlib.sha256(token.encode()).digest()
        found: Identity | None = None
        for digest, ident in self._entries:  # one list, even if a reload swaps it meanwhile
            # No early exit: every digest is compared whatever matches.
            if hmac.compare_digest(presented, digest) and found is None:
                found = ident
        if found is None:
            raise AuthenticationFailed("invalid API key")
        return found
