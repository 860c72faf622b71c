"""The audit key and the checkpoint live outside what the gateway writes (issue 9 F9)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from authority_sdk.audit.keys import load_key
from authority_sdk.audit.registry import open_sink
from authority_sdk.errors import AuthorityUnavailable, PolicyError
from authority_sdk.policy import parse_policy


def policy(tmp_path: Path, **audit: Any) -> Any:
    return parse_policy({"version": 1, "state": {"path": "run/state"},
                         "audit": {"path": "run/audit.jsonl", **audit}},
                        base_dir=str(tmp_path))


@pytest.mark.parametrize(("audit", "message"), [
    ({"hmac_key_file": "run/state/audit.key"}, "inside the state folder"),
    ({"hmac_key_file": "run/audit.key"}, "inside the audit log's folder"),
    ({"hmac_key_env": "K", "checkpoint_path": "run/state/cp.json"}, "inside the state folder"),
    ({"hmac_key_env": "K", "checkpoint_path": "run/cp.json"}, "inside the audit log's folder"),
    ({"checkpoint_path": "elsewhere/cp.json"}, "needs hmac_key_env or hmac_key_file"),
    ({"hmac_key_env": "K", "hmac_key_file": "keys/a.key"}, "not both"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
])
def test_misplaced_key_or_checkpoint_is_a_policy_error(tmp_path: Path, audit: dict[str, Any],
                                                       message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        policy(tmp_path, **audit)


def test_key_from_a_file_outside_the_state(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "audit.key").write_bytes(b"0123456789abcdef0123\n")
    pol = policy(tmp_path, hmac_key_file="keys/audit.key", checkpoint_path="cp/audit.cp")
    assert load_key(pol) == b"0123456789abcdef0123"
    sink = open_sink(pol)
    assert sink.key == b"0123456789abcdef0123"
    assert sink.checkpoints is not None and sink.checkpoints.path == tmp_path / "cp/audit.cp"


def test_key_from_the_environment_and_failing_closed(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pol = policy(tmp_path, hmac_key_env="AUDIT_TEST_KEY")
    monkeypatch.delenv("AUDIT_TEST_KEY", raising=False)
    with pytest.raises(AuthorityUnavailable, match=r"\$AUDIT_TEST_KEY, which is not set"):
        open_sink(pol)
    monkeypatch.setenv("AUDIT_TEST_KEY", "short")
    with pytest.raises(AuthorityUnavailable, match="at least 16"):
        load_key(pol)
    monkeypatch.setenv("AUDIT_TEST_KEY", "a-long-enough-audit-key")
    assert load_key(pol) == b"a-long-enough-audit-key"
    missing = policy(tmp_path, hmac_key_file="keys/none.key")
    with pytest.raises(AuthorityUnavailable, match=r"cannot read audit\.hmac_key_file"):
        load_key(missing)


def test_unknown_sink_is_a_policy_error(tmp_path: Path) -> None:
    from authority_sdk.audit import registry

    pol = policy(tmp_path)
    registry.register_sink("nowhere", "authority_sdk.audit.nowhere:open_for_policy")
    try:
        with pytest.raises(PolicyError, match="sink 'nowhere' is not available"):
            open_sink(pol.model_copy(update={"audit": pol.audit.model_copy(
                update={"backend": "nowhere"})}))
    finally:
        registry._SINKS.unregister("nowhere")
