"""oneDNN pre-packed linears (the fallback of ``NativeLinear``): the same weights,
float32-rounding-close outputs, any batch size; a loaded model's packed linears."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import loaded_model
from infinite_llm.model.layers import PackedLinear, can_prepack
from infinite_llm.model.llama import PACKED_LINEARS

pytestmark = pytest.mark.skipif(not can_prepack(torch.zeros(1)), reason="no oneDNN on this build")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_linear(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 40, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    packed = PackedLinear(w, b)
    assert torch.equal(packed.dense_weight(), w)
    for rows in (1, 3, 8, 33, 257):
        x = torch.randn(rows, 40, generator=g)
        torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert packed(torch.randn(2, 5, 40, generator=g)).shape == (2, 5, 96)


def test_loaded_model_is_packed_and_counts_the_weights_a_step_reads() -> None:
    model = loaded_model("tiny").model
    assert model.lm_head is not None and isinstance(model.layers[0].gate_up_proj, PACKED_LINEARS)
    arch = model.arch
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * i + i * h + 2 * h  # linears + two norms
    expected = 4 * (
        arch.num_layers * per_layer + h + arch.vocab_size * h
    )  # + final norm, LM head once
    assert model.weight_bytes() == expected
    assert not model.prepack()  # once only
