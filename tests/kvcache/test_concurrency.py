"""Threads hammering allocate/borrow/lend/free on shared rManagers and one gManager."""

from __future__ import annotations

import random
import sys
import threading

import pytest

from infinite_llm.kvcache import BlockRef, LendRequest, Release

from .conftest import LocalCluster, assert_pairs_consistent, real_edges


@pytest.fixture(autouse=True)
def fast_thread_switching():
    """Switch threads every few bytecodes instead of every 5 ms, so that races show up."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


class Registry:
    """Every rBlock handed out, to catch a block given to two holders at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[BlockRef, str] = {}
        self.conflicts: list[tuple[BlockRef, str, str]] = []

    def take(self, refs: list[BlockRef], holder: str) -> None:
        with self._lock:
            for ref in refs:
                if ref in self._held:
                    self.conflicts.append((ref, self._held[ref], holder))
                self._held[ref] = holder

    def drop(self, refs: list[BlockRef]) -> None:
        with self._lock:
            for ref in refs:
                del self._held[ref]


def test_threads_hammering_shared_managers():
    c = LocalCluster(4, 48, lending_cap=0.5)
    registry = Registry()
    errors: list[BaseException] = []
    stop = threading.Event()
    borrowers = [c.borrower(i) for i in range(4)]
    outsider_replies = {"granted": 0, "refused": 0}

    def engine(i: int) -> None:  # instance i's own requests, borrowing when full
        rng = random.Random(i)
        borrower = borrowers[i]
        live: list[list[BlockRef]] = []
        try:
            for step in range(1500):
                if live and rng.random() < 0.45:
                    refs = live.pop(rng.randrange(len(live)))
                    registry.drop(refs)
                    borrower.free(refs)
                else:
                    refs = borrower.allocate(rng.randint(1, 12))
                    if refs is not None:
                        registry.take(refs, f"engine{i}")
                        live.append(refs)
                if step % 25 == 0:
                    c.gm.on_heartbeat(c.managers[i].heartbeat())
            for refs in live:
                registry.drop(refs)
                borrower.free(refs)
        except BaseException as e:  # surfaced by the main thread
            errors.append(e)

    def outsider(k: int) -> None:  # remote debtors (not in the cluster) lending and returning
        rng = random.Random(100 + k)
        debtor_id = 100 + k
        held: list[tuple[int, list[BlockRef]]] = []
        try:
            for _ in range(1500):
                if held and rng.random() < 0.5:
                    creditor, refs = held.pop(rng.randrange(len(held)))
                    registry.drop(refs)
                    c.managers[creditor].reclaim(Release(debtor_id, refs))
                else:
                    creditor = rng.randrange(4)
                    reply = c.managers[creditor].lend(LendRequest(debtor_id, rng.randint(1, 6)))
                    outsider_replies["granted" if reply.ok else "refused"] += 1
                    if reply.granted is not None:
                        registry.take(reply.granted, f"outsider{k}")
                        held.append((creditor, reply.granted))
            for creditor, refs in held:
                registry.drop(refs)
                c.managers[creditor].reclaim(Release(debtor_id, refs))
        except BaseException as e:
            errors.append(e)

    def checker() -> None:
        try:
            while not stop.is_set():
                for m in c.managers.values():
                    m.check_integrity()
                    assert m.num_lent_blocks <= m.max_lent_blocks
                c.gm.check_integrity()
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=engine, args=(i,)) for i in range(4)]
    workers += [threading.Thread(target=outsider, args=(k,)) for k in range(2)]
    check = threading.Thread(target=checker)
    check.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    check.join()

    assert errors == []
    assert registry.conflicts == []
    for m in c.managers.values():
        m.check_integrity()
        assert (m.num_free_blocks, m.num_lent_blocks, m.num_borrowed_blocks) == (48, 0, 0)
    assert_pairs_consistent(c.managers.values())
    # The run really exercised borrowing and the cap, not just local allocation.
    assert sum(b.stats.num_granted for b in borrowers) > 50
    assert sum(b.stats.num_blocks_released for b in borrowers) == sum(
        b.stats.num_blocks_borrowed for b in borrowers
    )
    assert outsider_replies["granted"] > 50 and outsider_replies["refused"] > 0
    c.heartbeat_all()
    assert c.gm.edges() == real_edges(c.managers.values()) == {}


def test_threads_sharing_one_debtor():
    # Several threads borrow and release for the same debtor: a block a creditor takes back
    # may be lent again to that debtor at once, so the debtor must forget it first.
    c = LocalCluster(3, 8, lending_cap=1.0)
    errors: list[BaseException] = []
    grants = [0, 0, 0]

    def worker(t: int) -> None:
        rng = random.Random(t)
        borrower = c.borrower(0)
        held: list[list[BlockRef]] = []
        try:
            for step in range(3000):
                if held and rng.random() < 0.5:
                    borrower.release(held.pop(rng.randrange(len(held))))
                else:
                    refs = borrower.borrow(rng.randint(1, 2))
                    if refs is not None:
                        grants[t] += 1
                        held.append(refs)
                if step % 50 == 0:
                    c.heartbeat_all([1, 2])
            for refs in held:
                borrower.release(refs)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert min(grants) > 100
    c.check()
    assert c.managers[0].num_borrowed_blocks == 0
    assert c.managers[1].num_lent_blocks == c.managers[2].num_lent_blocks == 0
