"""Cost models: how long one instance step takes, from the work the scheduler handed it.

The simulator replaces the model runner by a cost model. A step's work (``StepWork``) is
what the real model runner would do for a ``SchedulerOutput``: new tokens through the
weights, samples through the LM head, and attention split into one shard per instance that
holds context rBlocks (the home's shard is local; the others are remote MicroAttentions).

Two implementations:

* ``RooflineCosts``: from a model and hardware spec. Each part of the step takes
  max(FLOPs / effective FLOP/s, bytes / effective bandwidth)::

      step = overhead + linear + TP all-reduces + max(local MA, max over creditors of
             (layers x (round trip + query/partial bytes over the network) + creditor MA))

  Weights are read once per step; each request's KV is read once per step; attention
  FLOPs grow with query x context pairs. Shards run in parallel on their own devices (the
  per-layer max, summed over identical layers). The creditor's MA time is also returned so
  the simulator can charge it to the creditor's own timeline.
* ``LinearCosts``: coefficients fitted by least squares to per-step timings of real runs on
  this machine (``fit.py``); all instances share one device there, so remote MAs are part of
  the debtor's step.

``NoisyCosts`` wraps either and scales each step by a seeded random factor, so that replays of
one trace show how much a run's outcome depends on step-time noise (which request a full pool
preempts depends on what arrived before which step).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Protocol

from infinite_llm.sim.specs import InstanceSpec


@dataclass(frozen=True, slots=True)
class ShardLoad:
    """The part of one step's attention that runs on one instance."""

    instance_id: int
    num_rows: int  # query rows sent there (new tokens of requests with context there)
    ctx_tokens: int  # cached tokens read there
    pairs: int  # query x cached-token pairs computed there
    num_writes: int  # new tokens whose K,V are stored there


@dataclass(frozen=True, slots=True)
class StepWork:
    """What one instance computes in one step (see ``placement.step_work``)."""

    home_id: int
    num_seqs: int
    num_new_tokens: int
    num_samples: int
    self_pairs: int  # causal pairs among the step's own tokens, computed on the home
    shards: tuple[ShardLoad, ...] = ()  # one per instance holding context or new K,V
    num_borrow_messages: int = 0  # control round trips of the borrow protocol while scheduling

    @property
    def ctx_tokens(self) -> int:
        return sum(s.ctx_tokens for s in self.shards)

    @property
    def local_ctx_tokens(self) -> int:
        return sum(s.ctx_tokens for s in self.shards if s.instance_id == self.home_id)

    @property
    def pairs(self) -> int:
        return self.self_pairs + sum(s.pairs for s in self.shards)

    @property
    def remote_shards(self) -> tuple[ShardLoad, ...]:
        return tuple(s for s in self.shards if s.instance_id != self.home_id)

    @property
    def num_remote_calls(self) -> int:
        """Remote MicroAttention calls per layer (one per creditor with context there)."""
        return sum(1 for s in self.remote_shards if s.ctx_tokens > 0)


@dataclass(frozen=True, slots=True)
class StepCost:
    seconds: float  # the debtor's step, start to end
    creditor_seconds: dict[int, float] = field(default_factory=dict)  # MA work done on creditors


class CostModel(Protocol):
    # What one cluster step costs beyond its instances' steps when instances step in turn.
    cluster_step_s: float

    def step(self, work: StepWork) -> StepCost:
        """Duration of one step on its home instance, and what it costs each creditor."""
        ...

    def migrate_seconds(self, num_blocks: int) -> float:
        """Copying ``num_blocks`` rBlocks between instances (defragmentation)."""
        ...


class RooflineCosts:
    """Costs from specs (see the module docstring); ``block_size`` sizes a migrated rBlock."""

    cluster_step_s = 0.0  # instances step on their own devices: no shared cluster step

    def __init__(self, spec: InstanceSpec, block_size: int) -> None:
        self.spec = spec
        self.block_size = block_size
        m = spec.model
        self._layers = m.num_layers
        self._kv_per_token = m.kv_bytes_per_token
        self._attn_flops = m.attention_flops_per_pair
        self._q_bytes = m.query_bytes_per_token_layer
        self._partial_bytes = m.partial_bytes_per_token_layer
        self._kv_token_layer = m.kv_bytes_per_token // m.num_layers

    def _roofline(self, flops: float, num_bytes: float) -> float:
        return max(flops / self.spec.flops, num_bytes / self.spec.bandwidth)

    def attention_seconds(self, ctx_tokens: int, pairs: int) -> float:
        return self._roofline(pairs * self._attn_flops, ctx_tokens * self._kv_per_token)

    def step(self, work: StepWork) -> StepCost:
        spec, m = self.spec, self.spec.model
        linear = self._roofline(
            work.num_new_tokens * m.linear_flops_per_token
            + work.num_samples * m.lm_head_flops_per_sample,
            m.weight_bytes_read_per_step,
        )
        # two all-reduces of the step's hidden states per layer (attention out, MLP out)
        hidden_bytes = work.num_new_tokens * m.hidden_size * m.weight_bytes_per_param
        tp = 2 * self._layers * spec.allreduce_seconds(hidden_bytes) if spec.tp_size > 1 else 0.0
        local = self._roofline(work.self_pairs * self._attn_flops, 0.0)
        net = spec.network
        remote = 0.0
        creditors: dict[int, float] = {}
        for shard in work.shards:
            ma = self.attention_seconds(shard.ctx_tokens, shard.pairs)
            if shard.instance_id == work.home_id:
                local += ma
                continue
            per_layer_bytes = (
                shard.num_rows * (self._q_bytes + self._partial_bytes)
                + shard.num_writes * self._kv_token_layer
            )
            wire = self._layers * (net.round_trip_s + per_layer_bytes / net.bandwidth)
            remote = max(remote, wire + ma)
            creditors[shard.instance_id] = creditors.get(shard.instance_id, 0.0) + ma
        seconds = (
            spec.step_overhead_s
            + work.num_seqs * spec.per_seq_overhead_s
            + work.num_borrow_messages * net.round_trip_s
            + linear
            + tp
            + max(local, remote)
        )
        return StepCost(seconds, creditors)

    def migrate_seconds(self, num_blocks: int) -> float:
        if num_blocks <= 0:
            return 0.0
        net = self.spec.network
        return net.latency_s + num_blocks * self.block_size * self._kv_per_token / net.bandwidth


# Features of the fitted model, in order; ``features(work)`` computes them.
FEATURES = ("step", "new_tokens", "samples", "seqs", "ctx_tokens", "pairs", "remote_calls")


def features(work: StepWork) -> list[float]:
    """The fitted model's regressors for one non-empty step."""
    return [
        1.0,
        float(work.num_new_tokens),
        float(work.num_samples),
        float(work.num_seqs),
        float(work.ctx_tokens),
        float(work.pairs),
        float(work.num_remote_calls),
    ]


@dataclass(frozen=True)
class LinearCosts:
    """step seconds = sum(coefficient x feature) over ``FEATURES`` (fitted, never negative).

    ``cluster_step_s`` is what one whole cluster step costs beyond its instances' steps
    (heartbeats, the front end, empty instances); ``migrate_block_s`` one migrated rBlock.
    """

    coefficients: tuple[float, ...]
    cluster_step_s: float = 0.0
    migrate_block_s: float = 0.0

    def __post_init__(self) -> None:
        if len(self.coefficients) != len(FEATURES):
            raise ValueError(f"need {len(FEATURES)} coefficients ({', '.join(FEATURES)})")

    def as_dict(self) -> dict[str, float]:
        return dict(zip(FEATURES, self.coefficients))

    def step(self, work: StepWork) -> StepCost:
        return StepCost(sum(c * x for c, x in zip(self.coefficients, features(work))))

    def migrate_seconds(self, num_blocks: int) -> float:
        return max(0, num_blocks) * self.migrate_block_s


class NoisyCosts:
    """``base``'s step times, each scaled by an independent lognormal factor of mean 1 and
    log-standard-deviation ``sigma`` (seeded). Migration costs are left exact."""

    def __init__(self, base: CostModel, sigma: float, seed: int) -> None:
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.base, self.sigma = base, sigma
        self.cluster_step_s = base.cluster_step_s
        self._rng = random.Random(seed)

    def step(self, work: StepWork) -> StepCost:
        cost = self.base.step(work)
        f = math.exp(self._rng.gauss(-0.5 * self.sigma**2, self.sigma))
        return StepCost(cost.seconds * f, {i: s * f for i, s in cost.creditor_seconds.items()})

    def migrate_seconds(self, num_blocks: int) -> float:
        return self.base.migrate_seconds(num_blocks)
