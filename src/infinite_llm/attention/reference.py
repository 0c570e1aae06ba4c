"""Plain torch MicroAttention: the readable definition every fast kernel is tested against."""

from __future__ import annotations

import torch

from infinite_llm.attention.batch import MABatch


def micro_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: MABatch,
    scale: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D]; caches: [Hkv, num_blocks, block_size, D] -> (out [T, Hq, D], lse [T, Hq] float32).

    Computed in float32. A request with no visible key gets out = 0, lse = -inf.
    """
    t, hq, d = q.shape
    hkv = k_cache.shape[0]
    group = hq // hkv
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for i in range(batch.num_requests):
        r0, r1 = batch.query_start[i], batch.query_start[i + 1]
        ctx = batch.context_lens[i]
        if r0 == r1 or ctx == 0:
            continue
        qi = q[r0:r1].float()  # [L, Hq, D]
        k = batch.gather_kv(k_cache, i).float().repeat_interleave(group, dim=0)  # [Hq, S, D]
        v = batch.gather_kv(v_cache, i).float().repeat_interleave(group, dim=0)
        scores = torch.einsum("lhd,hsd->hls", qi, k) * scale  # [Hq, L, S]
        if causal:
            assert batch.q_start_pos is not None and batch.kv_start_pos is not None
            q_pos = batch.q_start_pos[i] + torch.arange(r1 - r0, device=q.device)
            k_pos = batch.kv_start_pos[i] + torch.arange(ctx, device=q.device)
            scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [Hq, L]
        visible = ~torch.isinf(row_lse)
        probs = torch.where(
            visible[..., None],
            torch.exp(scores - row_lse.nan_to_num(0.0, neginf=0.0)[..., None]),
            0.0,
        )
        out[r0:r1] = torch.einsum("hls,hsd->lhd", probs, v)
        lse[r0:r1] = row_lse.transpose(0, 1)
    return out.to(q.dtype), lse
