"""The data plane's per-layer exchange in C (``cluster.native_plane``), without Ray: a debtor's
``remote_step`` against a creditor's channel server in this process, bit for bit the Python
path's result (the creditor's store and MA by ``micro_attention``, merged by ``merge_into``),
and failures that end the step instead of hanging."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch

from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.attention.merge import merge_into
from infinite_llm.attention.micro import micro_attention
from infinite_llm.cluster import native_plane
from infinite_llm.cluster.channel import channel_dir, remove_channel_dir
from infinite_llm.cluster.channel_peers import ChannelServer
from infinite_llm.cluster.native_plane import NativeRemoteHook, NativeSetup
from infinite_llm.cluster.ray_transport import PeerUnreachable, RayTransport
from infinite_llm.cluster.remote_decode import RemoteFn as STEP_FN  # remote_step's signature

pytestmark = pytest.mark.skipif(
    native_plane.library() is None, reason="no C compiler: the exchange stays in Python"
)

LAYERS, HQ, HKV, D, BS = 3, 4, 2, 64, 16


def _pool(seed: int) -> KVPool:
    pool = KVPool(LAYERS, HKV, D, num_blocks=16, block_size=BS, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    pool.k.copy_(torch.randn(pool.k.shape, generator=g))
    pool.v.copy_(torch.randn(pool.v.shape, generator=g))
    return pool


class Creditor:
    """A creditor's channel server answering setups as ``InstanceActor._serve`` does."""

    def __init__(self, pool: KVPool, token: str, delay_s: float = 0.0) -> None:
        self.pool = pool
        self.server = ChannelServer(1, self._serve, channel_dir(token))
        self.delay_s = delay_s

    def _serve(self, debtor_id, header, tensors):
        assert isinstance(header, NativeSetup)
        end = self.server.end_in_service()
        served = native_plane.accept(header, tensors[0], end, self.pool, "auto", self.delay_s)
        if served is not None:
            self.server.serve_natively(served)
        return served is not None, []


@pytest.fixture
def token():
    name = f"test-native-{os.getpid()}-{time.monotonic_ns()}"
    yield name
    remove_channel_dir(name)


def _debtor(creditor: Creditor, timeout_s: float = 30.0) -> RayTransport:
    transport = RayTransport(0, _pool(0))
    transport.set_peers({1: None})
    transport.channels._opener = lambda c: creditor.server.open(0, same_node=True)
    transport.channels.timeout_s = timeout_s
    transport.channels.slice_s = 0.05
    return transport


def _plan(t: int) -> SimpleNamespace:
    """Rows 0 and 2 of ``t`` have context on the creditor (blocks 3,4 and 7); rows 1 and 2 store
    their new K,V there (slots 70 and 113)."""
    batch = MABatch([1, 1], [[3, 4], [7]], [20, 9], BS)
    shard = SimpleNamespace(rows=torch.tensor([0, 2]), batch=batch)
    write = SimpleNamespace(rows=torch.tensor([1, 2]), slots=torch.tensor([70, 113]))
    return SimpleNamespace(num_tokens=t, shards={1: shard}, writes={1: write}, batch=batch)


def _hook(transport: RayTransport, plan) -> NativeRemoteHook:
    hook = native_plane.set_up(transport, plan, (1,), (HQ, HKV, D), LAYERS)
    assert isinstance(hook, NativeRemoteHook)
    return hook


def _zeros() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's qkv, attn and lse buffers for three rows."""
    return torch.zeros(3, (HQ + 2 * HKV) * D), torch.zeros(3, HQ, D), torch.zeros(3, HQ)


def test_a_layer_exchanged_in_c_equals_the_python_path_bit_for_bit(token) -> None:
    creditor = Creditor(_pool(1), token)
    reference = _pool(1)  # the same pool, for the Python path
    transport = _debtor(creditor)
    t = 3
    plan = _plan(t)
    hook = _hook(transport, plan)
    step = STEP_FN(hook.address)
    g = torch.Generator().manual_seed(2)
    for layer in range(LAYERS):
        qkv = torch.randn(t, (HQ + 2 * HKV) * D, generator=g)
        attn = torch.randn(t, HQ, D, generator=g)  # the local MA's state
        lse = torch.randn(t, HQ, generator=g)
        expect_out, expect_lse = attn.clone(), lse.clone()
        assert step(hook.context, 0, layer, qkv.data_ptr(), 0, 0) == 0
        assert step(hook.context, 1, layer, 0, attn.data_ptr(), lse.data_ptr()) == 0

        q = qkv[:, : HQ * D].reshape(t, HQ, D)
        k = qkv[:, HQ * D : (HQ + HKV) * D].reshape(t, HKV, D)
        v = qkv[:, (HQ + HKV) * D :].reshape(t, HKV, D)
        rows, write = plan.shards[1].rows, plan.writes[1]
        part_out, part_lse = micro_attention(
            q[rows],
            reference.k[layer],
            reference.v[layer],
            plan.batch,
            store=(write.slots, k[write.rows], v[write.rows]),
        )
        merge_into(expect_out, expect_lse, rows, part_out, part_lse)
        assert torch.equal(attn, expect_out) and torch.equal(lse, expect_lse)
        assert torch.equal(creditor.pool.k[layer], reference.k[layer])  # the stores, too
        assert torch.equal(creditor.pool.v[layer], reference.v[layer])
    hook.finished()
    assert transport.layer_wire.values() and transport.num_shard_calls == LAYERS
    assert creditor.server.num_served == LAYERS + 1  # the setup, then every layer in C
    transport.channels.close()
    creditor.server.close()


def test_a_creditor_that_dies_mid_step_ends_it_at_once(token) -> None:
    creditor = Creditor(_pool(1), token)
    transport = _debtor(creditor)
    hook = _hook(transport, _plan(3))
    step = STEP_FN(hook.address)
    qkv, attn, lse = _zeros()
    assert step(hook.context, 0, 0, qkv.data_ptr(), 0, 0) == 0
    assert step(hook.context, 1, 0, 0, attn.data_ptr(), lse.data_ptr()) == 0
    creditor.server.close()  # its channels close, as a process that dies closes them
    begin = time.monotonic()
    status = step(hook.context, 0, 1, qkv.data_ptr(), 0, 0)
    if status == 0:
        status = step(hook.context, 1, 1, 0, attn.data_ptr(), lse.data_ptr())
    assert status == -100 and time.monotonic() - begin < 5
    assert isinstance(hook.error, PeerUnreachable) and hook.error.instance_ids == [1]
    assert transport.channels.creditor_ids == []  # closed, reopened at the next need
    assert transport.take_unreachable() == [1]


def test_a_silent_creditor_fails_the_wait_at_its_deadline(token) -> None:
    creditor = Creditor(_pool(1), token, delay_s=2.0)
    transport = _debtor(creditor, timeout_s=0.3)
    transport.peer_alive = lambda i: True  # alive but silent: only the deadline ends the wait
    hook = _hook(transport, _plan(3))
    step = STEP_FN(hook.address)
    qkv, attn, lse = _zeros()
    begin = time.monotonic()
    assert step(hook.context, 0, 0, qkv.data_ptr(), 0, 0) == 0
    assert step(hook.context, 1, 0, 0, attn.data_ptr(), lse.data_ptr()) == -100
    assert time.monotonic() - begin < 5
    assert isinstance(hook.error, PeerUnreachable)
    assert "no reply in time" in str(hook.error.__notes__)
    creditor.server.close()


def test_a_request_wholly_on_the_creditor_joins_the_native_step(token) -> None:
    """Two decode rows: request 0's context on both pools, request 1's only on the creditor.
    The step's own hook (``build_native_step`` over the local pool, the creditor through C)
    gives request 1 exactly the creditor's answer and request 0 the merge of both."""
    from infinite_llm.attention import cpu_native
    from infinite_llm.attention.step_attention import build_native_step

    creditor = Creditor(_pool(1), token)
    reference = _pool(1)
    transport = _debtor(creditor)
    local_pool = transport._local.pools[0]
    local_ref = KVPool(LAYERS, HKV, D, num_blocks=16, block_size=BS, dtype=torch.float32)
    local_ref.k.copy_(local_pool.k)
    local_ref.v.copy_(local_pool.v)
    local_batch = MABatch([1], [[2, 5]], [25], BS)  # request 0, its first 25 tokens at home
    remote_batch = MABatch([1, 1], [[3], [7, 8]], [10, 30], BS)  # request 0's rest; request 1
    plan = SimpleNamespace(
        num_tokens=2,
        block_size=BS,
        query_start=[0, 1, 2],
        shards={
            0: SimpleNamespace(rows=torch.tensor([0]), batch=local_batch, requests=[0]),
            1: SimpleNamespace(rows=None, batch=remote_batch, requests=[0, 1]),
        },
        writes={
            0: SimpleNamespace(rows=torch.tensor([0]), slots=torch.tensor([2 * BS + 9])),
            1: SimpleNamespace(rows=torch.tensor([1]), slots=torch.tensor([8 * BS + 13])),
        },
    )
    hooks = []

    def remote():
        hooks.append(native_plane.set_up(transport, plan, (1,), (HQ, HKV, D), LAYERS))
        return hooks[-1]

    step = build_native_step(plan, (0,), (local_pool,), HQ, D, D**-0.5, lambda n: None, remote)
    assert step is not None and isinstance(hooks[0], NativeRemoteHook)
    attend = cpu_native.native_library().lib.step_attend
    g = torch.Generator().manual_seed(3)
    for layer in range(LAYERS):
        qkv = torch.randn(2, (HQ + 2 * HKV) * D, generator=g)
        q = qkv[:, : HQ * D].contiguous()
        attn = torch.full((2, HQ, D), float("nan"))  # whatever the scratch held
        lse = torch.full((2, HQ), float("nan"))
        assert (
            attend(
                step.context, layer, q.data_ptr(), qkv.data_ptr(), attn.data_ptr(), lse.data_ptr()
            )
            == 0
        )

        qh = q.view(2, HQ, D)
        k = qkv[:, HQ * D : (HQ + HKV) * D].reshape(2, HKV, D)
        v = qkv[:, (HQ + HKV) * D :].reshape(2, HKV, D)
        home = micro_attention(
            qh[:1],
            local_ref.k[layer],
            local_ref.v[layer],
            local_batch,
            store=(plan.writes[0].slots, k[:1], v[:1]),
        )
        away = micro_attention(
            qh,
            reference.k[layer],
            reference.v[layer],
            remote_batch,
            store=(plan.writes[1].slots, k[1:], v[1:]),
        )
        assert torch.equal(attn[1], away[0][1]) and torch.equal(lse[1], away[1][1])
        want_out, want_lse = home[0].clone(), home[1].clone()
        merge_into(want_out, want_lse, None, away[0][:1], away[1][:1])
        torch.testing.assert_close(attn[:1], want_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse[:1], want_lse, rtol=1e-5, atol=1e-6)
    transport.channels.close()
    creditor.server.close()


def test_a_step_stopped_between_sends_and_merge_leaves_no_reply_behind(token) -> None:
    """The decoder may stop a step for its own reason after a layer's sends: the replies then
    waiting are never read as another step's; the channel reopens and serves the next one."""
    creditor = Creditor(_pool(1), token)
    transport = _debtor(creditor)
    hook = _hook(transport, _plan(3))
    step = STEP_FN(hook.address)
    qkv, attn, lse = _zeros()
    assert step(hook.context, 0, 0, qkv.data_ptr(), 0, 0) == 0
    assert hook.error is None  # the decoder's own failure, not the exchange's
    assert transport.channels.creditor_ids == []
    again = _hook(transport, _plan(3))
    step = STEP_FN(again.address)
    assert step(again.context, 0, 0, qkv.data_ptr(), 0, 0) == 0
    assert step(again.context, 1, 0, 0, attn.data_ptr(), lse.data_ptr()) == 0
    transport.channels.close()
    creditor.server.close()
