"""Random allocate/borrow/free/heartbeat/defragment sequences over 2..8 in-process instances."""

from __future__ import annotations

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from infinite_llm.kvcache import BlockRef, GManager, GManagerConfig, execute_plan

from .conftest import FakeClock, LocalCluster, assert_pairs_consistent, real_edges

CONFIG = GManagerConfig(
    heartbeat_timeout_s=2.0, resort_every_heartbeats=4, resort_interval_s=0.5, window=3
)


class KVClusterMachine(RuleBasedStateMachine):
    @initialize(
        num_instances=st.integers(2, 8),
        num_blocks=st.integers(1, 12),
        caps=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.0]), min_size=8, max_size=8),
    )
    def setup(self, num_instances: int, num_blocks: int, caps: list[float]) -> None:
        self.clock = FakeClock()
        self.c = LocalCluster(
            num_instances, num_blocks, lending_cap=caps, config=CONFIG, clock=self.clock
        )
        self.n = num_instances
        self.requests: dict[int, tuple[int, list[BlockRef]]] = {}  # req -> (home, rBlocks)
        self.next_req = 0

    # ---- rules --------------------------------------------------------------------------

    def _pick(self, k: int) -> int:
        return sorted(self.requests)[k % len(self.requests)]

    def _allocate(self, home: int, num_blocks: int) -> list[BlockRef] | None:
        before = self.c.managers[home].heartbeat()
        got = self.c.borrower(home).allocate(num_blocks)
        after = self.c.managers[home].heartbeat()
        if got is None:  # all or nothing: nothing kept
            assert (after.num_used, after.num_borrowed) == (before.num_used, before.num_borrowed)
        else:
            assert len(got) == len(set(got)) == num_blocks
            event("borrowed" if any(r.instance_id != home for r in got) else "local only")
        return got

    @rule(home=st.integers(0, 7), num_blocks=st.integers(1, 10))
    def new_request(self, home: int, num_blocks: int) -> None:
        home %= self.n
        got = self._allocate(home, num_blocks)
        if got is not None:
            self.requests[self.next_req] = (home, got)
            self.next_req += 1

    @rule(home=st.integers(0, 7), creditor=st.integers(0, 7), num_blocks=st.integers(1, 4))
    def borrow_from(self, home: int, creditor: int, num_blocks: int) -> None:
        """A debtor asks one creditor of its choosing (as if the gManager ranked it first),
        so debts run in every direction."""
        self._borrow_from(home % self.n, creditor % self.n, num_blocks)

    @rule(k=st.integers(0, 100), num_blocks=st.integers(1, 4))
    def close_a_cycle(self, k: int, num_blocks: int) -> None:
        """Follow a debt a -> b (-> c) and make its end borrow from its start: a cycle."""
        edges = sorted(real_edges(self.c.managers.values()))
        if not edges:
            return
        a, b = edges[k % len(edges)]
        onward = [c for d, c in edges if d == b and c != a]
        end = onward[k % len(onward)] if onward else b
        self._borrow_from(end, a, num_blocks)

    def _borrow_from(self, home: int, creditor: int, num_blocks: int) -> None:
        if home == creditor:
            return
        debtor = self.c.managers[home]
        reply = self.c.send_lend(creditor, debtor.new_lend_request(num_blocks))
        if reply.granted is None:
            assert not self.c.managers[creditor].can_lend(num_blocks)
            return
        assert {r.instance_id for r in reply.granted} == {creditor}  # its own blocks only
        debtor.record_borrowed(reply.granted)
        self.c.gm.record_lend(home, creditor, num_blocks)
        self.requests[self.next_req] = (home, list(reply.granted))
        self.next_req += 1

    @rule(k=st.integers(0, 100), num_blocks=st.integers(1, 4))
    def grow_request(self, k: int, num_blocks: int) -> None:
        if not self.requests:
            return
        home, refs = self.requests[self._pick(k)]
        got = self._allocate(home, num_blocks)
        if got is not None:
            refs.extend(got)

    @rule(k=st.integers(0, 100))
    def finish_request(self, k: int) -> None:
        if not self.requests:
            return
        home, refs = self.requests.pop(self._pick(k))
        self.c.borrower(home).free(refs)

    @rule(i=st.integers(0, 7))
    def heartbeat(self, i: int) -> None:
        self.c.heartbeat_all([i % self.n])

    @rule()
    def heartbeat_round(self) -> None:
        self.c.heartbeat_all()
        assert self.c.gm.free_blocks() == {i: m.num_free_blocks for i, m in self.c.managers.items()}

    @rule(dt=st.sampled_from([0.1, 1.0, 2.5]))
    def time_passes(self, dt: float) -> None:
        self.clock.advance(dt)

    @rule()
    def restart_gmanager(self) -> None:
        self.c.gm = GManager(CONFIG, clock=self.clock)
        self.c.gm.rebuild(m.heartbeat() for m in self.c.managers.values())

    @rule(with_repatriation=st.booleans())
    def defragment(self, with_repatriation: bool) -> None:
        ms = self.c.managers
        self.c.heartbeat_all()  # so free counts are exact for the repatriation plan
        plan = self.c.gm.plan_defragmentation(with_repatriation=with_repatriation)
        usage = {i: m.num_used_blocks + m.num_lent_blocks for i, m in ms.items()}
        remote = self._num_remote()
        relocations = execute_plan(ms, plan, gmanager=self.c.gm)
        where = {r.old: r.new for r in relocations}
        assert len(where) == len(relocations) == plan.num_remote_blocks_removed
        for _, refs in self.requests.values():
            refs[:] = [where.get(r, r) for r in refs]
        after = {i: m.num_used_blocks + m.num_lent_blocks for i, m in ms.items()}
        delta = {i: after[i] - usage[i] for i in ms if after[i] != usage[i]}
        assert delta == plan.usage_delta()
        assert self._num_remote() == remote - plan.num_remote_blocks_removed
        if not plan.is_empty:
            event(f"defrag: {len(plan.swaps)} swaps, {len(plan.repatriations)} repatriations")
            assert self._num_remote() < remote
        assert self.c.gm.plan_defragmentation().is_empty  # no cycle left

    # ---- invariants ---------------------------------------------------------------------

    def _num_remote(self) -> int:
        return sum(r.instance_id != h for h, refs in self.requests.values() for r in refs)

    @invariant()
    def bookkeeping_matches_requests(self) -> None:
        if not hasattr(self, "c"):
            return
        self.c.check()  # integrity, caps, lent == borrowed per pair
        expected_owner: dict[BlockRef, int] = {}
        for home, refs in self.requests.values():
            for ref in refs:
                assert ref not in expected_owner, f"{ref} is in two requests"
                expected_owner[ref] = home
        for i, m in self.c.managers.items():
            owners = m.block_owners()
            assert owners == [expected_owner.get(BlockRef(i, b)) for b in range(m.num_blocks)]
            remote = sorted(
                r
                for h, refs in self.requests.values()
                if h == i
                for r in refs
                if r.instance_id != i
            )
            assert m.borrowed_refs() == remote
        # Single-threaded and every change reported: the ledger is exact at all times.
        assert self.c.gm.edges() == real_edges(self.c.managers.values())

    def teardown(self) -> None:
        if not hasattr(self, "c"):
            return
        for home, refs in self.requests.values():
            self.c.borrower(home).free(refs)
        for m in self.c.managers.values():
            assert m.num_free_blocks == m.num_blocks
            assert (m.num_lent_blocks, m.num_borrowed_blocks) == (0, 0)
            m.check_integrity()
        assert_pairs_consistent(self.c.managers.values())
        assert self.c.gm.edges() == {}


KVClusterMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_kv_cluster = KVClusterMachine.TestCase
