"""Native CPU MicroAttention for decode (few query tokens per request), all requests in one call.

The C kernel (``csrc/decode_ma.c``) reads K and V straight from the pool through the block
table (no gather, no copy), float32 or bfloat16, GQA by treating the ``G`` query heads of a KV
head as rows that share every key load, and runs (request, kv head, split-K chunk) items on
OpenMP threads, merging split-K partials by log-sum-exp inside the kernel. The same library
has the small loops around an MA (merges, a decode token's attention over itself, the KV
store); their wrappers are in ``native_ops``.

Why not torch's flash kernel for decode: it is called once per request (tens of microseconds
each) and streams a single query row at a fraction of the memory bandwidth. For long prefill
chunks it is a GEMM and wins; ``micro.py`` picks between the two.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import torch

from infinite_llm.attention.batch import MABatch
from infinite_llm.native.build import NativeLibrary, load_once
from infinite_llm.native.structs import c_struct

_SOURCE = Path(__file__).parent / "csrc" / "decode_ma.c"
TILE = 16  # keys per tile in the kernel: chunk lengths are multiples of it
MIN_CHUNK_TOKENS = 512  # shorter split-K chunks cost more in merging than they gain in balance
ITEMS_PER_THREAD = 4  # split-K until every thread has about this many items
SERIAL_WORK = (
    1024  # key-rows x kv heads below which one thread beats waking the others (measured: a 4-way
)
# split of 4 x 1,024-token decodes, 3,072 per shard, ran 1.30x the local step at 4096, 1.14x at 1024)
MAX_HEAD_DIM = 256

_state: dict[str, NativeLibrary | None] = {}


def native_library() -> NativeLibrary | None:
    """The compiled kernels, built on first use; None when they cannot be had (logged once)."""
    return load_once(_state, _SOURCE, _declare)


# The argument structs of ``csrc/ma_call.h``, built from the library's own declaration
# (``native.structs``) when it loads: name -> ctypes.Structure.
STRUCTS: dict[str, type[ctypes.Structure]] = {}


def struct(name: str) -> type[ctypes.Structure]:
    """``MADecodeCall``, ``MAShardsCall`` or ``StepAttention`` (the library must be loaded)."""
    return STRUCTS[name]


def _declare(lib: ctypes.CDLL) -> None:
    """C signatures (pointers travel as integers from ``Tensor.data_ptr()``)."""
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    for name in ("MADecodeCall", "MAShardsCall", "StepAttention"):
        STRUCTS[name] = c_struct(lib, name)
    lib.ma_decode_call.argtypes = [ctypes.POINTER(STRUCTS["MADecodeCall"])]
    lib.ma_decode_call.restype = ctypes.c_int
    lib.ma_shards_call.argtypes = [ctypes.c_void_p]  # the address of an MAShardsCall
    lib.ma_shards_call.restype = ctypes.c_int
    lib.step_attend.argtypes = [p, i64, p, p, p, p]  # called from C (the decoder), tests only here
    lib.step_attend.restype = ctypes.c_int
    lib.merge_into.argtypes = [p, p, p, i64, i32, i32, p, i32, p]
    lib.merge_into.restype = None
    addresses = ctypes.POINTER(i64)
    lib.merge_states.argtypes = [addresses, i32, i64, i32, i32, p, p]
    lib.merge_states.restype = None
    lib.self_decode.argtypes = [p, i64, p, i64, p, i64, i32, i64, i32, i32, i32, f32, p, p]
    lib.kv_write.argtypes = [p, p, i64, p, i64, p, i64, p, i64, i32, i32, i32]
    lib.kv_write.restype = ctypes.c_int
    lib.kv_read.argtypes = [p, p, i64, i64, i32, p, i64, i64, i32]
    lib.kv_read.restype = ctypes.c_int64
    lib.self_decode.restype = None


def native_available() -> bool:
    return native_library() is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the kernel handles these tensors (else callers use another impl)."""
    hkv, _, _, d = k_cache.shape
    hq = q.shape[1]
    return (
        q.device.type == "cpu"
        and k_cache.device.type == "cpu"
        and k_cache.dtype in (torch.float32, torch.bfloat16)
        and v_cache.dtype == k_cache.dtype
        and k_cache.stride() == v_cache.stride()
        and k_cache.stride(-1) == 1
        and k_cache.stride(-2) == d
        and d % (8 if k_cache.dtype == torch.float32 else 16) == 0  # whole vectors (bf16: pairs)
        and d <= MAX_HEAD_DIM
        and hq % hkv == 0
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def _split(batch: MABatch, hkv: int, num_threads: int) -> tuple[int, int]:
    """(chunk_tokens, threads): split-K only when (request, head) pairs cannot feed the threads."""
    return split_contexts(
        [c for c, n in zip(batch.context_lens, batch.query_lens) if c and n], hkv, num_threads
    )


def split_contexts(ctxs: list[int], hkv: int, num_threads: int) -> tuple[int, int]:
    if not ctxs:
        return TILE, 1
    longest = max(ctxs)
    work = sum(ctxs) * hkv
    if num_threads <= 1 or work < SERIAL_WORK:
        return longest, 1
    pairs = len(ctxs) * hkv
    want = ITEMS_PER_THREAD * num_threads
    if pairs >= want:
        return longest, num_threads
    per_pair = -(-want // pairs)
    while (pairs * per_pair) % num_threads:  # equal items, a whole number per thread: 3 pairs on
        per_pair += 1  # 2 threads as 12 items, not 9 (5 + 4: the second thread idles a ninth)
    chunk = max(MIN_CHUNK_TOKENS, -(-longest // per_pair))
    return -(-chunk // TILE) * TILE, num_threads


def _row_limits(batch: MABatch, num_rows: int) -> torch.Tensor:
    """Causal: per query row, how many of its request's keys in this shard it may see."""
    assert batch.q_start_pos is not None and batch.kv_start_pos is not None
    limits = torch.empty(num_rows, dtype=torch.int64)
    for i in range(batch.num_requests):
        r0, r1 = batch.query_start[i], batch.query_start[i + 1]
        first = batch.q_start_pos[i] - batch.kv_start_pos[i] + 1  # row r sees keys j < first + r
        limits[r0:r1] = (torch.arange(r1 - r0) + first).clamp_(0, batch.context_lens[i])
    return limits


class Prepared:
    """A decode MA call over one batch, prepared once and reused by every layer of the step:
    the argument struct with tables, shapes and split filled in (the caller sets the five
    pointers that change), and the tensors it points into, kept alive with it."""

    __slots__ = ("call", "keep", "run")

    def __init__(
        self, call: ctypes.Structure, keep: tuple, run: Callable[[ctypes.Structure], int]
    ) -> None:
        self.call, self.keep, self.run = call, keep, run


def _prepare(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: MABatch,
    scale: float,
    causal: bool,
    num_threads: int,
) -> Prepared | None:
    """The call for this batch and these tensors' geometry; None where the kernel cannot run it."""
    native = native_library()
    if native is None or not supports(q, k_cache, v_cache):
        return None
    t, hq, d = q.shape
    hkv = k_cache.shape[0]
    if t != batch.num_query_rows:
        raise ValueError(f"q has {t} rows, the batch {batch.num_query_rows}")
    tables = batch.flat_tables()
    limits = _row_limits(batch, t) if causal else None
    chunk, threads = batch.memo(
        ("split", hkv, num_threads), lambda: _split(batch, hkv, num_threads)
    )
    call = STRUCTS["MADecodeCall"](
        head_stride=k_cache.stride(0),
        block_stride=k_cache.stride(1),
        kv_bf16=int(k_cache.dtype == torch.bfloat16),
        num_requests=batch.num_requests,
        query_start=tables.query_start.data_ptr(),
        block_table=tables.block_table.data_ptr(),
        block_start=tables.block_start.data_ptr(),
        context_lens=tables.context_lens.data_ptr(),
        row_limit=0 if limits is None else limits.data_ptr(),
        hq=hq,
        hkv=hkv,
        d=d,
        block_size=batch.block_size,
        scale=scale,
        chunk_tokens=chunk,
        num_threads=threads,
    )
    return Prepared(call, (tables, limits), native.lib.ma_decode_call)


def prepare_decode_call(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: MABatch, scale: float
) -> Prepared | None:
    """A (non-causal) decode MA call over ``batch`` for a caller that fills the per-layer
    pointers itself (``step_attention``); q only lends its shape and dtype. None where the
    kernel cannot run it."""
    return _prepare(q, k_cache, v_cache, batch, scale, False, torch.get_num_threads())


def micro_attention_native(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: MABatch,
    scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``micro_attention_reference``; raises RuntimeError when unavailable."""
    result = try_micro_attention_native(q, k_cache, v_cache, batch, scale, causal)
    if result is None:
        raise RuntimeError("native decode attention is not available for these tensors")
    return result


def try_micro_attention_native(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: MABatch,
    scale: float,
    causal: bool = False,
    store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``micro_attention_native``, or None (nothing done) where the kernel cannot run it.

    ``store``: (slots [n] int64, k, v [n, Hkv, D]) new tokens to write into the caches first,
    in the same C call (None, with nothing written, where they do not fit it).

    Every layer of a step calls this with the same batch and tensors of the same geometry: the
    checks and the argument struct are made once per batch (``MABatch.memo``), and a call
    converts one ctypes argument. Its fixed cost matters as much as its bandwidth: between two
    layers the weights stream through the caches, so every Python object and C function the
    call touches is fetched from memory again (measured: after a 128 MiB read, a 16-token MA
    whose call makes its checks and passes 21 ctypes arguments takes 150 us, 40 us of it in C).
    """
    threads = torch.get_num_threads()
    key = (
        "native-call",
        q.shape,
        q.dtype,
        k_cache.shape,
        k_cache.stride(),
        v_cache.stride(),
        k_cache.dtype,
        v_cache.dtype,
        k_cache.is_cpu,
        scale,
        causal,
        threads,
    )
    prepared = batch.memo(key, lambda: _prepare(q, k_cache, v_cache, batch, scale, causal, threads))
    if prepared is None:
        return None
    call = prepared.call
    t, hq, d = q.shape
    qf = q if q.dtype == torch.float32 and q.is_contiguous() else q.to(torch.float32).contiguous()
    out = torch.empty(t, hq, d, dtype=torch.float32)
    lse = torch.empty(t, hq, dtype=torch.float32)
    call.q, call.k, call.v = qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr()
    call.out, call.lse = out.data_ptr(), lse.data_ptr()
    if store is None:
        call.write_n = 0
    elif not _set_store(call, k_cache, store):
        return None
    status = prepared.run(call)
    if status:
        check_status(status, d, k_cache.dtype)
    return (out if q.dtype == torch.float32 else out.to(q.dtype)), lse


def _set_store(
    call: ctypes.Structure,
    k_cache: torch.Tensor,
    store: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> bool:
    """The store's fields of ``call``; False where these tensors do not fit ``kv_write``."""
    slots, k, v = store
    d, dtype = call.d, k_cache.dtype
    if not (
        slots.dtype == torch.int64
        and slots.is_contiguous()
        and k.dtype == dtype
        and v.dtype == dtype
        and k.is_cpu
        and v.is_cpu
        and k.shape[0] == v.shape[0] == slots.shape[0]
        and k.shape[1] == v.shape[1] == call.hkv
        and k.stride(2) == 1
        and k.stride(1) == d
        and v.stride(2) == 1
        and v.stride(1) == d
    ):
        return False
    call.write_slots, call.write_n = slots.data_ptr(), slots.shape[0]
    call.write_k, call.write_k_row = k.data_ptr(), k.stride(0)
    call.write_v, call.write_v_row = v.data_ptr(), v.stride(0)
    return True


def check_status(status: int, head_dim: int, dtype: torch.dtype) -> None:
    """The kernels' return codes as exceptions."""
    if status == -3:
        raise IndexError("a KV slot is outside the pool")
    if status == -1:
        raise MemoryError("native decode attention could not allocate its scratch memory")
    if status != 0:
        raise ValueError(f"native decode attention cannot do head_dim={head_dim} with {dtype}")
