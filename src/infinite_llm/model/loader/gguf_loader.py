"""Read a GGUF file with the ``gguf`` package: architecture, dequantized weights, tokenizer.

The result is written once as a Hugging Face directory in the model cache (see ``cache.py``):
parsing a GGUF's vocabulary takes seconds, loading safetensors takes milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from infinite_llm.model.config import ModelArchConfig

# GGUF tensor name (inside blk.N.) -> Hugging Face name (inside model.layers.N.)
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


class GGUFError(ValueError):
    """The file is not a GGUF we can load."""


def _open(path: str) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises assorted errors on corrupt input
        raise GGUFError(f"{path} is not a readable GGUF file: {exc}") from exc


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_arch(reader: Any) -> ModelArchConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise GGUFError(f"GGUF architecture {arch!r} is not supported (llama, mistral, qwen2 are)")
    name = str(_field(reader, "general.name", "")).lower()
    model_type = "mistral" if arch == "llama" and "mistral" in name else arch
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFError(
            "GGUF with a rope_freqs tensor (Llama 3.1 RoPE scaling) is not supported yet; "
            "load the Hugging Face directory instead"
        )

    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    num_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens.data) if tokens is not None else None)
    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        rope_scaling = {"rope_type": scaling_type, "factor": float(get("rope.scaling.factor", 1.0))}
        original = get("rope.scaling.original_context_length")
        if original:
            rope_scaling["original_max_position_embeddings"] = int(original)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelArchConfig(
        model_type=model_type,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        attention_bias=any(t.name.endswith("attn_q.bias") for t in reader.tensors),
        rope_scaling=rope_scaling,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _hf_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")  # suffix: weight | bias
    if stem.startswith("blk."):
        _, layer, kind = stem.split(".", 2)
        if kind not in _LAYER_TENSORS:
            raise GGUFError(f"unexpected tensor {gguf_name}")
        return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"
    if stem not in _GLOBAL_TENSORS:
        raise GGUFError(f"unexpected tensor {gguf_name}")
    return f"{_GLOBAL_TENSORS[stem]}.{suffix}"


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two RoPE halves of each head's rows of Q and K;
    # undo it so the weights match the rotate-half layout of Hugging Face checkpoints.
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_weights(
    reader: Any, arch: ModelArchConfig, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized float32 tensors with Hugging Face names."""
    import gguf

    permute_qk = arch.model_type in ("llama", "mistral")
    for tensor in tqdm(
        reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress
    ):
        name = _hf_name(tensor.name)
        try:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:
            raise GGUFError(
                f"cannot dequantize {tensor.name} ({tensor.tensor_type.name}): {exc}"
            ) from exc
        data = np.ascontiguousarray(data, dtype=np.float32)
        if not data.flags.writeable:  # an F32 tensor comes back as a view of the read-only mmap
            data = data.copy()
        if permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _unpermute(data, arch.num_heads)
        elif permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _unpermute(data, arch.num_kv_heads)
        yield name, torch.from_numpy(data)


def load_gguf_tokenizer(path: str) -> Any:
    """The tokenizer and chat template stored in the GGUF metadata, via transformers' converter."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
    )


def open_gguf(path: str) -> tuple[Any, ModelArchConfig]:
    reader = _open(path)
    return reader, read_arch(reader)
