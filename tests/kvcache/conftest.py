"""Shared helpers for the kvcache tests: an in-process cluster of rManagers and a fake clock."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pytest

from infinite_llm.kvcache import (
    Borrower,
    GManager,
    GManagerConfig,
    LendReply,
    LendRequest,
    Release,
    RManager,
)

# Sort on every heartbeat so small exact tests see every heartbeat at once.
EAGER = GManagerConfig(resort_every_heartbeats=1, resort_interval_s=0.0, heartbeat_timeout_s=10.0)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class LocalCluster:
    """rManagers talking to each other and to one gManager by direct calls."""

    def __init__(
        self,
        num_instances: int,
        num_blocks: int,
        *,
        lending_cap: float | Sequence[float] = 0.5,
        config: GManagerConfig = EAGER,
        clock: FakeClock | None = None,
    ) -> None:
        self.clock = clock or FakeClock()
        caps = [lending_cap] * num_instances if isinstance(lending_cap, float) else lending_cap
        self.managers = {
            i: RManager(i, num_blocks, lending_cap=caps[i]) for i in range(num_instances)
        }
        self.gm = GManager(config, clock=self.clock)
        self.lend_calls: list[tuple[int, LendRequest]] = []
        self.heartbeat_all()

    def send_lend(self, creditor_id: int, request: LendRequest) -> LendReply:
        self.lend_calls.append((creditor_id, request))
        return self.managers[creditor_id].lend(request)

    def send_release(self, creditor_id: int, release: Release) -> None:
        self.managers[creditor_id].reclaim(release)

    def borrower(self, instance_id: int) -> Borrower:
        return Borrower(self.managers[instance_id], self.gm, self.send_lend, self.send_release)

    def heartbeat_all(self, ids: Iterable[int] | None = None) -> None:
        for i in self.managers if ids is None else ids:
            self.gm.on_heartbeat(self.managers[i].heartbeat())

    def check(self) -> None:
        """Integrity of every manager, and lent == borrowed per pair, block for block."""
        for m in self.managers.values():
            m.check_integrity()
        assert_pairs_consistent(self.managers.values())
        self.gm.check_integrity()


def assert_pairs_consistent(managers: Iterable[RManager]) -> None:
    by_id = {m.instance_id: m for m in managers}
    for c, creditor in by_id.items():
        for d in creditor.lent_counts():
            if d in by_id:
                assert creditor.lent_refs(d) == by_id[d].borrowed_refs(c), (
                    f"{c} lent {creditor.lent_refs(d)} to {d}, which holds "
                    f"{by_id[d].borrowed_refs(c)}"
                )
    for d, debtor in by_id.items():
        for c, n in debtor.borrowed_counts().items():
            lent = by_id[c].lent_counts().get(d, 0) if c in by_id else None
            assert lent == n, f"{d} holds {n} blocks of {c}, which lent it {lent}"


def real_edges(managers: Iterable[RManager]) -> dict[tuple[int, int], int]:
    """The debt graph as the creditors know it (the truth)."""
    return {(d, m.instance_id): n for m in managers for d, n in m.lent_counts().items() if n > 0}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cluster3(clock: FakeClock) -> LocalCluster:
    """3 instances of 8 blocks, cap 0.5 (4 lendable each)."""
    return LocalCluster(3, 8, clock=clock)
