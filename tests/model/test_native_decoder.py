"""The whole-step native decoder: the same bits as the layer-by-layer path, the steps it takes
and the ones it leaves to torch, and greedy tokens equal to transformers through the engine."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import hf_greedy, loaded_model, random_prompts
from infinite_llm import LLM, SamplingParams
from infinite_llm.attention.dist import DistAttention, LocalExecutor
from infinite_llm.attention.kv_pool import KVPool
from infinite_llm.attention.plan import DistPlan, StepSpan
from infinite_llm.kvcache.block import BlockRef
from infinite_llm.model import native_decoder
from infinite_llm.model.layers import apply_rotary

needs_native = pytest.mark.skipif(
    native_decoder.native_library() is None, reason="native kernels could not be built here"
)
BS = 8


def _pool(model, dtype: torch.dtype = torch.float32) -> KVPool:
    arch = model.arch
    pool = KVPool(arch.num_layers, arch.num_kv_heads, arch.head_dim, 40, BS, dtype)
    pool.k.zero_()
    pool.v.zero_()
    return pool


def _step(model, executor, refs, done: list[int], new: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    plan = DistPlan([StepSpan(r, d, n) for r, d, n in zip(refs, done, new)], BS)
    ids = torch.randint(0, model.arch.vocab_size, (sum(new),), generator=gen)
    pos = torch.tensor([p for d, n in zip(done, new) for p in range(d, d + n)])
    return model(ids, pos, DistAttention(executor, plan, model.arch.head_dim**-0.5))


def _layer_by_layer(model):
    class Off:
        def __enter__(self):
            self.saved, model.native_decoder = model.native_decoder, None

        def __exit__(self, *exc):
            model.native_decoder = self.saved

    return Off()


@needs_native
@pytest.mark.parametrize("num_pools", [1, 3])  # all local; borrowed rBlocks on other pools
def test_decode_steps_are_the_layer_by_layer_path_bit_for_bit(num_pools: int) -> None:
    model = loaded_model("tiny").model
    assert model.native_decoder is not None
    prompts = [5, 17, 33]
    rng = random.Random(num_pools)
    free = {p: rng.sample(range(40), 40) for p in range(num_pools)}
    refs = []
    for n in prompts:  # each rBlock on a random pool, at a random block id
        owners = [rng.randrange(num_pools) for _ in range(-(-(n + 4) // BS))]
        refs.append([BlockRef(p, free[p].pop()) for p in owners])
    fused = {p: _pool(model) for p in range(num_pools)}
    plain = {p: _pool(model) for p in range(num_pools)}
    with _layer_by_layer(model):  # prefill: the same path for both
        _step(model, LocalExecutor(fused), refs, [0, 0, 0], prompts, seed=1)
    for p in range(num_pools):
        plain[p].k.copy_(fused[p].k)
        plain[p].v.copy_(fused[p].v)
    done = list(prompts)
    for s in range(4):  # decode steps crossing a block boundary (17 + 4 > 2 blocks of 8)
        before = model.native_decoder.num_steps
        executor = LocalExecutor(fused)
        got = _step(model, executor, refs, done, [1, 1, 1], seed=10 + s)
        assert model.native_decoder.num_steps == before + 1
        baseline = LocalExecutor(plain)
        with _layer_by_layer(model):
            want = _step(model, baseline, refs, done, [1, 1, 1], seed=10 + s)
        assert torch.equal(got, want)
        for p in range(num_pools):
            assert torch.equal(fused[p].k, plain[p].k) and torch.equal(fused[p].v, plain[p].v)
        # the fused calls it stands for are counted as the layer path counts them
        assert executor.num_fused_calls == baseline.num_fused_calls
        done = [d + 1 for d in done]


@needs_native
def test_steps_it_leaves_to_the_layer_by_layer_path() -> None:
    model = loaded_model("tiny").model
    decoder = model.native_decoder
    refs = [[BlockRef(0, 0), BlockRef(0, 1)], [BlockRef(0, 2), BlockRef(1, 3)]]
    pools = {0: _pool(model), 1: _pool(model)}

    def taken(executor, refs, done, new) -> bool:
        before = decoder.num_steps
        _step(model, executor, refs, done, new, seed=0)
        return decoder.num_steps == before + 1

    assert not taken(LocalExecutor(pools), refs[:1], [0], [9])  # a prefill chunk
    assert taken(LocalExecutor(pools), refs[:1], [9], [1])
    assert taken(LocalExecutor(pools), refs[1:], [9], [1])  # context on two pools

    class OnlyZeroHere(LocalExecutor):  # as a Ray actor: instance 1's pool is another process's
        def native_pools(self):
            return {0: self.pools[0]}

    assert not taken(OnlyZeroHere(pools), refs[1:], [9], [1])
    assert not taken(LocalExecutor(pools, impl="flash"), refs[:1], [10], [1])  # another kernel
    bf16 = {0: _pool(model, torch.bfloat16)}
    assert not taken(LocalExecutor(bf16), refs[:1], [10], [1])  # a bfloat16 pool


@needs_native
def test_rope_and_silu_mul_match_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    t, heads, d = 5, 7, 64
    qkv = torch.randn(t, heads * d + 3 * d, generator=gen)
    qk = qkv[:, : heads * d].view(t, heads, d)  # strided rows, as the model's view
    cos, sin = torch.randn(t, 1, d, generator=gen), torch.randn(t, 1, d, generator=gen)
    want = qk * cos + qk.roll(d // 2, dims=-1) * sin
    tail = qkv[:, heads * d :].clone()
    assert apply_rotary(qk, cos, sin) is qk
    assert torch.equal(qk, want)  # the same products and sum: no fused multiply-add
    assert torch.equal(qkv[:, heads * d :], tail)  # the rest of the row untouched
    gate_up = torch.randn(t, 2 * 96, generator=gen) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(
        native_decoder.silu_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=2e-6
    )


@needs_native
def test_engine_decodes_natively_and_matches_transformers() -> None:
    loaded = loaded_model("tiny")
    llm = LLM("tiny", loaded_model=loaded, progress=False, block_size=8, kv_blocks_per_instance=128)
    prompts = random_prompts(4, (3, 40), 256, seed=7)
    before = loaded.model.native_decoder.num_steps
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )
    assert loaded.model.native_decoder.num_steps - before >= 19  # every decode-only step
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(loaded.model_dir, prompt, 20)
    llm.check_integrity()
