"""Micro-benchmark of the memory-management layer: gManager recommendations and lend rounds.

For each cluster size it builds that many in-process rManagers (pools partly used so free
memory varies) and one gManager, then measures for ``duration`` seconds each:

* ``recommend``: ``GManager.recommend`` latency and throughput, from 1 and from N threads,
  with one real heartbeat delivered every ``heartbeat_every`` queries (round robin), so
  reservations are refreshed and periodic re-sorting runs as it would in a cluster;
* ``lend_round``: the whole in-process borrow (recommend + ``LendRequest`` + the
  creditor's ``lend`` + reply + ``record_borrowed`` + ledger update), from 1 and N threads;
  a steady state is kept by releasing the oldest borrow once ``4 * instances`` are out.

Throughput counts calls over the wall time of the loop (heartbeats and releases included);
latencies time the call alone. ``python -m infinite_llm.bench.memory --json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.borrow import borrow, release
from infinite_llm.kvcache.gmanager import GManager, GManagerConfig
from infinite_llm.kvcache.messages import LendReply, LendRequest, Release
from infinite_llm.kvcache.metrics import percentile
from infinite_llm.kvcache.rmanager import RManager

TARGET_RECOMMENDATIONS_PER_S = 10_000  # at 1024 instances, one thread


class _SimCluster:
    def __init__(self, num_instances: int, blocks_per_instance: int, seed: int) -> None:
        rng = random.Random(seed)
        self.managers = [
            RManager(i, blocks_per_instance, lending_cap=0.5) for i in range(num_instances)
        ]
        for m in self.managers:  # own requests hold 0-60% of each pool
            m.allocate(rng.randint(0, blocks_per_instance * 6 // 10))
        self._hb_lock = threading.Lock()
        self.reset_gmanager()

    def reset_gmanager(self) -> None:
        """A fresh gManager fed one round of heartbeats (managers are reused: every
        measurement leaves them as it found them)."""
        self.gm = GManager(GManagerConfig())
        for m in self.managers:
            self.gm.on_heartbeat(m.heartbeat())
        self._next_hb = 0

    def heartbeat_one(self) -> None:
        with self._hb_lock:  # round robin shared by all threads
            i = self._next_hb
            self._next_hb = (i + 1) % len(self.managers)
        self.gm.on_heartbeat(self.managers[i].heartbeat())

    def send_lend(self, creditor_id: int, request: LendRequest) -> LendReply:
        return self.managers[creditor_id].lend(request)

    def send_release(self, creditor_id: int, msg: Release) -> None:
        self.managers[creditor_id].reclaim(msg)


def _run_threads(num_threads: int, work: Callable[[int], list[float]]) -> tuple[list[float], float]:
    results: list[list[float]] = [[] for _ in range(num_threads)]

    def target(t: int) -> None:
        results[t] = work(t)

    threads = [threading.Thread(target=target, args=(t,)) for t in range(num_threads)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    return [x for r in results for x in r], wall


def _summary(latencies: list[float], wall_s: float, num_threads: int) -> dict[str, float]:
    values = sorted(latencies)
    return {
        "threads": num_threads,
        "count": len(values),
        "per_s": len(values) / wall_s if wall_s > 0 else 0.0,
        "p50_us": percentile(values, 50) * 1e6 if values else float("nan"),
        "p99_us": percentile(values, 99) * 1e6 if values else float("nan"),
    }


def bench_recommend(
    cluster: _SimCluster, duration_s: float, num_threads: int, heartbeat_every: int, seed: int
) -> dict[str, float]:
    n = len(cluster.managers)
    gm = cluster.gm
    empty = [0] * num_threads

    def work(t: int) -> list[float]:
        rng = random.Random(seed + t)
        clock = time.perf_counter
        lat: list[float] = []
        deadline = clock() + duration_s
        k = 0
        while clock() < deadline:
            debtor, num_blocks = rng.randrange(n), rng.randint(1, 8)
            t0 = clock()
            rec = gm.recommend(debtor, num_blocks)
            lat.append(clock() - t0)
            empty[t] += rec.is_empty
            k += 1
            if k % heartbeat_every == 0:
                cluster.heartbeat_one()
        return lat

    latencies, wall = _run_threads(num_threads, work)
    out = _summary(latencies, wall, num_threads)
    out["empty"] = sum(empty)
    return out


def bench_lend_round(
    cluster: _SimCluster, duration_s: float, num_threads: int, heartbeat_every: int, seed: int
) -> dict[str, float]:
    n = len(cluster.managers)
    max_outstanding = 4 * n // num_threads + 1
    failed = [0] * num_threads

    def work(t: int) -> list[float]:
        rng = random.Random(seed + 1000 + t)
        clock = time.perf_counter
        out: deque[tuple[RManager, list[BlockRef]]] = deque()
        lat: list[float] = []
        deadline = clock() + duration_s
        k = 0
        while clock() < deadline:
            debtor = cluster.managers[rng.randrange(n)]
            t0 = clock()
            refs = borrow(
                debtor,
                cluster.gm,
                rng.randint(1, 8),
                cluster.send_lend,
                send_release=cluster.send_release,
            )
            lat.append(clock() - t0)
            if refs is None:
                failed[t] += 1
            else:
                out.append((debtor, refs))
            if len(out) > max_outstanding:
                old_debtor, old_refs = out.popleft()
                release(old_debtor, cluster.gm, old_refs, cluster.send_release)
            k += 1
            if k % heartbeat_every == 0:
                cluster.heartbeat_one()
        for old_debtor, old_refs in out:
            release(old_debtor, cluster.gm, old_refs, cluster.send_release)
        return lat

    latencies, wall = _run_threads(num_threads, work)
    result = _summary(latencies, wall, num_threads)
    result["failed"] = sum(failed)
    for m in cluster.managers:  # the benchmark must not have broken anything
        m.check_integrity()
    return result


def run_memory_bench(
    num_instances_list: Sequence[int] = (32, 256, 1024),
    *,
    duration_s: float = 1.0,
    num_threads: int = 4,
    blocks_per_instance: int = 4096,
    heartbeat_every: int = 8,
    seed: int = 0,
) -> dict:
    """Run every measurement for every cluster size; returns one JSON-ready dict."""
    results = []
    for n in num_instances_list:
        row: dict[str, object] = {"num_instances": n}
        cluster = _SimCluster(n, blocks_per_instance, seed)
        for name, fn, threads in (
            ("recommend", bench_recommend, 1),
            ("recommend_mt", bench_recommend, num_threads),
            ("lend_round", bench_lend_round, 1),
            ("lend_round_mt", bench_lend_round, num_threads),
        ):
            cluster.reset_gmanager()
            row[name] = fn(cluster, duration_s, threads, heartbeat_every, seed)
            if name == "recommend":
                row["gmanager"] = asdict(cluster.gm.stats())
        results.append(row)
    at_1024 = [r for r in results if r["num_instances"] == 1024]
    return {
        "benchmark": "memory",
        "config": {
            "num_instances": list(num_instances_list),
            "duration_s": duration_s,
            "num_threads": num_threads,
            "blocks_per_instance": blocks_per_instance,
            "heartbeat_every": heartbeat_every,
            "lending_cap": 0.5,
            "blocks_per_request": "uniform 1..8",
        },
        "results": results,
        "target": {
            "recommendations_per_s_at_1024": TARGET_RECOMMENDATIONS_PER_S,
            "met": (
                at_1024[0]["recommend"]["per_s"] >= TARGET_RECOMMENDATIONS_PER_S
                if at_1024
                else None
            ),
        },
    }


def format_table(report: dict) -> str:
    head = f"{'instances':>9} {'measure':<14} {'threads':>7} {'calls/s':>10} {'p50 us':>8} {'p99 us':>8}"
    lines = [head, "-" * len(head)]
    for row in report["results"]:
        for name in ("recommend", "recommend_mt", "lend_round", "lend_round_mt"):
            r = row[name]
            lines.append(
                f"{row['num_instances']:>9} {name:<14} {r['threads']:>7} {r['per_s']:>10.0f} "
                f"{r['p50_us']:>8.1f} {r['p99_us']:>8.1f}"
            )
    target = report["target"]
    if target["met"] is not None:
        verdict = "met" if target["met"] else "NOT met"
        lines.append(
            f"target: {target['recommendations_per_s_at_1024']} recommendations/s "
            f"at 1024 instances, one thread: {verdict}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinite-llm bench memory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--instances", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=4, help="threads for the *_mt rows")
    parser.add_argument("--blocks", type=int, default=4096, help="rBlocks per instance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run_memory_bench(
        args.instances,
        duration_s=args.duration,
        num_threads=args.threads,
        blocks_per_instance=args.blocks,
        seed=args.seed,
    )
    print(json.dumps(report) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
