"""Exact log-sum-exp merge of partial attention states (the aggregation step of DistAttention).

    lse = log(sum_j exp(lse_j));   out = sum_j exp(lse_j - lse) * out_j

computed relative to m = max_j lse_j (w_j = exp(lse_j - m), the largest exactly 1;
out = sum_j w_j out_j / sum_j w_j; lse = m + log(sum_j w_j)), so only differences of lse enter
the exponentials: exact where lse values are huge (1e4 and beyond) as where they are small.
Order-free; a shard with lse = -inf (no keys) contributes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from infinite_llm.attention.native_ops import merge_into_native, merge_states_native


def merge_attention_states(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """outs: each [T, H, D]; lses: each [T, H] float32 -> (out [T, H, D], lse [T, H] float32)."""
    if len(outs) != len(lses) or not outs:
        raise ValueError("need one lse per partial output, and at least one of each")
    if len(outs) == 1:
        return outs[0], lses[0]
    first = outs[0]
    if first.device.type == "cpu":  # one C call for all the states; a dozen small ops otherwise
        merged = merge_states_native(outs, lses)
        if merged is not None:
            out, lse = merged
            return (out if first.dtype == torch.float32 else out.to(first.dtype)), lse
    lse_stack = torch.stack([lse.float() for lse in lses])  # [S, T, H]
    top = _finite(lse_stack.amax(0))
    weights = torch.exp(lse_stack - top)  # [S, T, H]: the largest is exactly 1
    total = weights.sum(0)
    out = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
    for w, o in zip(weights, outs):
        out.add_(o.float() * w.unsqueeze(-1))
    out.div_(_nonzero(total).unsqueeze(-1))
    return out.to(outs[0].dtype), top + torch.log(total)


def merge_attention_states_(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_attention_states`` into the first state's own tensors (``outs[0]``, ``lses[0]``,
    returned): for partial states the caller owns and drops after the merge (the MAs' results),
    it saves the two allocations of a new state, which after the MAs have streamed their KV
    through the caches cost more than the merge's arithmetic."""
    if len(outs) != len(lses) or not outs:
        raise ValueError("need one lse per partial output, and at least one of each")
    first, first_lse = outs[0], lses[0]
    if len(outs) == 1:
        return first, first_lse
    if first.device.type == "cpu":
        merged = merge_states_native(outs, lses, in_place=True)
        if merged is not None:
            return merged
    out, lse = merge_attention_states(outs, lses)
    first.copy_(out)
    first_lse.copy_(lse)
    return first, first_lse


def merge_into(
    out: torch.Tensor,
    lse: torch.Tensor,
    rows: torch.Tensor | None,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
) -> None:
    """In place: merge a partial state for ``rows`` (or all rows) into the running (out, lse).

    out: [T, H, D]; lse: [T, H] float32; part_out/part_lse cover ``rows`` only.
    """
    if merge_into_native(out, lse, rows, part_out, part_lse):  # float32 state on CPU: one C loop
        return
    cur_out = out if rows is None else out.index_select(0, rows)
    cur_lse = lse if rows is None else lse.index_select(0, rows)
    top = _finite(torch.maximum(cur_lse, part_lse))
    w_cur, w_part = torch.exp(cur_lse - top), torch.exp(part_lse - top)
    total = w_cur + w_part
    merged = (
        cur_out.float() * w_cur.unsqueeze(-1) + part_out.float() * w_part.unsqueeze(-1)
    ) / _nonzero(total).unsqueeze(-1)
    new_lse = top + torch.log(total)
    if rows is None:
        out.copy_(merged)
        lse.copy_(new_lse)
    else:
        out.index_copy_(0, rows, merged.to(out.dtype))
        lse.index_copy_(0, rows, new_lse)


def _finite(top: torch.Tensor) -> torch.Tensor:
    # Rows where every state is empty (-inf): any finite reference gives weights exp(-inf) = 0.
    return torch.where(torch.isinf(top), torch.zeros_like(top), top)


def _nonzero(total: torch.Tensor) -> torch.Tensor:
    # Empty rows: the weighted sum is 0 and stays 0.
    return torch.where(total == 0, torch.ones_like(total), total)
