"""The panel-packed C linear against a float64 reference, and its place in a loaded model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import loaded_model
from infinite_llm.model import native_linear
from infinite_llm.model.native_linear import NativeLinear, pack_panels

needs_native = pytest.mark.skipif(
    native_linear.native_library() is None, reason="native kernels could not be built here"
)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double()).float()


@needs_native
@pytest.mark.parametrize("shape", [(96, 40), (33, 77), (16, 1), (1, 5), (960, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_linear_for_every_batch_size(shape: tuple[int, int], bias: bool) -> None:
    """Rows 1 (the one-row path), 2-6 (every short tile), 48/49 (a row block and one more),
    partial panels (n not a multiple of 16), odd k."""
    n, k = shape
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    layer = NativeLinear(w, b)
    for rows in (1, 2, 3, 4, 5, 6, 7, 13, 48, 49, 130):
        x = torch.randn(rows, k, generator=g)
        tol = 1e-6 + 1e-7 * k  # float32 rounding of a k-term sum of O(1) products
        torch.testing.assert_close(layer(x), _reference(x, w, b), rtol=tol, atol=tol)


@needs_native
def test_layouts_and_shapes() -> None:
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    layer = NativeLinear(w, b)
    assert torch.equal(layer.dense_weight(), w)  # the packing loses nothing
    assert layer.panels.shape == (3, 24, 16)
    assert torch.equal(pack_panels(w)[2, :, 8:], torch.zeros(24, 8))  # padding columns are zero
    x3 = torch.randn(2, 5, 24, generator=g)
    torch.testing.assert_close(layer(x3), _reference(x3, w, b), rtol=1e-5, atol=1e-5)
    wide = torch.randn(7, 50, generator=g)
    view = wide[:, 10:34]  # rows 50 floats apart: read in place through the row stride
    assert view.stride() == (50, 1)
    torch.testing.assert_close(layer(view), _reference(view, w, b), rtol=1e-5, atol=1e-5)
    strided = torch.randn(24, 7, generator=g).t()  # column-major: copied first
    torch.testing.assert_close(layer(strided), _reference(strided, w, b), rtol=1e-5, atol=1e-5)
    assert layer(torch.empty(0, 24)).shape == (0, 40)
    with pytest.raises(ValueError, match="24 input features"):
        layer(torch.randn(3, 25))


@needs_native
def test_threads_do_not_change_the_result() -> None:
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(200, 64, generator=g), torch.randn(9, 64, generator=g)
    layer = NativeLinear(w, None)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer(x)
        torch.set_num_threads(max(2, before))
        assert torch.equal(layer(x), one)  # each output's sum is one thread's, in k order
    finally:
        torch.set_num_threads(before)


@needs_native
def test_loaded_model_uses_it() -> None:
    model = loaded_model("tiny").model
    assert isinstance(model.layers[0].qkv_proj, NativeLinear)
    assert isinstance(model.lm_head, NativeLinear)


@needs_native
def test_tied_embedding_is_read_from_the_head_panels() -> None:
    """A tied model keeps one [vocab, hidden] table, the LM head's panels, and looks tokens up in
    them: the same rows bit for bit, and no second copy among its tensors."""
    from infinite_llm.model.loader import load_model
    from infinite_llm.model.native_linear import PanelEmbedding

    model = load_model("tiny:tied", "float32", progress=False).model
    assert isinstance(model.embed_tokens, PanelEmbedding)
    table = model.lm_head.dense_weight()
    vocab, hidden = table.shape
    assert not any(p.shape == (vocab, hidden) for p in model.parameters())
    assert torch.equal(model.embed_tokens.weight, table)
    ids = torch.tensor([[0, 1, 15, 16], [17, vocab - 1, 3, 3]])
    assert torch.equal(model.embed_tokens(ids), table[ids])
    assert model.embed_tokens(torch.tensor([], dtype=torch.long)).shape == (0, hidden)
    with pytest.raises(IndexError, match="out of range"):
        model.embed_tokens(torch.tensor([vocab]))
    untied = loaded_model("tiny").model
    assert isinstance(untied.embed_tokens, torch.nn.Embedding)
