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


def lender_killer(after_step: int = 8):
    """An ``on_step`` for ``run`` that kills, once, the first instance lending rBlocks after
    ``after_step`` (a crash: nobody is told, the next step finds out), and the list it records
    the killed instance in."""
    killed: list[int] = []

    def kill(engine: LLMEngine, step: int) -> None:
        if killed or step <= after_step:
            return
        stats = engine.cluster.stats()["instances"]  # type: ignore[attr-defined]
        lenders = [s["instance_id"] for s in stats if s["lent"] > 0]
        if lenders:
            engine.cluster.kill_instance(lenders[0])  # type: ignore[attr-defined]
            killed.append(lenders[0])

    return kill, killed


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


def tiny_block_bytes(block_size: int = 8) -> int:
    """Bytes of one rBlock of the tiny model in float32."""
    from infinite_llm.attention.kv_pool import KVPool
    from infinite_llm.model.loader import parse_dtype

    arch = loaded_model("tiny").arch
    return KVPool.bytes_per_block(
        arch.num_layers, arch.num_kv_heads, arch.head_dim, block_size, parse_dtype("float32")
    )


def host_pool_before_memory(engine: LLMEngine, expected) -> None:
    """A request of 33 rBlocks (240 + 24 tokens) on a model instance of 12, with a memory
    instance of 12 and a host pool of 24 (``make_engine(1, 12, block_size=8, budget=64,
    num_memory_instances=1, host_kv_memory=24 * tiny_block_bytes())``): its 21 borrowed come
    from the host pool, the faster tier; tokens exact, all free after."""
    from conftest import random_prompts

    stats = engine.cluster.stats()
    assert [(i["kind"], i["tier"], i["num_blocks"]) for i in stats["instances"]] == [
        ("model", "device", 12),
        ("memory", "memory", 12),
        ("host", "host", 24),
    ]
    prompts = random_prompts(1, (240, 240), 256, seed=53)
    lent = []
    got = run(
        engine,
        prompts,
        on_step=lambda e, s: lent.append(
            tuple(i["lent"] for i in e.cluster.stats()["instances"][1:])
        ),
    )
    assert got == expected(prompts)
    assert max(host for _, host in lent) == 21 and max(mem for mem, _ in lent) == 0
    assert_all_free(engine)
