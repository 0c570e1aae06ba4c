"""``NativeDecoder``: a whole decode step of the model in one C call (``csrc/decoder.c``).

Where it runs: float32 on CPU, every linear a ``NativeLinear``, and an attention backend whose
``native_step`` gives this step's attention as a C hook (``llama.NativeAttention``:
DistAttention gives one when every row of the step is a decode token it can run natively).
The decoder calls the hook once a layer and knows nothing of pools or peers. Everywhere else
the model runs layer by layer in torch, with the same kernels: the rope and silu*mul below are
what the torch path calls too, so either path gives the same bits.

Measured on SmolLM2 at batch 1: the torch path spent about 8 ms of a 27 ms step outside the
linears (each op and ctypes call starting cold after the weights streamed through the caches).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from infinite_llm.model import native_linear, native_norm
from infinite_llm.model.native_linear import NativeLinear
from infinite_llm.native.build import NativeLibrary, load_once
from infinite_llm.native.structs import c_struct

if TYPE_CHECKING:
    from infinite_llm.model.llama import AttentionBackend, LlamaForCausalLM

_SOURCE = Path(__file__).parent / "csrc" / "decoder.c"
_state: dict[str, NativeLibrary | None] = {}
MAX_HEAD_DIM = 512  # rope_f32's row buffer


# ``LayerWeights`` and ``DecodeStep`` of the C file, built from its declaration when it loads.
_STRUCTS: dict[str, type[ctypes.Structure]] = {}


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in ("LayerWeights", "DecodeStep"):
        _STRUCTS[name] = c_struct(lib, name)
    lib.decode_layers.argtypes = [ctypes.POINTER(_STRUCTS["DecodeStep"])]
    lib.decode_layers.restype = ctypes.c_int
    lib.rope_f32.argtypes = [p, i64, i64, i64, i64, p, p]
    lib.rope_f32.restype = None
    lib.silu_mul_f32.argtypes = [p, i64, i64, p]
    lib.silu_mul_f32.restype = None


def native_library() -> NativeLibrary | None:
    return load_once(_state, _SOURCE, _declare)


def rope_(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> bool:
    """``layers.apply_rotary`` in place on qk [T, heads, D] (rows may be strided, heads packed):
    float32 on CPU, cos and signed_sin [T, 1, D] contiguous; False (nothing done) elsewhere."""
    native = native_library()
    if native is None or qk.dtype != torch.float32 or not qk.is_cpu:
        return False
    t, heads, d = qk.shape
    if (
        d > MAX_HEAD_DIM
        or d % 2
        or qk.stride(2) != 1
        or qk.stride(1) != d
        or cos.dtype != torch.float32
        or signed_sin.dtype != torch.float32
        or cos.shape != (t, 1, d)
        or signed_sin.shape != (t, 1, d)
        or not (cos.is_contiguous() and signed_sin.is_contiguous())
    ):
        return False
    native.lib.rope_f32(
        qk.data_ptr(), t, heads, d, qk.stride(0), cos.data_ptr(), signed_sin.data_ptr()
    )
    return True


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for gate_up = [gate | up] rows [T, 2n] float32 contiguous on CPU; None
    where it does not apply."""
    native = native_library()
    if (
        native is None
        or gate_up.dtype != torch.float32
        or not gate_up.is_cpu
        or not gate_up.is_contiguous()
    ):
        return None
    t, n2 = gate_up.shape
    out = torch.empty(t, n2 // 2, dtype=torch.float32)
    native.lib.silu_mul_f32(gate_up.data_ptr(), t, n2 // 2, out.data_ptr())
    return out


def _address(fn: Any) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


class NativeDecoder:
    """The model's decode steps in one C call each; ``build`` answers None where it cannot."""

    def __init__(self, model: LlamaForCausalLM, libs: tuple[NativeLibrary, ...]) -> None:
        decoder, linear, norm = libs
        arch = model.arch
        self._run = decoder.lib.decode_layers
        self._step = _STRUCTS["DecodeStep"]
        weights = _STRUCTS["LayerWeights"]
        self._layers = (weights * arch.num_layers)()
        for i, layer in enumerate(model.layers):
            bias = layer.qkv_proj.bias
            self._layers[i] = weights(
                qkv=layer.qkv_proj.panels.data_ptr(),
                qkv_bias=0 if bias is None else bias.data_ptr(),
                o=layer.o_proj.panels.data_ptr(),
                gate_up=layer.gate_up_proj.panels.data_ptr(),
                down=layer.down_proj.panels.data_ptr(),
                input_norm=layer.input_layernorm.weight.data_ptr(),
                post_norm=layer.post_attention_layernorm.weight.data_ptr(),
            )
        self._model = model  # the weights the addresses point into live as long as the model
        self._constants = {
            "num_layers": arch.num_layers,
            "hidden": arch.hidden_size,
            "num_heads": arch.num_heads,
            "num_kv_heads": arch.num_kv_heads,
            "head_dim": arch.head_dim,
            "intermediate": arch.intermediate_size,
            "eps": arch.rms_norm_eps,
            "layers": ctypes.addressof(self._layers),
            "final_norm": model.norm.weight.data_ptr(),
            "linear": _address(linear.lib.linear_f32),
            "norm": _address(norm.lib.rms_norm),
            "add_norm": _address(norm.lib.add_rms_norm),
        }
        self.num_steps = 0  # decode steps run here (tests and curious users)

    @classmethod
    def build(cls, model: LlamaForCausalLM) -> NativeDecoder | None:
        arch = model.arch
        if model.dtype != torch.float32 or model.device.type != "cpu" or arch.num_layers == 0:
            return None
        if arch.head_dim > MAX_HEAD_DIM or arch.head_dim % 2:
            return None
        linears = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        if not all(
            isinstance(getattr(layer, n), NativeLinear) for layer in model.layers for n in linears
        ):
            return None
        if any(getattr(layer, n).bias is not None for layer in model.layers for n in linears[1:]):
            return None
        libs = (native_library(), native_linear.native_library(), native_norm.native_library())
        if any(lib is None for lib in libs):
            return None
        return cls(model, libs)  # type: ignore[arg-type]

    def __call__(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend
    ) -> torch.Tensor | None:
        """Every layer and the final norm over embeddings x [T, hidden] (updated in place: the
        residual stream) -> final hidden [T, hidden]; None (nothing done) where the backend has
        no native attention for this step."""
        arch = self._model.arch
        if not (x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()):
            return None
        hook = attn.native_step(arch.num_heads, arch.head_dim)
        if hook is None:
            return None
        out = torch.empty_like(x)
        step = self._step(
            t=x.shape[0],
            num_threads=torch.get_num_threads(),
            attend=hook.address,
            attend_ctx=hook.context,
            cos=cos.data_ptr(),
            sin=sin.data_ptr(),
            x=x.data_ptr(),
            out=out.data_ptr(),
            **self._constants,
        )
        status = self._run(step)
        if status:
            if hook.error is not None:
                raise hook.error  # a creditor could not answer: the step is abandoned
            _raise(status, arch.head_dim)
        hook.finished(arch.num_layers)
        self.num_steps += 1
        return out


def _raise(status: int, head_dim: int) -> None:
    """The step's return codes (the attention's, passed through) as exceptions."""
    if status == -1:
        raise MemoryError("the native decoder could not allocate its scratch memory")
    if status == -3:
        raise IndexError("a KV slot is outside the pool")
    raise RuntimeError(f"native decode step failed with status {status} (head_dim={head_dim})")
