"""The small C loops around a MicroAttention, in the same library as the decode kernel
(``csrc/decode_ma.c``, built and loaded by ``cpu_native``): the log-sum-exp merges of
DistAttention, a decode token's attention over itself, the store of new K,V into a pool, and
``bench attention``'s plain read of rBlocks. Each answers None or False (nothing done) where
the library or the tensors do not fit, and the caller uses torch.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from infinite_llm.attention.cpu_native import MAX_HEAD_DIM, native_library


def merge_states_native(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], in_place: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``merge.merge_attention_states`` of CPU states in one C call (out in float32); None where
    it does not apply. ``in_place``: the result goes into the first state's own tensors (which
    must be float32) instead of new ones. One call, not a fold of S - 1, and as few Python steps
    as the checks allow: after an MA has streamed its KV through the caches, each of them
    starts cold (two allocations were 48 of a cold merge's ~200 us)."""
    first, first_lse = outs[0], lses[0]
    shape, dtype = first.shape, first.dtype
    if (dtype != torch.float32 and dtype != torch.bfloat16) or len(shape) != 3:
        return None
    t, h, d = shape
    if d > MAX_HEAD_DIM or (in_place and dtype != torch.float32):
        return None
    lse_shape = (t, h)
    n = len(outs)
    pointers = (ctypes.c_int64 * (2 * n))()
    for s, (o, lse) in enumerate(zip(outs, lses, strict=True)):
        if not (
            o.is_cpu
            and o.dtype == dtype
            and o.shape == shape
            and o.is_contiguous()
            and lse.is_cpu
            and lse.dtype == torch.float32
            and lse.shape == lse_shape
            and lse.is_contiguous()
        ):
            return None
        pointers[s], pointers[n + s] = o.data_ptr(), lse.data_ptr()
    native = native_library()
    if native is None:
        return None
    if in_place:
        out, lse = first, first_lse
    else:
        out = torch.empty(shape, dtype=torch.float32)
        lse = torch.empty(lse_shape, dtype=torch.float32)
    native.lib.merge_states(
        pointers, n, t * h, d, int(dtype == torch.bfloat16), out.data_ptr(), lse.data_ptr()
    )
    return out, lse


def merge_into_native(
    out: torch.Tensor,
    lse: torch.Tensor,
    rows: torch.Tensor | None,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
) -> bool:
    """``merge.merge_into`` in one C loop; False (nothing done) where it does not apply."""
    if (
        out.dtype != torch.float32
        or lse.dtype != torch.float32
        or part_lse.dtype != torch.float32
        or part_out.dtype not in (torch.float32, torch.bfloat16)
        or out.device.type != "cpu"
        or part_out.device.type != "cpu"
        or not (
            out.is_contiguous()
            and lse.is_contiguous()
            and part_out.is_contiguous()
            and part_lse.is_contiguous()
        )
        or (rows is not None and (rows.dtype != torch.int64 or not rows.is_contiguous()))
    ):
        return False
    native = native_library()
    if native is None:
        return False
    n, h, d = part_out.shape
    native.lib.merge_into(
        out.data_ptr(),
        lse.data_ptr(),
        None if rows is None else rows.data_ptr(),
        n,
        h,
        d,
        part_out.data_ptr(),
        int(part_out.dtype == torch.bfloat16),
        part_lse.data_ptr(),
    )
    return True


def self_decode_native(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Decode self part (each token sees only itself) -> (out [T, Hq, D] float32, lse [T, Hq]);
    None where the native library or these tensors do not fit (the caller uses torch)."""
    native = native_library()
    if (
        native is None
        or not (q.dtype == k.dtype == v.dtype)
        or q.dtype not in (torch.float32, torch.bfloat16)
    ):
        return None
    t, hq, d = q.shape
    hkv = k.shape[1]
    for x in (q, k, v):
        if x.device.type != "cpu" or x.stride(-1) != 1 or x.stride(-2) != d:
            return None
    out = torch.empty(t, hq, d, dtype=torch.float32)
    lse = torch.empty(t, hq, dtype=torch.float32)
    native.lib.self_decode(
        q.data_ptr(),
        q.stride(0),
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        int(q.dtype == torch.bfloat16),
        t,
        hq,
        hkv,
        d,
        scale,
        out.data_ptr(),
        lse.data_ptr(),
    )
    return out, lse


def kv_write_native(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> bool:
    """Store k, v [n, Hkv, D] in one layer's slots (``KVPool.write``) with one C loop; False
    (nothing done) where the tensors do not fit it."""
    native = native_library()
    d = k_cache.shape[-1]
    if (
        native is None
        or k_cache.device.type != "cpu"
        or not (k.dtype == v.dtype == k_cache.dtype == v_cache.dtype)
        or k.device.type != "cpu"
        or v.device.type != "cpu"
        or slots.dtype != torch.int64
        or not slots.is_contiguous()
        or not (k_cache.is_contiguous() and v_cache.is_contiguous())
        or any(x.stride(-1) != 1 or x.stride(-2) != d for x in (k, v))
    ):
        return False
    status = native.lib.kv_write(
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.stride(0),
        slots.data_ptr(),
        slots.numel(),
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        k_cache.shape[0],
        d,
        k_cache.element_size(),
    )
    if status != 0:
        raise IndexError(
            f"a KV slot is outside the pool's {k_cache.shape[1] * k_cache.shape[2]} slots"
        )
    return True


def kv_read_native(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor
) -> int | None:
    """Read every rBlock ``block_ids`` (int32) names, K and V of every KV head, as a decode MA
    walks them but without its arithmetic (``bench attention``'s access-pattern ceiling);
    a checksum, or None where the native library or these tensors do not fit."""
    native = native_library()
    if (
        native is None
        or k_cache.device.type != "cpu"
        or block_ids.dtype != torch.int32
        or not block_ids.is_contiguous()
        or k_cache.stride() != v_cache.stride()
        or k_cache.shape != v_cache.shape
        or not k_cache[0, 0].is_contiguous()
    ):
        return None
    hkv, _, block_size, d = k_cache.shape
    block_bytes = block_size * d * k_cache.element_size()
    if block_bytes % 32:
        return None
    esz = k_cache.element_size()
    return native.lib.kv_read(
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.stride(0) * esz,
        k_cache.stride(1) * esz,
        hkv,
        block_ids.data_ptr(),
        block_ids.numel(),
        block_bytes,
        torch.get_num_threads(),
    )
