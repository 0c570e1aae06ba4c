"""Tiny random-weight models for tests: written as real Hugging Face directories.

The same directory feeds our loader and the transformers reference, so both run identical
weights. The tokenizer is byte-level (every byte is a token), so text works, including
multi-byte characters split across tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace

import torch

from infinite_llm.model.config import ModelArchConfig

BOS_ID, EOS_ID = 256, 257

_BASE = ModelArchConfig(
    model_type="llama",
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_ids=(EOS_ID,),
)
TINY_PRESETS: dict[str, ModelArchConfig] = {
    "llama": _BASE,
    "tied": replace(_BASE, tie_word_embeddings=True),
    "mha": replace(_BASE, num_kv_heads=4),
    "mqa": replace(_BASE, num_kv_heads=1),
    "qwen2": replace(_BASE, model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
    "mistral": replace(_BASE, model_type="mistral", rope_theta=1e6),
    "llama3": replace(
        _BASE,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_preset(name: str) -> tuple[str, ModelArchConfig]:
    preset = name.partition(":")[2] or "llama"
    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose from {', '.join(TINY_PRESETS)}")
    return preset, TINY_PRESETS[preset]


def random_state_dict(arch: ModelArchConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights scaled so logits are well separated (greedy decoding has no near-ties)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    h, i, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": rand(arch.vocab_size, h, std=1.0),
        "model.norm.weight": 1.0 + rand(h, std=0.1),
    }
    if not arch.tie_word_embeddings:
        sd["lm_head.weight"] = rand(arch.vocab_size, h, std=0.5)
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        sd[p + "input_layernorm.weight"] = 1.0 + rand(h, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1.0 + rand(h, std=0.1)
        sd[p + "self_attn.q_proj.weight"] = rand(arch.num_heads * d, h, std=h**-0.5 * 2)
        sd[p + "self_attn.k_proj.weight"] = rand(arch.num_kv_heads * d, h, std=h**-0.5 * 2)
        sd[p + "self_attn.v_proj.weight"] = rand(arch.num_kv_heads * d, h, std=h**-0.5)
        sd[p + "self_attn.o_proj.weight"] = rand(
            h, arch.num_heads * d, std=(arch.num_heads * d) ** -0.5
        )
        if arch.attention_bias:
            sd[p + "self_attn.q_proj.bias"] = rand(arch.num_heads * d, std=0.1)
            sd[p + "self_attn.k_proj.bias"] = rand(arch.num_kv_heads * d, std=0.1)
            sd[p + "self_attn.v_proj.bias"] = rand(arch.num_kv_heads * d, std=0.1)
        sd[p + "mlp.gate_proj.weight"] = rand(i, h, std=h**-0.5)
        sd[p + "mlp.up_proj.weight"] = rand(i, h, std=h**-0.5)
        sd[p + "mlp.down_proj.weight"] = rand(h, i, std=i**-0.5)
    return sd


def _byte_tokenizer(vocab_size: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Token id b is byte b (in ByteLevel's printable spelling); then <s>, </s>, spare ids.
    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    vocab["<s>"], vocab["</s>"] = BOS_ID, EOS_ID
    extras = [f"<extra_{i}>" for i in range(EOS_ID + 1, vocab_size)]
    vocab.update({name: EOS_ID + 1 + j for j, name in enumerate(extras)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": extras})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_model(out_dir: str, arch: ModelArchConfig, seed: int = 0) -> str:
    """Write config.json, model.safetensors and a byte-level tokenizer into ``out_dir``."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(
        random_state_dict(arch, seed),
        os.path.join(out_dir, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(arch.to_hf_dict(), f, indent=2)
    _byte_tokenizer(arch.vocab_size).save_pretrained(out_dir)
    return out_dir


def tiny_model_dir(name: str, seed: int = 0) -> str:
    """The cached directory of tiny model ``name`` (``tiny`` or ``tiny:<preset>``), created on first use."""
    from infinite_llm.model.loader.cache import cache_root

    preset, arch = tiny_preset(name)
    target = os.path.join(cache_root(), "tiny", f"{preset}-seed{seed}-v1")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(target))
    try:
        write_tiny_model(tmp, arch, seed)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
