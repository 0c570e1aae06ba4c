"""Protocol messages are plain picklable data (they cross process boundaries under Ray)."""

from __future__ import annotations

import pickle

import pytest

from infinite_llm.kvcache import (
    BlockRef,
    BorrowQuery,
    GManagerConfig,
    Heartbeat,
    LendReply,
    LendRequest,
    Recommendation,
    Release,
    RManager,
    RManagerConfig,
)
from infinite_llm.kvcache.defrag import CycleSwap, DefragPlan, Move


@pytest.mark.parametrize(
    "msg",
    [
        BorrowQuery(1, 4),
        Recommendation(1, 4, (2, 3), ((2, 2), (3, 2))),
        LendRequest(1, 4, 7),
        LendReply(2, 1, 7, [BlockRef(2, 0)], num_lendable=3),
        LendReply(2, 1, 8, None),
        Release(1, [BlockRef(2, 0)]),
        Heartbeat(0, 3, 8, 4, 2, 2, 1, 2, {1: 2}, {3: 1}),
        DefragPlan((CycleSwap((0, 1), 2),), (Move(0, 2, 1),)),
        RManagerConfig(lending_cap=0.25),
        GManagerConfig(heartbeat_timeout_s=1.0),
    ],
)
def test_pickle_round_trip(msg):
    assert pickle.loads(pickle.dumps(msg)) == msg


def test_message_helpers():
    assert LendReply(2, 1, 7, []).ok and not LendReply(2, 1, 7, None).ok
    assert Recommendation(1, 4).is_empty
    assert not Recommendation(1, 4, split=((2, 4),)).is_empty


def test_real_heartbeat_pickles():
    m = RManager(0, 8)
    m.allocate(2)
    hb = m.heartbeat()
    assert pickle.loads(pickle.dumps(hb)) == hb
