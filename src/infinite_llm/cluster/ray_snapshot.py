"""Snapshots of Ray instance actors, and the cluster-wide stats and integrity checks over them.

The driver gathers one ``InstanceSnapshot`` per actor between steps (nothing changes then) and
checks the same invariants ``InProcessCluster.check_integrity`` checks on live objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.ledger import Edge
from infinite_llm.kvcache.metrics import locality, percentile
from infinite_llm.kvcache.tiers import Tier


@dataclass(frozen=True)
class InstanceSnapshot:
    """One instance's memory, requests and counters at one moment, for stats and integrity."""

    instance_id: int
    node_id: str  # the Ray node it runs on
    kind: str  # "model", or a lender's tier ("memory", "host"): a pool without the model
    tier: int  # its pool's memory tier (``kvcache.tiers.Tier``)
    num_threads: int  # its last step's share of the node's cores
    num_blocks: int
    num_free: int
    num_used: int
    num_lent: int
    num_borrowed: int
    num_cached: int  # free rBlocks that keep a prefix's KV
    num_running: int
    num_waiting: int
    num_preemptions: int
    block_owners: list[int | None]
    cached_block_ids: list[int]
    lent_counts: dict[int, int]
    block_tables: dict[str, list[BlockRef]]  # this instance's own requests
    ref_cnts: dict[BlockRef, int]  # rBlocks several of them share (``SharedBlocks.ref_cnts``)
    borrow: dict[str, Any]  # BorrowStats counters
    prefix_cache: dict[str, int]  # ``prefix_counters``
    borrow_latency_s: list[float]
    transport: dict[str, int]
    layer_round_trip_s: list[float]  # per layer with remote shards: issue -> all (out, lse) back
    layer_remote_wait_s: list[float]  # ... of which spent waiting after the local share was done
    layer_wire_s: list[float]  # ... less the creditors' own time on the messages: the channels
    shard_serve_s: list[float]  # time this instance spent serving its debtors' MAs


def _p(values: list[float], q: float) -> float:
    return percentile(sorted(values), q)


def merged_stats(
    snaps: Sequence[InstanceSnapshot],
    edges: Mapping[Edge, int],
    gmanager_queries: int,
    borrowing: bool,
    block_size: int,
) -> dict[str, Any]:
    """The keys of ``InProcessCluster.stats()`` (less the driver's own counters) plus ``ray``."""
    tables = {rid: (s.instance_id, refs) for s in snaps for rid, refs in s.block_tables.items()}
    loc = locality(tables)

    def total(key: str) -> int:
        return sum(int(s.borrow.get(key, 0)) for s in snaps)

    borrow_latency = [x for s in snaps for x in s.borrow_latency_s]
    round_trips = [x for s in snaps for x in s.layer_round_trip_s]
    waits = [x for s in snaps for x in s.layer_remote_wait_s]
    wires = [x for s in snaps for x in s.layer_wire_s]
    serve = [x for s in snaps for x in s.shard_serve_s]
    return {
        "instances": [
            {
                "instance_id": s.instance_id,
                "num_blocks": s.num_blocks,
                "free": s.num_free,
                "used": s.num_used,
                "lent": s.num_lent,
                "borrowed": s.num_borrowed,
                "cached": s.num_cached,
                "running": s.num_running,
                "waiting": s.num_waiting,
                "preemptions": s.num_preemptions,
                "block_owners": s.block_owners,
                "cached_block_ids": s.cached_block_ids,
                "kind": s.kind,
                "tier": Tier(s.tier).label,
            }
            | s.prefix_cache
            for s in snaps
        ],
        "ledger": [
            {"debtor": d, "creditor": c, "blocks": n} for (d, c), n in sorted(edges.items())
        ],
        "locality": {
            "mean": loc.mean,
            "overall": loc.overall,
            "num_local": loc.num_local_blocks,
            "num_blocks": loc.num_blocks,
        },
        "borrowing": borrowing,
        "block_size": block_size,
        "false_replies": total("num_false_replies"),
        "borrows": total("num_borrows"),
        "borrow_failures": total("num_failed"),
        "blocks_borrowed": total("num_blocks_borrowed"),
        "borrow_latency_p50_s": _p(borrow_latency, 50),
        "borrow_latency_p99_s": _p(borrow_latency, 99),
        "gmanager_queries": gmanager_queries,
        "remote_ma_calls": sum(s.transport["shard_calls"] for s in snaps),
        "ray": {
            # recent samples only (each actor keeps its last 4096 of each figure)
            "layer_round_trip_p50_s": _p(round_trips, 50),
            "layer_round_trip_p99_s": _p(round_trips, 99),
            "layer_remote_wait_p50_s": _p(waits, 50),
            "layer_wire_p50_s": _p(wires, 50),
            "shard_serve_p50_s": _p(serve, 50),
            "fused_remote_steps": sum(s.transport["fused_remote_steps"] for s in snaps),
            # ... of them, exchanged in C (creditors on the debtor's node)
            "native_remote_steps": sum(s.transport["native_remote_steps"] for s in snaps),
            # channels debtors opened to creditors: on one node (shm), across nodes (zmq)
            "shm_channels": sum(s.transport["shm_channels"] for s in snaps),
            "zmq_channels": sum(s.transport["zmq_channels"] for s in snaps),
            "nodes": {s.instance_id: s.node_id for s in snaps},
            "threads": {s.instance_id: s.num_threads for s in snaps},
            "bytes_sent": sum(s.transport["bytes_sent"] for s in snaps),
            "bytes_received": sum(s.transport["bytes_received"] for s in snaps),
            "gmanager_view_refreshes": sum(s.transport.get("view_refreshes", 0) for s in snaps),
        },
    }
