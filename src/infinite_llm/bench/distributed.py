"""``infinite-llm bench distributed``: decode step time with a batch's KV spread over 1, 2, 4 instances.

Workloads (``--workloads BATCHxCONTEXT ...``, by default 1x4096 and 4x1024, in one run): BATCH
requests of CONTEXT random prompt tokens, greedy, all homed on instance 0 and prefilled in one
step. With N instances every pool holds ceil(total rBlocks / N)
(the whole generation's), so instance 0 fills its own pool and borrows the rest from the
others: the batch's KV is spread over N pools (N = 1: all local). Defragmentation is off (it
would bring blocks home). Each configuration runs in-process and on Ray (one actor per
instance). Decode steps that cross an rBlock boundary also borrow; the median hides them.
``--lenders memory host`` adds configurations of two pools where the second is not another
model instance's: a memory instance's (``placement`` memory) or the home's own host pool
(``host``); ``placement`` model is N model instances. On Ray the lender is an actor without
weights (a host pool's on its model actor's node).

Figures per configuration: median wall time of ``LLMEngine.step()`` over the measured decode
steps (min and max beside it; in-process configurations are alive together and their steps
interleaved, so machine noise hits them alike; Ray clusters run one at a time), its ratio to
the same backend's all-local step and to the in-process all-local step, the home's threads, the payload bytes that crossed instances per step (queries, new
K,V and their slots out; partial outputs and their lse back), remote MA calls per step, where
the rBlocks were, and whether the tokens equal the all-local run's. On Ray also, per layer, the
round trip (home issues every creditor's shard on its channel -> every (out, lse) back), the
part of it the channels themselves take (``wire``: send to the creditor's start, and its end,
or the local share's if later, to the reply read; neither side's compute), the creditor's time,
and, to compare with, a bare round trip on the channel with one layer's payload and a Ray
actor call (bare, and with that payload), and the share of the home's whole-step decodes
whose layers crossed in C (``cluster.native_plane``; the rest went through Python). The JSON
checks each figure against its target
(``distributed_report.TARGETS``); ``--out DIR`` writes ``distributed.png``.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.bench.common import emit, machine_info
from infinite_llm.bench.counting_executor import CountingExecutor
from infinite_llm.bench.distributed_report import (
    TARGETS,
    add_ratios,
    tables,
    target_checks,
    write_plot,
)
from infinite_llm.config import CacheConfig, EngineConfig
from infinite_llm.llm_engine import LLMEngine
from infinite_llm.model.loader import LoadedModel, load_model, parse_dtype
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.scheduler import SchedulerConfig

HOME = 0


def _engine(
    args: argparse.Namespace,
    loaded: LoadedModel,
    backend: str,
    num_instances: int,
    num_blocks: int,
    placement: str = "model",
) -> LLMEngine:
    """``num_instances`` pools of ``num_blocks``: model instances, or (``placement`` memory or
    host) one model instance and one pool without a model of that kind."""
    lenders: dict[str, Any] = {}
    if placement != "model":
        assert num_instances == 2, "a lender placement is one model instance and one lender"
        arch = loaded.arch
        nbytes = num_blocks * KVPool.bytes_per_block(
            arch.num_layers,
            arch.num_kv_heads,
            arch.head_dim,
            args.block_size,
            parse_dtype(args.dtype),
        )
        num_instances = 1
        if placement == "memory":
            lenders = {"num_memory_instances": 1, "kv_memory_per_memory_instance": nbytes}
        else:
            lenders = {"host_kv_memory": nbytes}
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        num_instances=num_instances,
        backend=backend,
        **lenders,
        attention_impl=args.attention_impl,
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=num_blocks,
            lending_cap=1.0,
            enable_prefix_caching=False,  # every placement prefills the same prompts afresh
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.batch * args.context, max_num_seqs=args.batch
        ),
    )
    engine = LLMEngine(config, loaded, progress=False)
    engine.cluster.defrag_interval_steps = 10**9  # type: ignore[attr-defined]
    return engine


def _ms(values: list[float], q: float = 50) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1e3


class _Run:
    """One configuration: an engine whose batch, all homed on instance 0, is spread over N pools."""

    def __init__(
        self,
        args: argparse.Namespace,
        loaded: LoadedModel,
        backend: str,
        num_instances: int,
        placement: str = "model",
    ) -> None:
        blocks_per_request = -(-(args.context + args.warmup + args.steps + 2) // args.block_size)
        self.num_blocks = math.ceil(args.batch * blocks_per_request / num_instances)
        self.backend, self.num_instances, self.num_layers = (
            backend,
            num_instances,
            loaded.arch.num_layers,
        )
        self.placement = placement
        self.engine = _engine(args, loaded, backend, num_instances, self.num_blocks, placement)
        self.cluster: Any = self.engine.cluster
        self.counter = None
        if backend == "inprocess":
            kv_bytes = torch.empty((), dtype=parse_dtype(args.dtype)).element_size()
            self.counter = CountingExecutor(self.cluster.transport, loaded.arch, kv_bytes, HOME)
            for inst in self.cluster.instances.values():
                if not inst.is_memory:
                    inst.runner.executor = self.counter
        self.times: list[float] = []
        self.tokens: dict[str, list[int]] = {}

    def start(self, prompts: list[list[int]], max_tokens: int) -> None:
        """Queue the batch and prefill it (one step: the token budget holds every prompt)."""
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        for prompt in prompts:
            request = self.engine.make_request(prompt, params)
            self.engine.add_request(request, home=HOME)
            self.tokens[request.request_id] = []
        while any(not t for t in self.tokens.values()):
            self.step()

    def step(self) -> float:
        start = time.perf_counter()
        outs = self.engine.step()
        elapsed = time.perf_counter() - start
        for out in outs:
            self.tokens[out.request_id] = out.outputs[0].token_ids
        return elapsed

    def _bytes(self, stats: dict[str, Any]) -> tuple[int, int]:
        if self.counter is not None:
            return self.counter.bytes_sent, self.counter.bytes_received
        return stats["ray"]["bytes_sent"], stats["ray"]["bytes_received"]

    def mark(self) -> None:
        self.before = self.cluster.stats()
        self.bytes_before = self._bytes(self.before)

    def finish(self, steps: int) -> dict[str, Any]:
        """Figures of the timed steps; then runs the batch to its end and checks every manager."""
        after = self.cluster.stats()
        (sent0, recv0), (sent1, recv1) = self.bytes_before, self._bytes(after)
        while self.engine.has_unfinished_requests():
            self.step()
        self.engine.check_integrity()
        row: dict[str, Any] = {
            "backend": self.backend,
            "instances": self.num_instances,
            "placement": self.placement,
            "blocks_per_pool": self.num_blocks,
            "step_ms": statistics.median(self.times) * 1e3,
            "step_ms_min": min(self.times) * 1e3,
            "step_ms_max": max(self.times) * 1e3,
            "bytes_out_per_step": (sent1 - sent0) / steps,
            "bytes_back_per_step": (recv1 - recv0) / steps,
            "remote_ma_per_step": (after["remote_ma_calls"] - self.before["remote_ma_calls"])
            / steps,
            "blocks_per_instance": [i["used"] + i["lent"] for i in self.before["instances"]],
            "preemptions": sum(i["preemptions"] for i in after["instances"]),
            "false_replies": after["false_replies"],
            "tokens": list(self.tokens.values()),
            "threads": (
                after["ray"]["threads"].get(HOME)
                if self.backend == "ray"
                else torch.get_num_threads()
            ),
        }
        if self.backend == "ray":
            row.update(
                _ray_figures(self.cluster, self.num_layers, steps, row["bytes_out_per_step"])
            )
        return row


def measure(
    args: argparse.Namespace,
    loaded: LoadedModel,
    backend: str,
    instances: list[int],
    prompts: list[list[int]],
    bar: tqdm,
    lenders: list[str] = (),  # type: ignore[assignment]
) -> list[dict[str, Any]]:
    """These instance counts (and two-pool lender placements) of one backend at once, their
    timed steps interleaved (round robin, rotating who goes first) so that a noisy machine slows
    them all alike."""
    runs: list[_Run] = []
    try:
        configs = [(n, "model") for n in instances] + [(2, kind) for kind in lenders]
        for n, placement in configs:
            runs.append(_Run(args, loaded, backend, n, placement))
            bar.update(1)
        for run in runs:
            run.start(
                prompts, args.warmup + args.steps + 2
            )  # one step after the timed ones ends it
            for _ in range(args.warmup):
                run.step()
            run.mark()
            bar.update(1)
        for i in range(args.steps):
            for j in range(len(runs)):
                run = runs[(i + j) % len(runs)]
                run.times.append(run.step())
        rows = [run.finish(args.steps) for run in runs]
        bar.update(len(runs))
        return rows
    finally:
        for run in runs:
            run.engine.shutdown()


def _ray_figures(
    cluster: Any, num_layers: int, steps: int, bytes_out_per_step: float
) -> dict[str, Any]:
    """Per-layer figures of the measured steps (the last ones each actor recorded)."""
    snaps = cluster.snapshots()
    calls = steps * num_layers
    home = next(s for s in snaps if s.instance_id == HOME)
    # One sample per layer and step; the closing step (one per layer) came after the timed ones.
    window = slice(-(calls + num_layers), -num_layers)
    round_trips = home.layer_round_trip_s[window]
    waits = home.layer_remote_wait_s[window]
    wires = home.layer_wire_s[window]
    serve = [x for s in snaps if s.instance_id != HOME for x in s.shard_serve_s[window]]
    fused = home.transport["fused_remote_steps"]
    figures: dict[str, Any] = {
        "layer_round_trip_ms": _ms(round_trips),
        "layer_remote_wait_ms": _ms(waits),
        "layer_wire_ms": _ms(wires),
        "creditor_ma_ms": _ms(serve),
        # of the home's whole-step decodes with remote shards, those whose layers crossed in C
        "steps_exchanged_in_c": home.transport["native_remote_steps"] / fused if fused else None,
    }
    if len(snaps) > 1:
        num_creditors = len(snaps) - 1
        payload = int(bytes_out_per_step / max(1, num_layers * num_creditors))
        probe = cluster.probe(num_calls=200, payload_bytes=payload)
        figures.update(
            {
                "noop_call_ms": probe["noop_s"] * 1e3,
                "payload_call_ms": probe["payload_s"] * 1e3,
                "channel_ms": probe["channel_s"] * 1e3,
                "layer_payload_bytes": payload,
            }
        )
    return figures


def _workload(text: str) -> tuple[int, int]:
    batch, _, context = text.partition("x")
    try:
        return int(batch), int(context)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a workload is BATCHxCONTEXT, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="infinite-llm bench distributed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--backends", nargs="+", default=["inprocess", "ray"], choices=["inprocess", "ray"]
    )
    parser.add_argument(
        "--workloads",
        type=_workload,
        nargs="+",
        default=[(1, 4096), (4, 1024)],
        help="BATCHxCONTEXT: requests and prompt tokens each (default: 1x4096 4x1024)",
    )
    parser.add_argument(
        "--lenders",
        nargs="*",
        default=["memory", "host"],
        choices=["memory", "host"],
        help="two-pool configurations whose second pool has no model",
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--steps", type=int, default=16, help="decode steps timed (the median is reported)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="decode steps before timing")
    parser.add_argument("--attention-impl", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write distributed.png here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.dtype, progress=False)
    rng = random.Random(args.seed)
    vocab = loaded.arch.vocab_size
    bar = tqdm(
        total=3
        * len(args.workloads)
        * len(args.backends)
        * (len(args.instances) + len(args.lenders)),
        desc="bench distributed",
        unit="stage",
    )
    rows = []
    for batch, context in args.workloads:
        run_args = argparse.Namespace(**vars(args), batch=batch, context=context)
        prompts = [[rng.randrange(3, vocab) for _ in range(context)] for _ in range(batch)]
        for backend in args.backends:
            # In-process configurations are timed together; Ray ones one cluster at a time
            # (idle actors of other clusters would load the machine: heartbeats, object store).
            groups = (
                [[n] for n in sorted(args.instances)]
                if backend == "ray"
                else [sorted(args.instances)]
            )
            # lender placements: with the in-process group; on Ray a cluster each
            if backend == "inprocess":
                runs = [(groups[0], args.lenders)]
            else:
                runs = [(g, []) for g in groups] + [([], [kind]) for kind in args.lenders]
            for group, lenders in runs:
                for row in measure(run_args, loaded, backend, group, prompts, bar, lenders):
                    rows.append({"workload": f"{batch}x{context}", **row})
    bar.close()
    add_ratios(rows)
    results = [{k: v for k, v in r.items() if k != "tokens"} for r in rows]
    result = {
        "bench": "distributed",
        "model": args.model,
        "dtype": args.dtype,
        "workloads": [f"{b}x{c}" for b, c in args.workloads],
        "block_size": args.block_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": machine_info(),  # threads: this process's torch threads
        "targets": TARGETS,
        "target_checks": target_checks(results),
        "results": results,
    }
    if args.out is not None:
        path = write_plot(results, args.out)
        if path is not None:
            result["plot"] = str(path)
    emit(result, tables(results, args.model, args.steps), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
