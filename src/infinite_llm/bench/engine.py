"""``infinite-llm bench engine``: prefill and decode throughput, ours vs transformers (and vLLM).

Workload (the same prompts for every engine, in one run): random 512-token prompts, 64 new
tokens, ignore_eos, greedy, at batch 1, 8 and 32. Method, identical for each engine:

* prefill tok/s = B*prompt_len / t1, t1 the wall time of a generate with max_tokens 1;
* decode: one run of the batch to 64 tokens, timed step by step (ours and vLLM: their engine's
  ``step()`` loop, each step's outputs counted; transformers: a logits processor stamps every
  step of ``generate``). A *full-batch decode step* comes after the last request's first token
  and gives all B requests a token; decode tok/s = B * (number of those steps) / (their time),
  each step's time being the interval since the previous step's outputs.

Why not the difference of two generates' wall times (t64 - t32): each
includes the whole prefill (at batch 32, 16K prompt tokens, 25-30 s here), whose run-to-run
noise (+-2 s) swamps the 32 decode steps (3 s); two runs of the same code read 1219 and 212
tok/s. Nor B*63 / (t64 - t1): engines with chunked prefill (ours, vLLM) decode the first
requests while later ones still prefill, so that difference leaves those decode steps out.
The batch-1 decode bound is measured bandwidth / weight bytes read per step. The bandwidth is
read at the start (a 1 GiB sum) and again just before and after each of our batch sizes (sums
over the model's own LM head, no allocation): on a shared machine it moves by a third
within minutes, so the bound uses the samples taken around our batch-1 run.
"""

from __future__ import annotations

import argparse
import os
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
from infinite_llm.bench.engine_timing import (
    Step,
    StepCounter,
    make_prompts,
    rates,
    ratio,
    timed,
)

MIN_PROBE_BYTES = 64 << 20  # a bandwidth probe must be well beyond the last-level cache


def _stepped_ours(
    llm: Any, batch: list[list[int]], params: Any
) -> tuple[float, list[Step], list[list[int]]]:
    """Our engine's step loop over ``batch`` (what ``LLM.generate`` runs), each step timed."""
    engine = llm.engine
    requests = [engine.make_request(p, params) for p in batch]
    for request in requests:
        engine.add_request(request)
    counter, finished = StepCounter(), {}
    try:
        while len(finished) < len(requests):
            outputs = engine.step()
            counter.record(outputs)
            finished |= {o.request_id: o for o in outputs if o.finished}
    finally:  # interrupted: free what is left, as LLM.generate does
        for request in requests:
            if request.request_id not in finished:
                engine.abort_request(request.request_id)
    total = time.perf_counter() - counter.start
    return (
        total,
        counter.steps,
        [list(finished[r.request_id].outputs[0].token_ids) for r in requests],
    )


def make_ours(args: argparse.Namespace) -> Any:
    """Our engine, with a pool for the largest batch's whole contexts (nothing preempted)."""
    from infinite_llm import LLM

    max_batch = max(args.batch_sizes)
    blocks = max_batch * (-(-(args.prompt_len + args.max_tokens) // args.block_size)) + 16
    return LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_blocks_per_instance=blocks,
        max_num_seqs=max(max_batch, 1),
        max_num_batched_tokens=args.max_num_batched_tokens,
        attention_impl=args.attention_impl,
        enable_prefix_caching=False,  # the batches repeat prompts; vLLM's peer runs without too
        progress=False,
    )


def bench_ours(
    args: argparse.Namespace, llm: Any, prompts: list[list[int]], bar: tqdm
) -> dict[int, Any]:
    from infinite_llm import SamplingParams

    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(
        prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False
    )
    model = llm.engine.loaded.model  # a resident table to sum: the LM head's (no copy made)
    probe = model.lm_head.panels if hasattr(model.lm_head, "panels") else model.embed_tokens.weight
    results = {}
    for b in args.batch_sizes:
        batch = prompts[:b]
        # the host's read rate around the run: for a CPU model only
        around = (
            tensor_read_samples(probe) if probe.is_cpu and probe.nbytes >= MIN_PROBE_BYTES else []
        )
        t_prefill, _ = timed(lambda batch=batch: llm.generate(batch, one, use_tqdm=False))
        t_total, steps, token_ids = _stepped_ours(llm, batch, full)
        if around:
            around += tensor_read_samples(probe)
        results[b] = {
            **rates(b, args.prompt_len, t_prefill, t_total, steps),
            "read_gbps_around": statistics.median(around) if around else None,
            "token_ids": token_ids,
        }
        bar.update(1)
    llm.check_integrity()
    return results


@torch.inference_mode()
def bench_hf(
    args: argparse.Namespace, model_dir: str, prompts: list[list[int]], bar: tqdm
) -> dict[int, Any]:
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype
    ]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval().to(args.device)

    class StepStamps:  # a logits processor: called once per generation step, after its forward
        def __init__(self, batch: int) -> None:
            self.batch, self.start, self.steps = batch, time.perf_counter(), []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.steps.append(
                (time.perf_counter() - self.start, self.batch, self.batch if not self.steps else 0)
            )
            return scores

    def generate(batch: list[list[int]], n: int, stamps: StepStamps | None = None) -> torch.Tensor:
        ids = torch.tensor(batch, device=args.device)
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            logits_processor=[stamps] if stamps else None,
        )

    generate(prompts[:1], 4)
    results = {}
    for b in args.batch_sizes:
        batch = prompts[:b]
        t_prefill, _ = timed(lambda batch=batch: generate(batch, 1))
        stamps = StepStamps(b)
        t_total, out = timed(
            lambda batch=batch, stamps=stamps: generate(batch, args.max_tokens, stamps)
        )
        results[b] = {
            **rates(b, args.prompt_len, t_prefill, t_total, stamps.steps),
            "token_ids": out[:, args.prompt_len :].tolist(),
        }
        bar.update(1)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="infinite-llm bench engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (both engines run there)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--attention-impl", default="auto")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        choices=["vllm"],
        help="also run this engine on the same workload (needs `make bench-peers`)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.max_tokens < 2:
        parser.error(
            "--max-tokens must be at least 2: decode is timed over the steps after the first token"
        )

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

        export_dir = os.path.join(
            tempfile.gettempdir(), f"infinite-llm-export-{args.model}-{args.dtype}"
        )
        if not os.path.isfile(os.path.join(export_dir, "model.safetensors")):
            from infinite_llm.model.export import export_hf

            export_hf(args.model, export_dir, args.dtype)
        report = run_vllm_offline(
            export_dir,
            prompts,
            args.batch_sizes,
            args.max_tokens,
            timeout=3600,
            extra_args=[
                "--dtype",
                args.dtype,
                "--max-num-batched-tokens",
                str(args.max_num_batched_tokens),
            ],
        )
        engines[peer] = {
            r["batch_size"]: {
                **rates(
                    r["batch_size"],
                    args.prompt_len,
                    r["t_prefill_s"],
                    r["t_total_s"],
                    [tuple(step) for step in r["steps"]],
                ),
                "token_ids": r["token_ids"],
            }
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
            row = {
                "engine": name,
                "batch": b,
                "prefill_tok_s": r["prefill_tok_s"],
                "decode_tok_s": r["decode_tok_s"],
                "decode_step_ms": r["decode_step_ms"],
            }
            if name != "infinite-llm":
                row["ours_decode_x"] = ratio(ours[b]["decode_tok_s"], r["decode_tok_s"])
                row["ours_prefill_x"] = ours[b]["prefill_tok_s"] / r["prefill_tok_s"]
                row["same_tokens"] = (
                    sum(a == c for a, c in zip(ours[b]["token_ids"], r["token_ids"])) / b
                )
            rows.append(row)
            figures.setdefault(name, {})[b] = {k: v for k, v in r.items() if k != "token_ids"} | {
                k: row[k] for k in ("ours_decode_x", "ours_prefill_x", "same_tokens") if k in row
            }
    result = {
        "bench": "engine",
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "workload": {
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "batch_sizes": args.batch_sizes,
        },
        "machine": machine_info(),
        "read_bandwidth_gb_s": bandwidth,
        "read_bandwidth_gb_s_around_batch1": around_batch1,
        "bound_bandwidth_gb_s": bound_gbps,
        "weight_bytes": weight_bytes,
        "batch1_decode_limit_tok_s": limit_tok_s,
        "batch1_decode_limit_tok_s_start": bandwidth * 1e9 / weight_bytes,
        "batch1_decode_fraction_of_limit": ratio(ours[first]["decode_tok_s"], limit_tok_s)
        if first == 1
        else None,
        "peak_rss_bytes_ours": rss_ours,
        "kv_pool_bytes_ours": kv_bytes,
        "engines": figures,
        "peers": peer_reports,
    }
    table = format_table(
        rows,
        [
            "engine",
            "batch",
            "prefill_tok_s",
            "decode_tok_s",
            "decode_step_ms",
            "ours_decode_x",
            "ours_prefill_x",
            "same_tokens",
        ],
        "bench engine",
    )
    table += (
        f"\nread bandwidth {bandwidth:.1f} GB/s at the start, {bound_gbps:.1f} for the bound; "
        f"weights {weight_bytes / 1e6:.0f} MB -> batch-1 decode bound "
        f"{limit_tok_s:.1f} tok/s; ours peak RSS {rss_ours / 1e9:.2f} GB (KV pool {kv_bytes / 1e9:.2f} GB reserved)"
    )
    emit(result, table, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
