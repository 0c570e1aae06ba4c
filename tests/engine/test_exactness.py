"""Greedy tokens identical to Hugging Face transformers on the same weights, on every engine path."""

from __future__ import annotations

import pytest

from conftest import hf_greedy, loaded_model, random_prompts
from infinite_llm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def run(name: str, prompts, params=GREEDY, **kwargs) -> tuple[LLM, list[list[int]]]:
    llm = LLM(name, loaded_model=loaded_model(name), progress=False, **kwargs)
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.check_integrity()
    stats = llm.cluster_stats()["instances"]
    assert all(s["free"] == s["num_blocks"] for s in stats), stats  # nothing leaked
    return llm, [o.outputs[0].token_ids for o in outs]


def expected(name: str, prompts, n: int = 24) -> list[list[int]]:
    return [hf_greedy(loaded_model(name).model_dir, p, n) for p in prompts]


@pytest.mark.parametrize("length", [1, 3, 15, 16, 17, 31, 33, 64, 100])
def test_single_prompt_crossing_block_boundaries(length: int) -> None:
    prompts = random_prompts(1, (length, length), 256, seed=length)
    _, got = run("tiny", prompts, block_size=16, kv_blocks_per_instance=32)
    assert got == expected("tiny", prompts)


def test_batch_of_mixed_lengths() -> None:
    prompts = random_prompts(12, (1, 90), 256, seed=1)
    _, got = run("tiny", prompts, block_size=8, kv_blocks_per_instance=256)
    assert got == expected("tiny", prompts)


def test_chunked_prefill_under_small_token_budget() -> None:
    prompts = random_prompts(5, (40, 120), 256, seed=2)
    _, got = run(
        "tiny", prompts, block_size=4, kv_blocks_per_instance=512, max_num_batched_tokens=7
    )
    assert got == expected("tiny", prompts)


def test_preemption_and_resume_give_identical_tokens() -> None:
    prompts = random_prompts(6, (20, 40), 256, seed=3)
    llm, got = run(
        "tiny", prompts, block_size=4, kv_blocks_per_instance=40, max_num_batched_tokens=32
    )
    assert llm.cluster_stats()["instances"][0]["preemptions"] > 0, "the pool was meant to run out"
    assert got == expected("tiny", prompts)


@pytest.mark.parametrize("preset", ["tied", "mha", "mqa", "qwen2", "mistral", "llama3"])
def test_architecture_variants(preset: str) -> None:
    name = f"tiny:{preset}"
    prompts = random_prompts(3, (5, 50), 256, seed=4)
    _, got = run(name, prompts, block_size=8, kv_blocks_per_instance=64)
    assert got == expected(name, prompts)


@pytest.mark.parametrize("block_size", [1, 2, 32])
def test_block_sizes(block_size: int) -> None:
    prompts = random_prompts(3, (10, 70), 256, seed=5)
    _, got = run("tiny", prompts, block_size=block_size, kv_blocks_per_instance=4096 // block_size)
    assert got == expected("tiny", prompts)


def test_reference_attention_kernel_matches_too() -> None:
    prompts = random_prompts(3, (10, 50), 256, seed=6)
    _, got = run(
        "tiny", prompts, block_size=8, kv_blocks_per_instance=64, attention_impl="reference"
    )
    assert got == expected("tiny", prompts)


def test_long_generation_past_many_blocks() -> None:
    prompts = random_prompts(2, (5, 10), 256, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    _, got = run("tiny", prompts, params, block_size=16, kv_blocks_per_instance=64)
    assert got == expected("tiny", prompts, 150)
