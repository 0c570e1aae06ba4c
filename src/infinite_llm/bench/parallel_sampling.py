"""``infinite-llm bench sampling``: one request of ``n`` samples against ``n`` separate requests
with the same prompt, on the same engine: peak rBlocks in use and output throughput.

The samples of one request share the prompt's full rBlocks (``kvcache.shared``); ``n``
separate requests each hold and compute the whole prompt (the prefix cache is off here: with it
they would share the prompt too, which ``bench prefix`` measures). Both runs draw the same tokens
(sample i and separate request i both sample from ``seed + i``, ``ignore_eos``), so they do the
same decoding work. rBlocks are counted after every step (used + lent, every instance).

    infinite-llm bench sampling --model tiny --n 4 --input-len 1000 --output-len 32 --json
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from infinite_llm.bench.common import emit, format_table, machine_info
from infinite_llm.cli.engine_args import add_engine_args, engine_config_from_args
from infinite_llm.llm_engine import LLMEngine
from infinite_llm.sampling_params import SamplingParams


def used_blocks(engine: LLMEngine) -> int:
    """rBlocks held by requests now, over every pool."""
    return sum(i["used"] + i["lent"] for i in engine.cluster.stats()["instances"])


def run(engine: LLMEngine, prompt: list[int], params: Sequence[SamplingParams]) -> dict[str, Any]:
    """Generate one request per ``params`` on ``prompt`` to the end; peak rBlocks, throughput."""
    for p in params:
        engine.add_request(engine.make_request(prompt, p))
    peak = num_tokens = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                num_tokens += sum(len(c.token_ids) for c in out.outputs)
        peak = max(peak, used_blocks(engine))
    duration = time.perf_counter() - start
    return {
        "peak_used_blocks": peak,
        "output_tokens": num_tokens,
        "duration_s": duration,
        "output_throughput": num_tokens / duration,
    }


def compare(
    engine: LLMEngine, n: int, input_len: int, output_len: int, seed: int = 0
) -> dict[str, Any]:
    """One request of ``n`` samples, then ``n`` separate requests with its prompt and seeds
    (``seed``: the prompt's and the samples')."""
    rng = random.Random(seed)
    vocab = engine.arch.vocab_size
    prompt = [rng.randrange(vocab // 4, vocab - vocab // 4) for _ in range(input_len)]
    base = SamplingParams(temperature=1.0, seed=seed, max_tokens=output_len, ignore_eos=True)
    run(engine, prompt[:8], [SamplingParams(max_tokens=2)])  # warm-up, not measured
    shared = run(engine, prompt, [replace(base, n=n)])
    separate = run(engine, prompt, [replace(base, seed=seed + i) for i in range(n)])
    return {
        "bench": "sampling",
        "model": engine.loaded.source.name,
        "config": {
            "n": n,
            "input_len": input_len,
            "output_len": output_len,
            "seed": seed,
            "block_size": engine.cluster.block_size,
            "num_instances": engine.config.num_instances,
        },
        "machine": machine_info(),
        "results": [{"mode": f"n={n}", **shared}, {"mode": f"{n} x n=1", **separate}],
        "memory_ratio": separate["peak_used_blocks"] / shared["peak_used_blocks"],
        "throughput_ratio": shared["output_throughput"] / separate["output_throughput"],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinite-llm bench sampling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_engine_args(p)
    p.add_argument("--n", type=int, default=4, help="samples per request")
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object (table to stderr)")
    return p


COLUMNS = ["mode", "peak_used_blocks", "output_tokens", "duration_s", "output_throughput"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = engine_config_from_args(args)
    config = replace(config, cache=replace(config.cache, enable_prefix_caching=False))
    engine = LLMEngine(config, progress=False)
    try:
        result = compare(engine, args.n, args.input_len, args.output_len, args.seed)
    finally:
        engine.shutdown()
    title = (
        f"bench sampling: {result['model']}, {args.input_len} in / {args.output_len} out, "
        f"n={args.n}: memory {result['memory_ratio']:.2f}x less, "
        f"throughput {result['throughput_ratio']:.2f}x"
    )
    emit(result, format_table(result["results"], COLUMNS, title), args.json)
    return 0
