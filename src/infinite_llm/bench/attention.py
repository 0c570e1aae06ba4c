"""Micro-benchmark of DistAttention's kernels: decode MA split over shards vs one monolithic MA.

Workload (SmolLM2-135M's attention shapes): ``--batch`` requests (default 1) each decoding one
token, Hq=9 query heads over Hkv=3 KV heads (GQA group 3), head_dim 64, block_size 16 (``--block-size``), one
layer's pool. For every context length and shard count S:

* ``mono``: the kernel over the whole context in one MA call, on one pool that holds it;
* ``split``: the context cut into S contiguous runs of rBlocks, each in a pool of its own laid
  out as mono's (as DistAttention places them on S instances), one MA per run, then the
  log-sum-exp merge of the S states: what S instances spend one after another (on a cluster
  they run at once). Not mono's pool: moving between head regions of a large pool costs about
  0.1 ms here (128K, 4 shards: +16 % read from mono's pool, +4 % from their own);
* ``fused``: the same shards in one native call that also merges (``decode_attention_shards``,
  what the in-process transport runs for a decode layer spread over pools);
* ``kernel`` (``--impl auto`` or ``native``): mono and split again as bare C calls whose arguments
  were bound beforehand (as the engine's native decoder runs a step's decode call): the
  kernels' own cost, without the Python of ``micro_attention`` and the merge per call, which
  after an MA has streamed its KV through the caches starts cold (tens of microseconds a
  call here; a 32K context's MA takes about 2 ms); ``kernel_overhead_pct`` = kernel split /
  kernel mono - 1;
* ``overhead`` = split / mono - 1 (``fused_overhead_pct``: fused / mono - 1); ``bandwidth`` = KV bytes read / time, against the machine's
  read bandwidth measured here: the cache flushes before the timed calls are timed reads of
  128 MiB, taken between that row's calls (a large torch sum at the start of the run as well);
* ``pattern read`` (each context's first row): the same rBlocks read by a C loop that only sums
  them (``kv_read``), as an MA walks them: what this access pattern can draw from memory here;
* ``error``: max abs difference of the split result to a float64 reference (chunked, exact);
  the fused and kernel results are checked against it too (``fused_max_abs_err``,
  ``kernel_max_abs_err``).

``python -m infinite_llm.bench.attention --json`` prints one JSON object; the table goes to
stdout otherwise; ``--out DIR`` writes ``attention.png`` (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from infinite_llm.attention import native_ops
from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.kv_pool import empty_kv
from infinite_llm.attention.merge import merge_attention_states_
from infinite_llm.attention.micro import IMPLS, micro_attention
from infinite_llm.bench.attention_report import format_table, targets, write_plot
from infinite_llm.bench.attention_shards import (
    Shard,
    cut_shards,
    fused_call,
    kernel_calls,
    own_pools,
)
from infinite_llm.bench.common import (
    CacheFlusher,
    cache_flusher,
    read_bandwidth_samples,
    time_alternating,
)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 9, 3, 64
DEFAULT_BLOCK_SIZE = 16  # the engine's default rBlock size
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NATIVE_IMPLS = ("auto", "native")  # the impls whose decode MA is the native kernel
DEFAULT_FLUSH_MIB = 128  # several times a last-level cache (32 MiB on the development machine)
# a row alternates up to 6 calls, each after a 128 MiB flush: 2 s gives a 32K row about 60 samples
DEFAULT_BUDGET_S = 2.0
DEFAULT_CONTEXTS = (4096, 16384, 32768, 65536, 131072, 262144, 524288)


def _reference_f64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: MABatch,
    scale: float,
    chunk_blocks: int = 1024,
) -> torch.Tensor:
    """Exact decode attention in float64, streaming the context a few rBlocks at a time (the
    whole context is never copied: peak memory stays near one chunk)."""
    group, block_size = NUM_HEADS // NUM_KV_HEADS, k.shape[2]
    outs = []
    for i in range(batch.num_requests):
        qi = q[batch.query_start[i] : batch.query_start[i + 1]].double()  # [L, Hq, D]
        qg = qi.view(qi.shape[0], NUM_KV_HEADS, group, HEAD_DIM)
        top = torch.full(qg.shape[:3], float("-inf"), dtype=torch.float64)
        total = torch.zeros_like(top)
        acc = torch.zeros(qg.shape, dtype=torch.float64)
        blocks, ctx = batch.block_ids[i], batch.context_lens[i]
        for b0 in range(0, len(blocks), chunk_blocks):
            ids = torch.tensor(blocks[b0 : b0 + chunk_blocks])
            valid = min(ctx - b0 * block_size, len(ids) * block_size)
            kc = k.index_select(1, ids).reshape(NUM_KV_HEADS, -1, HEAD_DIM)[:, :valid].double()
            vc = v.index_select(1, ids).reshape(NUM_KV_HEADS, -1, HEAD_DIM)[:, :valid].double()
            scores = torch.einsum("lhgd,hsd->lhgs", qg, kc) * scale
            new_top = torch.maximum(top, scores.amax(-1))
            fix = torch.exp(top - new_top)
            p = torch.exp(scores - new_top[..., None])
            total = total * fix + p.sum(-1)
            acc = acc * fix[..., None] + torch.einsum("lhgs,hsd->lhgd", p, vc)
            top = new_top
        outs.append((acc / total[..., None]).reshape(qi.shape))
    return torch.cat(outs)


def bench_context(
    context: int,
    shard_counts: Sequence[int],
    impl: str,
    dtype: torch.dtype,
    batch_size: int,
    layout: str,
    budget_s: float,
    seed: int,
    progress: Callable[[], None],
    flush: CacheFlusher | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> list[dict]:
    """Every shard count at one context length; one pool for the whole grid row."""
    num_blocks = -(-context // block_size)
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_KV_HEADS, num_blocks * batch_size, block_size, HEAD_DIM)
    k, v = empty_kv(shape, dtype), empty_kv(shape, dtype)  # as the engine's pools
    k.copy_(torch.randn(shape, generator=gen, dtype=torch.float32))
    v.copy_(torch.randn(shape, generator=gen, dtype=torch.float32))
    order = list(range(num_blocks * batch_size))
    if layout == "shuffled":  # rBlocks wherever the pool had room, as in a long-running engine
        random.Random(seed).shuffle(order)
    block_ids = [order[i * num_blocks : (i + 1) * num_blocks] for i in range(batch_size)]
    contexts = [context] * batch_size
    q = (torch.randn(batch_size, NUM_HEADS, HEAD_DIM, generator=gen) * 2).to(dtype)
    scale = HEAD_DIM**-0.5
    mono_batch = MABatch([1] * batch_size, block_ids, contexts, block_size)
    truth = _reference_f64(q, k, v, mono_batch, scale)
    kv_bytes = batch_size * context * NUM_KV_HEADS * HEAD_DIM * 2 * k.element_size()

    def mono() -> tuple[torch.Tensor, torch.Tensor]:
        return micro_attention(q, k, v, mono_batch, scale, impl=impl)

    mono_err = (mono()[0].double() - truth).abs().max().item()
    read_ids = torch.tensor([b for blocks in block_ids for b in blocks], dtype=torch.int32)

    def pattern_read() -> int | None:  # the same rBlocks read without the arithmetic
        return native_ops.kv_read_native(k, v, read_ids)

    mono_kernel = kernel_calls(q, [(k, v, mono_batch)], scale) if impl in NATIVE_IMPLS else None
    rows = []
    for num_shards in shard_counts:
        batches = cut_shards(block_ids, contexts, num_shards, block_size)
        shards = own_pools(k, v, batches, layout, seed) if num_shards > 1 else [(k, v, mono_batch)]
        parts = [micro_attention(q, sk, sv, b, scale, impl=impl) for sk, sv, b in shards]

        def split(shards: list[Shard] = shards) -> tuple[torch.Tensor, torch.Tensor]:
            states = [micro_attention(q, sk, sv, b, scale, impl=impl) for sk, sv, b in shards]
            return merge_attention_states_([o for o, _ in states], [lse for _, lse in states])

        # The merge alone, as split runs it (in place), into a copy of the first state: every
        # call merges the previous result again (other values, the same work).
        outs = [parts[0][0].clone()] + [o for o, _ in parts[1:]]
        lses = [parts[0][1].clone()] + [lse for _, lse in parts[1:]]

        def merge(outs: list = outs, lses: list = lses) -> tuple[torch.Tensor, torch.Tensor]:
            return merge_attention_states_(outs, lses)

        fns: dict[str, Callable[[], object]] = {
            "mono": mono,
            "split": split if num_shards > 1 else mono,
        }
        fused = fused_call(q, shards, scale, impl) if num_shards > 1 else None
        if fused is not None:
            fns["fused"] = fused
        split_kernel = kernel_calls(q, shards, scale) if mono_kernel and num_shards > 1 else None
        if mono_kernel is not None and split_kernel is not None:
            fns["mono_kernel"], fns["split_kernel"] = mono_kernel[0], split_kernel[0]
        if not rows and pattern_read() is not None:  # once per context, its first row
            fns["read"] = pattern_read
        first_sample = len(flush.samples) if flush is not None else 0
        timed = dict(zip(fns, time_alternating(list(fns.values()), budget_s, flush=flush)))
        during = flush.samples[first_sample:] if flush is not None else []
        mono_t, split_t = timed["mono"], timed["split"]
        merge_t = time_alternating([merge], min(budget_s, 0.05))[0] if num_shards > 1 else [0.0]
        err = mono_err if num_shards == 1 else (split()[0].double() - truth).abs().max().item()
        split_s, mono_s = statistics.median(split_t), statistics.median(mono_t)
        med = {name: statistics.median(t) for name, t in timed.items()}
        fused_s, read_s = med.get("fused"), med.get("read")
        fused_err = (fused()[0].double() - truth).abs().max().item() if fused is not None else None
        kernel_err = None
        if split_kernel is not None:
            split_kernel[0]()
            kernel_err = (split_kernel[1]().double() - truth).abs().max().item()
        kernel_pct = (
            (med["split_kernel"] / med["mono_kernel"] - 1) * 100 if "split_kernel" in med else None
        )
        rows.append(
            {
                "impl": impl,
                "context": context,
                "shards": num_shards,
                "time_ms": split_s * 1e3,
                "time_min_ms": min(split_t) * 1e3,
                "merge_ms": statistics.median(merge_t) * 1e3,
                "mono_ms": mono_s * 1e3,
                "mono_min_ms": min(mono_t) * 1e3,
                "overhead_pct": (split_s / mono_s - 1) * 100,
                "overhead_min_pct": (min(split_t) / min(mono_t) - 1) * 100,
                "samples": len(split_t),
                "kv_bytes": kv_bytes,
                "fused_ms": None if fused_s is None else fused_s * 1e3,
                "fused_overhead_pct": None if fused_s is None else (fused_s / mono_s - 1) * 100,
                "fused_max_abs_err": fused_err,
                "kernel_mono_ms": med["mono_kernel"] * 1e3 if "mono_kernel" in med else None,
                "kernel_split_ms": med["split_kernel"] * 1e3 if "split_kernel" in med else None,
                "kernel_overhead_pct": kernel_pct,
                "kernel_max_abs_err": kernel_err,
                "gbps": kv_bytes / split_s / 1e9,
                "gbps_best": kv_bytes / min(split_t) / 1e9,
                "read_gbps_during": statistics.median(during) if during else None,
                "pattern_read_gbps": None if read_s is None else kv_bytes / read_s / 1e9,
                "max_abs_err": err,
            }
        )
        # this row's pools go before the next row's are made
        del shards, parts, outs, lses, split, merge, fused, split_kernel, fns, timed
        progress()
    return rows


def run_attention_bench(
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    shard_counts: Sequence[int] = (1, 2, 4, 8, 16),
    impls: Sequence[str] = ("auto",),
    dtype: str = "float32",
    batch_size: int = 1,
    layout: str = "shuffled",
    budget_s: float = DEFAULT_BUDGET_S,
    seed: int = 0,
    show_progress: bool = True,
    flush_mib: int = DEFAULT_FLUSH_MIB,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict:
    """The whole grid; returns one JSON-ready dict."""
    from tqdm import tqdm

    flush = cache_flusher(flush_mib)
    samples = read_bandwidth_samples(512 << 20, 9)
    read_gbps, read_best_gbps = statistics.median(samples), max(samples)
    results: list[dict] = []
    with tqdm(
        total=len(contexts) * len(shard_counts) * len(impls),
        disable=not show_progress,
        file=sys.stderr,
    ) as bar:
        for impl in impls:
            for context in contexts:
                bar.set_description(f"{impl} {context // 1024}K")
                results += bench_context(
                    context,
                    shard_counts,
                    impl,
                    DTYPES[dtype],
                    batch_size,
                    layout,
                    budget_s,
                    seed,
                    lambda: bar.update(),
                    flush,
                    block_size,
                )
    for row in results:  # against the bandwidth read between this row's calls where there is one
        row["pct_of_bw_start"] = row["gbps"] / read_gbps * 100
        row["pct_of_bw"] = row["gbps"] / (row["read_gbps_during"] or read_gbps) * 100
        row["pct_of_bw_best"] = row["gbps_best"] / read_best_gbps * 100
        pattern = row["pattern_read_gbps"]
        row["pct_of_pattern_read"] = row["gbps"] / pattern * 100 if pattern else None
    return {
        "benchmark": "attention",
        "config": {
            "num_heads": NUM_HEADS,
            "num_kv_heads": NUM_KV_HEADS,
            "head_dim": HEAD_DIM,
            "block_size": block_size,
            "batch_size": batch_size,
            "query_tokens_per_request": 1,
            "dtype": dtype,
            "layout": layout,
            "impls": list(impls),
            "contexts": list(contexts),
            "shards": list(shard_counts),
            "threads": torch.get_num_threads(),
            "timing": "median of alternated samples (mono, split, fused and the kernel calls "
            "interleaved); *_min: best",
            "split_pools": "one per shard (as on that many instances); mono: one holding it all",
            "cache_flush_mib": flush_mib,
        },
        "machine": {
            "read_gbps": read_gbps,
            "read_best_gbps": read_best_gbps,
            "read_measure": "torch.sum over 512 MiB float32 at the start: median and best of 9; "
            "per row, read_gbps_during: median of the timed cache flushes (torch.sum over "
            "--flush-mib MiB) between that row's calls, which pct_of_bw is taken against",
        },
        "results": results,
        "targets": targets(results),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infinite-llm bench attention", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS))
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--impl", nargs="+", default=["auto"], choices=IMPLS, help="MA kernel(s) to time"
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=1, help="requests decoding together")
    parser.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help="tokens per rBlock (the engine's default 16; vLLM's CPU backend defaults to 128)",
    )
    parser.add_argument(
        "--layout", default="shuffled", choices=["shuffled", "contiguous"], help="rBlock placement"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds of timing per grid row, its calls alternated (the full grid took 88 s "
        "with the default 2 s on a 2-core Zen 4)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--flush-mib",
        type=int,
        default=DEFAULT_FLUSH_MIB,
        help="MiB read before every timed call to evict the caches (0: calls find what the "
        "previous one left in the cache)",
    )
    parser.add_argument("--out", type=Path, default=None, help="directory for attention.png")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.inference_mode():
        report = run_attention_bench(
            args.contexts,
            args.shards,
            args.impl,
            args.dtype,
            args.batch,
            args.layout,
            args.budget,
            args.seed,
            show_progress=not args.no_progress,
            flush_mib=args.flush_mib,
            block_size=args.block_size,
        )
    print(json.dumps(report) if args.json else format_table(report))
    if args.out is not None:
        path = write_plot(report, args.out)
        if path is not None:
            print(f"plot: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
