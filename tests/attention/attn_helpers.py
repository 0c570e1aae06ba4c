"""Helpers for the attention tests: random KV placed in pools, and the monolithic truth.

The truth is ``torch.nn.functional.scaled_dot_product_attention`` in float64 over each
request's whole contiguous K, V (plus an explicit float64 log-sum-exp, which SDPA does not
return). Kernels under test read the same values from paged pools.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infinite_llm.attention import cpu_native
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.kvcache.block import BlockRef

# Heads (Hq, Hkv): MHA, GQA (SmolLM2-135M's 9/3 and 8/2), MQA.
HEAD_LAYOUTS = [(4, 4), (9, 3), (8, 2), (4, 1)]
# 16/32/64/128 take the native kernel's specialised paths, 24 and 80 its generic one.
HEAD_DIMS = [16, 24, 64, 80, 128]
# bfloat16: inputs are rounded to bf16 first (the truth sees the same rounded values); what is left
# is the kernels' own rounding, chiefly of the outputs (8-bit mantissa: half an ulp is 2**-9 relative),
# once per partial output and once when merged: |err| <= BF16_ULPS * 2**-8 * max(1, |out|max).
BF16_ULPS = 2
F32_ATOL = 1e-5


def impls() -> list[str]:
    """Every MA kernel this machine can run ("native" only where it builds)."""
    out = ["reference", "flash", "auto"]
    if cpu_native.native_available():
        out.append("native")
    return out


def sdpa_truth(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos0: int | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [L, Hq, D], k, v [S, Hkv, D] -> (out [L, Hq, D], lse [L, Hq]) in float64.

    ``q_pos0`` None: every query sees every key; else query row r sits at position q_pos0 + r and
    sees keys 0..q_pos0 + r (causal). Rows that see no key: out 0, lse -inf.
    """
    n, hq, _ = q.shape
    s = k.shape[0]
    group = hq // k.shape[1]
    qh = q.double().transpose(0, 1)  # [Hq, L, D]
    kh = k.double().transpose(0, 1).repeat_interleave(group, 0)  # [Hq, S, D]
    vh = v.double().transpose(0, 1).repeat_interleave(group, 0)
    if q_pos0 is None:
        visible = torch.ones(n, s, dtype=torch.bool)
    else:
        visible = torch.arange(s)[None, :] <= (q_pos0 + torch.arange(n))[:, None]
    scores = (qh @ kh.transpose(1, 2)) * scale
    lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1).transpose(0, 1)
    rows = visible.any(1)
    out = torch.zeros(n, hq, q.shape[2], dtype=torch.float64)
    if bool(rows.any()):
        o = F.scaled_dot_product_attention(
            qh[:, rows], kh, vh, attn_mask=visible[rows], scale=scale
        )
        out[rows] = o.transpose(0, 1)
    return out, lse


def assert_close(
    out: torch.Tensor,
    lse: torch.Tensor | None,
    ref_out: torch.Tensor,
    ref_lse: torch.Tensor | None,
    dtype: torch.dtype,
) -> None:
    """Max abs error within the dtype's bound; -inf lse exactly where the truth has it."""
    scale = max(1.0, ref_out.abs().max().item()) if ref_out.numel() else 1.0
    atol = F32_ATOL if dtype == torch.float32 else BF16_ULPS * 2**-8 * scale
    assert not torch.isnan(out).any()
    err = (out.double() - ref_out).abs().max().item() if out.numel() else 0.0
    assert err <= atol, f"max abs error {err:.3g} > {atol:g}"
    if lse is None or ref_lse is None:
        return
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "empty rows differ"
    finite = ~torch.isinf(ref_lse)
    if bool(finite.any()):
        lse_err = (lse.double()[finite] - ref_lse[finite]).abs().max().item()
        assert lse_err <= (1e-4 if dtype == torch.float32 else 2e-2), f"lse error {lse_err:.3g}"


@dataclass
class Placement:
    """Pools holding every request's tokens in randomly placed rBlocks."""

    pools: dict[int, KVPool]
    refs: list[list[BlockRef]]  # per request, logical block order
    block_size: int


def place(
    rng: random.Random,
    num_pools: int,
    num_blocks_per_request: list[int],
    block_size: int,
    hkv: int,
    d: int,
    dtype: torch.dtype,
    num_layers: int = 1,
) -> Placement:
    """Every logical block of every request goes to a random pool, at a random free block id."""
    owners = [[rng.randrange(num_pools) for _ in range(n)] for n in num_blocks_per_request]
    need = [sum(o.count(p) for o in owners) for p in range(num_pools)]
    free = {p: rng.sample(range(need[p] + 3), need[p] + 3) for p in range(num_pools)}
    pools = {
        p: KVPool(num_layers, hkv, d, need[p] + 3, block_size, dtype) for p in range(num_pools)
    }
    refs = [[BlockRef(p, free[p].pop()) for p in owner] for owner in owners]
    return Placement(pools, refs, block_size)


def _slots(placement: Placement, i: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(owning pool, slot in it) of request ``i``'s tokens start..start+n."""
    bs = placement.block_size
    pos = torch.arange(start, start + n)
    refs = placement.refs[i]
    owner = torch.tensor([r.instance_id for r in refs], dtype=torch.long)[pos // bs]
    slot = torch.tensor([r.block_id for r in refs], dtype=torch.long)[pos // bs] * bs + pos % bs
    return owner, slot


def write_tokens(
    placement: Placement, layer: int, i: int, start: int, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store request ``i``'s tokens start..start+len(k) (k, v [n, Hkv, D]) in their rBlocks."""
    owner, slot = _slots(placement, i, start, k.shape[0])
    for p in owner.unique().tolist():
        rows = (owner == p).nonzero().squeeze(1)
        placement.pools[p].write(layer, slot[rows], k[rows], v[rows])


def read_tokens(
    placement: Placement, layer: int, i: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Request ``i``'s first ``n`` tokens back from their rBlocks -> k, v [n, Hkv, D] float32."""
    owner, slot = _slots(placement, i, 0, n)
    pool0 = next(iter(placement.pools.values()))
    k = torch.empty(n, pool0.num_kv_heads, pool0.head_dim)
    v = torch.empty_like(k)
    for p in owner.unique().tolist():
        rows = (owner == p).nonzero().squeeze(1)
        pool = placement.pools[p]
        flat_k = pool.k[layer].view(pool.num_kv_heads, -1, pool.head_dim)
        flat_v = pool.v[layer].view(pool.num_kv_heads, -1, pool.head_dim)
        k[rows] = flat_k[:, slot[rows]].transpose(0, 1).float()
        v[rows] = flat_v[:, slot[rows]].transpose(0, 1).float()
    return k, v


def randn(
    gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, std: float = 1.0
) -> torch.Tensor:
    """Random values already representable in ``dtype`` (float32 storage)."""
    return (torch.randn(*shape, generator=gen) * std).to(dtype).float()
