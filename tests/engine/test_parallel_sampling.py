"""Parallel sampling (``n``, ``best_of``) through the whole engine on the tiny model: results
exact against transformers and per-sample seeds, and the samples sharing the prompt's rBlocks."""

from __future__ import annotations

import random

import pytest

from cluster.helpers import assert_all_free, make_engine
from conftest import hf_greedy, loaded_model, random_prompts
from infinite_llm import LLM, SamplingParams
from infinite_llm.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(
        "tiny",
        loaded_model=loaded_model("tiny"),
        kv_blocks_per_instance=96,
        block_size=8,
        progress=False,
    )


def expected(prompt: list[int], n: int = 10) -> list[int]:
    return hf_greedy(loaded_model("tiny").model_dir, prompt, n)


def sampled(llm: LLM, prompt, **kwargs) -> list:
    params = SamplingParams(max_tokens=12, ignore_eos=True, **kwargs)
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    return out.outputs


def finish(engine: LLMEngine, on_step=None) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if on_step is not None:
            on_step()
        engine.check_integrity()
    return done


def test_greedy_samples_are_identical_and_exact(llm: LLM) -> None:
    prompt = random_prompts(1, (43, 43), 256, seed=1)[0]
    (one,) = llm.generate([prompt], GREEDY, use_tqdm=False)
    (three,) = llm.generate(
        [prompt], SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False
    )
    assert [c.index for c in three.outputs] == [0, 1, 2]
    want = expected(prompt)
    assert one.outputs[0].token_ids == want
    assert all(c.token_ids == want and c.finish_reason == "length" for c in three.outputs)
    assert three.outputs[1].text == one.outputs[0].text
    llm.check_integrity()


def test_seeded_samples_are_distinct_reproducible_and_seeded_seed_plus_index(llm: LLM) -> None:
    prompt = random_prompts(1, (30, 30), 256, seed=2)[0]
    first = [c.token_ids for c in sampled(llm, prompt, n=3, seed=7)]
    again = [c.token_ids for c in sampled(llm, prompt, n=3, seed=7)]
    assert first == again
    assert len({tuple(t) for t in first}) == 3
    # sample i draws from seed 7 + i, as a one-sample request with that seed does
    alone = [sampled(llm, prompt, seed=7 + i)[0].token_ids for i in range(3)]
    assert first == alone
    unseeded = [c.token_ids for c in sampled(llm, prompt, n=3)]
    assert len({tuple(t) for t in unseeded}) == 3


def test_best_of_returns_the_n_best_by_cumulative_logprob(llm: LLM) -> None:
    prompt = random_prompts(1, (25, 25), 256, seed=3)[0]
    best = sampled(llm, prompt, n=2, best_of=4, seed=11)
    assert [c.index for c in best] == [0, 1]
    assert best[0].cumulative_logprob >= best[1].cumulative_logprob
    assert all(c.logprobs is None for c in best)  # computed for the ranking, not asked for
    every = sampled(llm, prompt, n=4, seed=11, logprobs=0)
    ranked = sorted(every, key=lambda c: c.cumulative_logprob, reverse=True)
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    assert [c.cumulative_logprob for c in best] == pytest.approx(
        [c.cumulative_logprob for c in ranked[:2]]
    )
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)


def test_four_samples_of_a_1k_prompt_hold_its_full_rblocks_once() -> None:
    engine = make_engine(num_instances=1, num_blocks=80, block_size=16, budget=2048)
    prompt = random_prompts(1, (1000, 1000), 256, seed=4)[0]  # 62 full rBlocks + 8 tokens
    params = SamplingParams(n=4, temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request(engine.make_request(prompt, params, "r"))
    rm = engine.cluster.instances[0].rmanager
    engine.step()  # the first sample prefills the prompt: 63 rBlocks
    assert rm.num_used_blocks == 63
    engine.step()  # the other three share its 62 full ones, each with a tail of its own
    assert rm.num_used_blocks == 62 + 4
    engine.check_integrity()
    done = finish(engine)
    assert [c.token_ids for c in done["r"].outputs] == [expected(prompt, 6)] * 4
    assert_all_free(engine)


def test_samples_of_a_borrowed_prompt_share_its_remote_rblocks() -> None:
    # 2 instances x 16 rBlocks x 8 tokens: a 180-token prompt spreads over both pools
    engine = make_engine(num_instances=2, num_blocks=16, block_size=8, budget=256)
    prompt = random_prompts(1, (180, 180), 256, seed=5)[0]
    params = SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True)
    engine.add_request(engine.make_request(prompt, params, "r"), home=0)
    seen = []
    stats = engine.cluster.stats

    def on_step() -> None:
        seen.append((stats()["instances"][0]["borrowed"], stats()["instances"][1]["used"]))

    done = finish(engine, on_step)
    assert max(b for b, _ in seen) >= 6, "the prompt should live partly on instance 1"
    assert [c.token_ids for c in done["r"].outputs] == [expected(prompt)] * 2
    assert_all_free(engine)


def test_defragmentation_moves_a_shared_rblock_for_every_sample() -> None:
    engine = make_engine(num_instances=2, num_blocks=16, block_size=8, budget=256)
    engine.cluster.defrag_interval_steps = 10**9  # only when asked below
    filler, prompt = (
        random_prompts(2, (60, 60), 256, seed=6)[0],
        random_prompts(1, (100, 100), 256, seed=7)[0],
    )
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    engine.add_request(engine.make_request(filler, one, "filler"), home=0)
    params = SamplingParams(n=2, temperature=0, max_tokens=10, ignore_eos=True)
    engine.add_request(engine.make_request(prompt, params, "r"), home=0)
    engine.step()  # the filler holds 8 rBlocks of instance 0: the prompt borrows, then it ends
    engine.step()  # the second sample shares the prompt's rBlocks, borrowed ones too
    inst = engine.cluster.instances[0]
    shared = inst.scheduler.allocator.shared.ref_cnts()
    assert any(ref.instance_id == 1 for ref in shared)
    assert engine.cluster.defragment() > 0  # repatriation: brought home into the freed slots
    engine.check_integrity()
    samples = list(inst.scheduler.requests.values())
    assert len(samples) == 2
    assert samples[0].block_table.refs()[:12] == samples[1].block_table.refs()[:12]
    assert all(ref.instance_id == 0 for ref in samples[0].block_table)
    done = finish(engine)
    assert [c.token_ids for c in done["r"].outputs] == [expected(prompt)] * 2
    assert_all_free(engine)


def test_aborting_the_parent_aborts_every_sample() -> None:
    engine = make_engine(num_instances=1, num_blocks=40, block_size=8)
    prompt = random_prompts(1, (50, 50), 256, seed=8)[0]
    params = SamplingParams(n=3, temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request(engine.make_request(prompt, params, "r"))
    for _ in range(3):
        engine.step()
    final = engine.abort_request("r")
    assert final is not None and final.finished
    assert [c.finish_reason for c in final.outputs] == ["abort"] * 3
    assert not engine.has_unfinished_requests() and engine.abort_request("r") is None
    assert_all_free(engine)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_with_samples_aborts_and_preemptions_stays_exact(seed: int) -> None:
    # small pools on 2 instances: borrowing, preemptions and defragmentation while samples share
    rng = random.Random(seed)
    engine = make_engine(num_instances=2, num_blocks=10, block_size=4, budget=48)
    engine.cluster.defrag_interval_steps = 3
    prompts = random_prompts(20, (5, 40), 256, seed=9 + seed)
    wanted: dict[str, list[int]] = {}
    aborted: set[str] = set()
    pending = list(enumerate(prompts))
    done: dict = {}
    step = num_shared = 0
    while pending or engine.has_unfinished_requests():
        if pending and rng.random() < 0.7:
            i, prompt = pending.pop(0)
            max_tokens = rng.randint(1, 12)
            n = rng.randint(1, 4)
            params = SamplingParams(n=n, temperature=0, max_tokens=max_tokens, ignore_eos=True)
            rid = f"r{i}"
            engine.add_request(engine.make_request(prompt, params, rid))
            wanted[rid] = expected(prompt, max_tokens)
        live = [rid for rid in wanted if rid not in done and rid not in aborted]
        if live and rng.random() < 0.08:
            rid = rng.choice(live)
            if engine.abort_request(rid) is not None:
                aborted.add(rid)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
        num_shared += sum(
            len(inst.scheduler.allocator.shared) for inst in engine.cluster.instances.values()
        )
        step += 1
        assert step < 2000
    preemptions = sum(i["preemptions"] for i in engine.cluster.stats()["instances"])
    assert preemptions > 0, "the pools should be small enough to preempt"
    assert num_shared > 0 and engine.cluster.stats()["migrated_blocks"] > 0
    for rid, out in done.items():
        if rid not in aborted:
            assert [c.token_ids for c in out.outputs] == [wanted[rid]] * len(out.outputs), rid
    assert_all_free(engine)


def test_every_output_of_the_parent_carries_sample_0s_cached_tokens() -> None:
    # The samples after the first share its prompt rBlocks (no cache hit): the parent's outputs
    # all report what sample 0 found in the prefix cache, 0 at first, then the prompt's 5 full
    # rBlocks but the last token's when the same prompt comes again.
    engine = make_engine(num_instances=1, num_blocks=40, block_size=8)
    prompt = random_prompts(1, (45, 45), 256, seed=9)[0]
    params = SamplingParams(n=3, temperature=0, max_tokens=4, ignore_eos=True)
    for rid, cached in (("first", 0), ("again", 40)):
        engine.add_request(engine.make_request(prompt, params, rid))
        seen = []
        while engine.has_unfinished_requests():
            seen += [(out.outputs[0].index, out.num_cached_tokens) for out in engine.step()]
        assert {index for index, _ in seen} == {0, 1, 2}
        assert {n for _, n in seen} == {cached}, seen
    assert_all_free(engine)
