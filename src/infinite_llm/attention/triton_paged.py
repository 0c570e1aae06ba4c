"""MicroAttention in Triton: one kernel launch per MA call over a pool's paged rBlocks (the CUDA path).

``paged_attention`` has ``micro_attention_reference``'s contract; ``causal_self_attention_triton``
has ``cpu_flash.causal_self_attention``'s. Both run the same kernel, modelled on vLLM's/SGLang's
Triton paged decode and unified attention kernels:

* Grid (query tiles, kv heads). A tile is up to ``BLOCK_Q`` query rows of one request times the
  ``G`` query heads sharing one kv head, laid out as ``BLOCK_M = BLOCK_Q * G`` (padded) rows of
  one matrix, so each key/value token is loaded once for the whole group (GQA) and the scores are
  a tensor-core ``tl.dot``. Decode rows and prefill chunks of one batch share the launch; which
  request a tile belongs to comes from a small tile table built on the host once per batch
  (``MABatch.memo``), copied to the device with the block table in one transfer.
* The kernel walks the request's keys ``BLOCK_N`` tokens at a time; each token's slot is looked up
  through the block table (``block_table[token // block_size]``), so any block size, shuffled
  blocks and a partly filled last block need no special case. Online softmax (running max and sum,
  base-2 exponentials), then ``out = acc / sum`` and ``lse = max + log(sum)`` written once.
* Exactness first: scores and the softmax accumulate in float32. bfloat16/float16 q and k multiply
  exactly in a float32-accumulating ``tl.dot``; float32 operands use ``input_precision="ieee"``
  (never TF32). The probabilities are split into a high and a low half in the value dtype for the
  two tensor-core ``p @ v`` products, which keeps ~16 bits of each probability instead of the 8 a
  single bfloat16 cast keeps (FlashAttention's choice).
* Rows that see no key (an empty context, or a causal row before the shard's first key) get
  out 0, lse -inf, with no NaN on the way: the running max is replaced by 0 while it is -inf.
* No split-K: a decode step with few requests and long contexts fills fewer programs than the GPU
  has SMs. A split over the context with an lse merge is the next step if that matters.

On CPU tensors the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is first imported); that is how the tests check it on machines without a GPU.
"""

from __future__ import annotations

import functools
import itertools
import os

import torch

from infinite_llm.attention.batch import MABatch

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; triton_available() says False
    triton = None
    tl = None


def interpreter_on() -> bool:
    """TRITON_INTERPRET is set: triton runs kernels in Python on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The kernel below is compiled for the interpreter when the variable is set as this module loads.
_INTERPRETED = interpreter_on()

# Query rows x heads per program: small for decode rows (one query token), larger for chunks.
DECODE_BLOCK_M = 16
PREFILL_BLOCK_M = 64
BLOCK_N = 64  # key tokens per iteration
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """Triton is installed and can run here: a CUDA device, or its CPU interpreter switched on."""
    return triton is not None and (torch.cuda.is_available() or interpreter_on())


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: MABatch,
    scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D]; caches: [Hkv, num_blocks, block_size, D] -> (out [T, Hq, D] in q's dtype,
    lse [T, Hq] float32): ``micro_attention_reference``'s contract, every request in one launch."""
    _check_runnable(q)
    t, hq, d = q.shape
    hkv, _, block_size, dk = k_cache.shape
    if t != batch.num_query_rows or hq % hkv or dk != d or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"q {tuple(q.shape)}, caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit "
            f"a batch of {batch.num_query_rows} query rows"
        )
    if block_size != batch.block_size:
        raise ValueError(f"pool block size {block_size} != batch block size {batch.block_size}")
    if causal and (batch.q_start_pos is None or batch.kv_start_pos is None):
        raise ValueError("causal attention needs the batch's q_start_pos and kv_start_pos")
    tables = batch.memo(
        ("triton-paged", q.device, hq // hkv, causal),
        lambda: _paged_tables(batch, hq // hkv, causal, q.device),
    )
    return _launch(q, k_cache, v_cache, tables, scale, causal, paged=True)


def causal_self_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_lens: list[int],
    scale: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each request's new tokens over themselves, one launch for the batch.

    q: [T, Hq, D]; k, v: [T, Hkv, D], rows grouped per request in ``query_lens`` order ->
    (out [T, Hq, D] in ``out_dtype`` (default q's), lse [T, Hq] float32).
    """
    _check_runnable(q)
    t, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != t or k.shape[2] != d or hq % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k, v {tuple(k.shape)} do not fit")
    tables = _self_tables(tuple(query_lens), hq // k.shape[1], q.device)
    if tables.num_rows != t:
        raise ValueError(f"query_lens add up to {tables.num_rows}, q has {t} rows")
    # k, v as a "cache" of one block per token row: [Hkv, T, 1, D] views, no copy.
    k4, v4 = k.transpose(0, 1).unsqueeze(2), v.transpose(0, 1).unsqueeze(2)
    return _launch(q, k4, v4, tables, scale, True, paged=False, out_dtype=out_dtype)


def _check_runnable(q: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("attention impl 'triton' needs the triton package (pip install triton)")
    if q.device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError(
            "attention impl 'triton' runs on CPU tensors only under Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton and this module are imported (slow; meant for "
            "tests), or use a CUDA device"
        )


def _tile_shape(max_query_len: int, group: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q): rows of one program and the query tokens they cover (BLOCK_M >= 16,
    tl.dot's minimum; a power of two)."""
    block_m = DECODE_BLOCK_M if max_query_len * group <= DECODE_BLOCK_M else PREFILL_BLOCK_M
    block_m = max(block_m, triton.next_power_of_2(group))
    return block_m, block_m // group


@functools.lru_cache(maxsize=16)
def _self_tables(query_lens: tuple[int, ...], group: int, device: torch.device) -> _Tables:
    """The tile tables of a self-attention batch; cached because the caller calls once per layer
    with the same lengths (the key hashes a tuple, no device work)."""
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return _Tables.build(starts, query_lens, [], [], [], group, device)


def _paged_tables(batch: MABatch, group: int, causal: bool, device: torch.device) -> _Tables:
    flat = batch.flat_tables()
    shift: list[int] = []
    if causal:  # key j is visible to request row r when j <= q_start_pos - kv_start_pos + r
        assert batch.q_start_pos is not None and batch.kv_start_pos is not None
        shift = [a - b for a, b in zip(batch.q_start_pos, batch.kv_start_pos)]
    return _Tables.build(
        batch.query_start,
        batch.context_lens,
        flat.block_start.tolist(),
        flat.block_table.tolist(),
        shift,
        group,
        device,
    )


class _Tables:
    """The int32 index tensors the kernel reads, one device allocation (one host-to-device copy).

    query_start [n+1], context_lens [n], block_start [n+1], block_table [blocks], shift [n] (causal
    paged only), tile_req [tiles] (the request of each tile), tile_row [tiles] (its first q row).
    """

    def __init__(
        self, data: torch.Tensor, sizes: list[int], num_rows: int, block_m: int, block_q: int
    ) -> None:
        self.data = data
        self.block_m, self.block_q = block_m, block_q  # the tile shape (see _tile_shape)
        self.num_rows = num_rows  # query rows in the batch
        views = list(torch.split(data, sizes))
        # An empty table still needs a valid pointer: point it at the start of ``data``.
        views = [t if t.numel() else data[:1] for t in views]
        (
            self.query_start,
            self.context_lens,
            self.block_start,
            self.block_table,
            self.shift,
            self.tile_req,
            self.tile_row,
        ) = views
        self.num_tiles = sizes[-1]

    @classmethod
    def build(
        cls,
        query_start: list[int],
        context_lens: list[int] | tuple[int, ...],
        block_start: list[int],
        block_table: list[int],
        shift: list[int],
        group: int,
        device: torch.device,
    ) -> _Tables:
        rows = list(itertools.pairwise(query_start))
        block_m, block_q = _tile_shape(max((end - start for start, end in rows), default=0), group)
        tile_req: list[int] = []
        tile_row: list[int] = []
        for i, (start, end) in enumerate(rows):
            for row in range(start, end, block_q):
                tile_req.append(i)
                tile_row.append(row)
        parts = [
            query_start,
            list(context_lens),
            block_start,
            block_table,
            shift,
            tile_req,
            tile_row,
        ]
        flat = [x for part in parts for x in part] or [0]
        if max(flat) >= 2**31 or min(flat) < -(2**31):
            raise ValueError("batch tables exceed int32")
        data = torch.tensor(flat, dtype=torch.int32).to(device)
        return cls(data, [len(p) for p in parts], query_start[-1], block_m, block_q)


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: _Tables,
    scale: float,
    causal: bool,
    paged: bool,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    t, hq, d = q.shape
    hkv = k_cache.shape[0]
    out = torch.empty(t, hq, d, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(t, hq, dtype=torch.float32, device=q.device)
    if tables.num_tiles == 0 or t == 0:
        return out, lse
    low = _LOW_PRECISION
    if q.device.type == "cpu":
        # Triton's interpreter multiplies bfloat16 dot operands as their raw uint16 bits
        # (triton-lang/triton#11584, unsupported upstream): bfloat16 takes the float32 dots there
        # (the same exact products); the float16 tests cover the half-precision dot path.
        low = (torch.float16,)
    low_qk = q.dtype == k_cache.dtype and k_cache.dtype in low
    low_pv = v_cache.dtype in low
    grid = (tables.num_tiles, hkv)
    _attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        lse,
        tables.query_start,
        tables.context_lens,
        tables.block_start,
        tables.block_table,
        tables.shift,
        tables.tile_req,
        tables.tile_row,
        scale * 1.4426950408889634,  # log2(e): exp2 in the loop
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *out.stride(),
        *lse.stride(),
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        GROUP=hq // hkv,
        BLOCK_M=tables.block_m,
        BLOCK_Q=tables.block_q,
        BLOCK_N=BLOCK_N,
        PAGE=k_cache.shape[2],
        PAGED=paged,
        CAUSAL=causal,
        LOW_QK=low_qk,
        LOW_PV=low_pv,
        enable_fp_fusion=True,  # fused multiply-adds: one rounding instead of two
    )
    return out, lse


def _unavailable(*args: object, **kwargs: object) -> None:
    raise RuntimeError("triton is not installed")


def _jit(fn):  # the kernel is only compiled where triton exists
    return triton.jit(fn) if triton is not None else _unavailable


@_jit
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    query_start_ptr,
    context_lens_ptr,
    block_start_ptr,
    block_table_ptr,
    shift_ptr,
    tile_req_ptr,
    tile_row_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kh,
    stride_kb,
    stride_ks,
    stride_kd,
    stride_vh,
    stride_vb,
    stride_vs,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_lt,
    stride_lh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,  # tokens per cache block (1 for the self-attention "cache" of rows)
    PAGED: tl.constexpr,  # keys through the block table; else the request's own rows of k, v
    CAUSAL: tl.constexpr,
    LOW_QK: tl.constexpr,  # q and k both bfloat16/float16: exact products on tensor cores
    LOW_PV: tl.constexpr,  # v bfloat16/float16: p split in two halves of v's dtype
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.load(tile_req_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    q_first = tl.load(query_start_ptr + req)
    q_end = tl.load(query_start_ptr + req + 1)
    if PAGED:
        ctx = tl.load(context_lens_ptr + req)
        blocks = tl.load(block_start_ptr + req)
    else:
        ctx = q_end - q_first
        blocks = q_first  # token rows as blocks of one
    shift = 0
    if CAUSAL and PAGED:
        shift = tl.load(shift_ptr + req)

    # Row m of the tile: query token row0 + m // GROUP, head kv_head * GROUP + m % GROUP.
    offs_m = tl.arange(0, BLOCK_M)
    tok = row0 + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (tok < q_end)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_off = tok.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(
        q_ptr + q_off + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if not LOW_QK:
        q = q.to(tl.float32)

    kv_end = ctx
    limit = tok  # placeholder shape; set below when causal
    if CAUSAL:
        # key j visible to a row when j <= shift + (its row within the request)
        limit = shift + tok - q_first
        last = tl.minimum(row0 + BLOCK_Q, q_end) - 1
        kv_end = tl.maximum(tl.minimum(ctx, shift + last - q_first + 1), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        if PAGED:
            block = tl.load(block_table_ptr + blocks + offs_n // PAGE, mask=n_ok, other=0)
        else:
            block = blocks + offs_n
        slot = block.to(tl.int64) * stride_kb + (offs_n % PAGE) * stride_ks
        kv_ok = n_ok[None, :] & d_ok[:, None]
        k = tl.load(
            k_ptr + kv_head * stride_kh + slot[None, :] + offs_d[:, None] * stride_kd,
            mask=kv_ok,
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k) if LOW_QK else tl.dot(q, k.to(tl.float32), input_precision="ieee")
        s = s * qk_scale
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= limit[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v_slot = block.to(tl.int64) * stride_vb + (offs_n % PAGE) * stride_vs
        v = tl.load(
            v_ptr + kv_head * stride_vh + v_slot[:, None] + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if LOW_PV:
            p_hi = p.to(v.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
            acc = tl.dot(p_hi, v, acc)
            acc = tl.dot(p_lo, v, acc)
        else:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(
        seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, -float("inf")
    )
    o_off = tok.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(
        out_ptr + o_off + offs_d[None, :] * stride_od, out, mask=row_ok[:, None] & d_ok[None, :]
    )
    tl.store(lse_ptr + tok.to(tl.int64) * stride_lt + head * stride_lh, lse, mask=row_ok)
