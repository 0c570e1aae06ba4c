"""The discrete-event simulator: the project's scheduling and memory code on simulated time.

Requests arrive in time order; each is refused when its whole context (prompt + output)
exceeds what one request may hold (``SimClusterConfig.max_request_tokens``, the rule
``LLMEngine`` applies through ``max_model_len``), else routed and queued. A step is exactly
the engine's: ``Scheduler.schedule()`` (which allocates, borrows, preempts through the real
managers), then the cost model prices the step's work in place of the model runner, then
``Scheduler.update_from_output()`` with a token for every request that samples.

Two executions (``EXECUTIONS``):

* ``parallel``: every instance is its own device and steps on its own clock. Events (arrival,
  step end, heartbeat timer, defragmentation timer) are processed in time order from a heap.
  A step is scheduled when it starts and applied when it ends; remote MA time is charged to
  each creditor's timeline (its next step starts that much later), and so is migration.
  Idle instances with queued requests retry when memory may have been freed (a request
  finished) or the gManager's view changed (a heartbeat).
* ``serial``: all instances share one device and step in turn, as ``InProcessCluster.step()``
  does on this machine; requests whose arrival time has passed join before each cluster
  step, tokens are stamped when the cluster step ends (when ``LLMEngine.step`` returns), and
  defragmentation runs every ``defrag_every_steps`` cluster steps.

Per step the simulator does O(scheduled requests + new rBlocks) work (``PlacementTracker``),
so million-token contexts and 32 instances run in minutes.

A run stops early, marked ``livelock``, when ``livelock_threshold`` preemptions happen in a
row without any request finishing. That was once the fate of instances whose requests
outgrew their pools at the same time (each preempted its own and re-admitted it into the
memory it had just freed); the schedulers' cluster-wide order (``scheduler.scheduler``)
ended it, and the guard stays so that a regression stops instead of spinning.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from infinite_llm.cluster.core import Journal
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.output import SchedulerOutput
from infinite_llm.scheduler.request import Request
from infinite_llm.sim.cluster import SimCluster, SimClusterConfig, SimInstance
from infinite_llm.sim.costs import CostModel, StepWork
from infinite_llm.sim.metrics import RequestRecord, SimResult, WorkTotals
from infinite_llm.sim.placement import step_work
from infinite_llm.sim.trace import TraceRequest

logger = logging.getLogger(__name__)

EXECUTIONS = ("parallel", "serial")
_STALL_ROUNDS = 10_000  # heartbeat rounds (or empty cluster steps) without progress: a bug


def livelock_threshold(num_instances: int) -> int:
    """Preemptions in a row without any request finishing after which a run is declared
    livelocked (every instance keeps preempting and recomputing its own requests)."""
    return max(1_000, 100 * num_instances)


class _Run:
    """What both executions share: admission, one schedule, applying a step's results."""

    ROUTING = "load"  # the router's policy (``cluster.router``)

    def __init__(
        self,
        config: SimClusterConfig,
        costs: CostModel,
        requests: Sequence[TraceRequest],
        progress: bool,
        integrity_every: int,
        horizon_s: float = math.inf,
        journal: Journal | None = None,
    ) -> None:
        self.now = 0.0
        self.horizon_s = horizon_s
        self.config = config
        self.cluster = SimCluster(
            config, clock=lambda: self.now, routing=self.ROUTING, journal=journal
        )
        self.costs = costs
        self.trace = sorted(requests, key=lambda r: (r.arrival_s, r.index))
        self.records = {
            str(r.index): RequestRecord(r.index, r.kind, r.arrival_s, r.prompt_len, r.output_len)
            for r in self.trace
        }
        self.totals = WorkTotals()
        self._params = SamplingParams(max_tokens=None, ignore_eos=True)
        self._next = 0
        self._num_open = 0  # admitted, not finished
        self._bar = tqdm(
            total=len(self.trace), desc="simulating", unit="req", disable=not progress, leave=False
        )
        self._integrity_every = integrity_every
        self._open: dict[str, Request] = {}
        self._preemptions_since_finish = 0
        self._livelock_after = livelock_threshold(config.num_instances)
        self.stopped: str | None = None

    # -- arrivals ---------------------------------------------------------------------------
    @property
    def next_arrival(self) -> float:
        return self.trace[self._next].arrival_s if self._next < len(self.trace) else math.inf

    def admit_next(self) -> int | None:
        """Admit (or refuse) the next arrival; its home instance, or None if refused."""
        tr = self.trace[self._next]
        self._next += 1
        rec = self.records[str(tr.index)]
        if tr.num_tokens > self.cluster.max_request_tokens:
            rec.refused = True
            self._bar.update(1)
            return None
        request = Request(
            str(tr.index),
            range(tr.prompt_len),
            self._params,  # type: ignore[arg-type]
            tr.output_len,
            arrival_time=tr.arrival_s,
        )
        rec.home = self.cluster.add_request(request)
        self._open[request.request_id] = request
        self._num_open += 1
        return rec.home

    @property
    def done(self) -> bool:
        return self._next >= len(self.trace) and self._num_open == 0

    # -- one step ---------------------------------------------------------------------------
    def schedule(self, inst: SimInstance) -> tuple[SchedulerOutput, StepWork | None]:
        """One ``Scheduler.schedule()`` and the step's work (None when nothing was scheduled)."""
        stats = self.cluster.borrow_stats
        before = stats.num_rounds + stats.num_false_replies + stats.num_granted
        self.cluster.grant()
        out = inst.scheduler.schedule()
        for request in out.preempted:
            self.cluster.tracker.forget(request)
        self._preemptions_since_finish += len(out.preempted)
        if self._preemptions_since_finish > self._livelock_after and self.stopped is None:
            self.stopped = "livelock"
            logger.warning(
                "livelock at t=%.3fs: %d preemptions without a request finishing, %d open; "
                "stopping the run",
                self.now,
                self._preemptions_since_finish,
                self._num_open,
            )
        if out.is_empty:
            return out, None
        messages = stats.num_rounds + stats.num_false_replies + stats.num_granted - before
        return out, step_work(
            out, inst.instance_id, self.cluster.block_size, self.cluster.tracker.counts, messages
        )

    def apply(self, inst: SimInstance, out: SchedulerOutput) -> list[tuple[RequestRecord, bool]]:
        """``update_from_output`` with a token per sampling request; (record, finished) per
        request that got its first token or finished, for the caller to stamp."""
        sampled = {item.request.request_id: 0 for item in out.scheduled if item.samples}
        touched = []
        for result in inst.scheduler.update_from_output(out, sampled):
            request = result.request
            rec = self.records[request.request_id]
            if result.finished:
                self._preemptions_since_finish = 0
                rec.num_preemptions = request.num_preemptions
                del self._open[request.request_id]
                self.cluster.tracker.forget(request)
                self._num_open -= 1
                self._bar.update(1)
                touched.append((rec, True))
            elif result.new_token_id is not None and rec.first_token_s is None:
                touched.append((rec, False))
        return touched

    @staticmethod
    def stamp(touched: list[tuple[RequestRecord, bool]], t: float) -> None:
        for rec, finished in touched:
            if rec.first_token_s is None:
                rec.first_token_s = t
            if finished:
                rec.finish_s = t

    def maybe_check(self, count: int) -> None:
        if self._integrity_every and count % self._integrity_every == 0:
            self.cluster.check_integrity()

    def result(self, wall_s: float, **extra: Any) -> SimResult:
        self._bar.close()
        for request in self._open.values():  # left open by a stop
            self.records[request.request_id].num_preemptions = request.num_preemptions
        return SimResult(
            sorted(self.records.values(), key=lambda r: r.index),
            self.totals,
            self.cluster.stats(),
            wall_s,
            self.cluster.all_free(),
            self.stopped,
            dict(extra),
        )


class ParallelRun(_Run):
    """Each instance on its own device and clock (see the module docstring)."""

    _STEP_END, _HEARTBEAT, _DEFRAG = 0, 1, 2

    def run(self) -> SimResult:
        start_wall = time.perf_counter()
        cfg = self.config
        self._heap: list[tuple[float, int, int, int]] = []
        self._seq = itertools.count()
        self._busy: dict[int, tuple[SchedulerOutput, float]] = {}
        self._free_at = dict.fromkeys(self.cluster.instances, 0.0)  # creditor and migration work
        self._timers = False
        idle_rounds = 0
        num_steps = 0
        while (not self.done or self._heap) and self.stopped is None:
            t_arrival = self.next_arrival
            t_event = self._heap[0][0] if self._heap else math.inf
            if min(t_arrival, t_event) > self.horizon_s:
                self.stopped = "horizon"
                break
            if t_arrival <= t_event:
                self.now = t_arrival
                home = self.admit_next()
                if home is not None:
                    self._arm_timers()
                    self._start(home)
                continue
            t, _, kind, i = heapq.heappop(self._heap)
            self.now = t
            if kind == self._STEP_END:
                out, _ = self._busy.pop(i)
                touched = self.apply(self.cluster.instances[i], out)
                self.stamp(touched, t)
                self._start(i)
                if any(finished for _, finished in touched):
                    self._kick()
                num_steps += 1
                self.maybe_check(num_steps)
                idle_rounds = 0
            elif kind == self._HEARTBEAT:
                self.cluster.core.heartbeat(force=True)
                self._kick()
                idle_rounds = 0 if self._busy or self._next < len(self.trace) else idle_rounds + 1
                if idle_rounds > _STALL_ROUNDS:
                    raise RuntimeError(
                        f"simulation stalled at t={t:.3f}s with {self._num_open} open requests"
                    )
                self._rearm(self._HEARTBEAT, cfg.heartbeat_interval_s)
            else:
                for reloc in self.cluster.core.defragment():
                    for inst_id in (reloc.old.instance_id, reloc.new.instance_id):
                        self._charge(inst_id, self.costs.migrate_seconds(1))
                self._rearm(self._DEFRAG, cfg.defrag_interval_s)
        self.cluster.check_integrity()
        return self.result(time.perf_counter() - start_wall, num_steps=num_steps)

    def _arm_timers(self) -> None:
        if self._timers:
            return
        self._timers = True
        heapq.heappush(
            self._heap,
            (self.now + self.config.heartbeat_interval_s, next(self._seq), self._HEARTBEAT, -1),
        )
        if self.cluster.borrowing:
            heapq.heappush(
                self._heap,
                (self.now + self.config.defrag_interval_s, next(self._seq), self._DEFRAG, -1),
            )

    def _rearm(self, kind: int, interval: float) -> None:
        if self._num_open:  # timers run only while requests are open; the next arrival re-arms them
            heapq.heappush(self._heap, (self.now + interval, next(self._seq), kind, -1))
        else:
            self._timers = False

    def _charge(self, inst_id: int, seconds: float) -> None:
        """Work done on ``inst_id``'s device for others: its next step starts that much later."""
        busy = self._busy.get(inst_id)
        base = busy[1] if busy is not None else self.now
        self._free_at[inst_id] = max(self._free_at[inst_id], base) + seconds

    def _start(self, i: int) -> None:
        if i in self._busy:
            return
        inst = self.cluster.instances[i]
        if not inst.scheduler.has_unfinished_requests():
            return
        out, work = self.schedule(inst)
        if work is None and out.preempted:  # everything was preempted: admit from the queue now
            out, work = self.schedule(inst)
        if work is None:
            return
        cost = self.costs.step(work)
        end = max(self.now, self._free_at[i]) + cost.seconds
        self._busy[i] = (out, end)
        for creditor_id, seconds in cost.creditor_seconds.items():
            self._charge(creditor_id, seconds)
        self.totals.add(work, cost.seconds)
        heapq.heappush(self._heap, (end, next(self._seq), self._STEP_END, i))

    def _kick(self) -> None:
        """Memory may be free somewhere: idle instances with queued requests try again."""
        if not self.cluster.borrowing:
            return  # an idle baseline instance holds nothing, so its queue head already fitted
        for i in self.cluster.instances:
            self._start(i)


class SerialRun(_Run):
    """All instances on one device, stepping in turn (see the module docstring)."""

    ROUTING = "pack"  # as ``InProcessCluster``: one device, so fewer and bigger batches

    def run(self) -> SimResult:
        start_wall = time.perf_counter()
        num_cluster_steps = empty_rounds = 0
        instances = [self.cluster.instances[i] for i in sorted(self.cluster.instances)]
        while not self.done and self.stopped is None:
            if self.now > self.horizon_s:
                self.stopped = "horizon"
                break
            while self.next_arrival <= self.now:
                self.admit_next()
            if self._num_open == 0:
                if self._next >= len(self.trace):
                    break
                self.now = self.next_arrival
                continue
            self.cluster.core.heartbeat()  # if one is due, as ``InProcessCluster.step``
            touched: list[tuple[RequestRecord, bool]] = []
            ran = False
            for inst in instances:
                out, work = self.schedule(inst)
                if work is None:  # as ``Instance.step``: nothing scheduled, nothing run this round
                    continue
                cost = self.costs.step(work)
                seconds = cost.seconds + sum(
                    cost.creditor_seconds.values()
                )  # one device does it all
                self.now += seconds
                self.totals.add(work, seconds)
                touched += self.apply(inst, out)
                ran = True
            self.now += max(self.costs.cluster_step_s, 0.0 if ran else 1e-3)
            self.stamp(touched, self.now)
            num_cluster_steps += 1
            self.maybe_check(num_cluster_steps)
            empty_rounds = 0 if ran or self.next_arrival < math.inf else empty_rounds + 1
            if empty_rounds > _STALL_ROUNDS:
                raise RuntimeError(
                    f"simulation stalled at t={self.now:.3f}s with {self._num_open} open requests"
                )
            # every ``defrag_every_steps`` cluster steps, as ``InProcessCluster.step``
            self.now += self.costs.migrate_seconds(len(self.cluster.core.end_step()))
        self.cluster.check_integrity()
        return self.result(time.perf_counter() - start_wall, num_cluster_steps=num_cluster_steps)


def simulate(
    config: SimClusterConfig,
    costs: CostModel,
    requests: Sequence[TraceRequest],
    *,
    execution: str = "parallel",
    progress: bool = False,
    integrity_every: int = 0,
    horizon_s: float = math.inf,
) -> SimResult:
    """Run ``requests`` to completion (or until ``horizon_s`` of simulated time, or a livelock) on
    a simulated cluster; integrity is checked at the end (and every ``integrity_every`` steps)."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
    run_cls = ParallelRun if execution == "parallel" else SerialRun
    return run_cls(config, costs, requests, progress, integrity_every, horizon_s).run()
