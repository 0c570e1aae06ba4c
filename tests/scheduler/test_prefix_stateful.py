"""Random workloads over two borrowing instances with the prefix cache, schedulers and
allocators real, the model replaced by a ledger of which token each KV slot holds.

Requests draw their prompts from a few shared documents, so hits happen: held by requests
here, cached in the home pool, cached on the other instance and lent in place, after
preemptions and aborts. After every rule: each running request's computed positions hold its
own tokens (a hit on a stale or overwritten rBlock would show here), every manager and the
prefix cache pass their checks, and the cluster's invariants (``check_cluster``) hold. At the
end everything is free, only cached rBlocks keep names, and the ledger is empty."""

from __future__ import annotations

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from infinite_llm.kvcache import Borrower, GManager, GManagerConfig, RManager
from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.integrity import check_cluster, pool_state
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.request import Request, RequestStatus
from infinite_llm.scheduler.scheduler import Scheduler, SchedulerConfig

BS = 4
EAGER = GManagerConfig(resort_every_heartbeats=1, resort_interval_s=0.0, heartbeat_timeout_s=1e9)
DOCS = [[100 + 7 * d + i for i in range(40)] for d in range(3)]


def next_token(tokens: list[int]) -> int:
    """The fake model: the next token depends on the context, so equal prefixes continue alike."""
    return (sum(tokens[-3:]) * 31 + len(tokens)) % 50 + 1


class PrefixMachine(RuleBasedStateMachine):
    @initialize(blocks=st.lists(st.integers(4, 20), min_size=2, max_size=2))
    def setup(self, blocks: list[int]) -> None:
        self.g = GManager(EAGER)
        self.rms = [RManager(i, n, lending_cap=1.0) for i, n in enumerate(blocks)]

        self.remote_hits = 0

        def lend(creditor_id, request):
            reply = self.rms[creditor_id].lend(request)
            if request.hashes:
                self.remote_hits += len(reply.granted or ())
            return reply

        def release(creditor_id, rel):
            self.rms[creditor_id].reclaim(rel)

        self.scheds = [
            Scheduler(
                SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8),
                BS,
                Borrower(rm, self.g, lend, release, prefix_block_size=BS),
            )
            for rm in self.rms
        ]
        self.slots: dict[BlockRef, list[int | None]] = {}  # what each KV slot holds
        self.next_id = 0
        self.heartbeat()

    def heartbeat(self) -> None:
        for rm in self.rms:
            self.g.on_heartbeat(rm.heartbeat())

    def all_requests(self) -> list[Request]:
        return [r for s in self.scheds for r in s.requests.values()]

    @rule(
        doc=st.integers(0, 2),
        keep=st.integers(0, 40) | st.integers(24, 40),
        tail=st.lists(st.integers(1, 50), max_size=6),
        max_tokens=st.integers(1, 8),
        home=st.integers(0, 1),
    )
    def add(self, doc: int, keep: int, tail: list[int], max_tokens: int, home: int) -> None:
        prompt = DOCS[doc][:keep] + tail or [1]
        total = sum(rm.num_blocks for rm in self.rms)
        if -(-(len(prompt) + max_tokens) // BS) > total:
            return
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        request = Request(str(self.next_id), prompt, params, max_tokens)
        self.next_id += 1
        self.scheds[home].add_request(request)

    @rule(homes=st.lists(st.integers(0, 1), min_size=1, max_size=8), beat=st.booleans())
    def steps(self, homes: list[int], beat: bool) -> None:
        for home in homes:
            self.step(home)
            if beat:
                self.heartbeat()

    def step(self, home: int) -> None:
        sched = self.scheds[home]
        out = sched.schedule()
        sampled = {}
        for item in out.scheduled:
            r = item.request
            start = r.num_computed_tokens
            for p in range(start, start + item.num_new_tokens):
                ref = r.block_table[p // BS]
                self.slots.setdefault(ref, [None] * BS)[p % BS] = r.token_ids(p, p + 1)[0]
            if item.samples:
                sampled[r.request_id] = next_token(r.all_token_ids)
        sched.update_from_output(out, sampled)

    @precondition(lambda self: self.all_requests())
    @rule(k=st.integers(0, 100))
    def abort(self, k: int) -> None:
        requests = self.all_requests()
        victim = requests[k % len(requests)]
        self.scheds[victim.home_instance_id].abort_request(victim.request_id)

    @rule()
    def beat(self) -> None:
        self.heartbeat()

    @invariant()
    def computed_positions_hold_their_tokens(self) -> None:
        for r in self.all_requests():
            if r.status is not RequestStatus.RUNNING:
                continue
            tokens = r.all_token_ids
            for p in range(r.num_computed_tokens):
                held = self.slots.get(r.block_table[p // BS], [None] * BS)[p % BS]
                assert held == tokens[p], f"request {r.request_id} position {p}: {held}"

    @invariant()
    def managers_prefix_caches_and_ledger_agree(self) -> None:
        for rm, sched in zip(self.rms, self.scheds, strict=True):
            rm.check_integrity()
            sched.check_prefix_cache()
        pools = [
            pool_state(
                rm,
                ((rid, r.block_table) for rid, r in s.requests.items()),
                s.allocator.shared.ref_cnts(),
            )
            for rm, s in zip(self.rms, self.scheds, strict=True)
        ]
        check_cluster(pools, self.g.edges())

    def teardown(self) -> None:
        if not hasattr(self, "scheds"):
            return
        event(f"hits: {bool(sum(s.allocator.prefix.num_hits for s in self.scheds))}")
        event(f"hits lent in place: {bool(self.remote_hits)}")
        event(f"preempted: {bool(sum(s.num_preemptions for s in self.scheds))}")
        for sched in self.scheds:
            for rid in list(sched.requests):
                sched.abort_request(rid)
        for rm, sched in zip(self.rms, self.scheds, strict=True):
            rm.check_integrity()
            assert rm.num_free_blocks == rm.num_blocks and rm.num_borrowed_blocks == 0
            assert not sched.allocator.prefix.held and len(sched.allocator.shared) == 0
        assert not any(self.g.edges().values())


PrefixMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPrefixCache = PrefixMachine.TestCase
