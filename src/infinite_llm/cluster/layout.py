"""``PoolLayout``: the pools a cluster has, decided once from the configuration.

Model instances ``0..N-1`` each have a device pool; then ``K`` memory instances (a pool and
MicroAttention, no weights: ``--memory-instances``); then, with ``--host-kv-memory``, one host
pool per model instance (``host_of`` that instance). Every pool but the model instances' is a
*lender*: it never homes a request and lends every rBlock. Both runtimes build their instances
from this layout, and the longest request and the memory check come from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from infinite_llm.cluster.base import (
    check_pools_fit,
    max_request_blocks,
    resolve_memory_blocks,
    resolve_num_blocks,
)
from infinite_llm.config import EngineConfig
from infinite_llm.kvcache.tiers import Tier
from infinite_llm.model.config import ModelArchConfig


@dataclass(frozen=True)
class Lender:
    """A pool without a model: a memory instance's, or a model instance's host pool."""

    instance_id: int
    num_blocks: int
    tier: Tier
    host_of: int | None = None  # the model instance of a host pool


@dataclass(frozen=True)
class PoolLayout:
    num_instances: int  # model instances, ids 0..num_instances-1
    model_blocks: int  # rBlocks of each model instance's pool
    lenders: tuple[Lender, ...]
    borrowing: bool
    lending_cap: float  # of the model instances' pools (lenders lend everything)

    @classmethod
    def of(cls, config: EngineConfig, arch: ModelArchConfig) -> PoolLayout:
        """The layout ``config`` asks for; refused (ValueError) where this machine's available
        memory cannot hold the pools (unless they go to the nodes of a Ray cluster joined with
        ``ray_address``)."""
        n = config.num_instances
        model_blocks = resolve_num_blocks(config, arch)
        memory_blocks = resolve_memory_blocks(
            config, arch, model_blocks, config.kv_memory_per_memory_instance
        )
        lenders = [
            Lender(n + k, memory_blocks, Tier.MEMORY) for k in range(config.num_memory_instances)
        ]
        if config.host_kv_memory is not None:
            host_blocks = resolve_memory_blocks(config, arch, model_blocks, config.host_kv_memory)
            first = n + config.num_memory_instances
            lenders += [Lender(first + i, host_blocks, Tier.HOST, host_of=i) for i in range(n)]
        pools = {f"{n} model instances": n * model_blocks}
        for tier in (Tier.MEMORY, Tier.HOST):
            these = [lender for lender in lenders if lender.tier is tier]
            if these:
                pools[f"{len(these)} {tier.label} pools"] = sum(x.num_blocks for x in these)
        if config.ray_address is None:  # joined to a Ray cluster, the pools are on its nodes
            check_pools_fit(config, arch, pools)
        borrowing = config.cache.enable_borrowing and n + len(lenders) > 1
        cap = config.cache.lending_cap if borrowing else 0.0
        return cls(n, model_blocks, tuple(lenders), borrowing, cap)

    @property
    def max_request_blocks(self) -> int:
        """The most rBlocks one request can hold: its home pool, what the other model
        instances may lend, and every lender's pool."""
        return self.max_request_blocks_of(range(self.num_instances + len(self.lenders)))

    def max_request_blocks_of(self, live: Iterable[int]) -> int:
        """``max_request_blocks`` over the ``live`` pools only (after failures); 0 when no
        model instance is left."""
        live = set(live)
        models = sum(1 for i in range(self.num_instances) if i in live)
        if not models:
            return 0
        if not self.borrowing:
            return self.model_blocks
        others = max_request_blocks(self.model_blocks, models, self.lending_cap, True)
        return others + sum(x.num_blocks for x in self.lenders if x.instance_id in live)


def lender_device(model_device: str) -> tuple[str, bool]:
    """Where a pool without a model (a memory instance's, a host tier's) lives: host memory,
    its MicroAttention run by the host's cores; page-locked when the model instances are on a
    GPU, so the queries and ``(out, lse)`` that cross to it move without a staging copy.
    Returns (device, pinned)."""
    return "cpu", model_device.startswith("cuda")
