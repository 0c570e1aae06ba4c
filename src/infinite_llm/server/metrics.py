"""Prometheus metrics of the server, on their own registry (vLLM's names, ``infinite_llm:`` prefix).

Request metrics (running, waiting, TTFT, time per output token, end-to-end latency, tokens)
come from the request streams; the cluster's (rBlocks per instance and state, ledger edges,
false replies, migrations, locality, preemptions) from a cluster snapshot taken at scrape time.
So do the prefix cache's (vLLM v1's ``prefix_cache_queries`` / ``prefix_cache_hits``, in
tokens, per instance, and the cached rBlocks): each scheduler counts a request where it looks
its prompt up, once, at its first admission, on either backend, so the server shows what the
caches did (for a request aborted before its first token too) and counts nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from infinite_llm.outputs import RequestOutput
from infinite_llm.server.stream import RequestStream

PREFIX = "infinite_llm:"
disable_created_metrics()  # as vLLM does: no *_created series beside every counter
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
E2E_BUCKETS = (
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
)
BLOCK_STATES = {
    "free": "free rBlocks of each instance's pool (the cached ones included)",
    "used": "used rBlocks of each instance's pool",
    "lent": "lent rBlocks of each instance's pool",
    "borrowed": "borrowed rBlocks of each instance's pool",
    "cached": "free rBlocks of each instance's pool that keep a prefix's KV (prefix cache)",
}
INSTANCE_COUNTERS = {
    "num_preemptions": ("preemptions", "requests preempted (recomputed later)"),
    "prefix_cache_queries": (
        "prefix_cache_queries",
        "prompt tokens looked up in the prefix cache (at each request's first admission)",
    ),
    "prefix_cache_hits": (
        "prefix_cache_hits",
        "prompt tokens found in the prefix cache (at each request's first admission)",
    ),
}
CLUSTER_COUNTERS = {
    "false_replies": "creditor replies that refused a borrow (false)",
    "borrows": "borrow attempts by debtors",
    "blocks_borrowed": "rBlocks obtained by borrowing",
    "migrated_blocks": "rBlocks moved by debt-graph defragmentation",
    "defrag_runs": "defragmentation plans executed",
    "remote_ma_calls": "micro-attention calls served for another instance",
}


def tier_gauge(model: str, instances: list[dict[str, Any]]) -> GaugeMetricFamily:
    """rBlocks per memory tier (``kvcache.tiers``: device, host, memory) and state, summed over
    the instances of each tier."""
    gauge = GaugeMetricFamily(
        f"{PREFIX}rblocks_by_tier",
        "rBlocks of every pool of a memory tier (device, host, memory), by state",
        labels=["model_name", "tier", "state"],
    )
    totals: dict[tuple[str, str], int] = {}
    for inst in instances:
        for state in ("used", "lent", "free", "cached"):
            key = (inst.get("tier", "device"), state)
            totals[key] = totals.get(key, 0) + inst.get(state, 0)
    for (tier, state), n in sorted(totals.items()):
        gauge.add_metric([model, tier, state], n)
    return gauge


class ClusterCollector(Collector):
    """Reads the latest cluster snapshot at each scrape."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.snapshot: dict[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        model = self.model_name
        per_state = {
            state: GaugeMetricFamily(
                f"{PREFIX}rblocks_{state}", doc, labels=["model_name", "instance"]
            )
            for state, doc in BLOCK_STATES.items()
        }
        running = GaugeMetricFamily(
            f"{PREFIX}instance_requests_running",
            "requests running on each instance",
            labels=["model_name", "instance"],
        )
        waiting = GaugeMetricFamily(
            f"{PREFIX}instance_requests_waiting",
            "requests waiting on each instance",
            labels=["model_name", "instance"],
        )
        counters = {
            name: CounterMetricFamily(f"{PREFIX}{name}", doc, labels=["model_name", "instance"])
            for name, (_, doc) in INSTANCE_COUNTERS.items()
        }
        for inst in snap.get("instances", []):
            labels = [model, str(inst["instance_id"])]
            for state in BLOCK_STATES:
                per_state[state].add_metric(labels, inst.get(state, 0))
            running.add_metric(labels, inst.get("running", 0))
            waiting.add_metric(labels, inst.get("waiting", 0))
            for name, (key, _) in INSTANCE_COUNTERS.items():
                counters[name].add_metric(labels, inst.get(key, 0))
        yield from per_state.values()
        yield tier_gauge(model, snap.get("instances", []))
        yield running
        yield waiting
        yield from counters.values()
        ledger = snap.get("ledger", [])
        edges = GaugeMetricFamily(
            f"{PREFIX}ledger_blocks",
            "rBlocks a debtor owes a creditor (debt ledger)",
            labels=["model_name", "debtor", "creditor"],
        )
        for edge in ledger:
            edges.add_metric([model, str(edge["debtor"]), str(edge["creditor"])], edge["blocks"])
        yield edges
        num_edges = GaugeMetricFamily(
            f"{PREFIX}ledger_edges", "debtor-creditor pairs with a debt", labels=["model_name"]
        )
        num_edges.add_metric([model], len(ledger))
        yield num_edges
        for key, doc in CLUSTER_COUNTERS.items():
            if key in snap:
                family = CounterMetricFamily(f"{PREFIX}{key}", doc, labels=["model_name"])
                family.add_metric([model], snap[key] or 0)
                yield family
        locality = snap.get("locality") or {}
        for key in ("mean", "overall"):
            if locality.get(key) is not None:
                family = GaugeMetricFamily(
                    f"{PREFIX}locality_{key}",
                    f"share of rBlocks on their request's home instance ({key})",
                    labels=["model_name"],
                )
                family.add_metric([model], locality[key])
                yield family


class ServerMetrics:
    """Every metric of one server; ``on_output`` is the engine's output hook."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.requests_running = Gauge(
            f"{PREFIX}num_requests_running",
            "requests with a first token, unfinished",
            labels,
            registry=r,
        )
        self.requests_waiting = Gauge(
            f"{PREFIX}num_requests_waiting",
            "requests accepted, no first token yet",
            labels,
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "time to first token",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            f"{PREFIX}time_per_output_token_seconds",
            "time per output token after the first",
            labels,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds",
            "end-to-end request latency",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}prompt_tokens", "prefilled prompt tokens", labels, registry=r
        )
        self.generation_tokens = Counter(
            f"{PREFIX}generation_tokens", "generated tokens", labels, registry=r
        )
        self.request_success = Counter(
            f"{PREFIX}request_success",
            "finished requests by finish reason",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.cluster = ClusterCollector(model_name)
        r.register(self.cluster)
        self.model_name = model_name

    def on_output(self, stream: RequestStream, output: RequestOutput) -> None:
        model = self.model_name
        num_new = len(output.delta_token_ids)
        if num_new and stream.num_output_tokens == num_new:  # the first token(s)
            self.prompt_tokens.labels(model).inc(stream.num_prompt_tokens)
            assert stream.first_token_time is not None
            self.ttft.labels(model).observe(stream.first_token_time - stream.arrival_time)
        if num_new:
            self.generation_tokens.labels(model).inc(num_new)
        if output.finished:
            end = time.monotonic()
            self.e2e.labels(model).observe(end - stream.arrival_time)
            if stream.first_token_time is not None and stream.num_output_tokens > 1:
                tpot = (end - stream.first_token_time) / (stream.num_output_tokens - 1)
                self.tpot.labels(model).observe(tpot)
            reason = output.outputs[0].finish_reason or "unknown"
            self.request_success.labels(model, reason).inc()

    def render(self, num_running: int, num_waiting: int, snapshot: dict[str, Any] | None) -> bytes:
        """The text exposition, with the gauges and the cluster snapshot brought up to date."""
        self.requests_running.labels(self.model_name).set(num_running)
        self.requests_waiting.labels(self.model_name).set(num_waiting)
        self.cluster.snapshot = snapshot
        return generate_latest(self.registry)
