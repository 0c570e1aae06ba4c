"""The router: fewest requests among instances with room, most free memory otherwise."""

from __future__ import annotations

from infinite_llm.cluster.router import Router


def test_balances_requests_while_memory_is_plentiful() -> None:
    router = Router(block_size=16)
    free = {0: 1000, 1: 990, 2: 980}
    counts = dict.fromkeys(free, 0)
    for _ in range(30):
        home = router.pick(sorted(free), free, counts, num_tokens=100)
        counts[home] += 1
    assert counts == {0: 10, 1: 10, 2: 10}


def test_a_request_no_one_holds_goes_where_most_memory_is_free() -> None:
    router = Router(block_size=16)
    free = {0: 10, 1: 40, 2: 30}
    assert router.pick([0, 1, 2], free, {0: 0, 1: 9, 2: 0}, num_tokens=50 * 16) == 1


def test_routed_requests_count_against_free_memory_until_a_heartbeat() -> None:
    router = Router(block_size=16)
    free = {0: 10, 1: 10}
    assert router.pick([0, 1], free, {0: 0, 1: 1}, num_tokens=8 * 16) == 0
    # Instance 0 was promised 8 blocks: only instance 1 still holds another 8-block request.
    assert router.pick([0, 1], free, {0: 0, 1: 1}, num_tokens=8 * 16) == 1
    router.on_heartbeat(0)
    assert router.pick([0, 1], free, {0: 0, 1: 5}, num_tokens=8 * 16) == 0
