"""Per-request records and the run summary both the simulator and the real benchmark report.

Throughput is end to end: completed requests (and their prompt + output tokens) over the
makespan, from time 0 (the trace's origin) to the last completion. Refused requests count
nothing. TTFT = first token - arrival; TPOT = (finish - first token) / (output tokens - 1).
KV locality is the share of cached tokens that steps read on the request's home instance.
``recomputed_fraction`` is the share of computed tokens that preemption threw away (the
scheduler preempts by recompute), when every request completed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from infinite_llm.kvcache.metrics import percentile
from infinite_llm.sim.costs import StepWork


@dataclass(slots=True)
class RequestRecord:
    index: int
    kind: str
    arrival_s: float
    prompt_len: int
    output_len: int
    home: int | None = None
    refused: bool = False
    first_token_s: float | None = None
    finish_s: float | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.output_len

    @property
    def completed(self) -> bool:
        return self.finish_s is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.finish_s is None or self.first_token_s is None or self.output_len < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_len - 1)


@dataclass(slots=True)
class WorkTotals:
    """Sums over every non-empty step of a run."""

    num_steps: int = 0
    busy_s: float = 0.0
    new_tokens: int = 0
    ctx_tokens: int = 0
    local_ctx_tokens: int = 0
    remote_calls: int = 0

    def add(self, work: StepWork, seconds: float) -> None:
        self.num_steps += 1
        self.busy_s += seconds
        self.new_tokens += work.num_new_tokens
        self.ctx_tokens += work.ctx_tokens
        self.local_ctx_tokens += work.local_ctx_tokens
        self.remote_calls += work.num_remote_calls

    @property
    def kv_locality(self) -> float:
        return self.local_ctx_tokens / self.ctx_tokens if self.ctx_tokens else 1.0


def _pcts(values: Sequence[float], prefix: str) -> dict[str, float]:
    ordered = sorted(values)
    return {f"{prefix}_p{q}_s": percentile(ordered, q) for q in (50, 90, 99)}


def summarize(records: Iterable[RequestRecord], totals: WorkTotals | None = None) -> dict[str, Any]:
    records = list(records)
    done = [r for r in records if r.completed]
    makespan = max((r.finish_s for r in done if r.finish_s is not None), default=0.0)
    tokens = sum(r.num_tokens for r in done)
    out_tokens = sum(r.output_len for r in done)

    def rate(x: float) -> float:
        return x / makespan if makespan > 0 else 0.0

    last = max(done, key=lambda r: r.finish_s or 0.0, default=None)
    summary: dict[str, Any] = {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_refused": sum(r.refused for r in records),
        "num_unfinished": sum(1 for r in records if not r.refused and not r.completed),
        "num_preempted_requests": sum(1 for r in records if r.num_preemptions),
        "num_preemptions": sum(r.num_preemptions for r in records),
        "makespan_s": makespan,
        "requests_per_s": rate(len(done)),
        "tokens_per_s": rate(tokens),
        "output_tokens_per_s": rate(out_tokens),
        "longest_context_served": max((r.num_tokens for r in done), default=0),
        "longest_context_refused": max((r.num_tokens for r in records if r.refused), default=0),
        **_pcts([t for r in done if (t := r.ttft_s) is not None], "ttft"),
        **_pcts([t for r in done if (t := r.tpot_s) is not None], "tpot"),
        # the request that set the makespan: how long it waited and prefilled (arrival to first
        # token) and decoded
        "last_finished": None
        if last is None
        else {
            "tokens": last.num_tokens,
            "arrival_s": last.arrival_s,
            "ttft_s": last.ttft_s,
            "finish_s": last.finish_s,
        },
    }
    if totals is not None:
        needed = sum(r.num_tokens - 1 for r in done)  # the last sampled token is never computed
        summary.update(
            {
                "num_steps": totals.num_steps,
                "busy_s": totals.busy_s,
                "computed_tokens": totals.new_tokens,
                "recomputed_fraction": max(0.0, 1.0 - needed / totals.new_tokens)
                if totals.new_tokens
                else 0.0,
                "kv_locality": totals.kv_locality,
                "remote_ma_calls_per_step": totals.remote_calls / totals.num_steps
                if totals.num_steps
                else 0.0,
            }
        )
    return summary


def ratio(ours: float, base: float) -> float:
    """ours / base; nan when the baseline is 0."""
    return ours / base if base else math.nan


@dataclass
class SimResult:
    """One simulation run: its requests, its work and the cluster's counters."""

    records: list[RequestRecord]
    totals: WorkTotals
    cluster_stats: dict[str, Any]
    wall_s: float
    all_free_after: bool
    # "livelock" (see ``simulator.livelock_threshold``) or "horizon"; None: ran out
    stopped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def livelock(self) -> bool:
        return self.stopped == "livelock"

    def summary(self) -> dict[str, Any]:
        s = summarize(self.records, self.totals)
        s["stopped"] = self.stopped
        s["livelock"] = self.livelock
        stats = self.cluster_stats
        s.update(
            {
                k: stats[k]
                for k in (
                    "borrows",
                    "borrow_failures",
                    "false_replies",
                    "blocks_borrowed",
                    "migrated_blocks",
                    "defrag_runs",
                )
            }
        )
        s["all_free_after"] = self.all_free_after
        s["wall_s"] = self.wall_s
        return s
