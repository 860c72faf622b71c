"""Prometheus metrics of one proxy app (a registry per app, so tests can build many).

With several workers (``authority serve --workers N``) each worker is its own
process; ``serve`` then points ``PROMETHEUS_MULTIPROC_DIR`` at a shared folder
and ``/metrics`` sums every worker's numbers, whichever worker answers.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "authority_requests", "Requests answered by the proxy, by route, decision and code.",
            ["route", "decision", "code", "status"], registry=r)
        self.actions = Counter(
            "authority_actions", "Tool calls gated, by resulting status.", ["status"],
            registry=r)
        self.approvals = Counter(
            "authority_approval_transitions", "Approval decisions and their outcomes.",
            ["status"], registry=r)
        self.upstream_latency = Histogram(
            "authority_upstream_latency_seconds",
            "Time until the upstream answered (its whole body; its headers when streaming).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram(
            "authority_gateway_overhead_seconds",
            "Time a chat request spent in the gateway itself, upstream call excluded.",
            buckets=_OVERHEAD_BUCKETS, registry=r)
        self.fallbacks = Counter(
            "authority_upstream_fallbacks", "Upstream attempts that failed before a fallback "
            "was asked, by upstream and code.", ["upstream", "code"], registry=r)
        self.cost = Counter(
            "authority_cost_usd", "Actual upstream spend in USD, by environment.",
            ["environment"], registry=r)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)
