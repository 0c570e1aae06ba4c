"""Small simulated clusters for the simulator tests (block size 4, a dozen rBlocks per pool)."""

from __future__ import annotations

from infinite_llm.scheduler.scheduler import SchedulerConfig
from infinite_llm.sim.cluster import SimClusterConfig
from infinite_llm.sim.costs import FEATURES, LinearCosts
from infinite_llm.sim.trace import TraceRequest


def small_config(
    num_instances: int = 3, num_blocks: int = 12, borrowing: bool = True, **kwargs
) -> SimClusterConfig:
    return SimClusterConfig(
        num_instances=num_instances,
        num_blocks_per_instance=num_blocks,
        block_size=4,
        enable_borrowing=borrowing,
        scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8),
        **kwargs,
    )


def unit_costs() -> LinearCosts:
    """10 ms a step, 1 ms a new token, 1 us a cached token read, 0.5 ms a remote MA call."""
    coef = dict.fromkeys(FEATURES, 0.0) | {
        "step": 0.01,
        "new_tokens": 1e-3,
        "ctx_tokens": 1e-6,
        "remote_calls": 5e-4,
    }
    return LinearCosts(tuple(coef[f] for f in FEATURES), cluster_step_s=1e-4, migrate_block_s=1e-4)


def requests(*lengths: tuple[int, int], gap: float = 0.01) -> list[TraceRequest]:
    """(prompt, output) pairs arriving ``gap`` seconds apart."""
    return [TraceRequest(i, i * gap, p, o, "test") for i, (p, o) in enumerate(lengths)]
