"""Attention of CPU prefill chunks in one C call per layer (``csrc/prefill_ma.c``): their causal
self part (``causal_self_attention_native``) and their context in a pool's rBlocks
(``micro_attention_prefill_native``).

The self part of a prefill step (each request's new tokens over themselves) is most of its
attention. torch's CPU flash kernel takes it one request at a time, after the KV heads are
repeated for their query groups: a fifth of a 512-token prompt's prefill on SmolLM2. This kernel runs every request at once, reads the new K, V where they lie in the
step's ``qkv`` tensor (any token stride), shares each key load among the ``G`` query heads of
its KV head and tiles scores and values as a GEMM does. ``causal_self_attention`` uses it for
float32 CPU tensors and the torch kernel otherwise. The same kernel reads a chunk's context
through a pool's block table (a prefill continued over its earlier chunks, a prompt after a
prefix-cache hit), every request at once, where torch's kernel needs one call per request and
a gather of scattered rBlocks; ``micro.micro_attention`` uses it for float32 query chunks.

Zen 4, 2 threads, SmolLM2's heads (Hq 9, Hkv 3, D 64), one layer, median ms
(``scripts/prefill_attention_speed.py``, block size 16):

    self part, requests x tokens      torch flash   this kernel
    4 x 128                           2.45          0.99
    4 x 256                           6.15          3.04
    4 x 512                           25.1          11.0
    1 x 2048                          48.4          40.3
    8 x 16                            0.91          0.14
    context, requests x tokens over
    4 x 64 over 2000, shuffled        12.7          12.6
    4 x 64 over 2000, one run         12.4          11.1
    1 x 16 over 2032, shuffled        1.20          0.89
    4 x 128 over 256, shuffled        3.24          2.62

Through the engine, a 4 x 512-token prefill (30 layers): 0.68 s of self part with torch's
kernel, 0.35 s with this one, of a 3.0-3.4 s forward.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import torch

from infinite_llm.attention.batch import MABatch
from infinite_llm.native.build import NativeLibrary, load_once

_SOURCE = Path(__file__).parent / "csrc" / "prefill_ma.c"
MAX_HEAD_DIM = 256
MAX_GROUP = 64  # query heads per KV head (the kernel's MAX_ROWS)
_state: dict[str, NativeLibrary | None] = {}


def _declare(lib: ctypes.CDLL) -> None:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.prefill_self_attention.argtypes = [
        p, i64, p, i64, p, i64, p, i64, i32, i32, i32, ctypes.c_float, p, p, i32
    ]  # fmt: skip
    lib.prefill_self_attention.restype = ctypes.c_int
    lib.prefill_paged_attention.argtypes = [
        p, p, p, p, i64, i64, i64, p, p, p, p, i64, i32, i32, i32, ctypes.c_float, p, p, i32
    ]  # fmt: skip
    lib.prefill_paged_attention.restype = ctypes.c_int


def native_library() -> NativeLibrary | None:
    """The compiled kernel, built on first use; None when it cannot be had (logged once)."""
    return load_once(_state, _SOURCE, _declare)


def _heads_fit(hq: int, hkv: int, d: int) -> bool:
    """The kernel's head shapes: whole 16-float tiles of D, whole query groups."""
    return (
        d % 16 == 0 and d <= MAX_HEAD_DIM and hkv > 0 and hq % hkv == 0 and hq // hkv <= MAX_GROUP
    )


def _token_rows(x: torch.Tensor) -> bool:
    """[T, H, D] with contiguous heads inside a token (any token stride): the kernel's layout."""
    _, h, d = x.shape
    return x.stride(2) == 1 and (h == 1 or x.stride(1) == d)


def causal_self_attention_native(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_lens: list[int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``cpu_flash.causal_self_attention`` for float32 CPU tensors in one call: (out [T, Hq, D],
    lse [T, Hq]) in float32; None (nothing done) where the kernel or the shapes do not fit.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; rows grouped per request, ``query_lens`` tokens each."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    if (
        not query_lens
        or any(x.dtype != torch.float32 or not x.is_cpu for x in (q, k, v))
        or not _heads_fit(hq, hkv, d)
        or sum(query_lens) != t
        or not all(_token_rows(x) for x in (q, k, v))
    ):
        return None
    native = native_library()
    if native is None:
        return None
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(query_lens, dtype=torch.int64), 0, out=starts[1:])
    args = (q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0))
    args += (starts.data_ptr(), len(query_lens))
    return _call(native.lib.prefill_self_attention, args, t, hq, hkv, d, scale)


def micro_attention_prefill_native(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: MABatch,
    scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``micro_attention_reference``'s contract for float32 CPU query chunks over one pool layer
    ([Hkv, num_blocks, block_size, D]) in one call: (out [T, Hq, D], lse [T, Hq]) in float32;
    None (nothing done) where the kernel or the tensors do not fit."""
    t, hq, d = q.shape
    hkv = k_cache.shape[0]
    if (
        batch.num_requests == 0
        or t != batch.num_query_rows
        or q.dtype != torch.float32
        or k_cache.dtype != torch.float32
        or v_cache.dtype != torch.float32
        or not (q.is_cpu and k_cache.is_cpu and v_cache.is_cpu)
        or not q.is_contiguous()
        or k_cache.stride() != v_cache.stride()
        or k_cache.stride(3) != 1
        or k_cache.stride(2) != d
        or not _heads_fit(hq, hkv, d)
    ):
        return None
    if causal and (batch.q_start_pos is None or batch.kv_start_pos is None):
        raise ValueError("causal prefill attention needs the batch's q_start_pos and kv_start_pos")
    native = native_library()
    if native is None:
        return None
    tables = batch.flat_tables()
    offsets = None
    if causal:
        offsets = batch.memo(
            "prefill-offsets",
            lambda: torch.tensor(
                [a - b for a, b in zip(batch.q_start_pos, batch.kv_start_pos)],  # type: ignore[arg-type]
                dtype=torch.int64,
            ),
        )
    args = (q.data_ptr(), tables.query_start.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr())
    args += (k_cache.stride(0), k_cache.stride(1), batch.block_size)
    args += (tables.block_table.data_ptr(), tables.block_start.data_ptr())
    args += (tables.context_lens.data_ptr(), None if offsets is None else offsets.data_ptr())
    args += (batch.num_requests,)
    return _call(native.lib.prefill_paged_attention, args, t, hq, hkv, d, scale)


def _call(
    fn: Callable[..., int], args: tuple, t: int, hq: int, hkv: int, d: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``fn(*args, hq, hkv, d, scale, out, lse, threads)`` into new (out [t, hq, d], lse
    [t, hq]) float32; None where the kernel declined (status -1)."""
    out = torch.empty(t, hq, d, dtype=torch.float32)
    lse = torch.empty(t, hq, dtype=torch.float32)
    status = fn(*args, hq, hkv, d, scale, out.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    return (out, lse) if status == 0 else None
