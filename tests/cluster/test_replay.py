"""The simulator runs the runtime's own decisions: one seeded trace through the in-process
cluster and through the simulator, its steps costing what the in-process ones took, gives the
same homes, borrows, preemptions and migrations in the same order, and the same token times.

The in-process run keeps the cluster core's time on a virtual clock that advances by each
instance step's measured duration, so every time-driven choice (heartbeat rounds, the gManager's
re-ranking) sees in both runs the same clock at the same point."""

from __future__ import annotations

import random
import time

from conftest import loaded_model
from infinite_llm.cluster.core import ClusterConfig
from infinite_llm.cluster.inprocess import InProcessCluster
from infinite_llm.config import CacheConfig, EngineConfig
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.request import Request
from infinite_llm.scheduler.scheduler import SchedulerConfig
from infinite_llm.sim.cluster import SimClusterConfig
from infinite_llm.sim.costs import StepCost, StepWork
from infinite_llm.sim.simulator import SerialRun
from infinite_llm.sim.trace import TraceRequest

NUM_INSTANCES, NUM_BLOCKS, BLOCK_SIZE = 3, 12, 8  # 96 tokens a pool
SCHEDULER = SchedulerConfig(max_num_batched_tokens=48, max_num_seqs=8)


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ReplayCosts:
    """Each instance step costs, in order, what the in-process run's steps took."""

    cluster_step_s = 0.0

    def __init__(self, durations: list[float]) -> None:
        self.durations = list(durations)
        self.used = 0

    def step(self, work: StepWork) -> StepCost:
        seconds = self.durations[self.used]
        self.used += 1
        return StepCost(seconds)

    def migrate_seconds(self, num_blocks: int) -> float:
        return 0.0


def _journal_preemptions(core, schedulers) -> None:
    """Preemptions into the core's journal too (the schedulers decide them)."""
    for scheduler in schedulers:

        def preempt(request, original=scheduler.preempt):
            core.journal.append(("preempt", core.num_steps, request.request_id))
            original(request)

        scheduler.preempt = preempt


def _trace(seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    # chat-sized requests and a few longer than a pool (they borrow, and preempt the young)
    return [
        (rng.randint(130, 180) if i % 4 == 1 else rng.randint(8, 60), rng.randint(4, 20))
        for i in range(12)
    ]


def test_the_simulator_replays_an_in_process_run_decision_for_decision() -> None:
    lengths = _trace(seed=11)
    loaded = loaded_model("tiny")
    vocab = loaded.arch.vocab_size

    # In process, on a virtual clock advanced by each instance step's own time.
    clock, journal, durations = VirtualClock(), [], []
    config = EngineConfig(
        model="tiny",
        num_instances=NUM_INSTANCES,
        # the simulator's traces carry lengths, not tokens: it runs without the prefix cache
        cache=CacheConfig(
            block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, enable_prefix_caching=False
        ),
        scheduler=SCHEDULER,
        cluster=ClusterConfig(defrag_interval_steps=4),
    )
    cluster = InProcessCluster(config, loaded, clock=clock, journal=journal)
    for inst in cluster.instances.values():

        def timed_step(step=inst.step):
            start = time.perf_counter()
            events = step()
            if events:  # an instance that scheduled nothing did no step (nor does the sim's)
                durations.append(time.perf_counter() - start)
                clock.now += durations[-1]
            return events

        inst.step = timed_step
    _journal_preemptions(cluster.core, (i.scheduler for i in cluster.instances.values()))
    rng = random.Random(3)
    homes = {}
    for i, (prompt, output) in enumerate(lengths):
        params = SamplingParams(temperature=0, max_tokens=output, ignore_eos=True)
        request = Request(str(i), [rng.randrange(3, vocab) for _ in range(prompt)], params, output)
        homes[str(i)] = cluster.add_request(request)
    first_token = {}
    for _ in range(2000):
        if not cluster.has_unfinished_requests():
            break
        for event in cluster.step():
            if event.sampled is not None:
                first_token.setdefault(event.request_id, clock.now)
    assert not cluster.has_unfinished_requests()
    cluster.check_integrity()
    kinds = {entry[0] for entry in journal}
    assert {"home", "borrow", "preempt", "migrate"} <= kinds, kinds  # the trace exercises all

    # The simulator, every step costing what the in-process one took.
    sim_journal: list = []
    costs = ReplayCosts(durations)
    run = SerialRun(
        SimClusterConfig(
            num_instances=NUM_INSTANCES,
            num_blocks_per_instance=NUM_BLOCKS,
            block_size=BLOCK_SIZE,
            scheduler=SCHEDULER,
            defrag_every_steps=4,
        ),
        costs,
        [TraceRequest(i, 0.0, p, o, "replay") for i, (p, o) in enumerate(lengths)],
        progress=False,
        integrity_every=0,
        journal=sim_journal,
    )
    _journal_preemptions(run.cluster.core, (i.scheduler for i in run.cluster.instances.values()))
    result = run.run()

    assert sim_journal == journal
    assert costs.used == len(durations)
    assert {str(r.index): r.home for r in result.records} == homes
    assert {str(r.index): r.first_token_s for r in result.records} == first_token
