"""``infinite-llm bench capacity``: the longest context served with borrowing vs ``--no-borrow``.

Same instances, same pools, same binary. For each mode the engine reports the longest request
it accepts (its ``max_model_len``); the bench then proves it by serving a request of exactly
that length (prompt + ``--output-tokens`` generated tokens) to completion, and checks that one
token more is refused with a clear error rather than crashing or hanging. The ratio of the two
longest contexts is the paper's "x longer context" figure for this cluster.

``--memory-instances`` and ``--host-kv-blocks`` add pools without a model to the borrowing
run (memory instances; a host pool per instance: ``kvcache.tiers``); ``served/pooled`` is the
longest context served over what every pool together holds.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from tqdm import tqdm

from infinite_llm.bench.common import emit, format_table, machine_info


def pooled_blocks(args: argparse.Namespace, borrowing: bool) -> int:
    """rBlocks of every pool of the run: the model instances', and with borrowing the memory
    instances' and the host pools'."""
    n = args.instances * args.kv_blocks
    if borrowing:
        n += args.memory_instances * (args.memory_kv_blocks or args.kv_blocks)
        n += args.instances * args.host_kv_blocks
    return n


def serve_longest(args: argparse.Namespace, borrowing: bool, loaded: Any) -> dict[str, Any]:
    from infinite_llm import LLM, SamplingParams
    from infinite_llm.attention.kv_pool import KVPool
    from infinite_llm.model.loader import parse_dtype

    arch = loaded.arch
    per_block = KVPool.bytes_per_block(
        arch.num_layers, arch.num_kv_heads, arch.head_dim, args.block_size, parse_dtype("float32")
    )
    lenders: dict[str, Any] = {}
    if borrowing and args.memory_instances:
        lenders["num_memory_instances"] = args.memory_instances
        lenders["kv_memory_per_memory_instance"] = (
            args.memory_kv_blocks or args.kv_blocks
        ) * per_block
    if borrowing and args.host_kv_blocks:
        lenders["host_kv_memory"] = args.host_kv_blocks * per_block
    llm = LLM(
        args.model,
        loaded_model=loaded,
        num_instances=args.instances,
        block_size=args.block_size,
        kv_blocks_per_instance=args.kv_blocks,
        enable_borrowing=borrowing,
        **lenders,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        progress=False,
    )
    engine = llm.engine
    longest = engine.max_model_len
    rng = random.Random(args.seed)
    prompt_len = longest - args.output_tokens
    prompt = [rng.randrange(3, loaded.arch.vocab_size - 1) for _ in range(prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - start
    served = len(out.prompt_token_ids) + len(out.outputs[0].token_ids)
    refused = None
    try:
        engine.make_request(prompt + [3] * args.output_tokens, params)
    except ValueError as exc:
        refused = str(exc)
    peak = llm.cluster_stats()
    llm.check_integrity()
    return {
        "max_model_len": longest,
        "served_tokens": served,
        "finish_reason": out.outputs[0].finish_reason,
        "seconds": elapsed,
        "one_more_refused": refused is not None,
        "refusal": refused,
        "pool_tokens_per_instance": args.kv_blocks * args.block_size,
        "pooled_tokens": pooled_blocks(args, borrowing) * args.block_size,
        "all_free_after": all(i["free"] == i["num_blocks"] for i in peak["instances"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="infinite-llm bench capacity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", default="tiny", help="tiny (fast, default) or smollm2 (real compute)"
    )
    parser.add_argument("--instances", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--kv-blocks", type=int, default=64, help="rBlocks per instance")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--memory-instances", type=int, default=0, help="memory instances in the borrowing run"
    )
    parser.add_argument(
        "--memory-kv-blocks", type=int, default=None, help="rBlocks per memory instance"
    )
    parser.add_argument(
        "--host-kv-blocks", type=int, default=0, help="rBlocks of each instance's host pool"
    )
    parser.add_argument("--output-tokens", type=int, default=8)
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=1 << 22,
        help="raise the model's own limit so the pools are what binds",
    )
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import logging

    from infinite_llm.model.loader import load_model

    # The pools are meant to bind before --max-model-len: the engine's warning about it is noise here.
    logging.getLogger("infinite_llm.llm_engine").setLevel(logging.ERROR)

    loaded = load_model(args.model, progress=False)
    instance_counts = list(args.instances)
    rows, runs = [], []
    bar = tqdm(total=2 * len(instance_counts), desc="bench capacity", unit="run")
    for n in instance_counts:
        args.instances = n
        base = serve_longest(args, False, loaded)
        bar.update(1)
        ours = serve_longest(args, True, loaded)
        bar.update(1)
        ratio = ours["served_tokens"] / base["served_tokens"]
        runs.append(
            {
                "instances": n,
                "no_borrow": base,
                "borrowing": ours,
                "context_ratio": ratio,
                "ratio_over_instances": ratio / n,
                "served_over_pooled": ours["served_tokens"] / ours["pooled_tokens"],
            }
        )
        rows.append(
            {
                "instances": n,
                "pool_tokens": base["pool_tokens_per_instance"],
                "no_borrow_tokens": base["served_tokens"],
                "borrowing_tokens": ours["served_tokens"],
                "ratio": ratio,
                "ratio/N": ratio / n,
                "pooled_tokens": ours["pooled_tokens"],
                "served/pooled": ours["served_tokens"] / ours["pooled_tokens"],
                "refused_past": base["one_more_refused"] and ours["one_more_refused"],
                "s_borrowing": ours["seconds"],
            }
        )
    bar.close()
    result = {
        "bench": "capacity",
        "model": args.model,
        "block_size": args.block_size,
        "kv_blocks_per_instance": args.kv_blocks,
        "memory_instances": args.memory_instances,
        "memory_kv_blocks": args.memory_kv_blocks or args.kv_blocks,
        "host_kv_blocks": args.host_kv_blocks,
        "machine": machine_info(),
        "runs": runs,
    }
    emit(
        result,
        format_table(rows, list(rows[0]), "bench capacity: longest context served"),
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
