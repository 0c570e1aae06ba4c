"""The C RMSNorm (and residual add + RMSNorm) against transformers' formula."""

from __future__ import annotations

import pytest
import torch

from infinite_llm.model import native_norm
from infinite_llm.model.layers import RMSNorm

needs_native = pytest.mark.skipif(
    native_norm.native_library() is None, reason="native kernels could not be built here"
)


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@needs_native
@pytest.mark.parametrize("rows", [1, 7, 130])  # 130: the rows split over threads
def test_rms_norm_matches_the_formula(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=gen) * 3
    w = torch.randn(576, generator=gen)
    out = native_norm.rms_norm(x, w, 1e-5)
    assert out is not None
    torch.testing.assert_close(out, _hf_rms_norm(x, w, 1e-5), rtol=2e-6, atol=2e-6)


@needs_native
def test_add_rms_norm_adds_in_place() -> None:
    gen = torch.Generator().manual_seed(1)
    residual, delta = torch.randn(5, 64, generator=gen), torch.randn(5, 64, generator=gen)
    w = torch.rand(64, generator=gen)
    expected_sum = residual + delta
    out = native_norm.add_rms_norm(residual, delta, w, 1e-6)
    assert out is not None
    torch.testing.assert_close(residual, expected_sum, rtol=0, atol=0)  # exact: one float add
    torch.testing.assert_close(out, _hf_rms_norm(expected_sum, w, 1e-6), rtol=2e-6, atol=2e-6)


def test_what_it_does_not_take_falls_back_to_torch() -> None:
    w = torch.ones(64)
    x = torch.randn(64, 4).t()  # not contiguous
    assert native_norm.rms_norm(x, w, 1e-6) is None
    assert native_norm.rms_norm(x.contiguous().bfloat16(), w, 1e-6) is None
    assert native_norm.add_rms_norm(x.contiguous(), torch.randn(4, 32), w, 1e-6) is None
    norm = RMSNorm(64, 1e-6, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(norm(x), _hf_rms_norm(x, w, 1e-6), rtol=2e-6, atol=2e-6)
    residual, delta = x.clone(), torch.randn(4, 64)  # x.clone() keeps the strides: no C call
    new_residual, h = norm.add_forward(residual, delta)
    torch.testing.assert_close(new_residual, x + delta)
    torch.testing.assert_close(h, _hf_rms_norm(x + delta, w, 1e-6), rtol=2e-6, atol=2e-6)
