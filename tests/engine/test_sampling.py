"""Sampling: seeds, filters, logprobs, stop conditions, on the tiny model through the whole engine."""

from __future__ import annotations

import math

import torch

from conftest import loaded_model, random_prompts
from infinite_llm import LLM, SamplingParams
from infinite_llm.engine.sampler import _filter


def llm(**kwargs) -> LLM:
    kwargs.setdefault("kv_blocks_per_instance", 256)
    kwargs.setdefault("block_size", 8)
    return LLM("tiny", loaded_model=loaded_model("tiny"), progress=False, **kwargs)


def tokens(engine: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]


def test_seed_reproducible_regardless_of_batch() -> None:
    prompts = random_prompts(4, (5, 30), 256, seed=10)
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    engine = llm()
    alone = tokens(engine, prompts[:1], params)[0]
    batched = tokens(
        engine, prompts, [params] + [SamplingParams(temperature=0.8, max_tokens=20)] * 3
    )[0]
    assert alone == batched
    other_seed = tokens(
        engine,
        prompts[:1],
        SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True),
    )
    assert (
        other_seed[0] != alone
    )  # 20 tokens from a 320-way distribution: a collision is implausible


def test_seeded_sampling_survives_preemption() -> None:
    prompts = random_prompts(6, (20, 40), 256, seed=11)
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=24, ignore_eos=True) for i in range(6)
    ]
    roomy = tokens(llm(block_size=4, kv_blocks_per_instance=400), prompts, params)
    tight_engine = llm(block_size=4, kv_blocks_per_instance=40, max_num_batched_tokens=32)
    tight = tokens(tight_engine, prompts, params)
    assert tight_engine.cluster_stats()["instances"][0]["preemptions"] > 0
    assert tight == roomy


def test_filters_that_leave_one_token_equal_greedy() -> None:
    prompts = random_prompts(3, (5, 30), 256, seed=12)
    engine = llm()
    greedy = tokens(engine, prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for params in (
        SamplingParams(temperature=1.5, top_k=1, seed=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, min_p=1.0, seed=0, max_tokens=12, ignore_eos=True),
    ):
        assert tokens(engine, prompts, params) == greedy, params


def test_filter_keeps_exactly_the_expected_tokens() -> None:
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    kept = lambda x: (~torch.isinf(x)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(_filter(logits, top_k=2, top_p=1.0, min_p=0.0)) == [0, 1]
    assert kept(_filter(logits, top_k=0, top_p=0.7, min_p=0.0)) == [0, 1]  # 0.5 < 0.7 <= 0.75
    assert kept(_filter(logits, top_k=0, top_p=0.75, min_p=0.0)) == [0, 1]
    assert kept(_filter(logits, top_k=0, top_p=0.76, min_p=0.0)) == [0, 1, 2]
    assert kept(_filter(logits, top_k=0, top_p=1.0, min_p=0.4)) == [0, 1]  # p >= 0.4 * 0.5


def test_logprobs_of_greedy_tokens() -> None:
    prompts = random_prompts(2, (5, 20), 256, seed=13)
    outs = llm().generate(
        prompts,
        SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True),
        use_tqdm=False,
    )
    for out in outs:
        comp = out.outputs[0]
        assert comp.logprobs is not None and len(comp.logprobs) == 8
        total = 0.0
        for token, top in zip(comp.token_ids, comp.logprobs):
            assert token in top and len(top) == 3  # greedy token is among the top 3
            assert top[token] == max(top.values()) and top[token] <= 0.0
            total += top[token]
        assert math.isclose(comp.cumulative_logprob, total, rel_tol=1e-6)


def test_stop_string_cuts_text_and_finishes() -> None:
    engine = llm()
    prompt = random_prompts(1, (10, 10), 256, seed=14)[0]
    free = engine.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )
    text = free[0].outputs[0].text
    stop = next(
        text[i : i + 2]
        for i in range(5, len(text) - 2)
        if text[i : i + 2].isprintable() and text.find(text[i : i + 2]) == i
    )
    out = engine.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.find(stop)]
    kept = engine.generate(
        [prompt],
        SamplingParams(
            temperature=0,
            max_tokens=40,
            stop=stop,
            ignore_eos=True,
            include_stop_str_in_output=True,
        ),
        use_tqdm=False,
    )
    assert kept[0].outputs[0].text == text[: text.find(stop) + len(stop)]
    engine.check_integrity()


def test_stop_token_ids_and_min_tokens() -> None:
    engine = llm()
    prompt = random_prompts(1, (10, 10), 256, seed=15)[0]
    free = tokens(engine, [prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[
        0
    ]
    stop_at = free[5]
    first = free.index(stop_at)
    out = engine.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at]),
        use_tqdm=False,
    )[0].outputs[0]
    assert (
        out.token_ids == free[: first + 1]
        and out.finish_reason == "stop"
        and out.stop_reason == stop_at
    )
    # min_tokens: the stop token is masked until enough output exists, so it cannot end the request early.
    late = engine.generate(
        [prompt],
        SamplingParams(
            temperature=0, max_tokens=20, stop_token_ids=[stop_at], min_tokens=first + 3
        ),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(late.token_ids) >= first + 3
    assert stop_at not in late.token_ids[: first + 2]
