"""Small simulated clusters for the simulator tests (block size 4, a dozen rBlocks per pool)."""

from __future__ import annotations

from dataclasses import dataclass, field

from infinite_llm.scheduler.scheduler import SchedulerConfig
from infinite_llm.sim.cluster import SimClusterConfig
from infinite_llm.sim.costs import FEATURES, CostModel, LinearCosts, StepCost, StepWork
from infinite_llm.sim.trace import TraceRequest


def small_config(
    num_instances: int = 3,
    num_blocks: int = 12,
    borrowing: bool = True,
    max_num_seqs: int = 8,
    **kwargs,
) -> SimClusterConfig:
    return SimClusterConfig(
        num_instances=num_instances,
        num_blocks_per_instance=num_blocks,
        block_size=4,
        enable_borrowing=borrowing,
        scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=max_num_seqs),
        **kwargs,
    )


def linear_costs(
    cluster_step_s: float = 0.0, migrate_block_s: float = 0.0, **coefficients: float
) -> LinearCosts:
    """A ``LinearCosts`` with the named coefficients (``costs.FEATURES``), every other one 0."""
    unknown = set(coefficients) - set(FEATURES)
    if unknown:
        raise ValueError(f"not features: {sorted(unknown)}")
    coef = dict.fromkeys(FEATURES, 0.0) | coefficients
    return LinearCosts(tuple(coef[f] for f in FEATURES), cluster_step_s, migrate_block_s)


def unit_costs() -> LinearCosts:
    """10 ms a step, 1 ms a new token, 1 us a cached token read, 0.5 ms a remote MA call."""
    coef = dict.fromkeys(FEATURES, 0.0) | {
        "step": 0.01,
        "new_tokens": 1e-3,
        "ctx_tokens": 1e-6,
        "remote_calls": 5e-4,
    }
    return LinearCosts(tuple(coef[f] for f in FEATURES), cluster_step_s=1e-4, migrate_block_s=1e-4)


@dataclass(frozen=True)
class CreditorCosts:
    """``base``'s seconds for the debtor's step, and ``ma_s_per_token`` per cached token each
    remote shard reads as MicroAttention time on its creditor (the part of a step that
    ``RooflineCosts`` returns in ``creditor_seconds``): simple enough to follow by hand where
    the simulator charges that time."""

    base: LinearCosts
    ma_s_per_token: float

    @property
    def cluster_step_s(self) -> float:
        return self.base.cluster_step_s

    def step(self, work: StepWork) -> StepCost:
        creditors = {
            s.instance_id: s.ctx_tokens * self.ma_s_per_token
            for s in work.remote_shards
            if s.ctx_tokens
        }
        return StepCost(self.base.step(work).seconds, creditors)

    def migrate_seconds(self, num_blocks: int) -> float:
        return self.base.migrate_seconds(num_blocks)


@dataclass
class RecordingCosts:
    """``base``, keeping every step it priced, in the order the simulator asked."""

    base: CostModel
    steps: list[tuple[StepWork, StepCost]] = field(default_factory=list)

    @property
    def cluster_step_s(self) -> float:
        return self.base.cluster_step_s

    def step(self, work: StepWork) -> StepCost:
        cost = self.base.step(work)
        self.steps.append((work, cost))
        return cost

    def migrate_seconds(self, num_blocks: int) -> float:
        return self.base.migrate_seconds(num_blocks)

    @property
    def seconds(self) -> list[float]:
        return [cost.seconds for _, cost in self.steps]


def requests(*lengths: tuple[int, int], gap: float = 0.01) -> list[TraceRequest]:
    """(prompt, output) pairs arriving ``gap`` seconds apart."""
    return [TraceRequest(i, i * gap, p, o, "test") for i, (p, o) in enumerate(lengths)]
