"""``NativeLinear``: float32 CPU linears through the panel-packed C kernel (``csrc/linear.c``).

The weight is repacked once, at load, into panels of 16 output columns (k-major inside a
panel) and the plain copy dropped, so memory stays at one copy. The kernel streams a panel per
16 outputs: at batch 1 the weights at close to the machine's read bandwidth, at larger batches
6 x 16 register tiles. Faster than oneDNN's pre-packed linear (``PackedLinear``, the fallback
where no C compiler is found) at every batch size measured; numbers in the C file.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import nn

from infinite_llm.native.build import NativeLibrary, load_once

_SOURCE = Path(__file__).parent / "csrc" / "linear.c"
PANEL = 16  # output columns per panel (NR in the C file)
_state: dict[str, NativeLibrary | None] = {}


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.linear_f32.argtypes = [p, i64, i64, i64, p, p, i64, p, i64, ctypes.c_int]
    lib.linear_f32.restype = None


def native_library() -> NativeLibrary | None:
    return load_once(_state, _SOURCE, _declare)


def supports(weight: torch.Tensor) -> bool:
    """Whether this weight can be a ``NativeLinear`` (builds the kernel on first call)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and native_library() is not None
    )


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """[n, k] -> [ceil(n / 16), k, 16]: panel p holds output columns 16p..16p+15, k-major.

    Copied straight into the result (no padded or transposed intermediate): loading keeps at
    most one extra copy of one matrix, the LM head's 113 MB on SmolLM2, not three."""
    n, k = weight.shape
    full, rest = divmod(n, PANEL)
    out = torch.empty(full + (rest > 0), k, PANEL, dtype=torch.float32)
    if full:
        out[:full].copy_(weight[: full * PANEL].view(full, PANEL, k).transpose(1, 2))
    if rest:
        out[full].zero_()
        out[full, :, :rest].copy_(weight[full * PANEL :].t())
    return out


class NativeLinear(nn.Module):
    """``F.linear`` for float32 CPU inputs of any batch, the weight held in panels."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        native = native_library()
        if native is None or not supports(weight):
            raise RuntimeError("the native linear kernel is not available for this weight")
        self.out_features, self.in_features = weight.shape
        self.weight_nbytes = weight.numel() * weight.element_size()
        self.panels = pack_panels(weight.detach())
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self._run = native.lib.linear_f32
        self._panels_ptr = self.panels.data_ptr()
        self._bias_ptr = None if self.bias is None else self.bias.data_ptr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            lead = x.shape[:-1]
            return self(x.reshape(-1, x.shape[-1])).view(*lead, self.out_features)
        if x.dtype != torch.float32 or x.stride(-1) != 1 or not x.is_cpu:
            x = x.to(device="cpu", dtype=torch.float32).contiguous()
        if x.shape[1] != self.in_features:
            raise ValueError(f"linear expects {self.in_features} input features, got {x.shape[1]}")
        m, n = x.shape[0], self.out_features
        y = torch.empty(m, n, dtype=torch.float32)
        if m:
            self._run(
                x.data_ptr(),
                m,
                self.in_features,
                x.stride(0),
                self._panels_ptr,
                self._bias_ptr,
                n,
                y.data_ptr(),
                n,
                torch.get_num_threads(),
            )
        return y

    def dense_weight(self) -> torch.Tensor:
        """The weight back in its plain [n, k] layout, bit for bit."""
        return (
            self.panels.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features].clone()
        )


class PanelEmbedding(nn.Module):
    """The token embedding of a model whose LM head is tied to it, read from the head's panels
    (row v of the table is column v % 16 of panel v // 16), so the [vocab, hidden] table is held
    once: 113 MB less resident for SmolLM2. A lookup gathers a strided column per token (the
    same floats, bit for bit); ``weight`` rebuilds the plain table on demand (a copy)."""

    def __init__(self, head: NativeLinear) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self._head = [head]  # not a submodule: the head is the model's own, counted there

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        panels = self._head[0].panels
        ids = input_ids.reshape(-1).to(device=panels.device, dtype=torch.long)
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.num_embeddings:
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        rows = panels[ids // PANEL, :, ids % PANEL]  # [T, hidden], a new tensor
        return rows.view(*input_ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        return self._head[0].dense_weight()
