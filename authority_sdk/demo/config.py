"""The demo's policy: ``examples/policy.yaml`` with its ports, keys and folders filled in.

The demo never edits the user's policy. It writes an effective copy into a
fresh folder that also holds the state, the audit log and the children's logs,
so ``authority audit verify --policy <folder>/policy.yaml`` (or any other
command) works on exactly what the demo did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ..errors import PolicyError
from ..policy import KeyConfig, Policy, load_policy

__all__ = ["DemoKey", "DemoKeys", "demo_secret", "examples_dir", "make_folder", "pick_keys",
           "write_policy"]

UPSTREAM_PLACEHOLDER_KEY = "no-key-needed-for-the-scripted-model"


def examples_dir() -> Path | None:
    """The ``examples/`` folder of the source checkout this package runs from, if any."""
    here = Path(__file__).resolve().parents[2] / "examples"
    return here if (here / "policy.yaml").is_file() else None


def demo_secret(key_name: str) -> str:
    # Predictable on purpose: the demo prints them so the snippets can be pasted.
    return f"demo-{key_name}-key"


def make_folder(root: Path) -> Path:
    """A fresh ``demo-<timestamp>`` folder under ``root`` (never one with old state in it)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        folder = root / (f"demo-{stamp}" if n == 0 else f"demo-{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a fresh demo folder under {root}")


@dataclass(frozen=True)
class DemoKey:
    name: str
    secret: str
    environment: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class DemoKeys:
    agent: DemoKey      # an agent key bound to prod
    dev: DemoKey        # an agent key bound to dev
    ops: DemoKey        # approver + admin
    all: tuple[DemoKey, ...]


def write_policy(base: Path, folder: Path, *, model_url: str, receiver_url: str,
                 proxy_url: str | None = None) -> tuple[Path, Policy, dict[str, str]]:
    """Write the effective policy into ``folder``; return it, the loaded policy and the
    environment variables the proxy needs (key secrets, the placeholder upstream key)."""
    try:
        data = yaml.safe_load(base.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"{base}: cannot read the demo policy: {exc}") from exc
    if not isinstance(data, dict):
        raise PolicyError(f"{base}: the policy must be a mapping at the top level")
    if isinstance(data.get("upstreams"), list):  # several upstreams: each is the local model
        for up in data["upstreams"]:
            if isinstance(up, dict):
                up["base_url"] = model_url + "/v1"
    else:
        data["upstream"] = {**(data.get("upstream") or {}), "base_url": model_url + "/v1"}
    data["state"] = {**(data.get("state") or {}), "path": "state"}
    data["audit"] = {**(data.get("audit") or {}), "path": "audit.jsonl"}
    notify = data.get("notifications")
    channels = (notify.get("channels") or {}) if isinstance(notify, dict) else {}
    for cfg in [*(data.get("executors") or {}).values(), *channels.values()]:
        if isinstance(cfg, dict) and cfg.get("type") == "webhook":
            path = urlsplit(str(cfg.get("url", ""))).path or "/"
            cfg["url"] = receiver_url + path
    if isinstance(notify, dict) and proxy_url is not None:
        notify["public_base_url"] = proxy_url  # the demo's proxy is where people reach it
    out = folder / "policy.yaml"
    header = (f"# Written by `authority demo` from {base}:\n"
              "# the upstream is the local scripted model, webhooks go to the local receiver,\n"
              "# state and audit live in this folder.\n")
    out.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    policy = load_policy(out)
    env = {up.api_key_env: UPSTREAM_PLACEHOLDER_KEY for up in policy.routes if up.api_key_env}
    for k in policy.keys:
        if k.secret_env:
            env[k.secret_env] = demo_secret(k.name)
    for name, ch in policy.notifications.channels.items():
        if ch.type == "webhook":
            env[ch.secret_env] = demo_secret(f"notify-{name}")
    return out, policy, env


def pick_keys(policy: Policy) -> DemoKeys:
    """The three callers the walkthrough needs, chosen by what the policy gives them."""
    usable = [k for k in policy.keys if k.secret_env]

    def demo_key(k: KeyConfig) -> DemoKey:
        return DemoKey(k.name, demo_secret(k.name), k.environment or policy.default_environment,
                       tuple(k.roles))

    keys = tuple(demo_key(k) for k in usable)

    def first(what: str, ok: Any) -> DemoKey:
        for k in keys:
            if ok(k):
                return k
        raise PolicyError(f"the demo needs a key with secret_env for {what}; the policy has "
                          f"none (keys: {', '.join(k.name for k in policy.keys) or 'none'})")

    return DemoKeys(
        agent=first("an agent in prod", lambda k: "agent" in k.roles and k.environment == "prod"),
        dev=first("an agent in dev", lambda k: "agent" in k.roles and k.environment == "dev"),
        ops=first("an approver and admin",
                  lambda k: "approver" in k.roles and "admin" in k.roles),
        all=keys,
    )
