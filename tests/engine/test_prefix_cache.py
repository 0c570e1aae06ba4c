"""The prefix cache through the whole engine on the tiny model: greedy tokens identical to
transformers with and without hits (a hit that ends mid-prompt, a hit on another instance's
rBlocks attended in place, a hit on rBlocks that were lent, a hit after a preemption), the
cached token counts reported, integrity after every step, and everything free at the end."""

from __future__ import annotations

import pytest

from cluster.helpers import GREEDY, assert_all_free, make_engine, run
from conftest import hf_greedy, loaded_model, random_prompts
from infinite_llm.config import CacheConfig, EngineConfig
from infinite_llm.llm_engine import LLMEngine

BS = 8


def expected(prompt: list[int], n: int = GREEDY.max_tokens) -> list[int]:
    return hf_greedy(loaded_model("tiny").model_dir, prompt, n)


def generate(engine: LLMEngine, prompt: list[int], home: int | None = None) -> tuple[list, int]:
    """One request to completion: its tokens and the prompt tokens it found cached."""
    request = engine.make_request(prompt, GREEDY)
    engine.add_request(request, home=home)
    tokens, cached = None, None
    while tokens is None:
        for out in engine.step():
            if out.request_id == request.request_id and out.finished:
                tokens, cached = out.outputs[0].token_ids, out.num_cached_tokens
        engine.check_integrity()
    return tokens, cached


def prefix_stats(engine: LLMEngine) -> list[tuple[int, int]]:
    return [
        (inst.scheduler.allocator.prefix.num_queries, inst.scheduler.allocator.prefix.num_hits)
        for inst in engine.cluster.instances.values()
    ]


def test_a_repeated_prompt_and_one_sharing_part_of_it_reuse_the_cached_rblocks() -> None:
    engine = make_engine(1, 64, block_size=BS)
    doc = random_prompts(1, (61, 61), 256, seed=11)[0]
    first, cached = generate(engine, doc)
    assert first == expected(doc) and cached == 0
    again, cached = generate(engine, doc)
    assert again == first and cached == (len(doc) - 1) // BS * BS  # all but the last token's
    # a new question after 5 full rBlocks and 3 tokens of the document: the hit ends there
    other = doc[:43] + random_prompts(1, (20, 20), 256, seed=12)[0]
    tokens, cached = generate(engine, other)
    assert tokens == expected(other) and cached == 40
    assert prefix_stats(engine) == [(len(doc) * 2 + len(other), 0 + 56 + 40)]
    assert_all_free(engine)


def test_turned_off_every_prompt_is_computed_whole() -> None:
    config = EngineConfig(
        model="tiny", cache=CacheConfig(block_size=BS, num_blocks=64, enable_prefix_caching=False)
    )
    engine = LLMEngine(config, loaded_model("tiny"), progress=False)
    assert engine.cluster.instances[0].scheduler.allocator.prefix is None
    doc = random_prompts(1, (40, 40), 256, seed=13)[0]
    assert generate(engine, doc) == generate(engine, doc) == (expected(doc), 0)
    assert engine.cluster.instances[0].rmanager.num_cached_blocks == 0


def test_a_hit_on_another_instance_is_attended_in_place_and_lent_back_cached() -> None:
    engine = make_engine(2, 32, block_size=BS)
    engine.cluster.defrag_interval_steps = 10**9  # repatriation would copy them to instance 1
    doc = random_prompts(1, (57, 57), 256, seed=14)[0]
    assert generate(engine, doc, home=0) == (expected(doc), 0)
    rm0, rm1 = (engine.cluster.instances[i].rmanager for i in (0, 1))
    assert rm0.num_cached_blocks == 10  # 57 + 24 tokens, the last not computed: 10 full
    engine.cluster.core.heartbeat(force=True)  # the gManager's index learns where they are

    borrowed = []
    request = engine.make_request([*doc, 5, 6, 7], GREEDY)
    engine.add_request(request, home=1)
    tokens = None
    while tokens is None:
        for out in engine.step():
            if out.finished:
                tokens, cached = out.outputs[0].token_ids, out.num_cached_tokens
        borrowed.append(rm1.num_borrowed_blocks)
        engine.check_integrity()
    assert tokens == expected([*doc, 5, 6, 7]) and cached == 56
    assert borrowed[0] == 7  # instance 0's cached rBlocks, lent to 1 and attended there
    assert rm0.num_cached_blocks == 10  # given back with their names: cached again
    assert_all_free(engine)


def test_rblocks_a_request_borrowed_stay_cached_on_their_creditor_for_the_next_one() -> None:
    engine = make_engine(2, 6, block_size=BS)  # 48 tokens a pool: the prompt must borrow
    doc = random_prompts(1, (70, 70), 256, seed=15)[0]
    assert generate(engine, doc, home=0) == (expected(doc), 0)
    rm1 = engine.cluster.instances[1].rmanager
    assert rm1.num_cached_blocks > 0  # lent rBlocks came back named
    engine.cluster.core.heartbeat(force=True)
    tokens, cached = generate(engine, doc, home=0)
    assert tokens == expected(doc) and cached == (len(doc) - 1) // BS * BS
    assert_all_free(engine)


def test_a_preempted_request_resumes_from_its_own_cached_rblocks() -> None:
    engine = make_engine(1, 14, block_size=BS, borrowing=False, budget=32)
    prompts = random_prompts(3, (30, 40), 256, seed=16)
    got = run(engine, prompts)  # 3 x (30-40 + 24) tokens in 112: preemptions happen
    assert engine.cluster.instances[0].scheduler.num_preemptions > 0
    assert got == [expected(p) for p in prompts]
    assert_all_free(engine)


@pytest.mark.parametrize("seed", range(3))
def test_random_shared_prefixes_over_two_borrowing_instances(seed: int) -> None:
    import random

    rng = random.Random(seed)
    engine = make_engine(2, 24, block_size=BS, budget=48)
    docs = random_prompts(3, (20, 50), 256, seed=100 + seed)
    prompts = [
        rng.choice(docs)[: rng.randint(8, 50)]
        + random_prompts(1, (1, 12), 256, seed=seed * 50 + i)[0]
        for i in range(8)
    ]
    homes = [rng.randrange(2) for _ in prompts]
    got = run(engine, prompts, homes=homes)
    assert got == [expected(p) for p in prompts]
    assert sum(hits for _, hits in prefix_stats(engine)) > 0
    assert_all_free(engine)
