"""``KVPool.write``: the native store equals torch's index_copy_, checks its slots, takes views."""

from __future__ import annotations

import sys

import pytest
import torch

from infinite_llm.attention import cpu_native
from infinite_llm.attention.kv_pool import KVPool


def _torch_write(
    pool: KVPool, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    h, d = pool.num_kv_heads, pool.head_dim
    pool.k[layer].view(h, -1, d).index_copy_(1, slots, k.transpose(0, 1).to(pool.dtype))
    pool.v[layer].view(h, -1, d).index_copy_(1, slots, v.transpose(0, 1).to(pool.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_write_equals_index_copy(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = (KVPool(2, 3, 64, 10, 16, dtype) for _ in range(2))
    for pool in (a, b):
        pool.k.zero_()
        pool.v.zero_()
    # k, v as the model makes them: strided views of one fused projection
    qkv = torch.randn(5, 9 * 64 + 2 * 3 * 64, generator=gen).to(dtype)
    k = qkv[:, 9 * 64 : 12 * 64].view(5, 3, 64)
    v = qkv[:, 12 * 64 :].view(5, 3, 64)
    slots = torch.tensor([0, 17, 159, 42, 43])
    a.write(1, slots, k, v)
    _torch_write(b, 1, slots, k, v)
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert a.k[1].view(3, -1, 64)[:, 17].abs().sum() > 0  # something was written


@pytest.mark.skipif(not cpu_native.native_available(), reason="native kernels unavailable")
def test_out_of_range_slot_is_refused_and_writes_nothing() -> None:
    pool = KVPool(1, 2, 16, 4, 4, torch.float32)
    pool.k.zero_()
    pool.v.zero_()
    k = torch.ones(2, 2, 16)
    with pytest.raises(IndexError):
        pool.write(0, torch.tensor([3, 16]), k, k)
    assert pool.k.abs().sum() == 0 and pool.v.abs().sum() == 0


def _mapping_flags(address: int) -> list[str] | None:
    """The VmFlags of the mapping holding ``address`` (/proc/self/smaps), None if unmapped."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps")
def test_pool_memory_is_2mb_aligned_advised_as_huge_pages_and_works_without() -> None:
    """Huge-page advice is an optimisation: the pool is the same tensor either way."""
    import gc

    from infinite_llm.attention import kv_pool

    pool = KVPool(2, 2, 64, 2048, 16, torch.float32)  # 2 x 16 MiB per layer
    assert pool.k.shape == (2, 2, 2048, 16, 64) and pool.k.is_contiguous()
    for t in (pool.k, pool.v):  # whole 2 MB pages from the first byte, advised before use
        assert t.data_ptr() % kv_pool.HUGE_PAGE == 0
        assert "hg" in (_mapping_flags(t.data_ptr()) or [])
    address = pool.k.data_ptr()
    pool.write(1, torch.tensor([0, 2047 * 16 + 15]), torch.ones(2, 2, 64), torch.ones(2, 2, 64))
    assert pool.k[1, :, 2047, 15].sum() == 128 and pool.k[1, :, 0, 0].sum() == 128
    del pool, t
    gc.collect()
    assert _mapping_flags(address) is None  # unmapped with the last tensor over it
    small = kv_pool.empty_kv((4, 16), torch.float32)  # under one huge page: plain torch.empty
    assert small.shape == (4, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INFINITE_LLM_HUGEPAGES", "0")
        plain = KVPool(1, 1, 16, 8, 4, torch.float32)
        plain.write(0, torch.tensor([5]), torch.ones(1, 1, 16), torch.ones(1, 1, 16))
        assert plain.k[0].view(1, -1, 16)[0, 5].sum() == 16
