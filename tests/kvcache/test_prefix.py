"""The prefix cache's parts: the chained hash, a pool's cached rBlocks (kept free, taken back,
evicted least recently freed first, lent in place by content), what an instance advertises and
the gManager's index of it."""

from __future__ import annotations

import pytest

from infinite_llm.kvcache import GManager, LendRequest, Release, RManager
from infinite_llm.kvcache.block import BlockRef
from infinite_llm.kvcache.prefix import chain_hash
from infinite_llm.kvcache.prefix_index import Advertised, PrefixIndex


def test_the_hash_chains_over_the_prefix() -> None:
    a = chain_hash(b"", [1, 2, 3, 4])
    assert a == chain_hash(b"", [1, 2, 3, 4]) and len(a) == 16
    assert chain_hash(a, [5, 6, 7, 8]) != chain_hash(chain_hash(b"", [9, 2, 3, 4]), [5, 6, 7, 8])
    assert chain_hash(b"", [1, 2, 3, 4]) != chain_hash(b"", [4, 3, 2, 1])
    assert chain_hash(b"", [2**40]) != chain_hash(b"", [0])  # token ids are not truncated


def refs(instance: int, *ids: int) -> list[BlockRef]:
    return [BlockRef(instance, b) for b in ids]


def test_freed_named_rblocks_stay_cached_free_and_are_taken_back_by_content() -> None:
    rm = RManager(0, 6)
    got = rm.allocate(4)
    assert got == refs(0, 0, 1, 2, 3)
    rm.free(got, [b"h0", b"h1", None, b"h3"])
    assert (rm.num_free_blocks, rm.num_cached_blocks, rm.num_used_blocks) == (6, 3, 0)
    assert rm.cached_block_ids() == [0, 1, 3]
    # the leading run found: h0 h1, then h2 is missing
    assert rm.take_cached([b"h0", b"h1", b"h2", b"h3"]) == refs(0, 0, 1)
    assert (rm.num_used_blocks, rm.num_cached_blocks) == (2, 1)
    rm.check_integrity()


def test_plain_free_rblocks_go_first_then_the_least_recently_freed_cached_one() -> None:
    rm = RManager(0, 4)
    a, b = rm.allocate(1), rm.allocate(1)
    rm.free(b, [b"b"])
    rm.free(a, [b"a"])  # freed last: evicted last
    assert rm.allocate(2) == refs(0, 2, 3)
    assert rm.allocate(1) == b  # the least recently freed
    assert rm.take_cached([b"b"]) == [] and rm.take_cached([b"a"]) == a
    rm.check_integrity()


def test_one_cached_rblock_per_content() -> None:
    rm = RManager(0, 4)
    got = rm.allocate(2)
    rm.free(got, [b"same", b"same"])
    assert rm.num_cached_blocks == 1 and rm.num_free_blocks == 4
    rm.check_integrity()


def test_cached_rblocks_are_lent_in_place_within_the_cap_and_come_back_named() -> None:
    rm = RManager(1, 8, lending_cap=0.25)  # at most 2 lent
    got = rm.allocate(3)
    rm.free(got, [b"x", b"y", b"z"])
    reply = rm.lend(LendRequest(0, 3, 1, (b"x", b"y", b"z")))
    assert reply.granted == refs(1, 0, 1)  # the cap stops the run
    assert rm.lend(LendRequest(0, 1, 2, (b"nope",))).granted == []  # a stale entry: nothing
    assert rm.num_lent_blocks == 2 and rm.lent_counts() == {0: 2}
    rm.check_integrity()
    rm.reclaim(Release(0, reply.granted, (b"x", None)))
    assert rm.num_cached_blocks == 2 and rm.cached_block_ids() == [2, 0]  # z, then x
    rm.check_integrity()
    with pytest.raises(ValueError, match="hashes"):
        rm.lend(LendRequest(0, 2, 3, (b"z",)))


def test_lending_plain_rblocks_evicts_cached_ones_when_the_heap_is_empty() -> None:
    rm = RManager(1, 2, lending_cap=1.0)
    rm.free(rm.allocate(2), [b"p", b"q"])
    assert rm.num_lendable_blocks == 2
    assert rm.lend(LendRequest(0, 2, 1)).granted == refs(1, 0, 1)
    assert rm.num_cached_blocks == 0
    hb = rm.heartbeat()
    assert set(hb.prefix_added) == set() and set(hb.prefix_removed) == set()  # came and went
    rm.check_integrity()


def test_the_heartbeat_carries_what_an_instance_began_and_stopped_serving() -> None:
    rm = RManager(0, 4)
    rm.advertise(b"held")
    rm.free(rm.allocate(1), [b"cached"])
    hb = rm.heartbeat()
    assert set(hb.prefix_added) == {b"held", b"cached"} and hb.prefix_removed == ()
    assert hb.num_cached == 1
    assert rm.heartbeat().prefix_added == ()  # nothing changed since
    rm.unadvertise(b"held")
    assert rm.heartbeat().prefix_removed == (b"held",)


def test_advertised_counts_a_hash_held_and_cached_at_once() -> None:
    adv = Advertised()
    adv.add(b"h")
    adv.add(b"h")
    adv.remove(b"h")
    assert b"h" in adv and adv.drain() == ((b"h",), ())
    adv.remove(b"h")
    assert adv.drain() == ((), (b"h",))


def test_the_index_answers_leading_runs_per_instance() -> None:
    index = PrefixIndex()
    index.apply(0, [b"a", b"b", b"c"], [])
    index.apply(1, [b"a", b"b"], [])
    index.apply(2, [b"b"], [])
    assert index.matches([b"a", b"b", b"c", b"d"]) == {0: 3, 1: 2}
    assert index.holders([b"a", b"b", b"c", b"d"]) == [(0, 1), (0, 1, 2), (0,)]
    index.forget_instance(0)
    assert index.matches([b"a", b"b", b"c"]) == {1: 2}
    index.apply(1, [], [b"a"])
    assert index.holders([b"a"]) == [] and len(index) == 1


def test_the_gmanager_keeps_the_index_from_heartbeats_and_forgets_the_dead() -> None:
    g = GManager()
    rm = RManager(3, 4)
    rm.free(rm.allocate(2), [b"a", b"b"])
    g.on_heartbeat(rm.heartbeat())
    assert g.prefix_matches([b"a", b"b"]) == {3: 2}
    assert g.prefix_holders([b"a", b"x"]) == [(3,)]
    g.forget_instance(3)
    assert g.prefix_matches([b"a"]) == {}


def test_a_freed_request_leaves_its_head_cached_longest() -> None:
    from infinite_llm.scheduler.allocator import LocalAllocator

    rm = RManager(0, 5)
    alloc = LocalAllocator(rm, prefix_block_size=4)
    table = alloc.allocate(3)
    for ref, h in zip(table, [b"head", b"mid", b"tail"], strict=True):
        alloc.prefix._hold(ref, h)
    alloc.free(table)
    assert rm.num_cached_blocks == 3
    rm.allocate(3)  # the 2 plain free rBlocks, then the least recently freed cached one
    assert rm.take_cached([b"tail"]) == [] and rm.take_cached([b"head", b"mid"]) == table[:2]
