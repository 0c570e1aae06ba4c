"""Penalties, logit_bias, allowed_token_ids: the batched processing against a row-by-row
reference, repetition_penalty against transformers' own processor end to end, and the
direction each one moves the tokens on the tiny model."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import hf_model, loaded_model, random_prompts
from infinite_llm import LLM, SamplingParams
from infinite_llm.engine.logits_processing import process_logits
from infinite_llm.scheduler.request import Request


def llm(**kwargs) -> LLM:
    kwargs.setdefault("kv_blocks_per_instance", 256)
    kwargs.setdefault("block_size", 8)
    return LLM("tiny", loaded_model=loaded_model("tiny"), progress=False, **kwargs)


def greedy(engine: LLM, prompts, max_tokens: int = 24, **kwargs) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)
    return [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]


def reference_row(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """One row, one rule at a time, with Python loops: what ``process_logits`` must equal."""
    p = request.sampling_params
    row = logits.clone()
    if p.allowed_token_ids:
        keep = set(p.allowed_token_ids)
        for t in range(row.shape[0]):
            if t not in keep:
                row[t] = float("-inf")
    if request.num_output_tokens < p.min_tokens:
        for t in [*p.stop_token_ids, request.eos_token_id]:
            row[t] = float("-inf")
    for t, b in (p.logit_bias or {}).items():
        row[t] += b
    seen = set(request.prompt_token_ids) | set(request.output_token_ids)
    for t in range(row.shape[0]):
        if t in seen:
            row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
        count = request.output_token_ids.count(t)
        row[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return row


def test_batched_processing_equals_the_row_by_row_reference() -> None:
    rng = random.Random(0)
    vocab = 50
    requests = []
    for i in range(12):
        kwargs = rng.choice(
            [
                {},
                {"presence_penalty": rng.uniform(-2, 2)},
                {"frequency_penalty": rng.uniform(-2, 2), "repetition_penalty": 1.3},
                {"repetition_penalty": rng.uniform(0.5, 2.0)},
                {"logit_bias": {str(rng.randrange(vocab)): rng.uniform(-100, 100)}},
                {"allowed_token_ids": rng.sample(range(vocab), 5), "presence_penalty": 1.0},
                {"min_tokens": 4, "stop_token_ids": [3], "frequency_penalty": 0.5},
            ]
        )
        request = Request(
            f"r{i}",
            [rng.randrange(vocab) for _ in range(rng.randint(1, 20))],
            SamplingParams(temperature=0, **kwargs),
            max_tokens=100,
            eos_token_id=0,
        )
        request.output_token_ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 10))]
        requests.append(request)
    logits = torch.randn(len(requests), vocab) * 5
    expected = torch.stack([reference_row(logits[i], r) for i, r in enumerate(requests)])
    got = process_logits(logits.clone(), requests)
    torch.testing.assert_close(got, expected)


def test_rows_without_processing_are_untouched() -> None:
    plain = Request("a", [1, 2, 2], SamplingParams(), max_tokens=8)
    plain.output_token_ids = [2, 2]
    logits = torch.randn(1, 10)
    assert torch.equal(process_logits(logits.clone(), [plain]), logits)


def test_repetition_penalty_matches_transformers(tiny_dir) -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    model = hf_model(tiny_dir)
    processor = RepetitionPenaltyLogitsProcessor(1.7)
    prompts = random_prompts(3, (5, 30), 256, seed=3)
    ours = greedy(llm(), prompts, repetition_penalty=1.7)
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            for _ in range(len(got)):
                scores = processor(ids, model(ids).logits[:, -1].float())
                ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
        assert ids[0, len(prompt) :].tolist() == got


def test_penalties_make_repeats_rarer() -> None:
    engine = llm()
    prompts = random_prompts(4, (5, 30), 256, seed=12)

    def repeats(outputs: list[list[int]]) -> int:
        return sum(len(o) - len(set(o)) for o in outputs)

    base = repeats(greedy(engine, prompts, max_tokens=40))
    assert base > 0  # the tiny model repeats itself: the premise of the test
    for kwargs in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        assert repeats(greedy(engine, prompts, max_tokens=40, **kwargs)) < base, kwargs
    # A negative penalty rewards repeats.
    assert repeats(greedy(engine, prompts, max_tokens=40, presence_penalty=-2.0)) > base


def test_logit_bias_and_allowed_token_ids() -> None:
    engine = llm()
    prompts = random_prompts(2, (5, 30), 256, seed=12)
    base = greedy(engine, prompts)
    assert greedy(engine, prompts, logit_bias={7: 100}) == [[7] * 24] * 2
    banned = greedy(engine, prompts, logit_bias={str(base[0][0]): -100})
    assert banned[0][0] != base[0][0]
    allowed = greedy(engine, prompts, allowed_token_ids=[5, 6, 7])
    assert all(set(out) <= {5, 6, 7} for out in allowed)
    # The logprobs are the model's own, as vLLM reports them: the bias does not change them.
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    biased = SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logprobs=0, logit_bias={7: 100}
    )
    (a,), (b,) = (engine.generate(prompts[:1], p, use_tqdm=False) for p in (params, biased))
    assert b.outputs[0].token_ids[0] == 7
    assert a.outputs[0].logprobs[0].get(7) is None or a.outputs[0].logprobs[0][7] == pytest.approx(
        b.outputs[0].logprobs[0][7]
    )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1": float("nan")}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"seed": 2**64}, "seed"),
        ({"logprobs": -2}, "logprobs"),
    ],
)
def test_bad_values_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_logit_bias_is_clamped_as_openai_documents() -> None:
    assert SamplingParams(logit_bias={"5": 500, 6: -1e9}).logit_bias == {5: 100.0, 6: -100.0}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"allowed_token_ids": [1, 999999]}, "allowed_token_ids"),
        ({"stop_token_ids": [999999]}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": 30}, "prompt_logprobs"),
        ({"truncate_prompt_tokens": 10**6}, "truncate_prompt_tokens"),
    ],
)
def test_the_engine_checks_token_ids_and_logprob_counts(kwargs, field) -> None:
    engine = llm()
    with pytest.raises(ValueError, match=field):
        engine.generate([[5, 6, 7]], SamplingParams(max_tokens=2, **kwargs), use_tqdm=False)
    engine.check_integrity()


def test_every_logprob_when_the_engine_allows_it() -> None:
    engine = llm(max_logprobs=-1)
    (out,) = engine.generate(
        [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2, logprobs=-1), use_tqdm=False
    )
    vocab = engine.engine.arch.vocab_size
    assert [len(entry) for entry in out.outputs[0].logprobs] == [vocab, vocab]


def test_truncate_prompt_tokens_keeps_the_end_or_the_start() -> None:
    engine = llm()
    prompt = random_prompts(1, (40, 40), 256, seed=4)[0]
    for side, kept in (("left", prompt[-10:]), ("right", prompt[:10])):
        params = SamplingParams(
            temperature=0, max_tokens=8, truncate_prompt_tokens=10, truncation_side=side
        )
        (out,) = engine.generate([prompt], params, use_tqdm=False)
        assert out.prompt_token_ids == kept
        assert (
            out.outputs[0].token_ids
            == greedy(engine, [kept], max_tokens=8)[0][: len(out.outputs[0].token_ids)]
        )


def test_prompt_dicts_as_vllm_takes_them() -> None:
    engine = llm()
    prompt = random_prompts(1, (10, 10), 256, seed=5)[0]
    text = engine.get_tokenizer().decode(prompt)
    expected = greedy(engine, [prompt], max_tokens=6)[0]
    outs = engine.generate(
        [{"prompt_token_ids": prompt}, {"prompt": text}, prompt],
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        use_tqdm=False,
    )
    assert outs[0].outputs[0].token_ids == expected == outs[2].outputs[0].token_ids
    assert outs[1].prompt == text
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.generate([{"prompt_ids": prompt}], use_tqdm=False)
    with pytest.raises(ValueError, match="prompts\\[0\\]"):
        engine.generate([[1.5, 2]], use_tqdm=False)


@pytest.mark.parametrize("chunk", [2048, 16])  # one prefill step, or chunks of 16 tokens
def test_prompt_logprobs_match_transformers(tiny_dir, chunk) -> None:
    prompt = random_prompts(1, (70, 70), 256, seed=6)[0]
    engine = llm(max_num_batched_tokens=chunk)
    (out,) = engine.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2), use_tqdm=False
    )
    with torch.inference_mode():
        expected = torch.log_softmax(hf_model(tiny_dir)(torch.tensor([prompt])).logits[0], -1)
    got, ranks = out.prompt_logprobs, out.prompt_logprob_ranks
    assert got[0] is None and len(got) == len(prompt)
    assert ranks[0] is None and len(ranks) == len(prompt)
    for pos in range(1, len(prompt)):
        entry, row = got[pos], expected[pos - 1]
        assert entry[prompt[pos]] == pytest.approx(float(row[prompt[pos]]), abs=1e-4)
        # its rank: the tokens at least as likely, itself included (vLLM's count)
        assert ranks[pos] == int((row >= row[prompt[pos]]).sum())
        top = row.topk(2)
        for token, lp in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[token] == pytest.approx(lp, abs=1e-4)
        assert len(entry) in (2, 3)  # the top 2, plus the prompt's token when not among them


def test_prompt_logprobs_are_reported_once_across_preemption() -> None:
    prompts = random_prompts(6, (30, 40), 256, seed=11)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=0)
    roomy = llm(block_size=4, kv_blocks_per_instance=400).generate(prompts, params, use_tqdm=False)
    tight_engine = llm(block_size=4, kv_blocks_per_instance=40, max_num_batched_tokens=32)
    tight = tight_engine.generate(prompts, params, use_tqdm=False)
    assert tight_engine.cluster_stats()["instances"][0]["preemptions"] > 0
    for a, b in zip(roomy, tight):
        assert len(b.prompt_logprobs) == len(b.prompt_token_ids)
        assert [None if e is None else list(e) for e in a.prompt_logprobs] == [
            None if e is None else list(e) for e in b.prompt_logprobs
        ]
