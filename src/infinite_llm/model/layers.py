"""Building blocks of the decoder: RMSNorm and rotary position embeddings, as transformers computes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from infinite_llm.model import native_decoder, native_norm
from infinite_llm.model.config import ModelArchConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, then cast back (the same arithmetic as transformers).

    float32 rows on CPU go through one C call (``native_norm``), torch elsewhere."""

    def __init__(
        self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            out = native_norm.rms_norm(x, self.weight, self.eps) if x.is_cpu else None
            # One fused kernel; bitwise equal to the formula below in float32.
            return (
                out if out is not None else F.rms_norm(x, self.weight.shape, self.weight, self.eps)
            )
        input_dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(input_dtype)

    def add_forward(
        self, residual: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, its norm). On CPU in float32, one C call that adds in place:
        ``residual`` must be the caller's own (a decoder layer's running hidden state)."""
        if residual.is_cpu and residual.dtype == torch.float32:
            out = native_norm.add_rms_norm(residual, delta, self.weight, self.eps)
            if out is not None:
                return residual, out
        residual = residual + delta
        return residual, self(residual)


def _rope_inv_freq(arch: ModelArchConfig) -> tuple[torch.Tensor, float]:
    if arch.rope_type == "default":
        dim = arch.head_dim
        inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    if arch.rope_type == "dynamic":
        raise ValueError(
            "dynamic NTK RoPE scaling is not supported (its frequencies depend on the batch)"
        )
    # Scaled variants (linear, llama3, yarn, longrope): transformers' own implementation.
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fields = arch.to_hf_dict()
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[arch.rope_type](hf_config)
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of one step, shared by every layer."""

    def __init__(self, arch: ModelArchConfig, device: torch.device) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inv_freq(arch)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> (cos, signed sin): [T, 1, head_dim], broadcast over heads.

        The sine comes with the rotate-half sign folded in (first half negated), for ``apply_rotary``.
        """
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        half = sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos.to(dtype).unsqueeze(1), signed_sin.to(dtype).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotate-half convention (HF layout, not interleaved).

    HF: x*cos + cat(-x2, x1)*sin. Here cat(x2, x1) is a roll and the sign sits in ``signed_sin``:
    the same products, so the same bits. float32 on CPU: one C loop that rotates ``x`` in place
    and returns it (the same arithmetic, no fused multiply-add); a new tensor otherwise.
    """
    if native_decoder.rope_(x, cos, signed_sin):
        return x
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim (one C loop for float32 CPU
    rows; torch elsewhere)."""
    out = native_decoder.silu_mul(gate_up) if gate_up.dim() == 2 else None
    if out is not None:
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def can_prepack(weight: torch.Tensor) -> bool:
    """oneDNN pre-packed linears: CPU, float32 (bfloat16 packing needs AVX-512 or AVX-NE-CONVERT)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    """``F.linear`` with the weight reordered once into oneDNN's blocked layout (what
    ``torch.compile`` does for CPU linears). The plain layout is re-blocked on every call; at
    this model's decode shapes the packed GEMM is 1.5-3x faster. Same math, other summation
    order: results agree with ``F.linear`` to float32 rounding."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_nbytes = weight.numel() * weight.element_size()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            weight.detach(), None
        )  # opaque mkldnn tensor
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def dense_weight(self) -> torch.Tensor:
        """The weight back in its plain layout, bit for bit (identity rows times it are exact)."""
        eye = torch.eye(self.in_features, dtype=torch.float32)
        return (
            torch.ops.mkldnn._linear_pointwise(eye, self.packed, None, "none", [], "")
            .t()
            .contiguous()
        )
