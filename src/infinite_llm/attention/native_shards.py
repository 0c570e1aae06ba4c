"""A decode layer whose rows have context on several pools (DistAttention's shards in one
process), as one call of the native kernel: every pool's MA and the log-sum-exp merge of their
states (``ma_decode_shards`` in ``csrc/decode_ma.c``). ``DistAttention`` uses it per layer, ``step_attention`` for a whole step."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.cpu_native import check_status, native_library, split_contexts, struct


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
        cls,
        shards: list[tuple[MABatch, list[int]]],
        query_start: list[int],
        allow_missing: bool = False,
    ) -> ShardTables | None:
        """``shards``: (batch, the batch request index of each of its requests); None when some
        batch request has no shard (nothing to compute its rows from), unless
        ``allow_missing`` (their rows get the empty state, for what another process's pools
        answer to be merged in)."""
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
        if set(group) != set(range(num_groups)) and not allow_missing:
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


class PreparedShards:
    """A shards call for one step: the struct with tables, shapes and split filled in, and the
    per-shard pointer arrays it points to (``k``, ``v``: the caller fills a layer's pointers)."""

    __slots__ = ("call", "k", "strides", "tables", "v")

    def __init__(
        self,
        tables: ShardTables,
        caches: list[tuple[torch.Tensor, torch.Tensor]],
        hq: int,
        block_size: int,
        scale: float,
    ) -> None:
        n = len(caches)
        k0 = caches[0][0]
        hkv, d = k0.shape[0], k0.shape[-1]
        self.tables = tables
        self.k = (ctypes.c_int64 * n)(*(k.data_ptr() for k, _ in caches))
        self.v = (ctypes.c_int64 * n)(*(v.data_ptr() for _, v in caches))
        self.strides = (ctypes.c_int64 * n)(*(k.stride(0) for k, _ in caches))
        chunk, threads = split_contexts(
            [c for c in tables.contexts if c], hkv, torch.get_num_threads()
        )
        self.call = struct("MAShardsCall")(
            num_shards=n,
            k=ctypes.addressof(self.k),
            v=ctypes.addressof(self.v),
            head_stride=ctypes.addressof(self.strides),
            block_stride=k0.stride(1),
            kv_bf16=int(k0.dtype == torch.bfloat16),
            req_start=tables.req_start.data_ptr(),
            group=tables.group.data_ptr(),
            q_first=tables.q_first.data_ptr(),
            block_table=tables.block_table.data_ptr(),
            block_start=tables.block_start.data_ptr(),
            context_lens=tables.context_lens.data_ptr(),
            num_groups=len(tables.group_rows),
            group_rows=tables.group_rows.data_ptr(),
            hq=hq,
            hkv=hkv,
            d=d,
            block_size=block_size,
            scale=scale,
            chunk_tokens=chunk,
            num_threads=threads,
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
    qf = q if q.dtype == torch.float32 and q.is_contiguous() else q.to(torch.float32).contiguous()
    out = torch.empty(t, hq, d, dtype=torch.float32)
    lse = torch.empty(t, hq, dtype=torch.float32)
    prepared = PreparedShards(tables, caches, hq, block_size, scale)
    call = prepared.call
    call.q, call.out, call.lse = qf.data_ptr(), out.data_ptr(), lse.data_ptr()
    status = native.lib.ma_shards_call(ctypes.addressof(call))
    check_status(status, d, caches[0][0].dtype)
    return out, lse
