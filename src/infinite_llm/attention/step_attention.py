"""``LocalDecode``: a decode step whose rows attend to rBlocks in pools of this process (and,
through a ``RemoteDecode`` hook, in other processes' pools), prepared once per step for a fused
native decoder (``model/native_decoder``), and the shard tables that the native several-pool
kernel reads (``LocalExecutor.run_decode`` uses them too).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from infinite_llm.attention import cpu_native, native_shards
from infinite_llm.attention.kv_pool import KVPool

if TYPE_CHECKING:
    from infinite_llm.attention.dist import DistPlan


class RemoteDecode(Protocol):
    """Shards of a fused decode step in other processes (a Ray actor's creditors): the native
    decoder calls ``address`` (``decoder.c``'s ``RemoteFn``) twice a layer, to send their share
    after the local stores and to merge their ``(out, lse)`` after the local MA. A nonzero
    status abandons the step; ``error`` then says why (re-raised by the decoder)."""

    address: int
    error: BaseException | None


@dataclass(frozen=True)
class LocalDecode:
    """A decode step whose rows attend only to rBlocks in pools of this process (one or
    several): what a fused native decoder (``model/native_decoder``) needs to store the new K,V
    and run every layer's attention itself, in DistAttention's order (store, then MA).

    ``kind`` 0: ``call`` is a ``cpu_native`` decode call over ``pools[0]``; 1: a
    ``native_shards.ShardsCall`` over every pool, merging in the kernel. The layer pointers are
    the decoder's to set. ``done(num_layers)``: the executor's accounting, once a step ran."""

    pools: tuple[KVPool, ...]
    kind: int
    call: ctypes.Structure
    keep: object  # what the call points into
    write_pool: torch.Tensor  # [T] int64: index into pools of row i's new K,V
    slots: torch.Tensor  # [T] int64: its slot there
    done: Callable[[int], None]
    remote: RemoteDecode | None = None


def build_local_decode(
    executor: object,
    plan: DistPlan,
    insts: tuple[int, ...],
    pools: tuple[KVPool, ...],
    num_heads: int,
    head_dim: int,
    scale: float,
    remote: Callable[[], RemoteDecode | None] | None = None,
) -> LocalDecode | None:
    """The step's ``LocalDecode`` over ``pools`` (the plan's local shards, in ``insts`` order)
    and, with ``remote``, a hook for the rest (called once, if the local part can run); None
    where the native kernels cannot take it."""
    t = plan.num_tokens
    write_pool = torch.full((t,), -2, dtype=torch.int64)
    slots = torch.zeros(t, dtype=torch.int64)
    for inst, write in plan.writes.items():
        rows = slice(None) if write.rows is None else write.rows
        write_pool[rows] = insts.index(inst) if inst in insts else -1
        slots[rows] = write.slots
    if bool((write_pool < -1).any()) or (remote is None and bool((write_pool < 0).any())):
        return None  # a row without a new K,V: not a decode step the kernel knows
    q_like = torch.empty(t, num_heads, head_dim)
    caches = [(p.k[0], p.v[0]) for p in pools]
    if len(pools) == 1:
        if plan.shards[insts[0]].rows is not None:
            return None
        prepared = cpu_native.prepare_decode_call(
            q_like, *caches[0], plan.shards[insts[0]].batch, scale
        )
        if prepared is None:
            return None
        call, keep, kind = prepared.call, prepared, 0
    else:
        tables = shard_tables(plan, list(insts), q_like, caches)
        if tables is None:
            return None
        shards = native_shards.PreparedShards(tables, caches, num_heads, plan.block_size, scale)
        call, keep, kind = shards.call, shards, 1
    count = getattr(executor, "count_fused_decode", None)

    def done(num_layers: int) -> None:
        if count is not None:
            count(len(insts), num_layers)

    hook = None
    if remote is not None:
        hook = remote()
        if hook is None:
            return None
    return LocalDecode(pools, kind, call, keep, write_pool, slots, done, hook)


def shard_tables(
    plan: DistPlan,
    insts: list[int],
    q: torch.Tensor,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
) -> native_shards.ShardTables | None:
    """The plan's shards as the native kernel reads them; None where it cannot take them (no
    kernel, another dtype or layout, pools that differ)."""
    k0 = caches[0][0]
    if not cpu_native.native_available() or any(
        not cpu_native.supports(q, k, v)
        or k.dtype != k0.dtype
        or k.shape[0] != k0.shape[0]
        or k.shape[2:] != k0.shape[2:]
        or k.stride(1) != k0.stride(1)
        for k, v in caches
    ):
        return None
    shards = [(plan.shards[i].batch, plan.shards[i].requests) for i in insts]
    return native_shards.ShardTables.build(shards, plan.query_start)
