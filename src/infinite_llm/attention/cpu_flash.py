"""Fast CPU MicroAttention on PyTorch's fused flash kernel, which returns the log-sum-exp.

Grouped-query attention without copying KV per head: the ``G`` query heads sharing one KV
head are laid out as ``G`` query rows of that head (valid whenever no causal mask is needed).
"""

from __future__ import annotations

import functools

import torch

from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.cpu_prefill import causal_self_attention_native
from infinite_llm.attention.native_ops import self_decode_native

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def micro_attention_flash(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: MABatch,
    scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``micro_attention_reference``; CPU tensors only."""
    t, hq, d = q.shape
    hkv = k_cache.shape[0]
    group = hq // hkv
    out = torch.zeros(t, hq, d, dtype=q.dtype)
    lse = torch.full((t, hq), float("-inf"), dtype=torch.float32)
    for i in range(batch.num_requests):
        r0, r1 = batch.query_start[i], batch.query_start[i + 1]
        if r0 == r1 or batch.context_lens[i] == 0:  # the kernel faults on zero keys
            continue
        n = r1 - r0
        k = batch.gather_kv(k_cache, i)  # [Hkv, S, D]
        v = batch.gather_kv(v_cache, i)
        if causal:
            o, part_lse = _causal(q[r0:r1], k, v, batch, i, group, scale)
        else:
            # rows (l, g) of KV head h: [1, Hkv, L*G, D]
            qi = q[r0:r1].view(n, hkv, group, d).permute(1, 0, 2, 3).reshape(1, hkv, n * group, d)
            o4, lse3 = _flash(qi, k.unsqueeze(0), v.unsqueeze(0), 0.0, False, scale=scale)
            o = o4[0].view(hkv, n, group, d).permute(1, 0, 2, 3).reshape(n, hq, d)
            part_lse = lse3[0].view(hkv, n, group).permute(1, 0, 2).reshape(n, hq)
        out[r0:r1] = o
        lse[r0:r1] = part_lse
    return out, lse


def _causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: MABatch,
    i: int,
    group: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    assert batch.q_start_pos is not None and batch.kv_start_pos is not None
    n, s = q.shape[0], k.shape[1]
    q_pos = batch.q_start_pos[i] + torch.arange(n)
    k_pos = batch.kv_start_pos[i] + torch.arange(s)
    visible = k_pos[None, :] <= q_pos[:, None]  # [L, S]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
    kh = k.repeat_interleave(group, dim=0).unsqueeze(0)
    vh = v.repeat_interleave(group, dim=0).unsqueeze(0)
    mask = torch.zeros(n, s, dtype=q.dtype).masked_fill(~visible, float("-inf"))
    o4, lse3 = _flash(qh, kh, vh, 0.0, False, attn_mask=mask[None, None], scale=scale)
    o, lse = o4[0].transpose(0, 1), lse3[0].transpose(0, 1)
    hidden = ~visible.any(dim=1)  # query rows that see no key in this shard
    if bool(hidden.any()):
        o = o.masked_fill(hidden[:, None, None], 0.0)
        lse = lse.masked_fill(hidden[:, None], float("-inf"))
    return o, lse


@functools.cache
def triton_on_cuda() -> bool:
    """The Triton kernels can run on this machine's CUDA device (decided once per process)."""
    # imported here, not at the top: importing triton is slow and fixes TRITON_INTERPRET
    from infinite_llm.attention.triton_paged import triton_available

    return torch.cuda.is_available() and triton_available()


def causal_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_lens: list[int],
    scale: float,
    out_dtype: torch.dtype | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each request's new tokens over themselves (causal): the step's own shard.

    q: [T, Hq, D]; k, v: [T, Hkv, D], rows grouped per request -> (out [T, Hq, D], lse [T, Hq]).
    ``out`` is in ``out_dtype`` (default: q's). A decode token (length 1) sees only itself:
    out = v, lse = q.k * scale, computed without any attention kernel.
    ``impl``: the MA impl in use. ``"triton"`` runs ``causal_self_attention_triton`` (CUDA, or
    CPU under Triton's interpreter); ``"auto"`` does so for CUDA tensors where triton is
    installed; on CPU, float32 prefill chunks go to the native kernel (``cpu_prefill``) under
    ``"auto"`` and ``"native"``; otherwise the torch paths below (CPU: the fused flash kernel).
    """
    if impl == "triton" or (impl == "auto" and q.device.type == "cuda" and triton_on_cuda()):
        from infinite_llm.attention.triton_paged import causal_self_attention_triton

        return causal_self_attention_triton(q, k, v, query_lens, scale, out_dtype)
    t, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    out_dtype = out_dtype or q.dtype
    if all(n == 1 for n in query_lens):  # a pure decode batch
        fused = self_decode_native(q, k, v, scale) if q.device.type == "cpu" else None
        if fused is not None:
            return fused[0].to(out_dtype), fused[1]
        # products in float32, as the native kernel and the MAs form scores (bfloat16 products
        # lost up to 2e-2 of lse at D=16: hypothesis found it)
        qf, kf = q.reshape(t, hkv, group, d).float(), k.unsqueeze(2).float()
        lse = (qf * kf).sum(-1).view(t, hq) * scale
        out = torch.empty(t, hkv, group, d, dtype=out_dtype, device=q.device)
        out.copy_(v.unsqueeze(2))  # a fresh buffer (merged into in place), never a view of v
        return out.view(t, hq, d), lse
    if impl in ("auto", "native") and q.device.type == "cpu":
        native = causal_self_attention_native(q, k, v, query_lens, scale)
        if native is not None:  # every request in one call (float32)
            return native[0].to(out_dtype), native[1]
    out = torch.empty(t, hq, d, dtype=out_dtype, device=q.device)
    lse = torch.empty(t, hq, dtype=torch.float32, device=q.device)
    start = 0
    for n in query_lens:
        end = start + n
        qh = q[start:end].transpose(0, 1).unsqueeze(0)
        kh = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
        vh = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
        if q.device.type == "cpu":
            o4, l3 = _flash(qh, kh, vh, 0.0, True, scale=scale)
            out[start:end] = o4[0].transpose(0, 1)
            lse[start:end] = l3[0].transpose(0, 1)
        else:
            scores = (qh[0].float() @ kh[0].float().transpose(-1, -2)) * scale  # [Hq, L, L]
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            row_lse = torch.logsumexp(scores, -1)
            out[start:end] = (
                (torch.exp(scores - row_lse[..., None]) @ vh[0].float()).transpose(0, 1).to(q.dtype)
            )
            lse[start:end] = row_lse.transpose(0, 1)
        start = end
    return out, lse
