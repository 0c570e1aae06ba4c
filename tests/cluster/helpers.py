"""Driving an engine step by step with pinned homes and integrity checks after every step."""

from __future__ import annotations

import time

from conftest import loaded_model
from infinite_llm.config import CacheConfig, EngineConfig
from infinite_llm.llm_engine import LLMEngine
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.scheduler import SchedulerConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def make_engine(
    num_instances: int,
    num_blocks: int,
    block_size: int = 8,
    borrowing: bool = True,
    budget: int = 64,
    lending_cap: float = 1.0,
    backend: str = "inprocess",
    model: str = "tiny",
    prefix_caching: bool = True,
    **kwargs,
) -> LLMEngine:
    config = EngineConfig(
        model=model,
        num_instances=num_instances,
        backend=backend,
        cache=CacheConfig(
            block_size=block_size,
            num_blocks=num_blocks,
            enable_borrowing=borrowing,
            lending_cap=lending_cap,
            enable_prefix_caching=prefix_caching,
        ),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=64),
        **kwargs,
    )
    return LLMEngine(config, loaded_model(model), progress=False)


def run(
    engine: LLMEngine,
    prompts,
    params=GREEDY,
    homes=None,
    check_every_step: bool = True,
    timeout_s: float = 300.0,
    on_step=None,
) -> list[list[int]]:
    """Generate to completion; returns token ids per prompt."""
    ids = []
    for i, prompt in enumerate(prompts):
        request = engine.make_request(prompt, params if not isinstance(params, list) else params[i])
        engine.add_request(request, home=None if homes is None else homes[i])
        ids.append(request.request_id)
    done: dict[str, list[int]] = {}
    deadline = time.monotonic() + timeout_s
    step = 0
    while len(done) < len(ids):
        assert time.monotonic() < deadline, f"no progress: {len(done)}/{len(ids)} finished"
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
        if on_step is not None:
            on_step(engine, step)
        if check_every_step:
            engine.check_integrity()
    return [done[i] for i in ids]


def assert_all_free(engine: LLMEngine) -> None:
    engine.check_integrity()
    stats = engine.cluster.stats()
    for inst in stats["instances"]:
        assert inst["free"] == inst["num_blocks"], inst
        assert inst["lent"] == inst["borrowed"] == 0, inst
    assert stats["ledger"] == [] or all(e["blocks"] == 0 for e in stats["ledger"]), stats["ledger"]


def assert_prefix_cached(engine: LLMEngine) -> None:
    """The same 45-token prompt twice on instance 0 (8-token rBlocks): the first leaves its 5
    full rBlocks cached, the second finds 40 tokens there; ``stats()`` says which rBlocks are
    cached (free, owned by nobody) and counts the tokens looked up and found."""
    prompt = list(range(3, 48))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for num_hits in (0, 40):
        run(engine, [prompt], params, homes=[0])
        first, *others = engine.cluster.stats()["instances"]
        assert (first["prefix_cache_queries"], first["prefix_cache_hits"]) == (
            45 * (1 + bool(num_hits)),
            num_hits,
        )
        assert first["cached"] == len(first["cached_block_ids"]) == 5, first
        assert all(first["block_owners"][b] is None for b in first["cached_block_ids"])
        assert first["free"] == first["num_blocks"]
        for inst in others:
            assert inst["cached"] == inst["prefix_cache_queries"] == 0
            assert inst["cached_block_ids"] == []
