"""``NativeStep``: a decode step's attention for a whole-step native decoder, as one C hook.

The decoder (``model/csrc/decoder.c``) runs every layer of a decode step in one C call and
calls an ``AttendFn`` once a layer; this module prepares that function's context
(``StepAttention`` of ``csrc/ma_call.h``, run by ``step_attend`` in ``csrc/decode_ma.c``): the
step's pools of this process, where each row's new K,V goes, the MA call over one pool or the
several-pool call that merges in the kernel, and, through a ``RemoteDecode`` hook, the rows'
share in other processes. The model sees only an address and a context; which pools, kernels
and peers take part is DistAttention's decision (``attention/dist.py``), made once a step.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from infinite_llm.attention import cpu_native, native_shards
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.attention.plan import DistPlan


class RemoteDecode(Protocol):
    """Shards of a whole-step decode in other processes (a Ray actor's creditors):
    ``step_attend`` calls ``address`` (``ma_call.h``'s ``RemoteFn``) with ``context`` twice a
    layer, to send their share after the local stores and to merge their ``(out, lse)`` after
    the local MA. A nonzero status abandons the step; ``error`` then says why. ``finished()``
    once the step ran (the hook records what the exchange cost)."""

    address: int
    context: int
    error: BaseException | None

    def finished(self) -> None: ...


@dataclass
class NativeStep:
    """What a whole-step decoder needs of the step's attention (``model.llama.NativeAttention``):
    ``address`` of ``step_attend`` and its ``context``; ``finished(num_layers)`` once the step
    ran; ``error`` the exception that stopped it (a creditor that could not answer), if any."""

    address: int
    context: int
    keep: object  # what the context points into
    on_finished: Callable[[int], None]
    remote: RemoteDecode | None = None

    @property
    def error(self) -> BaseException | None:
        return None if self.remote is None else self.remote.error

    def finished(self, num_layers: int) -> None:
        if self.remote is not None:
            self.remote.finished()
        self.on_finished(num_layers)


def build_native_step(
    plan: DistPlan,
    insts: tuple[int, ...],
    pools: tuple[KVPool, ...],
    num_heads: int,
    head_dim: int,
    scale: float,
    on_finished: Callable[[int], None],
    remote: Callable[[], RemoteDecode | None] | None = None,
) -> NativeStep | None:
    """The step's hook over ``pools`` (the plan's shards of this process, in ``insts`` order)
    and, with ``remote``, a hook for the rest (called once, if the local part can run); None
    where the native kernels cannot take it."""
    native = cpu_native.native_library()
    if native is None:
        return None
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
    if len(pools) == 1 and plan.shards[insts[0]].rows is None:
        prepared = cpu_native.prepare_decode_call(
            q_like, *caches[0], plan.shards[insts[0]].batch, scale
        )
        if prepared is None:
            return None
        call, kind = prepared.call, 0
        keep: object = prepared
    else:
        # One pool serving some rows, or several: the shards call, which places every
        # request's rows itself; a request wholly elsewhere gets the empty state.
        tables = shard_tables(plan, list(insts), q_like, caches, allow_missing=remote is not None)
        if tables is None:
            return None
        shards = native_shards.PreparedShards(tables, caches, num_heads, plan.block_size, scale)
        call, keep, kind = shards.call, shards, 1
    hook = None
    if remote is not None:
        hook = remote()
        if hook is None:
            return None
    n = len(pools)
    arrays = (ctypes.c_int64 * (6 * n))(
        *(p.k.data_ptr() for p in pools),
        *(p.v.data_ptr() for p in pools),
        *(p.k.stride(0) * p.k.element_size() for p in pools),
        *(p.k.stride(1) for p in pools),
    )
    base, size = ctypes.addressof(arrays), ctypes.sizeof(ctypes.c_int64) * n
    step = cpu_native.struct("StepAttention")(
        kind=kind,
        call=ctypes.addressof(call),
        num_pools=n,
        k_bases=base,
        v_bases=base + size,
        layer_strides=base + 2 * size,
        head_strides=base + 3 * size,
        layer_k=base + 4 * size,  # the last two n-blocks: filled per layer by step_attend
        layer_v=base + 5 * size,
        write_pool=write_pool.data_ptr(),
        slots=slots.data_ptr(),
        t=t,
        hq=num_heads,
        hkv=pools[0].num_kv_heads,
        d=head_dim,
        remote=0 if hook is None else hook.address,
        remote_ctx=0 if hook is None else hook.context,
    )
    address = ctypes.cast(native.lib.step_attend, ctypes.c_void_p).value or 0
    return NativeStep(
        address,
        ctypes.addressof(step),
        (step, keep, arrays, write_pool, slots, caches),
        on_finished,
        hook,
    )


def shard_tables(
    plan: DistPlan,
    insts: list[int],
    q: torch.Tensor,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    allow_missing: bool = False,
) -> native_shards.ShardTables | None:
    """The plan's shards as the native several-pool kernel reads them; None where it cannot
    take them (no kernel, another dtype or layout, pools that differ, or, unless
    ``allow_missing``, a request none of ``insts`` serves)."""
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
    return native_shards.ShardTables.build(shards, plan.query_start, allow_missing)
