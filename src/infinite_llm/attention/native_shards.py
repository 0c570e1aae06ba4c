"""A decode layer whose rows have context on several pools (DistAttention's shards in one
process), as one call of the native kernel: every pool's MA and the log-sum-exp merge of their
states (``ma_decode_shards`` in ``csrc/decode_ma.c``). ``LocalExecutor.run_decode`` uses it."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.cpu_native import check_status, native_library, split_contexts


@dataclass(frozen=True)
class ShardTables:
    """Decode rows whose context is spread over several pools, as ``ma_decode_shards`` reads
    them: the flat per-(shard, request) arrays, built once per step and reused by every layer."""

    req_start: torch.Tensor  # [S + 1] int64: shard s's requests
    group: torch.Tensor  # [R] int64: the batch request each shard request serves
    q_first: torch.Tensor  # [R] int64: its first query row
    block_table: torch.Tensor  # [sum of blocks] int32
    block_start: torch.Tensor  # [R + 1] int64
    context_lens: torch.Tensor  # [R] int64
    group_rows: torch.Tensor  # [num_groups] int64: query rows per batch request
    contexts: list[int]  # every shard request's context, for the thread split

    @classmethod
    def build(
        cls, shards: list[tuple[MABatch, list[int]]], query_start: list[int]
    ) -> ShardTables | None:
        """``shards``: (batch, the batch request index of each of its requests); None when some
        batch request has no shard (nothing to compute its rows from)."""
        num_groups = len(query_start) - 1
        req_start, group, q_first, blocks, block_start, ctxs = [0], [], [], [], [0], []
        for batch, requests in shards:
            for i, g in enumerate(requests):
                group.append(g)
                q_first.append(query_start[g])
                blocks.extend(batch.block_ids[i])
                block_start.append(len(blocks))
                ctxs.append(batch.context_lens[i])
            req_start.append(len(group))
        if set(group) != set(range(num_groups)):
            return None

        def i64(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64)

        return cls(
            i64(req_start),
            i64(group),
            i64(q_first),
            torch.tensor(blocks, dtype=torch.int32),
            i64(block_start),
            i64(ctxs),
            i64([query_start[g + 1] - query_start[g] for g in range(num_groups)]),
            ctxs,
        )


def decode_attention_shards(
    q: torch.Tensor,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    tables: ShardTables,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every shard's decode MA and their log-sum-exp merge in one native call: (out [T, Hq, D]
    float32, lse [T, Hq]) for all rows of q. ``caches``: per shard, one layer of its pool (k, v),
    all of one dtype and layout that ``supports`` accepts (the caller checks)."""
    native = native_library()
    if native is None:
        raise RuntimeError("native decode attention is not available")
    t, hq, d = q.shape
    k0 = caches[0][0]
    hkv = k0.shape[0]
    qf = q if q.dtype == torch.float32 and q.is_contiguous() else q.to(torch.float32).contiguous()
    out = torch.empty(t, hq, d, dtype=torch.float32)
    lse = torch.empty(t, hq, dtype=torch.float32)
    num_threads = torch.get_num_threads()
    chunk, threads = split_contexts([c for c in tables.contexts if c], hkv, num_threads)
    n = len(caches)
    k_ptrs = (ctypes.c_int64 * n)(*(k.data_ptr() for k, _ in caches))
    v_ptrs = (ctypes.c_int64 * n)(*(v.data_ptr() for _, v in caches))
    strides = (ctypes.c_int64 * n)(*(k.stride(0) for k, _ in caches))
    status = native.lib.ma_decode_shards(
        qf.data_ptr(),
        n,
        k_ptrs,
        v_ptrs,
        strides,
        k0.stride(1),
        int(k0.dtype == torch.bfloat16),
        tables.req_start.data_ptr(),
        tables.group.data_ptr(),
        tables.q_first.data_ptr(),
        tables.block_table.data_ptr(),
        tables.block_start.data_ptr(),
        tables.context_lens.data_ptr(),
        len(tables.group_rows),
        tables.group_rows.data_ptr(),
        hq,
        hkv,
        d,
        block_size,
        scale,
        chunk,
        threads,
        out.data_ptr(),
        lse.data_ptr(),
    )
    check_status(status, d, k0.dtype)
    return out, lse
