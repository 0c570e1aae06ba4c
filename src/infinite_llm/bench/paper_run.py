"""Configurations of ``bench paper`` on the real engine: requests driven open loop, every
instance step timed with its features for the simulator's fit.

The runs compared with each other (ours and ``--no-borrow`` on one trace) go interleaved, one
engine step each in turn, every run on its own clock that advances only while that run works:
whatever slows this shared machine for a few seconds slows both modes alike, instead of
deciding which one looks faster (back-to-back runs of one configuration differ by 3-6 %)."""

from __future__ import annotations

import argparse
import random
import time
from collections import deque
from collections.abc import Generator, Sequence
from typing import Any

from infinite_llm.sim.costs import features
from infinite_llm.sim.fit import (
    MigrationSample,
    OverheadSample,
    Samples,
    StepSample,
)
from infinite_llm.sim.metrics import RequestRecord, WorkTotals, summarize
from infinite_llm.sim.placement import step_work
from infinite_llm.sim.trace import TraceRequest


class BenchClock:
    """Seconds the run has worked: wall time, or this process's CPU time (``cpu``: immune to
    other jobs on a shared machine when torch runs one thread). Paused while another run works
    (``pause``/``resume``); a wait for the next arrival is skipped instead of slept."""

    def __init__(self, kind: str = "wall") -> None:
        if kind not in ("wall", "cpu"):
            raise ValueError(f"clock must be wall or cpu, got {kind!r}")
        self.kind = kind
        self._read = time.perf_counter if kind == "wall" else time.process_time
        self._origin = self._read()
        self._paused_at: float | None = None

    def __call__(self) -> float:
        return (self._read() if self._paused_at is None else self._paused_at) - self._origin

    def restart(self) -> None:
        self._origin = self._read()
        self._paused_at = None

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = self._read()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._origin += self._read() - self._paused_at
            self._paused_at = None

    def wait_until(self, t: float) -> None:
        delay = t - self()
        if delay > 0:  # nothing to do until then: the time passes at once
            self._origin -= delay


class StepProbe:
    """Times a real cluster's instance steps (with their ``StepWork``), cluster-step overhead
    and defragmentation, by wrapping the instances' ``step``, runners' ``execute`` and the
    cluster core's ``defragment``."""

    def __init__(self, cluster: Any, run: str, samples: Samples, clock: BenchClock) -> None:
        self.cluster, self.run, self.samples, self.clock = cluster, run, samples, clock
        self.totals = WorkTotals()
        self.peak_used_fraction = 0.0
        self._inside = self._feature_s = 0.0
        self._work: Any = None
        for inst in cluster.instances.values():
            self._wrap(inst)
        core = cluster.core
        defragment = core.defragment

        def probed_defragment(*a: Any, **kw: Any) -> list[Any]:
            t0 = self.clock()
            relocations = defragment(*a, **kw)
            dt = self.clock() - t0
            self._inside += dt
            if relocations:
                samples.migrations.append(MigrationSample(run, len(relocations), dt))
            return relocations

        core.defragment = probed_defragment

    def _wrap(self, inst: Any) -> None:
        step, execute, block_size = inst.step, inst.runner.execute, self.cluster.block_size

        def probed_execute(out: Any, *args: Any) -> Any:
            t0 = self.clock()
            self._work = step_work(out, inst.instance_id, block_size)
            self._feature_s += self.clock() - t0
            return execute(out, *args)

        def probed_step() -> Any:
            self._work, self._feature_s = None, 0.0
            t0 = self.clock()
            events = step()
            dt = self.clock() - t0 - self._feature_s
            if self._work is not None:
                self.samples.steps.append(StepSample(self.run, tuple(features(self._work)), dt))
                self.totals.add(self._work, dt)
                self._inside += dt + self._feature_s
                rm = inst.rmanager
                self.peak_used_fraction = max(
                    self.peak_used_fraction, 1 - rm.num_free_blocks / rm.num_blocks
                )
            return events

        inst.step, inst.runner.execute = probed_step, probed_execute

    def engine_step(self, engine: Any) -> list[Any]:
        self._inside = 0.0
        t0 = self.clock()
        outputs = engine.step()
        self.samples.overheads.append(OverheadSample(self.run, self.clock() - t0 - self._inside))
        return outputs


def livelock_threshold(num_instances: int) -> int:
    """Preemptions in a row without a request finishing after which a real run is stopped (the
    engine's known livelock; see the simulator's ``livelock_threshold``, scaled to CPU runs)."""
    return 30 * num_instances + 60


Driven = tuple[list[RequestRecord], str | None]


def drive(
    engine: Any, requests: Sequence[TraceRequest], probe: StepProbe, seed: int, timeout_s: float
) -> Generator[None, None, Driven]:
    """Open loop on the probe's clock: add each request once its arrival time has passed, else
    step; yields after every engine step (``interleave`` runs several of these in turn).

    Stops early (aborting what is open) on a livelock or after ``timeout_s``; returns the
    records and why it stopped early (None when every request ended)."""
    from infinite_llm.sampling_params import SamplingParams

    vocab = engine.arch.vocab_size
    prompts = {}
    for r in requests:  # made before the clock starts
        rng = random.Random(seed * 1_000_003 + r.index)
        prompts[r.index] = [rng.randrange(3, vocab - 1) for _ in range(r.prompt_len)]
    records = {
        r.index: RequestRecord(r.index, r.kind, r.arrival_s, r.prompt_len, r.output_len)
        for r in requests
    }
    pending = deque(sorted(requests, key=lambda r: (r.arrival_s, r.index)))
    clock = probe.clock
    instances = list(engine.cluster.instances.values())
    limit = livelock_threshold(len(instances))
    preempted_at_finish = 0
    stopped = None
    clock.restart()
    while pending or engine.has_unfinished_requests():
        now = clock()
        preemptions = sum(inst.scheduler.num_preemptions for inst in instances)
        if preemptions - preempted_at_finish > limit or now > timeout_s:
            stopped = "livelock" if now <= timeout_s else "timeout"
            for rec in records.values():
                if not rec.refused and rec.home is not None and rec.finish_s is None:
                    engine.abort_request(str(rec.index))
            break
        while pending and pending[0].arrival_s <= now:
            tr = pending.popleft()
            rec = records[tr.index]
            if tr.num_tokens > engine.max_model_len:  # the whole context can never fit
                rec.refused = True
                continue
            params = SamplingParams(temperature=0.0, max_tokens=tr.output_len, ignore_eos=True)
            request = engine.make_request(prompts[tr.index], params, request_id=str(tr.index))
            engine.add_request(request)
            rec.home = request.home_instance_id
        if not engine.has_unfinished_requests():
            if pending:
                clock.wait_until(pending[0].arrival_s)
            continue
        outputs = probe.engine_step(engine)
        t = clock()
        for out in outputs:
            rec = records[int(out.request_id)]
            if rec.first_token_s is None and out.outputs[0].token_ids:
                rec.first_token_s = t
            if out.finished:
                rec.finish_s = t
                rec.num_preemptions = out.metrics.num_preemptions if out.metrics else 0
                preempted_at_finish = sum(inst.scheduler.num_preemptions for inst in instances)
        yield
    return [records[i] for i in sorted(records)], stopped


def interleave(
    drivers: Sequence[Generator[None, None, Driven]], clocks: Sequence[BenchClock]
) -> list[Driven]:
    """Run the drivers one engine step each in turn, each clock running only during its own
    driver's turn, until all have finished; their results in order."""
    results: list[Driven | None] = [None] * len(drivers)
    for clock in clocks:
        clock.pause()
    live = list(range(len(drivers)))
    while live:
        for i in list(live):
            clocks[i].resume()
            try:
                next(drivers[i])
            except StopIteration as done:
                results[i] = done.value
                live.remove(i)
            finally:
                clocks[i].pause()
    return [r for r in results if r is not None]


def real_runs(
    args: argparse.Namespace,
    loaded: Any,
    n: int,
    modes: Sequence[tuple[str, bool]],
    requests: Sequence[TraceRequest],
    label: str,
    samples: Samples,
) -> list[dict[str, Any]]:
    """The same requests on ``n`` fresh instances once per ``(mode, borrowing)``, interleaved."""
    from infinite_llm import LLM

    llms, probes = [], []
    for mode, borrowing in modes:
        llm = LLM(
            args.model,
            loaded_model=loaded,
            num_instances=n,
            block_size=args.block_size,
            kv_blocks_per_instance=args.kv_blocks,
            enable_borrowing=borrowing,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            max_model_len=1 << 22,
            seed=args.seed,
            progress=False,
        )
        llms.append(llm)
        probes.append(
            StepProbe(llm.engine.cluster, f"{label} {mode}", samples, BenchClock(args.clock))
        )
    driven = interleave(
        [
            drive(llm.engine, requests, probe, args.seed, args.run_timeout)
            for llm, probe in zip(llms, probes, strict=True)
        ],
        [p.clock for p in probes],
    )
    return [
        run_document(llm, probe, records, stopped, n, borrowing, requests)
        for llm, probe, (records, stopped), (_, borrowing) in zip(
            llms, probes, driven, modes, strict=True
        )
    ]


def run_document(
    llm: Any,
    probe: StepProbe,
    records: list[RequestRecord],
    stopped: str | None,
    n: int,
    borrowing: bool,
    requests: Sequence[TraceRequest],
) -> dict[str, Any]:
    llm.check_integrity()
    stats = llm.cluster_stats()
    summary = summarize(records, probe.totals)
    summary.update(
        {
            "stopped": stopped,
            "max_model_len": llm.engine.max_model_len,
            "peak_used_fraction": probe.peak_used_fraction,
            "block_locality_at_end": stats["locality"]["overall"],
            "borrows": stats["borrows"],
            "blocks_borrowed": stats["blocks_borrowed"],
            "migrated_blocks": stats["migrated_blocks"],
            "all_free_after": all(i["free"] == i["num_blocks"] for i in stats["instances"]),
        }
    )
    return {
        "label": probe.run,
        "instances": n,
        "mode": "borrowing" if borrowing else "no_borrow",
        "summary": summary,
        "requests": list(requests),
    }
