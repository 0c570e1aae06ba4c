"""``infinite-llm bench engine``: prefill and decode throughput, ours vs transformers (and vLLM).

Workload (the same prompts for every engine, in one run): random 512-token prompts, 64 new
tokens, ignore_eos, greedy, at batch 1, 8 and 32. Method, identical for each engine: three
generates of the batch, with max_tokens 1, 32 and 64 (wall times t1, t32, t64);
prefill tok/s = B*prompt_len / t1; decode tok/s = B*(64-32) / (t64 - t32), the last 32 tokens
of every request. Not B*63 / (t64 - t1): engines with chunked prefill (ours, vLLM) start
decoding the first requests while later ones still prefill, so that difference leaves out
decode steps that ran inside the prefill phase (at batch 32 it read ours at 599 tok/s when a
steady decode step took 125 ms, 256 tok/s); transformers prefills the whole batch at once.
The batch-1 decode bound is measured bandwidth / weight bytes read per step. The bandwidth is
read at the start (a 1 GiB sum) and again just before and after each of our batch sizes (sums
over the model's own embedding table, no allocation): on a shared machine it moves by a third
within minutes, so the bound uses the samples taken around our batch-1 run.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from typing import Any

import torch
from tqdm import tqdm

from infinite_llm.bench.common import (
    emit,
    format_table,
    machine_info,
    measure_read_bandwidth,
    peak_rss_bytes,
    tensor_read_samples,
)

MIN_PROBE_BYTES = 64 << 20  # a bandwidth probe must be well beyond the last-level cache


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _rates(b: int, prompt_len: int, max_tokens: int, t_prefill: float, t_half: float, t_total: float) -> dict[str, float]:
    """Throughputs from the wall times of generates with 1, ``max_tokens // 2`` and
    ``max_tokens`` new tokens (see the module docstring)."""
    steps = max_tokens - max_tokens // 2
    decode_time = max(t_total - t_half, 1e-9)
    return {
        "prefill_s": t_prefill,
        "half_s": t_half,
        "total_s": t_total,
        "prefill_tok_s": b * prompt_len / t_prefill,
        "decode_tok_s": b * steps / decode_time,
        "decode_step_ms": decode_time / steps * 1e3,
    }


def make_ours(args: argparse.Namespace) -> Any:
    """Our engine, with a pool for the largest batch's whole contexts (nothing preempted)."""
    from infinite_llm import LLM

    max_batch = max(args.batch_sizes)
    blocks = max_batch * (-(-(args.prompt_len + args.max_tokens) // args.block_size)) + 16
    return LLM(args.model, dtype=args.dtype, block_size=args.block_size, kv_blocks_per_instance=blocks,
               max_num_seqs=max(max_batch, 1), max_num_batched_tokens=args.max_num_batched_tokens,
               attention_impl=args.attention_impl, progress=False)


def bench_ours(args: argparse.Namespace, llm: Any, prompts: list[list[int]], bar: tqdm) -> dict[int, Any]:
    from infinite_llm import SamplingParams

    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    half = SamplingParams(temperature=0.0, max_tokens=args.max_tokens // 2, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    probe = llm.engine.loaded.model.embed_tokens.weight
    results = {}
    for b in args.batch_sizes:
        batch = prompts[:b]
        around = tensor_read_samples(probe) if probe.nbytes >= MIN_PROBE_BYTES else []
        t_prefill, _ = _timed(lambda batch=batch: llm.generate(batch, one, use_tqdm=False))
        t_half, _ = _timed(lambda batch=batch: llm.generate(batch, half, use_tqdm=False))
        t_total, outs = _timed(lambda batch=batch: llm.generate(batch, full, use_tqdm=False))
        if around:
            around += tensor_read_samples(probe)
        results[b] = {**_rates(b, args.prompt_len, args.max_tokens, t_prefill, t_half, t_total),
                      "read_gbps_around": statistics.median(around) if around else None,
                      "token_ids": [o.outputs[0].token_ids for o in outs]}
        bar.update(1)
    llm.check_integrity()
    return results


@torch.inference_mode()
def bench_hf(args: argparse.Namespace, model_dir: str, prompts: list[list[int]], bar: tqdm) -> dict[int, Any]:
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    def generate(batch: list[list[int]], n: int) -> torch.Tensor:
        ids = torch.tensor(batch)
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)

    generate(prompts[:1], 4)
    results = {}
    for b in args.batch_sizes:
        batch = prompts[:b]
        t_prefill, _ = _timed(lambda batch=batch: generate(batch, 1))
        t_half, _ = _timed(lambda batch=batch: generate(batch, args.max_tokens // 2))
        t_total, out = _timed(lambda batch=batch: generate(batch, args.max_tokens))
        results[b] = {**_rates(b, args.prompt_len, args.max_tokens, t_prefill, t_half, t_total),
                      "token_ids": out[:, args.prompt_len:].tolist()}
        bar.update(1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infinite-llm bench engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--attention-impl", default="auto")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--peer", action="append", default=[], choices=["vllm"],
                        help="also run this engine on the same workload (needs `make bench-peers`)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2: decode is timed over the second half of the tokens")

    steps = len(args.batch_sizes) * (1 + (not args.no_hf) + len(args.peer))
    bar = tqdm(total=steps, desc="bench engine", unit="run")
    bandwidth = measure_read_bandwidth()
    llm = make_ours(args)  # the model is loaded once: the peak RSS is the engine's own
    prompts = make_prompts(max(args.batch_sizes), args.prompt_len, llm.engine.arch.vocab_size)
    weight_bytes = llm.engine.loaded.model.weight_bytes()
    ours = bench_ours(args, llm, prompts, bar)
    rss_ours = peak_rss_bytes()
    kv_bytes = sum(inst.pool.nbytes for inst in llm.engine.cluster.instances.values())
    model_dir = llm.engine.loaded.model_dir
    del llm
    engines: dict[str, dict[int, Any]] = {"infinite-llm": ours}
    if not args.no_hf:
        engines["transformers"] = bench_hf(args, model_dir, prompts, bar)
    peer_reports = {}
    for peer in args.peer:
        from infinite_llm.bench.peers.vllm import run_vllm_offline

        export_dir = os.path.join(tempfile.gettempdir(), f"infinite-llm-export-{args.model}-{args.dtype}")
        if not os.path.isfile(os.path.join(export_dir, "model.safetensors")):
            from infinite_llm.model.export import export_hf

            export_hf(args.model, export_dir, args.dtype)
        report = run_vllm_offline(
            export_dir, prompts, args.batch_sizes, args.max_tokens, timeout=3600,
            extra_args=["--dtype", args.dtype, "--max-num-batched-tokens", str(args.max_num_batched_tokens)],
        )
        engines[peer] = {
            r["batch_size"]: {**_rates(r["batch_size"], args.prompt_len, args.max_tokens, r["t_prefill_s"],
                                       r["t_half_s"], r["t_total_s"]), "token_ids": r["token_ids"]}
            for r in report["results"]
        }
        peer_reports[peer] = {k: v for k, v in report.items() if k != "results"}
        bar.update(len(args.batch_sizes))
    bar.close()

    # the bound from the bandwidth read around our batch-1 run where there is one
    first = args.batch_sizes[0]
    around_batch1 = ours[first]["read_gbps_around"] if first == 1 else None
    bound_gbps = around_batch1 or bandwidth
    limit_tok_s = bound_gbps * 1e9 / weight_bytes
    rows, figures = [], {}
    for name, res in engines.items():
        for b, r in res.items():
            row = {"engine": name, "batch": b, "prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"],
                   "decode_step_ms": r["decode_step_ms"]}
            if name != "infinite-llm":
                row["ours_decode_x"] = ours[b]["decode_tok_s"] / r["decode_tok_s"]
                row["ours_prefill_x"] = ours[b]["prefill_tok_s"] / r["prefill_tok_s"]
                row["same_tokens"] = sum(a == c for a, c in zip(ours[b]["token_ids"], r["token_ids"])) / b
            rows.append(row)
            figures.setdefault(name, {})[b] = {k: v for k, v in r.items() if k != "token_ids"} | {
                k: row[k] for k in ("ours_decode_x", "ours_prefill_x", "same_tokens") if k in row}
    result = {
        "bench": "engine",
        "model": args.model,
        "dtype": args.dtype,
        "workload": {"prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "batch_sizes": args.batch_sizes},
        "machine": machine_info(),
        "read_bandwidth_gb_s": bandwidth,
        "read_bandwidth_gb_s_around_batch1": around_batch1,
        "bound_bandwidth_gb_s": bound_gbps,
        "weight_bytes": weight_bytes,
        "batch1_decode_limit_tok_s": limit_tok_s,
        "batch1_decode_limit_tok_s_start": bandwidth * 1e9 / weight_bytes,
        "batch1_decode_fraction_of_limit": ours[first]["decode_tok_s"] / limit_tok_s if first == 1 else None,
        "peak_rss_bytes_ours": rss_ours,
        "kv_pool_bytes_ours": kv_bytes,
        "engines": figures,
        "peers": peer_reports,
    }
    table = format_table(rows, ["engine", "batch", "prefill_tok_s", "decode_tok_s", "decode_step_ms",
                                "ours_decode_x", "ours_prefill_x", "same_tokens"], "bench engine")
    table += (f"\nread bandwidth {bandwidth:.1f} GB/s at the start, {bound_gbps:.1f} for the bound; "
              f"weights {weight_bytes / 1e6:.0f} MB -> batch-1 decode bound "
              f"{limit_tok_s:.1f} tok/s; ours peak RSS {rss_ours / 1e9:.2f} GB (KV pool {kv_bytes / 1e9:.2f} GB reserved)")
    emit(result, table, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
