"""The native decode kernel: its own paths (split-K, threads, row tiles, bf16), build cache, fallbacks."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from attn_helpers import assert_close, place, randn, write_tokens

from infinite_llm.attention import cpu_native, micro, native_ops
from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.micro import micro_attention
from infinite_llm.attention.reference import micro_attention_reference
from infinite_llm.native.build import build_and_load, kernel_cache_dir

needs_native = pytest.mark.skipif(
    not cpu_native.native_available(), reason="native kernel could not be built here"
)


def _problem(
    ctxs: list[int], qlens: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype, bs: int = 16
):
    gen = torch.Generator().manual_seed(sum(ctxs) + d)
    placement = place(random.Random(len(ctxs)), 1, [-(-c // bs) for c in ctxs], bs, hkv, d, dtype)
    for i, c in enumerate(ctxs):
        write_tokens(
            placement,
            0,
            i,
            0,
            randn(gen, c, hkv, d, dtype=dtype),
            randn(gen, c, hkv, d, dtype=dtype),
        )
    batch = MABatch(qlens, [[r.block_id for r in refs] for refs in placement.refs], ctxs, bs)
    q = randn(gen, sum(qlens), hq, d, dtype=dtype, std=2.0).to(dtype)
    pool = placement.pools[0]
    return q, pool.k[0], pool.v[0], batch


def _check(q, k, v, batch, causal: bool = False, impl: str = "native") -> None:
    scale = q.shape[-1] ** -0.5
    out, lse = micro_attention(q, k, v, batch, scale, causal=causal, impl=impl)
    ref_out, ref_lse = micro_attention_reference(
        q.double(), k.double(), v.double(), batch, scale, causal
    )
    assert_close(out, lse, ref_out, ref_lse, q.dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_split_k_across_threads(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, causal: bool
) -> None:
    """Small chunks force several split-K partials per (request, head), merged in the kernel."""
    monkeypatch.setattr(cpu_native, "MIN_CHUNK_TOKENS", 16)
    monkeypatch.setattr(cpu_native, "SERIAL_WORK", 0)
    monkeypatch.setattr(cpu_native, "ITEMS_PER_THREAD", 16)
    q, k, v, batch = _problem([1000, 37], [1, 2], 9, 3, 64, dtype)
    if causal:
        batch = MABatch(
            batch.query_lens,
            batch.block_ids,
            batch.context_lens,
            16,
            q_start_pos=[600, 0],
            kv_start_pos=[0, 1],
        )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        chunk, num_threads = cpu_native._split(batch, 3, 2)
        assert num_threads == 2 and chunk % cpu_native.TILE == 0 and chunk <= 1000 // 5
        _check(q, k, v, batch, causal)
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("bs", [16, 24, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_shuffled_contexts(bs: int, dtype: torch.dtype) -> None:
    """Thousands of keys on shuffled rBlocks: whole steps of tiles, the prefetch ahead, a last
    partial step and tile (block sizes a multiple of the tile, and not), GQA rows 1..3."""
    q, k, v, batch = _problem([2011, 1100, 64, 77], [1, 1, 1, 1], 9, 3, 64, dtype, bs)
    _check(q, k, v, batch)
    q, k, v, batch = _problem([1500, 333], [1, 1], 8, 4, 32, dtype, bs)
    _check(q, k, v, batch)


@needs_native
def test_more_rows_than_one_tile() -> None:
    """8 query tokens x 4 heads per KV head = 32 rows: two passes of 16 rows over the keys."""
    q, k, v, batch = _problem([300, 5], [8, 3], 8, 2, 32, torch.float32)
    _check(q, k, v, batch)


@needs_native
def test_unsupported_tensors_use_flash() -> None:
    q, k, v, batch = _problem([40], [1], 4, 2, 12, torch.float32)  # D = 12: not a multiple of 8
    assert not cpu_native.supports(q, k, v)
    _check(q, k, v, batch, impl="auto")
    _check(q, k, v, batch, impl="native")


def test_native_unavailable_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(cpu_native._state, "lib", None)
    monkeypatch.setattr(micro, "_warned", set())
    q, k, v, batch = _problem([70, 3], [1, 1], 9, 3, 64, torch.float32)
    with caplog.at_level(logging.WARNING, logger="infinite_llm.attention.micro"):
        _check(q, k, v, batch, impl="native")
    assert "native attention unavailable" in caplog.text
    _check(q, k, v, batch, impl="auto")


def test_missing_compiler_or_disabled_gives_none(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = cpu_native._SOURCE
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.WARNING):
        assert build_and_load(source) is None
    assert "no C compiler" in caplog.text
    monkeypatch.setenv("INFINITE_LLM_NATIVE", "0")
    assert build_and_load(source) is None


@needs_native
def test_build_is_cached() -> None:
    """A second build of the same source, flags and CPU loads the cached library untouched."""
    first = build_and_load(cpu_native._SOURCE)  # built by now by the tests above, or right here
    assert first is not None and first.path.parent == kernel_cache_dir()
    stamp = first.path.stat().st_mtime_ns
    second = build_and_load(cpu_native._SOURCE)
    assert second is not None and second.path == first.path
    assert second.path.stat().st_mtime_ns == stamp


@needs_native
def test_a_changed_local_header_rebuilds(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached library is named by the source and the local headers it includes."""
    monkeypatch.setenv("INFINITE_LLM_KERNEL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "sub").mkdir()
    header = tmp_path / "sub" / "value.h"
    source = tmp_path / "probe.c"
    source.write_text('#include "sub/value.h"\nint probe(void) { return VALUE; }\n')
    libs = []
    for value in (1, 2):
        header.write_text(f"#define VALUE {value}\n")
        native = build_and_load(source)
        assert native is not None
        assert native.lib.probe() == value
        libs.append(native.path)
    assert libs[0] != libs[1]


@needs_native
def test_one_batch_over_layers_and_pools() -> None:
    """A step's batch prepares its native call once and reuses it for every layer: the call
    follows each layer's tensors, and another dtype or geometry gets a call of its own."""
    q, k, v, batch = _problem([300, 45], [1, 1], 9, 3, 64, torch.float32)
    gen = torch.Generator().manual_seed(7)
    layers = [(k, v), (torch.randn(k.shape, generator=gen), torch.randn(v.shape, generator=gen))]
    for _ in range(2):  # every layer twice, as over two steps of the same batch
        for kl, vl in layers:
            _check(q, kl, vl, batch, impl="auto")
            _check(q * 0.5, kl, vl, batch, impl="native")
    _check(q.bfloat16(), k.bfloat16(), v.bfloat16(), batch, impl="native")
    _check(q[:, :6].contiguous(), k, v, batch, impl="native")  # 6 query heads: group of 2
    _check(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, batch, impl="native")  # strided
    with pytest.raises(ValueError, match="rows"):
        micro_attention(torch.cat([q, q]), k, v, batch, impl="native")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_read_reads_every_named_block(dtype: torch.dtype) -> None:
    """bench attention's pattern read: the 32-bit words of the named rBlocks, K and V of every
    head, summed modulo 2^32 (a block named twice counts twice; others not at all)."""
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(3, 40, 16, 64, generator=gen).to(dtype)
    v = torch.randn(3, 40, 16, 64, generator=gen).to(dtype)
    ids = [7, 0, 39, 7, 12]
    words = [x.contiguous().view(torch.int32).view(3, 40, -1)[:, ids].long().sum() for x in (k, v)]
    expected = int(sum(words)) % 2**32
    assert native_ops.kv_read_native(k, v, torch.tensor(ids, dtype=torch.int32)) == expected
    assert native_ops.kv_read_native(k, v, torch.tensor(ids)) is None  # int64 ids: not taken
