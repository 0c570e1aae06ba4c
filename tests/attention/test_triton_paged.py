"""The Triton kernels (``triton_paged``) against the torch reference and the CPU self-attention.

Where no GPU is present the kernels run under Triton's interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before triton is first imported. So this module runs in one of two modes:

* in-process, on CUDA tensors where a GPU is present, or on CPU tensors when the environment
  already has ``TRITON_INTERPRET=1`` (set before the process started, so before any import);
* otherwise ``test_kernels_under_interpreter`` runs this same file again in a child pytest
  with ``TRITON_INTERPRET=1``, and ``test_kernel_compiles_for_sm90`` compiles the kernel for an
  H100 (no GPU needed), which catches what the interpreter lets through.

Shapes are small: the interpreter runs each program in Python.
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys

import pytest
import torch

import infinite_llm
from infinite_llm.attention.batch import MABatch
from infinite_llm.attention.cpu_flash import causal_self_attention
from infinite_llm.attention.micro import micro_attention
from infinite_llm.attention.reference import micro_attention_reference

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton)", allow_module_level=True)

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
RUN_HERE = torch.cuda.is_available() or INTERPRETER
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32_TOL = {"atol": 1e-5, "rtol": 1e-5}

# (query rows, context tokens) per request: decode rows, a prefill chunk, an exact block, a
# partial last block, a context longer than one key tile (64), an empty context, no rows.
MIXED = [(1, 37), (6, 21), (1, 16), (1, 150), (2, 0), (0, 5), (3, 9)]


def random_batch(
    specs: list[tuple[int, int]],
    hkv: int,
    group: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    q_dtype: torch.dtype | None = None,
    positions: list[tuple[int, int]] | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, MABatch]:
    """q [T, Hq, D], a pool's k, v caches with each request's blocks at shuffled ids, the batch.

    ``positions``: (q_start_pos, kv_start_pos) per request, for causal batches.
    """
    gen = torch.Generator().manual_seed(seed)
    needs = [-(-ctx // block_size) for _, ctx in specs]
    num_blocks = sum(needs) + 3  # spare blocks hold garbage that must never be read
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    block_ids, used = [], 0
    for n in needs:
        block_ids.append(ids[used : used + n])
        used += n
    shape = (hkv, num_blocks, block_size, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    rows = sum(n for n, _ in specs)
    q = torch.randn(rows, hkv * group, head_dim, generator=gen).to(q_dtype or dtype)
    batch = MABatch(
        query_lens=[n for n, _ in specs],
        block_ids=block_ids,
        context_lens=[ctx for _, ctx in specs],
        block_size=block_size,
        q_start_pos=None if positions is None else [p for p, _ in positions],
        kv_start_pos=None if positions is None else [p for _, p in positions],
    )
    return q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), batch


def check_against_reference(q, k_cache, v_cache, batch, causal: bool, **tol) -> None:
    from infinite_llm.attention.triton_paged import paged_attention

    scale = q.shape[-1] ** -0.5
    out, lse = paged_attention(q, k_cache, v_cache, batch, scale, causal)
    ref_out, ref_lse = micro_attention_reference(q, k_cache, v_cache, batch, scale, causal)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(lse, ref_lse, **F32_TOL)  # -inf where no key is seen, both
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)


if RUN_HERE:

    @pytest.mark.parametrize(("group", "head_dim"), [(1, 64), (3, 64), (3, 32), (1, 32)])
    def test_mixed_batch_float32(group: int, head_dim: int) -> None:
        q, k, v, batch = random_batch(MIXED, 2, group, head_dim, seed=group * head_dim)
        check_against_reference(q, k, v, batch, causal=False, **F32_TOL)

    def test_decode_rows_only_and_odd_block_size() -> None:
        specs = [(1, ctx) for ctx in (1, 5, 12, 13, 70, 0)]
        q, k, v, batch = random_batch(specs, 3, 3, 32, block_size=6, seed=1)
        check_against_reference(q, k, v, batch, causal=False, **F32_TOL)

    @pytest.mark.parametrize(("group", "head_dim"), [(3, 64), (1, 32)])
    def test_causal_positions(group: int, head_dim: int) -> None:
        # (rows, ctx) with (q_start_pos, kv_start_pos): a chunk seeing its whole shard; a chunk
        # whose first rows precede the shard's keys (out 0, lse -inf there); a chunk longer than
        # one query tile (21 rows at G=3) starting inside the shard; decode rows; an empty shard.
        specs = [(4, 20), (5, 12), (25, 40), (1, 30), (1, 8), (3, 0)]
        positions = [(20, 0), (98, 100), (15, 0), (29, 0), (50, 60), (7, 0)]
        q, k, v, batch = random_batch(specs, 2, group, head_dim, positions=positions, seed=7)
        check_against_reference(q, k, v, batch, causal=True, **F32_TOL)
        _, lse = micro_attention_reference(q, k, v, batch, head_dim**-0.5, True)
        assert bool(torch.isinf(lse).any()) and not bool(torch.isinf(lse).all())  # honest case

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("causal", [False, True])
    def test_half_precision_caches(dtype: torch.dtype, causal: bool) -> None:
        positions = [(ctx - 1 + rows // 2, 0) for rows, ctx in MIXED] if causal else None
        q, k, v, batch = random_batch(MIXED, 2, 3, 64, dtype=dtype, positions=positions, seed=3)
        # Products of half-precision values are exact in float32: what differs is the rounding
        # of out to q's dtype (one ulp: 2**-8 relative for bfloat16, 2**-11 for float16).
        ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
        check_against_reference(q, k, v, batch, causal, atol=ulp, rtol=ulp)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_float32_queries_over_half_cache_keep_probabilities_exact(dtype: torch.dtype) -> None:
        # out in float32: no final rounding hides the p @ v products. A single cast of the
        # probabilities to v's dtype errs by ~1e-3 here; the hi/lo split keeps ~16 bits or more.
        # (Under the interpreter bfloat16 takes the float32 dots; float16 the split.)
        q, k, v, batch = random_batch(MIXED, 2, 3, 64, dtype=dtype, q_dtype=torch.float32)
        check_against_reference(q, k, v, batch, causal=False, atol=5e-5, rtol=5e-5)

    def test_micro_attention_dispatch_and_store() -> None:
        q, k, v, batch = random_batch(MIXED, 2, 3, 32, seed=11)
        slots = torch.tensor([batch.block_ids[0][0] * 16 + 3], device=DEVICE)
        new_k = torch.randn(1, 2, 32, device=DEVICE)
        new_v = torch.randn(1, 2, 32, device=DEVICE)
        k_ref, v_ref = k.clone(), v.clone()
        out, lse = micro_attention(q, k, v, batch, impl="triton", store=(slots, new_k, new_v))
        ref_out, ref_lse = micro_attention(
            q, k_ref, v_ref, batch, impl="reference", store=(slots, new_k, new_v)
        )
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)  # the store happened first
        torch.testing.assert_close(out, ref_out, **F32_TOL)
        torch.testing.assert_close(lse, ref_lse, **F32_TOL)

    def test_tables_reach_the_device_once_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
        from infinite_llm.attention import triton_paged

        builds = []
        real = triton_paged._paged_tables
        monkeypatch.setattr(triton_paged, "_paged_tables", lambda *a: builds.append(1) or real(*a))
        q, k, v, batch = random_batch(MIXED, 2, 3, 32, seed=5)
        first = triton_paged.paged_attention(q, k, v, batch, 0.2)
        for _ in range(2):  # the next layers
            again = triton_paged.paged_attention(q, k, v, batch, 0.2)
        assert len(builds) == 1
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])

    def test_clear_errors() -> None:
        from infinite_llm.attention.triton_paged import paged_attention

        q, k, v, batch = random_batch([(2, 5)], 2, 3, 32)
        with pytest.raises(ValueError, match="q_start_pos"):
            paged_attention(q, k, v, batch, 0.2, causal=True)
        with pytest.raises(ValueError, match="query rows"):
            paged_attention(q[:1], k, v, batch, 0.2)

    @pytest.mark.parametrize(
        ("query_lens", "group", "head_dim", "dtype"),
        [
            ([1, 5, 30, 2], 3, 64, torch.float32),  # 30 rows: two query tiles at G=3
            ([4, 1, 17], 1, 32, torch.float32),
            ([1, 1, 1], 3, 32, torch.float32),  # decode rows: out = v, lse = q.k * scale
            ([3, 9], 3, 64, torch.bfloat16),
        ],
    )
    def test_causal_self_attention_matches_cpu(
        query_lens: list[int], group: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        from infinite_llm.attention.triton_paged import causal_self_attention_triton

        gen = torch.Generator().manual_seed(len(query_lens) * head_dim)
        t, hkv = sum(query_lens), 2
        q = torch.randn(t, hkv * group, head_dim, generator=gen).to(dtype)
        k = torch.randn(t, hkv, head_dim, generator=gen).to(dtype)
        v = torch.randn(t, hkv, head_dim, generator=gen).to(dtype)
        scale = head_dim**-0.5
        # the truth: the CPU kernel in float32 on the same (rounded) values; the Triton kernel's
        # products of bfloat16 values are exact in float32, and its probabilities keep ~16 bits
        # on a GPU's split p @ v (2**-18 relative), so the tolerance stays tight
        ref_out, ref_lse = causal_self_attention(
            q.float(), k.float(), v.float(), query_lens, scale, torch.float32
        )
        q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
        out, lse = causal_self_attention_triton(q, k, v, query_lens, scale, torch.float32)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        torch.testing.assert_close(lse.cpu(), ref_lse, **F32_TOL)
        split = F32_TOL if dtype == torch.float32 else {"atol": 5e-5, "rtol": 5e-5}
        torch.testing.assert_close(out.cpu(), ref_out, **split)
        # through causal_self_attention's dispatch, out in q's dtype: one rounding
        via, via_lse = causal_self_attention(q, k, v, query_lens, scale, impl="triton")
        ulp = 2**-7 if dtype == torch.bfloat16 else 1e-6
        assert via.dtype == dtype and torch.equal(via_lse, lse)
        torch.testing.assert_close(via.float(), out, atol=ulp, rtol=ulp)


else:

    def test_kernels_under_interpreter() -> None:
        """This file's kernel tests, on CPU tensors, in a child with the interpreter on."""
        env = dict(os.environ, TRITON_INTERPRET="1")
        src = os.path.dirname(os.path.dirname(infinite_llm.__file__))  # the code under test
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]

    def test_triton_impl_on_cpu_without_interpreter_is_a_clear_error() -> None:
        q, k, v, batch = random_batch([(1, 5)], 1, 1, 32)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            micro_attention(q, k, v, batch, impl="triton")

    @pytest.mark.parametrize("dtype", ["bf16", "fp32"])
    def test_kernel_compiles_for_sm90(dtype: str) -> None:
        """The kernel compiles for an H100 (sm_90, no GPU needed): tl.dot's shapes and types, the
        loop-carried state, and everything else the interpreter does not check."""
        triton = pytest.importorskip("triton")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from infinite_llm.attention.triton_paged import _attention_kernel as kernel

        if importlib.util.find_spec("triton.backends.nvidia") is None:
            pytest.skip("this triton has no NVIDIA backend")
        data = {"q_ptr", "k_ptr", "v_ptr", "out_ptr"}
        consts = {
            "HEAD_DIM": 64,
            "BLOCK_D": 64,
            "GROUP": 3,
            "BLOCK_M": 64,
            "BLOCK_Q": 21,
            "BLOCK_N": 64,
            "PAGE": 16,
            "PAGED": True,
            "CAUSAL": True,
            "LOW_QK": dtype != "fp32",
            "LOW_PV": dtype != "fp32",
        }
        signature = {}
        for name in kernel.arg_names:
            if name in consts:
                signature[name] = "constexpr"
            elif name in data:
                signature[name] = f"*{dtype}"
            elif name == "lse_ptr":
                signature[name] = "*fp32"
            elif name.endswith("_ptr"):
                signature[name] = "*i32"
            else:
                signature[name] = "fp32" if name == "qk_scale" else "i32"
        source = ASTSource(
            fn=kernel,
            signature=signature,
            constexprs={(kernel.arg_names.index(n),): c for n, c in consts.items()},
        )
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": True}
        )
        assert compiled.asm["cubin"]
