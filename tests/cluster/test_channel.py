"""The data plane's channels: messages of tensors both ways, shm and zmq, growth, failures."""

from __future__ import annotations

import os
import time

import pytest
import torch

from infinite_llm.cluster.channel import channel_dir, remove_channel_dir
from infinite_llm.cluster.channel_peers import ChannelClient, ChannelFailed, ChannelServer


def _echo(debtor_id, header, tensors):
    if header == "boom":
        raise ValueError("bad message")
    # The reply: the header with the debtor's id, every tensor doubled (None stays None).
    return (debtor_id, header), [None if t is None else t * 2 for t in tensors]


@pytest.fixture
def server():
    token = f"test-{os.getpid()}-{time.monotonic_ns()}"
    made = ChannelServer(1, _echo, channel_dir(token))
    yield made
    made.close()
    remove_channel_dir(token)


def _client(server, same_node: bool, **kwargs) -> ChannelClient:
    return ChannelClient(0, lambda c: server.open(0, same_node), lambda c: True, **kwargs)


@pytest.mark.parametrize("same_node", [True, False], ids=["shm", "zmq"])
def test_tensors_cross_both_ways_exactly(server, same_node) -> None:
    client = _client(server, same_node)
    tensors = [
        torch.randn(4, 9, 64),
        None,
        torch.arange(7, dtype=torch.int64),
        torch.randn(3, 5).to(torch.bfloat16),
        torch.empty(0, 3),
        torch.randn(8, 8)[:, ::2],  # not contiguous
    ]
    for layer in range(3):
        client.send(1, ("layer", layer), tensors)
        (header, out) = client.wait([1])[1]
        assert header == (0, ("layer", layer))
        assert out[1] is None
        for got, sent in zip(out, tensors):
            if sent is not None:
                assert got.dtype == sent.dtype and torch.equal(got, sent * 2)
    assert client.kind(1) == ("shm" if same_node else "zmq")
    client.close()


def test_a_message_larger_than_the_region_grows_it_and_small_ones_follow(server) -> None:
    client = _client(server, True)
    for n in (10, 1 << 20, 10, 3 << 20, 5):
        x = torch.randn(n)
        client.send(1, n, [x])
        assert torch.equal(client.wait([1])[1][1][0], x * 2)
    client.close()


def test_a_failing_handler_fails_the_wait_with_its_message(server) -> None:
    client = _client(server, True)
    client.send(1, "boom", [])
    with pytest.raises(ChannelFailed, match="bad message"):
        client.wait([1])
    client.send(1, "fine", [torch.ones(2)])  # the channel still serves
    assert torch.equal(client.wait([1])[1][1][0], torch.full((2,), 2.0))
    client.close()


def test_a_closed_server_fails_the_wait_instead_of_hanging(server) -> None:
    client = _client(server, True)
    client.send(1, "first", [torch.ones(1)])
    client.wait([1])
    server.close()
    start = time.monotonic()
    with pytest.raises(ChannelFailed):
        client.send(1, "second", [torch.ones(1)])
        client.wait([1])
    assert time.monotonic() - start < 2


def test_silence_from_a_dead_peer_ends_at_the_liveness_check(server) -> None:
    # zmq shows no end of file: the wait asks is_alive after a silent slice.
    alive = {"value": True}
    client = ChannelClient(
        0, lambda c: server.open(0, False), lambda c: alive["value"], slice_s=0.05
    )
    client.send(1, "ok", [])
    client.wait([1])
    server.close()
    client.send(1, "lost", [])
    alive["value"] = False
    start = time.monotonic()
    with pytest.raises(ChannelFailed, match="gone"):
        client.wait([1])
    assert time.monotonic() - start < 1
    client.close()


def test_an_unanswered_request_past_the_deadline_fails(server) -> None:
    client = ChannelClient(
        0, lambda c: server.open(0, False), lambda c: True, timeout_s=0.2, slice_s=0.05
    )
    server.close()
    client.send(1, "nobody", [])
    with pytest.raises(ChannelFailed, match="no reply"):
        client.wait([1])
    client.close()


def test_an_unreadable_message_closes_its_channel_and_the_server_serves_on(server) -> None:
    client = _client(server, True)
    client.send(1, "first", [torch.ones(1)])
    client.wait([1])
    end = client._ends[1]
    os.write(end._bell_out, (1234).to_bytes(4, "little"))  # a region generation that never was
    with pytest.raises(ChannelFailed):
        client._owed[1] = -1
        client.wait([1])
    other = ChannelClient(2, lambda c: server.open(2, True), lambda c: True)
    other.send(1, "still here", [torch.ones(3)])
    assert torch.equal(other.wait([1])[1][1][0], torch.full((3,), 2.0))
    other.close()
    client.close()
