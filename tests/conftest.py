"""Shared helpers: tiny models on disk, the Hugging Face transformers reference, integrity checks."""

from __future__ import annotations

import functools
import os
import random

import pytest
import torch

from infinite_llm.model.loader import load_model
from infinite_llm.model.loader.tiny import tiny_model_dir

torch.set_num_threads(min(2, os.cpu_count() or 1))


@functools.cache
def loaded_model(name: str, dtype: str = "float32"):
    """Load each model once per test session (the weights are read-only)."""
    return load_model(name, dtype, progress=False)


@functools.cache
def hf_model(model_dir: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def hf_greedy(
    model_dir: str, prompt: list[int], max_new_tokens: int, dtype: torch.dtype = torch.float32
) -> list[int]:
    """Greedy continuation by transformers (KV-cached), never stopping early on EOS."""
    return hf_greedy_with(hf_model(model_dir, dtype), prompt, max_new_tokens)


@torch.inference_mode()
def hf_greedy_with(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with a transformers model: argmax each step, EOS is just another token
    (``generate(min_new_tokens=...)`` would instead forbid EOS and change the argmax)."""
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    past = out.past_key_values
    tokens = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].float().argmax())
        tokens.append(token)
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens


def random_prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_dir() -> str:
    return tiny_model_dir("tiny")
