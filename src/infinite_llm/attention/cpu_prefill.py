"""Causal self-attention of a CPU prefill step in one C call (``csrc/prefill_ma.c``).

The self part of a prefill step (each request's new tokens over themselves) is most of its
attention. torch's CPU flash kernel takes it one request at a time, after the KV heads are
repeated for their query groups: a fifth of a 512-token prompt's prefill on SmolLM2. This kernel runs every request at once, reads the new K, V where they lie in the
step's ``qkv`` tensor (any token stride), shares each key load among the ``G`` query heads of
its KV head and tiles scores and values as a GEMM does. ``causal_self_attention`` uses it for
float32 CPU tensors and the torch kernel otherwise.

Zen 4, 2 threads, SmolLM2's heads (Hq 9, Hkv 3, D 64), one layer, median ms
(``scripts/prefill_attention_speed.py``):

    requests x tokens   torch flash   this kernel
    4 x 128             2.10          0.86
    4 x 256             6.14          3.37
    4 x 512             25.4          10.9
    1 x 2048            50.0          38.6
    8 x 16              0.95          0.13

Through the engine, a 4 x 512-token prefill (30 layers): 0.68 s with torch's kernel, 0.35 s with
this one, of a 3.0-3.4 s forward.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from infinite_llm.native.build import NativeLibrary, load_once

_SOURCE = Path(__file__).parent / "csrc" / "prefill_ma.c"
MAX_HEAD_DIM = 256
_state: dict[str, NativeLibrary | None] = {}


def _declare(lib: ctypes.CDLL) -> None:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.prefill_self_attention.argtypes = [
        p, i64, p, i64, p, i64, p, i64, i32, i32, i32, ctypes.c_float, p, p, i32
    ]  # fmt: skip
    lib.prefill_self_attention.restype = ctypes.c_int


def native_library() -> NativeLibrary | None:
    """The compiled kernel, built on first use; None when it cannot be had (logged once)."""
    return load_once(_state, _SOURCE, _declare)


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
        or d % 16
        or d > MAX_HEAD_DIM
        or hkv == 0
        or hq % hkv
        or hq // hkv > 64
        or sum(query_lens) != t
        or not all(_token_rows(x) for x in (q, k, v))
    ):
        return None
    native = native_library()
    if native is None:
        return None
    starts = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(query_lens, dtype=torch.int64), 0, out=starts[1:])
    out = torch.empty(t, hq, d, dtype=torch.float32)
    lse = torch.empty(t, hq, dtype=torch.float32)
    status = native.lib.prefill_self_attention(
        q.data_ptr(),
        q.stride(0),
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        starts.data_ptr(),
        len(query_lens),
        hq,
        hkv,
        d,
        scale,
        out.data_ptr(),
        lse.data_ptr(),
        torch.get_num_threads(),
    )
    return (out, lse) if status == 0 else None
