"""``bench distributed``'s in-process executor: the in-process transport, counting the payload
that would cross between instances if they were processes (in process, nothing crosses)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from infinite_llm.attention.dist import ShardWork
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.attention.plan import DistPlan


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.nbytes for t in tensors if t is not None)


class CountingExecutor:
    """Wraps the in-process transport: payload bytes of every shard that leaves the home, on
    the per-shard path as it runs and, for layers that ran fused in one native call (or a
    whole step in C), the traffic they stand for (each creditor's query rows and new K,V out,
    a float32 (out, lse) per row back)."""

    def __init__(self, inner: Any, arch: Any, kv_bytes: int, home: int = 0) -> None:
        self.inner = inner
        self.home = home
        self.impl = inner.impl
        self.bytes_sent = 0
        self.bytes_received = 0
        hq, hkv, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self._q_row, self._kv_row, self._back_row = (
            hq * d * 4,
            2 * hkv * d * kv_bytes + 8,
            hq * (d + 1) * 4,
        )

    def run(
        self, layer_idx: int, work: Mapping[int, ShardWork]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        results = self.inner.run(layer_idx, work)
        for inst, w in work.items():
            if inst != self.home:
                self.bytes_sent += _nbytes(w.q, w.write_slots, w.k, w.v)
        for inst, (out, lse) in results.items():
            if inst != self.home:
                self.bytes_received += _nbytes(out, lse)
        return results

    def native_pools(self) -> Mapping[int, KVPool]:
        return self.inner.native_pools()

    def remote_decode(
        self, plan: DistPlan, insts: tuple[int, ...], num_heads: int, head_dim: int
    ) -> None:
        return None  # in process: every pool is here

    def count_fused(self, plan: DistPlan, num_layers: int) -> None:
        self.inner.count_fused(plan, num_layers)
        for inst, write in plan.writes.items():
            if inst != self.home:
                self.bytes_sent += num_layers * write.slots.numel() * self._kv_row
        for inst, shard in plan.shards.items():
            if inst != self.home:
                rows = plan.num_tokens if shard.rows is None else shard.rows.numel()
                self.bytes_sent += num_layers * rows * self._q_row
                self.bytes_received += num_layers * rows * self._back_row
