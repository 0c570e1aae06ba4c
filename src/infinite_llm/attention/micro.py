"""``micro_attention``: one MA over rBlocks of one pool, dispatched to the best kernel for the device.

Kernels (all return (out, lse float32) and are tested against the reference):

* ``reference``: plain torch, float32 math; any device.
* ``flash``: torch's fused CPU flash kernel, one call per request; a GEMM for long query chunks.
* ``native``: the C decode kernel (``cpu_native``), every request in one multithreaded call;
  falls back to ``flash`` (with a log line) where it cannot be built or used.
* ``triton``: the Triton paged kernel (``triton_paged``), every request in one launch; CUDA
  tensors, or CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, for tests).
* ``auto``: on CPU, requests with at most ``NATIVE_MAX_QUERY_LEN`` query tokens (decode rows)
  go to ``native`` and longer prefill chunks to the native prefill kernel (``cpu_prefill``,
  float32; ``flash`` otherwise), a mixed batch split between the two; ``flash`` alone when the
  native decode kernel is unavailable. On CUDA, ``triton`` where triton is
  installed, else ``reference`` (with a warning, once).
"""

from __future__ import annotations

import logging

import torch

from infinite_llm.attention import cpu_native
from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.cpu_flash import micro_attention_flash, triton_on_cuda
from infinite_llm.attention.cpu_prefill import micro_attention_prefill_native
from infinite_llm.attention.kv_pool import write_layer
from infinite_llm.attention.reference import micro_attention_reference

logger = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "flash", "native", "triton")
# Per request: up to this many query tokens "auto" uses the native kernel. Its cost grows with the
# rows (G per token) while flash turns into a GEMM. Measured (1 thread, Hq=9 Hkv=3 D=64, shuffled
# rBlocks): 4K context, 4 tokens native 1.0 ms vs flash 1.5 ms, 8 tokens even, 16 flash ahead;
# 32K context, native ahead up to 16 tokens (flash must gather scattered blocks first).
NATIVE_MAX_QUERY_LEN = 8

_warned: set[str] = set()


def micro_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: MABatch,
    scale: float | None = None,
    causal: bool = False,
    impl: str = "auto",
    store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over the rBlocks named in ``batch``; returns (out [T, Hq, D], lse [T, Hq] f32).

    q: [T, Hq, D]; k_cache, v_cache: one layer of a pool, [Hkv, num_blocks, block_size, D].
    ``impl``: one of ``IMPLS`` (see the module docstring).
    ``store``: (slots [n] int64, k, v [n, Hkv, D]) new tokens written into the caches before
    the MA reads them (DistAttention's order); a decode batch on the native kernel does both in
    one call.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose from {', '.join(IMPLS)}")
    on_cpu = q.device.type == "cpu"
    if store is not None:
        if on_cpu and (
            impl == "native"
            or (impl == "auto" and batch.split_by_query_len(NATIVE_MAX_QUERY_LEN)[1] is None)
        ):
            result = cpu_native.try_micro_attention_native(
                q, k_cache, v_cache, batch, scale, causal, store
            )
            if result is not None:
                return result
        write_layer(k_cache, v_cache, *store)
    if impl == "auto":
        if on_cpu:
            result = _auto_cpu(q, k_cache, v_cache, batch, scale, causal)
            if result is not None:
                return result
            impl = "flash"
        else:
            impl = _auto_device(q.device.type)
    if impl == "triton":
        from infinite_llm.attention.triton_paged import paged_attention

        return paged_attention(q, k_cache, v_cache, batch, scale, causal)
    if impl == "native":
        if on_cpu:
            result = cpu_native.try_micro_attention_native(
                q, k_cache, v_cache, batch, scale, causal
            )
            if result is not None:
                return result
        impl = "flash" if on_cpu else "reference"
        _warn_once(
            f"native attention unavailable for {q.device.type} {k_cache.dtype} D={q.shape[-1]}; using {impl}"
        )
    if impl == "flash":
        return micro_attention_flash(q, k_cache, v_cache, batch, scale, causal)
    return micro_attention_reference(q, k_cache, v_cache, batch, scale, causal)


def native_usable(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """The native kernel is built (building it on first call) and handles these tensors."""
    return cpu_native.supports(q, k_cache, v_cache) and cpu_native.native_available()


def _auto_device(device_type: str) -> str:
    """``auto`` off CPU: the Triton kernel on CUDA where triton is installed, else the torch
    reference."""
    if device_type == "cuda" and triton_on_cuda():
        return "triton"
    _warn_once(f"triton unavailable; attention on {device_type} uses the slow torch reference")
    return "reference"


def _auto_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: MABatch,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Decode rows by the native decode kernel, longer query chunks by the native prefill kernel
    (float32) or flash; None where the native decode kernel cannot run (the caller uses flash
    for everything)."""
    few, many = batch.split_by_query_len(NATIVE_MAX_QUERY_LEN)
    if many is None:  # the usual decode step: one call, checks made once per batch
        return cpu_native.try_micro_attention_native(q, k_cache, v_cache, batch, scale, causal)
    if few is None:
        return prefill_chunks(q, k_cache, v_cache, batch, scale, causal)
    if not native_usable(q, k_cache, v_cache):
        return micro_attention_flash(q, k_cache, v_cache, batch, scale, causal)
    t, hq, d = q.shape
    out = torch.empty(t, hq, d, dtype=q.dtype)
    lse = torch.empty(t, hq, dtype=torch.float32)
    parts = ((few, cpu_native.micro_attention_native), (many, prefill_chunks))
    for part, kernel in parts:
        part_out, part_lse = kernel(
            q.index_select(0, part.rows), k_cache, v_cache, part.batch, scale, causal
        )
        out.index_copy_(0, part.rows, part_out)
        lse.index_copy_(0, part.rows, part_lse)
    return out, lse


def prefill_chunks(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: MABatch,
    scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query chunks over a CPU pool: every request in one native call where the tensors are
    float32 (``cpu_prefill``), else torch's flash kernel request by request."""
    native = micro_attention_prefill_native(q, k_cache, v_cache, batch, scale, causal)
    if native is not None:
        return native[0].to(q.dtype), native[1]
    return micro_attention_flash(q, k_cache, v_cache, batch, scale, causal)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
