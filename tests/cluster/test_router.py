"""The router: least pending work first; among equally loaded instances, room, then free memory;
or, for instances on one device, the busiest one with room."""

from __future__ import annotations

import pytest

from infinite_llm.cluster.router import Router


def test_balances_requests_while_memory_is_plentiful() -> None:
    router = Router(block_size=16)
    free = {0: 1000, 1: 990, 2: 980}
    pending = dict.fromkeys(free, 0)
    for _ in range(30):
        home = router.pick(sorted(free), free, pending, num_tokens=100)
        pending[home] += 100
    assert pending == {0: 1000, 1: 1000, 2: 1000}


def test_balances_tokens_not_request_counts() -> None:
    """One long request is as much work as many short ones: the short ones go elsewhere."""
    router = Router(block_size=16)
    free = {0: 10_000, 1: 10_000}
    pending = dict.fromkeys(free, 0)
    sizes = [8000] + [100] * 60
    homes = []
    for size in sizes:
        home = router.pick(sorted(free), free, pending, num_tokens=size)
        pending[home] += size
        homes.append(home)
    assert homes[0] == 0 and set(homes[1:]) == {1}  # 60 x 100 tokens stay below the 8,000
    assert router.pick(sorted(free), free, pending, num_tokens=100) == 1


def test_load_comes_before_room() -> None:
    """A long request goes to the least loaded instance even where it must wait for room (or
    borrow): instance 1 has room now but a backlog; instance 0 drains first."""
    router = Router(block_size=16)
    free = {0: 10, 1: 400, 2: 30}
    assert router.pick([0, 1, 2], free, {0: 50, 1: 9000, 2: 60}, num_tokens=100 * 16) == 0


def test_among_equally_loaded_room_then_most_free_memory() -> None:
    router = Router(block_size=16)
    free = {0: 10, 1: 40, 2: 30}
    pending = {0: 0, 1: 0, 2: 0}
    assert router.pick([0, 1, 2], free, pending, num_tokens=35 * 16) == 1  # only 1 holds it
    router.on_heartbeat(1)
    assert router.pick([0, 1, 2], free, pending, num_tokens=50 * 16) == 1  # none: most free
    assert router.pick([0, 2], free, pending, num_tokens=5 * 16) == 2  # both hold it: most free


def test_routed_requests_count_against_free_memory_until_a_heartbeat() -> None:
    router = Router(block_size=16)
    free = {0: 10, 1: 10}
    pending = {0: 0, 1: 0}
    assert router.pick([0, 1], free, pending, num_tokens=8 * 16) == 0
    # Instance 0 was promised 8 blocks: only instance 1 still holds another 8-block request.
    assert router.pick([0, 1], free, pending, num_tokens=8 * 16) == 1
    router.on_heartbeat(0)
    router.on_heartbeat(1)
    assert router.pick([0, 1], free, pending, num_tokens=8 * 16) == 0


def test_ray_driver_counts_the_prompt_until_the_first_token_then_the_output_left() -> None:
    """On Ray the driver routes from its records: prefill progress stays in the actor."""
    from infinite_llm.cluster.ray_members import RequestRecord
    from infinite_llm.sampling_params import SamplingParams
    from infinite_llm.scheduler.request import Request

    request = Request("r", list(range(100)), SamplingParams(max_tokens=20), max_tokens=20)
    record = RequestRecord(request, home=0)
    assert record.pending_tokens == 100 + 20
    record.output_token_ids += [5, 6, 7]
    assert record.pending_tokens == 17
    record.output_token_ids += [1] * 17
    assert record.pending_tokens == 0


def test_pack_sends_requests_to_the_busiest_instance_with_room() -> None:
    """Instances on one device: one bigger batch instead of several small ones."""
    router = Router(block_size=16, policy="pack")
    free = {0: 10, 1: 40, 2: 40}
    pending = {0: 500, 1: 300, 2: 0}
    room = dict(free)
    assert router.pick([0, 1, 2], free, pending, 5 * 16, room) == 0  # busiest, and it fits
    assert router.pick([0, 1, 2], free, pending, 6 * 16, room) == 1  # 0 promised 5 of its 10
    del room[1]  # instance 1's batch is full
    assert router.pick([0, 1, 2], free, pending, 6 * 16, room) == 2
    assert router.pick([0, 1, 2], free, pending, 50 * 16, room) == 2  # no room: least loaded


def test_pack_with_pooled_memory_counts_every_promise_against_every_instance() -> None:
    from infinite_llm.cluster.router import InstanceLoad, pack_room

    # (pending tokens, unfinished requests, batch size): 2 has no place left
    loads = {0: InstanceLoad(900, 3, 4), 1: InstanceLoad(100, 1, 4), 2: InstanceLoad(50, 4, 4)}
    free, lendable = {0: 4, 1: 30, 2: 20}, {0: 2, 1: 25, 2: 15}
    room = pack_room(loads, free, lendable, pooled=True)
    assert room == {0: 4 + 25 + 15, 1: 30 + 2 + 15}
    assert pack_room(loads, free, lendable, pooled=False) == {0: 4, 1: 30}
    router = Router(block_size=16, policy="pack")
    pending = {0: 900, 1: 100, 2: 50}
    assert router.pick([0, 1, 2], free, pending, 40 * 16, room, pooled=True) == 0  # borrows
    assert router.pick([0, 1, 2], free, pending, 5 * 16, room, pooled=True) == 1  # 44 - 40 < 5
    with pytest.raises(ValueError, match="routing policy"):
        Router(block_size=16, policy="random")


def test_a_cached_prefix_counts_as_work_the_instance_will_not_do() -> None:
    """``load``: the instance serving 100 of the request's rBlocks (1,600 tokens) wins while it
    is busier by less than that, and loses once it is busier by more."""
    router = Router(block_size=16)
    free = {0: 1000, 1: 1000}
    cached = {1: 100}
    assert router.pick([0, 1], free, {0: 0, 1: 1500}, 2000, cached=cached) == 1
    assert router.pick([0, 1], free, {0: 0, 1: 1700}, 2000, cached=cached) == 0


def test_pack_prefers_the_longest_cached_prefix_among_instances_with_room() -> None:
    router = Router(block_size=16, policy="pack")
    free = {0: 100, 1: 100, 2: 100}
    room = {0: 100, 1: 100, 2: 5}
    pending = {0: 900, 1: 10, 2: 0}
    assert router.pick([0, 1, 2], free, pending, 320, room, cached={1: 12, 2: 19}) == 1
    assert router.pick([0, 1, 2], free, pending, 320, room) == 0  # no prefix: the busiest
