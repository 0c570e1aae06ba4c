"""SharedBlocks: reference counts of rBlocks several requests hold; the integrity check over them."""

from __future__ import annotations

import pytest

from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.integrity import check_cluster, pool_state
from infinite_llm.kvcache.rmanager import RManager
from infinite_llm.kvcache.shared import SharedBlocks, check_holders
from infinite_llm.scheduler.allocator import LocalAllocator

A, B, C = BlockRef(0, 3), BlockRef(0, 4), BlockRef(1, 7)


def test_the_last_holder_frees() -> None:
    shared = SharedBlocks()
    shared.share([A, B])
    shared.share([A])
    assert shared.ref_cnts() == {A: 3, B: 2} and shared.ref_cnt(C) == 1
    assert shared.release([A, B, C]) == [C]  # C was held once: freed at once
    assert shared.release([A, B]) == [B]
    assert shared.release([A]) == [A]
    assert len(shared) == 0


def test_share_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        SharedBlocks().share([A, A])


def test_relocate_keeps_counts_across_a_ring_of_moves() -> None:
    shared = SharedBlocks()
    shared.share([A])
    shared.share([A, B])
    shared.relocate({A: B, B: C, C: A})  # a cycle swap: every target is another's source
    assert shared.ref_cnts() == {B: 3, C: 2}


def test_check_holders_catches_uncounted_and_stale_sharing() -> None:
    check_holders([[A, B], [A, C]], {A: 2})
    with pytest.raises(AssertionError, match="held by two requests"):
        check_holders([[A, B], [A, C]], {})
    with pytest.raises(AssertionError, match="ref_cnt 3"):
        check_holders([[A, B], [A, C]], {A: 3})
    with pytest.raises(AssertionError, match="no request holds"):
        check_holders([[A]], {B: 2})


def test_the_allocator_frees_a_shared_rblock_with_its_last_holder() -> None:
    rm = RManager(0, 8)
    alloc = LocalAllocator(rm)
    prompt = alloc.allocate(3)
    assert prompt is not None
    alloc.shared.share(prompt[:2])  # a second sample holds the prompt's two full rBlocks
    tail = alloc.allocate(1)
    assert tail is not None
    tables = {"0_r": prompt, "1_r": prompt[:2] + tail}
    check_cluster([pool_state(rm, tables.items(), alloc.shared.ref_cnts())], {})
    assert rm.num_used_blocks == 4
    alloc.free(tables.pop("0_r"))
    assert rm.num_used_blocks == 3  # only the first sample's own tail went back
    check_cluster([pool_state(rm, tables.items(), alloc.shared.ref_cnts())], {})
    alloc.free(tables.pop("1_r"))
    assert rm.num_free_blocks == 8 and len(alloc.shared) == 0
    rm.check_integrity()


def test_check_cluster_still_catches_a_leak_beside_shared_rblocks() -> None:
    rm = RManager(0, 8)
    alloc = LocalAllocator(rm)
    refs = alloc.allocate(3)
    assert refs is not None
    alloc.shared.share(refs[:1])
    tables = {"a": refs, "b": refs[:1]}
    check_cluster([pool_state(rm, tables.items(), alloc.shared.ref_cnts())], {})
    leaked = alloc.allocate(1)  # held by no request
    assert leaked is not None
    with pytest.raises(AssertionError, match="used"):
        check_cluster([pool_state(rm, tables.items(), alloc.shared.ref_cnts())], {})
