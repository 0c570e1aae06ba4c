"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) that knows nothing about where its KV lives.

Each attention layer computes q, k, v and hands them to an ``AttentionBackend`` supplied by the
caller for this step; the backend writes k, v into rBlocks and runs (Dist)Attention.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from infinite_llm.model import native_linear
from infinite_llm.model.config import ModelArchConfig
from infinite_llm.model.layers import (
    PackedLinear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    can_prepack,
    silu_mul,
)
from infinite_llm.model.native_decoder import NativeDecoder
from infinite_llm.model.native_linear import NativeLinear, PanelEmbedding

PACKED_LINEARS = (NativeLinear, PackedLinear)


class NativeAttention(Protocol):
    """A step's attention as a C hook, for a whole-step native decoder: ``address`` of a
    function called once a layer with ``context`` (``AttendFn`` in ``model/csrc/decoder.c``);
    ``finished(num_layers)`` once the step ran; ``error``, after a nonzero status, why."""

    address: int
    context: int

    @property
    def error(self) -> BaseException | None: ...

    def finished(self, num_layers: int) -> None: ...


class AttentionBackend(Protocol):
    """Attention for one step: stores the new K, V and attends over the whole context. The
    model knows nothing of where that context lives."""

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] -> [T, num_heads, head_dim]."""
        ...

    def native_step(self, num_heads: int, head_dim: int) -> NativeAttention | None:
        """This step's attention as a C hook for every layer (float32 decode rows the backend
        runs natively), or None: the model then runs layer by layer and calls the backend."""
        ...


class DecoderLayer(nn.Module):
    def __init__(
        self, arch: ModelArchConfig, layer_idx: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        h, d = arch.hidden_size, arch.head_dim
        self.q_size = arch.num_heads * d
        self.kv_size = arch.num_kv_heads * d
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, d
        kw = {"dtype": dtype, "device": device}
        self.input_layernorm = RMSNorm(h, arch.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(h, arch.rms_norm_eps, **kw)
        # q, k, v fused in one GEMM; gate and up fused in another.
        # Weights come from a checkpoint: skip_init avoids a random initialisation we'd overwrite.
        self.qkv_proj = skip_init(
            nn.Linear, h, self.q_size + 2 * self.kv_size, bias=arch.attention_bias, **kw
        )
        self.o_proj = skip_init(nn.Linear, self.q_size, h, bias=False, **kw)
        self.gate_up_proj = skip_init(nn.Linear, h, 2 * arch.intermediate_size, bias=False, **kw)
        self.down_proj = skip_init(nn.Linear, arch.intermediate_size, h, bias=False, **kw)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden], the previous layer's MLP output still to be added to ``residual``
        (the running hidden state), or the embeddings when ``residual`` is None. Returns this
        layer's MLP output and the residual, which it updates in place: each add is fused
        with the norm after it (``RMSNorm.add_forward``), as vLLM does."""
        t = x.shape[0]
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            residual, h = self.input_layernorm.add_forward(residual, x)
        qkv = self.qkv_proj(h)
        # q and k heads rotate together: one set of kernels for both.
        qk = qkv[:, : self.q_size + self.kv_size].view(
            t, self.num_heads + self.num_kv_heads, self.head_dim
        )
        qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        o = attn(self.layer_idx, q, k, v)  # [T, num_heads, head_dim]
        residual, h = self.post_attention_layernorm.add_forward(
            residual, self.o_proj(o.reshape(t, self.q_size))
        )
        return self.down_proj(silu_mul(self.gate_up_proj(h))), residual


class LlamaForCausalLM(nn.Module):
    """Decoder over a flat batch of tokens from many requests (no padding)."""

    def __init__(self, arch: ModelArchConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.arch = arch
        self.dtype = dtype
        self.device = device
        kw = {"dtype": dtype, "device": device}
        self.embed_tokens = skip_init(nn.Embedding, arch.vocab_size, arch.hidden_size, **kw)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, i, dtype, device) for i in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, **kw)
        self.rotary = RotaryEmbedding(arch, device)
        if arch.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(
                torch.empty(arch.vocab_size, arch.hidden_size, **kw), requires_grad=False
            )
        self.lm_head: NativeLinear | PackedLinear | None = None  # set by prepack()
        # Decode steps in one C call where the weights and the step allow (set by prepack()).
        self.native_decoder: NativeDecoder | None = None
        self.requires_grad_(False)

    def prepack(self) -> bool:
        """Replace every linear (and the LM head) by a packed one when the weights allow it
        (CPU, float32): ``NativeLinear`` (the C kernel) where it builds, else oneDNN's
        ``PackedLinear``. Call once, after ``load_weights``. Returns whether it packed."""
        if self.lm_head is not None:
            return False
        if native_linear.supports(self.lm_head_weight):
            packed: type[NativeLinear] | type[PackedLinear] = NativeLinear
        elif can_prepack(self.lm_head_weight):
            packed = PackedLinear
        else:
            return False
        for layer in self.layers:
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                linear = getattr(layer, name)
                setattr(layer, name, packed(linear.weight, linear.bias))
        self.lm_head = packed(self.lm_head_weight, None)
        self.native_decoder = NativeDecoder.build(self)
        if self.arch.tie_word_embeddings and isinstance(self.lm_head, NativeLinear):
            self.embed_tokens = PanelEmbedding(self.lm_head)  # one copy of the shared table
        del self.lm_head_weight  # the packed copy replaces it
        return True

    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: every linear and norm and the LM head, once
        (the embedding is only gathered, a row per token)."""
        embedding = (
            self.embed_tokens.weight if isinstance(self.embed_tokens, nn.Embedding) else None
        )
        n = sum(p.numel() * p.element_size() for p in self.parameters() if p is not embedding)
        n += sum(m.weight_nbytes for m in self.modules() if isinstance(m, PACKED_LINEARS))
        if self.lm_head is None and self.arch.tie_word_embeddings:
            n += self.lm_head_weight.numel() * self.lm_head_weight.element_size()
        return n

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]."""
        cos, sin = self.rotary(positions, self.dtype)
        x, residual = self.embed_tokens(input_ids), None  # the embedding output is ours to update
        if self.native_decoder is not None:
            hidden = self.native_decoder(x, cos, sin, attn)
            if hidden is not None:
                return hidden
        for layer in self.layers:
            x, residual = layer(x, cos, sin, attn, residual)
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm.add_forward(residual, x)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in float32."""
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.lm_head_weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors named as in Hugging Face checkpoints (``model.layers.0.self_attn.q_proj.weight``)."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        loaded: set[str] = set()
        params = dict(self.named_parameters(remove_duplicate=False))
        fused = {
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name.startswith("lm_head."):
                if self.arch.tie_word_embeddings:
                    continue
                name = "lm_head_weight"
            name = name.replace(".self_attn.", ".").replace(".mlp.", ".")
            if "rotary_emb" in name:
                continue
            parts = name.split(".")
            if len(parts) >= 3 and parts[-2] in fused:
                target, index = fused[parts[-2]]
                key = ".".join([*parts[:-2], target, parts[-1]])
                pending.setdefault(key, {})[str(index)] = tensor
                num_parts = 3 if target == "qkv_proj" else 2
                if len(pending[key]) == num_parts:
                    parts_by_index = pending.pop(key)
                    pieces = [parts_by_index[str(i)] for i in range(num_parts)]
                    self._copy(params, key, torch.cat(pieces, dim=0))
                    loaded.add(key)
                continue
            self._copy(params, name, tensor)
            loaded.add(name)
        missing = sorted(
            set(params) - loaded - ({"lm_head_weight"} if self.arch.tie_word_embeddings else set())
        )
        if pending or missing:
            raise ValueError(f"checkpoint is incomplete: missing {sorted(pending) + missing}")

    @staticmethod
    def _copy(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> None:
        if name not in params:
            raise ValueError(f"unexpected tensor in checkpoint: {name}")
        param = params[name]
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(
                f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
            )
        param.data.copy_(tensor)
