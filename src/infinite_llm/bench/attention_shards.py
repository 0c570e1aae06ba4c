"""How ``bench attention``'s split row places a context's shards: cut into contiguous runs of
rBlocks, each copied into a pool of its own (as on that many instances), the fused native
call over those pools that the in-process transport runs, and the same MAs and merge as bare
kernel calls."""

from __future__ import annotations

import ctypes
import random
from collections.abc import Callable

import torch

from infinite_llm.attention import cpu_native, native_shards
from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.kv_pool import empty_kv

Shard = tuple[torch.Tensor, torch.Tensor, MABatch]  # a pool's K and V layer, the MA over it


def fused_call(
    q: torch.Tensor, shards: list[Shard], scale: float, impl: str
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]] | None:
    """The shards as the in-process transport runs them: every shard's MA and the merge in one
    native call (``decode_attention_shards``); None where that path does not apply."""
    k, v, _ = shards[0]
    if impl not in ("auto", "native") or not (
        cpu_native.native_available() and cpu_native.supports(q, k, v)
    ):
        return None
    n = shards[0][2].num_requests
    tables = native_shards.ShardTables.build(
        [(b, list(range(n))) for _, _, b in shards], list(range(n + 1))
    )
    if tables is None:
        return None
    caches = [(sk, sv) for sk, sv, _ in shards]
    return lambda: native_shards.decode_attention_shards(q, caches, tables, k.shape[2], scale)


def kernel_calls(
    q: torch.Tensor, shards: list[Shard], scale: float
) -> tuple[Callable[[], None], Callable[[], torch.Tensor]] | None:
    """Every shard's MA, then (for more than one) the log-sum-exp merge of their states into the
    first, each one C call whose arguments were bound beforehand: the kernels' own time, as a
    runtime that prepares a step's calls once pays it per layer (the engine's native decoder
    binds its decode call once per step and sets only each layer's pointers), without the
    Python that ``micro_attention`` and ``merge_attention_states_`` spend on every call (checks,
    the call's memo key, new output tensors). Returns (run, result): ``result()`` is the merged
    output of the last run, float32. None where the native kernel does not take these tensors."""
    native = cpu_native.native_library()
    if native is None:
        return None
    t, hq, d = q.shape
    qf = q.to(torch.float32).contiguous()
    states, runs = [], []
    for k, v, batch in shards:
        prepared = cpu_native.prepare_decode_call(qf, k, v, batch, scale)
        if prepared is None:
            return None
        out, lse = torch.empty(t, hq, d), torch.empty(t, hq)
        call = prepared.call
        call.q, call.k, call.v = qf.data_ptr(), k.data_ptr(), v.data_ptr()
        call.out, call.lse, call.write_n = out.data_ptr(), lse.data_ptr(), 0
        states.append((out, lse, prepared))  # the prepared call keeps its tables alive
        runs.append((prepared.run, call))
    n = len(states)
    pointers = (ctypes.c_int64 * (2 * n))(
        *(o.data_ptr() for o, _, _ in states), *(lse.data_ptr() for _, lse, _ in states)
    )
    out0, lse0 = states[0][0], states[0][1]
    merge_args = (pointers, n, t * hq, d, 0, out0.data_ptr(), lse0.data_ptr())
    merge_states = native.lib.merge_states

    def run(keep: tuple = (qf, states)) -> None:  # the tensors and tables the calls point into
        for fn, call in runs:
            if fn(call):
                raise RuntimeError("native decode attention failed")
        if n > 1:
            merge_states(*merge_args)

    return run, lambda: out0


def own_pools(
    k: torch.Tensor, v: torch.Tensor, batches: list[MABatch], layout: str, seed: int
) -> list[Shard]:
    """Each shard's rBlocks copied into a pool of its own, in ``layout`` (shuffled or in order)."""
    out = []
    for s, batch in enumerate(batches):
        old = [b for blocks in batch.block_ids for b in blocks]
        new = list(range(len(old)))
        if layout == "shuffled":
            random.Random(seed * 1000 + s).shuffle(new)
        shape = (k.shape[0], len(old), *k.shape[2:])
        sk, sv = empty_kv(shape, k.dtype), empty_kv(shape, v.dtype)
        sk[:, new] = k[:, old]
        sv[:, new] = v[:, old]
        tables, at = [], 0
        for blocks in batch.block_ids:
            tables.append(new[at : at + len(blocks)])
            at += len(blocks)
        out.append(
            (sk, sv, MABatch(batch.query_lens, tables, batch.context_lens, batch.block_size))
        )
    return out


def cut_shards(
    block_ids: list[list[int]], contexts: list[int], num_shards: int, block_size: int
) -> list[MABatch]:
    """Each request's blocks cut into ``num_shards`` contiguous runs (the last may hold fewer)."""
    batches = []
    for s in range(num_shards):
        ids, lens = [], []
        for blocks, ctx in zip(block_ids, contexts):
            per = -(-len(blocks) // num_shards)
            mine = blocks[s * per : (s + 1) * per]
            ids.append(mine)
            lens.append(max(0, min(ctx, (s + 1) * per * block_size) - s * per * block_size))
        batches.append(MABatch([1] * len(ids), ids, lens, block_size))
    return batches
