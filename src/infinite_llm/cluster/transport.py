"""How instances reach each other: MA shards, lend requests and releases.

Two implementations share this contract: ``InProcessTransport`` (direct calls, this file) and
the Ray transport (``cluster/ray_cluster.py``). A transport that cannot reach a creditor answers
a false ``LendReply`` instead of raising, so the debtor moves on to the next candidate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import torch

from infinite_llm.attention.dist import LocalExecutor, MAExecutor, ShardWork
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.attention.plan import DistPlan
from infinite_llm.attention.step_attention import RemoteDecode
from infinite_llm.kvcache.messages import LendReply, LendRequest, Release

if TYPE_CHECKING:
    from infinite_llm.engine.instance import Instance


class Transport(MAExecutor, Protocol):
    """An instance's MA executor (``attention.dist.MAExecutor``) and its borrowing transport."""

    def lend(self, creditor_id: int, request: LendRequest) -> LendReply: ...

    def release(self, creditor_id: int, release: Release) -> None: ...


class InProcessTransport:
    """All instances in this process: pools read and written directly, managers called directly."""

    def __init__(self, attention_impl: str = "auto") -> None:
        self.instances: dict[int, Instance] = {}
        self._executor = LocalExecutor({}, impl=attention_impl)
        self.impl = attention_impl
        self.num_shard_calls = 0  # MA calls that went to an instance other than the caller's home

    def attach(self, instance: Instance) -> None:
        self.instances[instance.instance_id] = instance
        self._executor.pools = {i: inst.pool for i, inst in self.instances.items()}

    def detach(self, instance_id: int) -> None:
        self.instances.pop(instance_id, None)
        self._executor.pools = {i: inst.pool for i, inst in self.instances.items()}

    def run(
        self, layer_idx: int, work: Mapping[int, ShardWork]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        self.num_shard_calls += max(0, len(work) - 1)
        return self._executor.run(layer_idx, work)

    def native_pools(self) -> Mapping[int, KVPool]:
        """Every pool is in this process (``LocalExecutor.native_pools``)."""
        return self._executor.native_pools()

    def remote_decode(
        self, plan: DistPlan, insts: tuple[int, ...], num_heads: int, head_dim: int
    ) -> RemoteDecode | None:
        return None  # every pool is here

    def count_fused(self, plan: DistPlan, num_layers: int) -> None:
        """Layers over several pools run as one native call: counted as the shard calls they
        stand for, one per other instance and layer."""
        self._executor.count_fused(plan, num_layers)
        self.num_shard_calls += max(0, len(plan.instance_ids) - 1) * num_layers

    def lend(self, creditor_id: int, request: LendRequest) -> LendReply:
        creditor = self.instances.get(creditor_id)
        if creditor is None:
            return LendReply(
                creditor_id=creditor_id,
                debtor_id=request.debtor_id,
                request_id=request.request_id,
                granted=None,
            )
        return creditor.lend(request)

    def release(self, creditor_id: int, release: Release) -> None:
        creditor = self.instances.get(creditor_id)
        if creditor is not None:  # a dead creditor's memory is gone with it
            creditor.reclaim(release)
