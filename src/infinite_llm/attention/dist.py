"""DistAttention: a request's attention over rBlocks spread across instances, merged exactly.

Per step the engine builds a ``DistPlan`` from each request's block table. Per layer:

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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from infinite_llm.attention import native_shards
from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.cpu_flash import causal_self_attention
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.attention.local_decode import LocalDecode, build_local_decode, shard_tables
from infinite_llm.attention.merge import merge_into
from infinite_llm.attention.micro import micro_attention
from infinite_llm.kvcache.block import BlockRef

_T = TypeVar("_T")


@dataclass(frozen=True)
class StepSpan:
    """One request's share of a step: its rBlocks, tokens already cached, tokens computed now."""

    block_refs: Sequence[BlockRef]
    num_computed_tokens: int
    num_new_tokens: int


@dataclass
class ShardWork:
    """What one instance does for one layer: store new K,V and/or run one batched MA."""

    write_slots: torch.Tensor | None = None  # [n] int64 slots in that instance's pool
    k: torch.Tensor | None = None  # [n, Hkv, D]
    v: torch.Tensor | None = None
    q: torch.Tensor | None = None  # [rows, Hq, D]
    batch: MABatch | None = None


class MAExecutor(Protocol):
    """Runs each instance's share of a layer; in-process here, remote in ``cluster/``."""

    def run(
        self, layer_idx: int, work: Mapping[int, ShardWork]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """On every instance store the new K,V, then run the MA (a decode token's MA reads its
        own K,V); return (out, lse) per instance that had an MA."""
        ...


@dataclass
class _Shard:
    rows: torch.Tensor | None  # query rows sent to this instance (None: all rows, in order)
    batch: MABatch
    requests: list[int]  # the step's request index of each of the batch's requests


@dataclass
class _Write:
    rows: torch.Tensor | None  # token rows whose k, v go to this instance (None: all)
    slots: torch.Tensor


class DistPlan:
    """Where each request's context lives and where its new tokens go, computed once per step."""

    def __init__(
        self, spans: Sequence[StepSpan], block_size: int, device: torch.device | str = "cpu"
    ) -> None:
        self.query_lens = [s.num_new_tokens for s in spans]
        self.num_tokens = sum(self.query_lens)
        # Prefill chunks (more than one new token) get a causal self part; decode tokens don't.
        self.prefill_query_lens = [n for n in self.query_lens if n > 1]
        shard_reqs: dict[int, list[tuple[int, list[int], int]]] = {}
        write_rows: dict[int, list[int]] = {}
        write_slots: dict[int, list[int]] = {}
        row = 0
        for idx, span in enumerate(spans):
            ctx = span.num_computed_tokens
            refs = span.block_refs
            if len(refs) * block_size < ctx + span.num_new_tokens:
                raise ValueError(
                    f"request {idx}: {len(refs)} rBlocks cannot hold {ctx + span.num_new_tokens} tokens"
                )
            # A decode token attends to the cache including its own (stored first) K,V.
            if span.num_new_tokens == 1:
                ctx += 1
            num_ctx_blocks = -(-ctx // block_size)
            per_instance: dict[int, list[int]] = {}
            for ref in refs[:num_ctx_blocks]:
                per_instance.setdefault(ref.instance_id, []).append(ref.block_id)
            last = refs[num_ctx_blocks - 1].instance_id if num_ctx_blocks else None
            for inst, blocks in per_instance.items():
                # Every context block is full except the logically last one, listed last on its instance.
                tokens = len(blocks) * block_size
                if inst == last:
                    tokens -= num_ctx_blocks * block_size - ctx
                shard_reqs.setdefault(inst, []).append((idx, blocks, tokens))
            first_new = span.num_computed_tokens
            for pos in range(first_new, first_new + span.num_new_tokens):
                ref = refs[pos // block_size]
                write_rows.setdefault(ref.instance_id, []).append(row + pos - first_new)
                write_slots.setdefault(ref.instance_id, []).append(
                    ref.block_id * block_size + pos % block_size
                )
            row += span.num_new_tokens

        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        self.shards: dict[int, _Shard] = {}
        for inst, reqs in shard_reqs.items():
            batch = MABatch(
                query_lens=[self.query_lens[i] for i, _, _ in reqs],
                block_ids=[blocks for _, blocks, _ in reqs],
                context_lens=[tokens for _, _, tokens in reqs],
                block_size=block_size,
            )
            rows: list[int] = []
            for i, _, _ in reqs:
                rows.extend(range(starts[i], starts[i + 1]))
            self.shards[inst] = _Shard(self._index(rows, device), batch, [i for i, _, _ in reqs])
        prefill_rows = [
            r
            for i, n in enumerate(self.query_lens)
            if n > 1
            for r in range(starts[i], starts[i + 1])
        ]
        self.prefill_rows = self._index(prefill_rows, device) if prefill_rows else None
        self.query_start = starts
        self.block_size = block_size
        self._memo: dict[object, object] = {}
        self.writes = {
            inst: _Write(
                self._index(write_rows[inst], device),
                torch.tensor(slots, dtype=torch.long, device=device),
            )
            for inst, slots in write_slots.items()
        }

    def _index(self, rows: list[int], device: torch.device | str) -> torch.Tensor | None:
        if len(rows) == self.num_tokens and rows == list(range(self.num_tokens)):
            return None  # every row, in order: no gather or scatter needed
        return torch.tensor(rows, dtype=torch.long, device=device)

    def memo(self, key: object, compute: Callable[[], _T]) -> _T:
        """``compute()`` once per step and key (an executor's per-step tables, reused by every layer)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]  # type: ignore[return-value]

    @property
    def instance_ids(self) -> set[int]:
        return set(self.shards) | set(self.writes)

    def context_bytes(self, head_dim: int, num_kv_heads: int, dtype_size: int) -> dict[int, int]:
        """Per instance: bytes of K and V one layer's MA reads (for the bandwidth figures)."""
        return {
            inst: sum(shard.batch.context_lens) * 2 * num_kv_heads * head_dim * dtype_size
            for inst, shard in self.shards.items()
        }


def take_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` a shard or write names (None: all of them, in order)."""
    return x if rows is None else x.index_select(0, rows)


class DistAttention:
    """The attention backend the model calls: self part + one MA per instance, merged exactly."""

    def __init__(self, executor: MAExecutor, plan: DistPlan, scale: float) -> None:
        self.executor = executor
        self.plan = plan
        self.scale = scale

    def local_decode(self, num_rows: int, num_heads: int, head_dim: int) -> LocalDecode | None:
        """This step as decode over pools of this process (every row a decode token, its context
        and new K,V in float32 pools the executor holds and runs natively), or None. Shards in
        other processes join through the executor's ``remote_decode`` hook where it has one
        (a Ray actor's creditors), with one local pool holding context of every row."""
        plan = self.plan
        if plan.prefill_query_lens or plan.num_tokens != num_rows or not plan.shards:
            return None
        local_pool = getattr(self.executor, "local_pool", None)
        if local_pool is None or not set(plan.writes) <= set(plan.shards):
            return None
        pools_of = {i: local_pool(i) for i in plan.shards}
        insts = tuple(i for i, p in pools_of.items() if p is not None)
        others = tuple(i for i, p in pools_of.items() if p is None)
        pools = tuple(pools_of[i] for i in insts)
        if not insts or any(p.dtype != torch.float32 for p in pools):  # type: ignore[union-attr]
            return None
        remote = None
        if others:
            make = getattr(self.executor, "remote_decode", None)
            if make is None or len(insts) != 1:
                return None
            remote = lambda: make(plan, others, num_heads, head_dim)  # noqa: E731
        return plan.memo(
            ("local-decode", insts, others),
            lambda: build_local_decode(
                self.executor, plan, insts, pools, num_heads, head_dim, self.scale, remote
            ),  # type: ignore[arg-type]
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
        run_decode = getattr(self.executor, "run_decode", None)
        if run_decode is not None and not plan.prefill_query_lens and len(plan.shards) > 1:
            merged = run_decode(layer_idx, work, q, plan, self.scale)
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
            acc, lse = causal_self_attention(q, k, v, plan.query_lens, self.scale, torch.float32)
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
                )
                acc.index_copy_(0, rows, part_out)
                lse.index_copy_(0, rows, part_lse)
        for inst, (part_out, part_lse) in results.items():
            merge_into(acc, lse, plan.shards[inst].rows, part_out, part_lse)
        return acc.to(q.dtype)


class LocalExecutor:
    """All pools in this process: direct writes and MA calls (the in-process transport).

    A decode step whose rows have context on several pools can run as one native call
    (``run_decode``): each pool's MA and the log-sum-exp merge of their states, as DistAttention
    would do shard by shard, without a Python round per shard and layer.
    """

    def __init__(self, pools: Mapping[int, KVPool], impl: str = "auto") -> None:
        self.pools = pools
        self.impl = impl
        self.num_fused_calls = 0

    def run_decode(
        self,
        layer_idx: int,
        writes: Mapping[int, ShardWork],
        q: torch.Tensor,
        plan: DistPlan,
        scale: float,
    ) -> torch.Tensor | None:
        """Store the new K,V, then attention of every (decode) row over all its shards: the
        merged out [T, Hq, D] float32; None (nothing done) where the native kernel cannot."""
        if self.impl not in ("auto", "native") or q.device.type != "cpu":
            return None
        insts = list(plan.shards)
        if any(i not in self.pools for i in insts):
            return None
        caches = [(self.pools[i].k[layer_idx], self.pools[i].v[layer_idx]) for i in insts]
        tables = plan.memo(
            ("native-shards", tuple(insts)), lambda: shard_tables(plan, insts, q, caches)
        )
        if tables is None:
            return None
        self._write(layer_idx, writes)
        self.num_fused_calls += 1
        out, _ = native_shards.decode_attention_shards(q, caches, tables, plan.block_size, scale)
        return out

    def local_pool(self, instance_id: int) -> KVPool | None:
        """The pool whose MAs run here on the native kernel, for a fused decoder; else None."""
        if self.impl not in ("auto", "native"):
            return None
        return self.pools.get(instance_id)

    def count_fused_decode(self, num_pools: int, num_layers: int) -> None:
        """A fused decoder ran a step over ``num_pools`` pools: the fused calls it stands for."""
        if num_pools > 1:
            self.num_fused_calls += num_layers

    def _write(self, layer_idx: int, work: Mapping[int, ShardWork]) -> None:
        for inst, w in work.items():
            if w.write_slots is not None:
                assert w.k is not None and w.v is not None
                self.pools[inst].write(layer_idx, w.write_slots, w.k, w.v)

    def run(
        self, layer_idx: int, work: Mapping[int, ShardWork]
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for inst, w in work.items():
            pool = self.pools[inst]
            # The store first: a decode token's MA reads its own K,V (one native call does both).
            store = None if w.write_slots is None else (w.write_slots, w.k, w.v)
            if w.batch is not None and w.q is not None:
                results[inst] = micro_attention(
                    w.q, pool.k[layer_idx], pool.v[layer_idx], w.batch, impl=self.impl, store=store
                )
            elif store is not None:
                pool.write(layer_idx, *store)
        return results
