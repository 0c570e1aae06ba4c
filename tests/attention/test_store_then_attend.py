"""``micro_attention(..., store=...)``: new K,V written into the pool, then the MA over them;
the native kernel does both in one call. Same pool contents and same result as a separate
``KVPool.write`` followed by the MA, for every kernel; bad slots refused with nothing written."""

from __future__ import annotations

import pytest
import torch
from attn_helpers import impls

from infinite_llm.attention import cpu_native, micro
from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.attention.micro import micro_attention

HQ, HKV, D, BS = 6, 2, 32, 16


def _pools(dtype: torch.dtype) -> tuple[KVPool, KVPool]:
    gen = torch.Generator().manual_seed(0)
    a, b = (KVPool(1, HKV, D, 12, BS, dtype) for _ in range(2))
    fill = torch.randn(a.k.shape, generator=gen).to(dtype)
    for pool in (a, b):
        pool.k.copy_(fill)
        pool.v.copy_(fill.flip(-1))
    return a, b


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_lens", [[1, 1, 1], [1, 12]])  # decode; decode + a prefill chunk
def test_store_then_attend_equals_write_then_attend(
    impl: str, dtype: torch.dtype, query_lens: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(1)
    fused, separate = _pools(dtype)
    blocks = [[3, 7], [0, 1, 2], [11, 4]]
    contexts = [20, 33, 17]
    batch = MABatch(query_lens, blocks[: len(query_lens)], contexts[: len(query_lens)], BS)
    rows = sum(query_lens)
    q = torch.randn(rows, HQ, D, generator=gen).to(dtype)
    # new K,V as the model makes them: strided views of one fused projection
    qkv = torch.randn(len(query_lens), (HQ + 2 * HKV) * D, generator=gen).to(dtype)
    k = qkv[:, HQ * D : (HQ + HKV) * D].view(-1, HKV, D)
    v = qkv[:, (HQ + HKV) * D :].view(-1, HKV, D)
    # each request's last context token is the new one (a decode step stores, then attends)
    slots = torch.tensor([b[(c - 1) // BS] * BS + (c - 1) % BS for b, c in zip(blocks, contexts)])
    slots = slots[: len(query_lens)]
    if impl == "native" or (impl == "auto" and max(query_lens) == 1):

        def no_separate_store(*args: object) -> None:
            raise AssertionError("the native call should have stored the K,V itself")

        monkeypatch.setattr(micro, "write_layer", no_separate_store)
    out, lse = micro_attention(q, fused.k[0], fused.v[0], batch, impl=impl, store=(slots, k, v))
    monkeypatch.undo()
    separate.write(0, slots, k, v)
    want_out, want_lse = micro_attention(q, separate.k[0], separate.v[0], batch, impl=impl)
    assert torch.equal(fused.k, separate.k) and torch.equal(fused.v, separate.v)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


def test_a_store_the_native_call_cannot_take_is_written_first() -> None:
    """float32 K,V for a bfloat16 pool: converted by the torch store, then the MA."""
    fused, separate = _pools(torch.bfloat16)
    batch = MABatch([1], [[5]], [3], BS)
    q = torch.randn(1, HQ, D).to(torch.bfloat16)
    k, v = torch.randn(1, HKV, D), torch.randn(1, HKV, D)
    slots = torch.tensor([5 * BS + 2])
    out, _ = micro_attention(q, fused.k[0], fused.v[0], batch, store=(slots, k, v))
    separate.write(0, slots, k, v)
    assert torch.equal(fused.k, separate.k)
    torch.testing.assert_close(out, micro_attention(q, separate.k[0], separate.v[0], batch)[0])


@pytest.mark.skipif(not cpu_native.native_available(), reason="native kernels unavailable")
def test_out_of_range_slot_in_the_fused_call_writes_nothing() -> None:
    pool, _ = _pools(torch.float32)
    before_k, before_v = pool.k.clone(), pool.v.clone()
    batch = MABatch([1, 1], [[1], [2]], [4, 4], BS)
    q = torch.randn(2, HQ, D)
    k = torch.ones(2, HKV, D)
    with pytest.raises(IndexError, match="outside the pool"):
        micro_attention(
            q, pool.k[0], pool.v[0], batch, impl="native", store=(torch.tensor([20, 12 * BS]), k, k)
        )
    assert torch.equal(pool.k, before_k) and torch.equal(pool.v, before_v)
