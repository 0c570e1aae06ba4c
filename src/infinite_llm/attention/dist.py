"""DistAttention: a request's attention over rBlocks spread across instances, merged exactly.

Per step the engine builds a ``DistPlan`` (``attention/plan.py``) from each request's block
table. Per layer:

    new k, v    --stored first in the slot of their rBlock, wherever it lives
    q rows      --MA over context rBlocks on instance 0 (local)-------> (out, lse) --merge--> out
                --MA over context rBlocks on instance 2 (a creditor)--> (out, lse)
    prefill     --self (causal, fresh k/v)----------------------------> (out, lse)

No MA over rBlocks ever needs a causal mask. A decode token's context is every cached token up
to and including itself (its K,V are stored before the MAs run). A prefill chunk's context is
the tokens cached before the step; its causal part over its own tokens is computed from the
fresh k, v. Only queries (and the new tokens' k, v) travel to an instance; only (out, lse) come
back; one call per instance per layer for the whole batch. A decode batch whose rBlocks are all
local is one kernel call per layer, with nothing to merge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from infinite_llm.attention import native_shards
from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.cpu_flash import causal_self_attention
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.attention.merge import merge_into
from infinite_llm.attention.micro import micro_attention
from infinite_llm.attention.plan import DistPlan, take_rows
from infinite_llm.attention.step_attention import (
    NativeStep,
    RemoteDecode,
    build_native_step,
    shard_tables,
)


@dataclass
class ShardWork:
    """What one instance does for one layer: store new K,V and/or run one batched MA."""

    write_slots: torch.Tensor | None = None  # [n] int64 slots in that instance's pool
    k: torch.Tensor | None = None  # [n, Hkv, D]
    v: torch.Tensor | None = None
    q: torch.Tensor | None = None  # [rows, Hq, D]
    batch: MABatch | None = None


class MAExecutor(Protocol):
    """How a step's MicroAttentions run: in this process (``LocalExecutor``, the in-process
    cluster's transport) or across processes (``cluster.ray_transport.RayTransport``).
    DistAttention asks it what it can do once a step and decides how the step runs."""

    impl: str  # the MA kernels this process runs (``micro.IMPLS``); the self part follows it

    def run(
        self, layer_idx: int, work: Mapping[int, ShardWork]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """On every instance store the new K,V, then run the MA (a decode token's MA reads its
        own K,V); return (out, lse) per instance that had an MA."""
        ...

    def native_pools(self) -> Mapping[int, KVPool]:
        """The pools of this process whose MAs this executor runs on the native CPU kernels:
        DistAttention may then read them directly, several pools in one kernel call per layer
        or a whole decode step in C. Empty where it runs none natively."""
        ...

    def remote_decode(
        self, plan: DistPlan, insts: tuple[int, ...], num_heads: int, head_dim: int
    ) -> RemoteDecode | None:
        """The shards ``insts`` (in other processes) of a whole native decode step, exchanged
        from inside it; None where this executor cannot reach them that way."""
        ...

    def count_fused(self, plan: DistPlan, num_layers: int) -> None:
        """``num_layers`` layers of ``plan`` ran over its pools in this process without a
        ``run`` per shard (one native call a layer, or a whole step): the executor's counters."""
        ...


class DistAttention:
    """The attention backend the model calls: self part + one MA per instance, merged exactly.

    How the step runs is decided here, once, from the plan and what the executor can do:

    * ``native_step``: a decode step whose every shard the executor runs natively in this
      process (or one such pool plus shards the executor reaches from inside a C step) is
      offered to a whole-step native decoder as a C hook (``step_attention``);
    * ``fused``: a decode layer over several native pools of this process is one kernel call
      (every pool's MA and the log-sum-exp merge inside it);
    * otherwise each instance's share goes through ``executor.run`` and the states are merged
      here.
    """

    def __init__(self, executor: MAExecutor, plan: DistPlan, scale: float) -> None:
        self.executor = executor
        self.plan = plan
        self.scale = scale
        decode = (
            bool(plan.shards)
            and not plan.prefill_query_lens
            and set(plan.writes) <= set(plan.shards)
        )
        pools = executor.native_pools() if decode else {}
        local = tuple(i for i in plan.shards if i in pools)
        self._others = tuple(i for i in plan.shards if i not in pools)
        self._pools = tuple(pools[i] for i in local)
        self._local = local
        float32 = all(p.dtype == torch.float32 for p in self._pools)
        # A whole step in C: every shard native here, or one here and the rest reached from C.
        self._whole = bool(local) and float32 and (not self._others or len(local) == 1)
        # One kernel call per layer over several pools of this process.
        self._fused = decode and len(local) > 1 and not self._others

    def native_step(self, num_heads: int, head_dim: int) -> NativeStep | None:
        """This step as a C hook for a whole-step decoder (``model.llama.NativeAttention``),
        built once a step; None where the step does not qualify or the kernels cannot take it."""
        if not self._whole or self.plan.num_tokens == 0:
            return None
        plan, others = self.plan, self._others
        remote = None
        if others:
            executor = self.executor
            remote = lambda: executor.remote_decode(plan, others, num_heads, head_dim)  # noqa: E731
        return plan.memo(
            ("native-step", num_heads, head_dim),
            lambda: build_native_step(
                plan,
                self._local,
                self._pools,
                num_heads,
                head_dim,
                self.scale,
                lambda num_layers: self.executor.count_fused(plan, num_layers),
                remote,
            ),
        )

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        plan = self.plan
        work: dict[int, ShardWork] = {}
        for inst, write in plan.writes.items():
            work[inst] = ShardWork(
                write_slots=write.slots, k=take_rows(k, write.rows), v=take_rows(v, write.rows)
            )
        if self._fused and q.device.type == "cpu":
            merged = self._fused_layer(layer_idx, work, q)
            if merged is not None:  # every shard's MA and the merge in one call
                return merged.to(q.dtype)
        for inst, shard in plan.shards.items():
            w = work.setdefault(inst, ShardWork())
            w.q, w.batch = take_rows(q, shard.rows), shard.batch
        results = self.executor.run(layer_idx, work)
        if not plan.prefill_query_lens and len(results) == 1:
            ((inst, (out, _)),) = results.items()
            if plan.shards[inst].rows is None:
                return out.to(q.dtype)  # every row's whole context on one instance: done
        # Merged in float32, rounded to the model's dtype once.
        first = None
        if not plan.prefill_query_lens:  # decode: start from a state that covers every row
            first = next((i for i in results if plan.shards[i].rows is None), None)
        if first is not None:
            out0, lse0 = results.pop(first)
            acc = out0.to(torch.float32, copy=True)
            lse = lse0.to(torch.float32, copy=True)
        elif len(plan.prefill_query_lens) == len(plan.query_lens):
            acc, lse = causal_self_attention(
                q, k, v, plan.query_lens, self.scale, torch.float32, self.executor.impl
            )
        else:
            acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
            if plan.prefill_rows is not None:
                rows = plan.prefill_rows
                part_out, part_lse = causal_self_attention(
                    q.index_select(0, rows),
                    k.index_select(0, rows),
                    v.index_select(0, rows),
                    plan.prefill_query_lens,
                    self.scale,
                    torch.float32,
                    self.executor.impl,
                )
                acc.index_copy_(0, rows, part_out)
                lse.index_copy_(0, rows, part_lse)
        for inst, (part_out, part_lse) in results.items():
            merge_into(acc, lse, plan.shards[inst].rows, part_out, part_lse)
        return acc.to(q.dtype)

    def _fused_layer(
        self, layer_idx: int, writes: Mapping[int, ShardWork], q: torch.Tensor
    ) -> torch.Tensor | None:
        """Store the new K,V, then attention of every (decode) row over all its pools in one
        native call: the merged out [T, Hq, D] float32; None (nothing done) where the kernel
        cannot take these pools."""
        plan, pools = self.plan, self._pools
        caches = [(p.k[layer_idx], p.v[layer_idx]) for p in pools]
        tables = plan.memo(
            ("native-shards", self._local), lambda: shard_tables(plan, list(self._local), q, caches)
        )
        if tables is None:
            return None
        for inst, w in writes.items():
            assert w.write_slots is not None and w.k is not None and w.v is not None
            pools[self._local.index(inst)].write(layer_idx, w.write_slots, w.k, w.v)
        out, _ = native_shards.decode_attention_shards(
            q, caches, tables, plan.block_size, self.scale
        )
        self.executor.count_fused(plan, 1)
        return out


class LocalExecutor:
    """All pools in this process: direct writes and MA calls (the in-process transport).
    ``num_fused_calls``: layers whose shards over several pools ran as one native call."""

    def __init__(self, pools: Mapping[int, KVPool], impl: str = "auto") -> None:
        self.pools = pools
        self.impl = impl
        self.num_fused_calls = 0

    def native_pools(self) -> Mapping[int, KVPool]:
        if self.impl not in ("auto", "native"):
            return {}
        return {i: p for i, p in self.pools.items() if p.k.device.type == "cpu"}

    def remote_decode(
        self, plan: DistPlan, insts: tuple[int, ...], num_heads: int, head_dim: int
    ) -> RemoteDecode | None:
        return None  # every pool it knows is in this process

    def count_fused(self, plan: DistPlan, num_layers: int) -> None:
        if len(plan.shards) > 1:
            self.num_fused_calls += num_layers

    def run(
        self, layer_idx: int, work: Mapping[int, ShardWork]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for inst, w in work.items():
            pool = self.pools[inst]
            here = pool.k.device
            home = (w.q if w.q is not None else w.k).device  # type: ignore[union-attr]
            if home != here:  # a GPU instance's host pool: its MA runs on the host's cores
                w = _moved(w, here)
            # The store first: a decode token's MA reads its own K,V (one native call does both).
            store = None if w.write_slots is None else (w.write_slots, w.k, w.v)
            if w.batch is not None and w.q is not None:
                out, lse = micro_attention(
                    w.q, pool.k[layer_idx], pool.v[layer_idx], w.batch, impl=self.impl, store=store
                )
                if home != here:
                    out, lse = out.to(home, non_blocking=True), lse.to(home, non_blocking=True)
                results[inst] = (out, lse)
            elif store is not None:
                pool.write(layer_idx, *store)
        return results


def _moved(work: ShardWork, device: torch.device) -> ShardWork:
    """``work`` with its tensors on ``device`` (the pool's), for an MA where the pool lives."""

    def to(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return ShardWork(to(work.write_slots), to(work.k), to(work.v), to(work.q), work.batch)
