"""Shared helpers: tiny models on disk, the Hugging Face transformers reference, integrity checks,
and the Ray fixtures (a local Ray runtime per module, Ray engines always shut down)."""

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


@pytest.fixture(scope="module")
def ray_runtime():
    """One local Ray runtime for the whole module (each test still starts its own actors)."""
    ray = pytest.importorskip("ray")
    from infinite_llm.cluster.ray_runtime import init_ray

    started = init_ray(num_cpus=8)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def ray_engine(ray_runtime):
    """Makes Ray engines; kills their actors after the test, whatever happened."""
    made = []

    from cluster.helpers import make_engine

    def make(**kwargs):
        engine = make_engine(backend="ray", **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown()
