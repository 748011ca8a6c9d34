"""Sample chunking (issue 17): ``mc_predict(..., sample_chunk=K)`` and ``sampling(S, chunk=K)``
run the S samples K at a time, and with a seed give exactly the unchunked samples, for every
bdlkern layer that draws noise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bdlkern
from bdlkern.nn import (
    ConcreteDropout,
    ConcreteDropoutLinear,
    MCDropout,
    MCDropoutConv1d,
    MCDropoutConv2d,
    MCDropoutLinear,
    SparseVDConv2d,
    SparseVDLinear,
)
from bdlkern.uncertainty import mc_predict


def _sparse_vd_noisy(layer):
    """Gives a sparse-VD layer weights with real variance (log alpha around 0), so that its LRT
    noise shows in the output, and prunes a few weights."""
    with torch.no_grad():
        layer.log_sigma2.copy_(2 * torch.log(layer.theta.abs() + 1e-3) + torch.empty_like(layer.theta).uniform_(-2, 4))
    return layer


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(
        MCDropoutLinear(7, 30, p=0.3), nn.ReLU(), _sparse_vd_noisy(SparseVDLinear(30, 20)), nn.ReLU(),
        ConcreteDropoutLinear(20, 20, init_p=0.3), MCDropout(0.2), nn.Linear(20, 5),
    )
    shared = nn.Sequential(MCDropoutLinear(7, 16, p=0.4, shared_mask=True), nn.Tanh(), MCDropoutLinear(16, 3, p=0.2))
    per_feature = nn.Sequential(ConcreteDropoutLinear(7, 9, per_feature=True, init_p=0.3), nn.ReLU(), nn.Linear(9, 2))
    conv = nn.Sequential(
        MCDropoutConv2d(3, 4, 3, p=0.3), nn.ReLU(), MCDropoutConv2d(4, 5, 3, p=0.2, mask="channel", stride=2),
        _sparse_vd_noisy(SparseVDConv2d(5, 6, 3, padding=1)), MCDropout(0.3, mask="channel", dims=2),
        ConcreteDropout(nn.Conv2d(6, 6, 1), init_p=0.2), nn.Flatten(), MCDropoutLinear(6 * 3 * 3, 5, shared_mask=True),
    )
    conv1d = nn.Sequential(MCDropoutConv1d(2, 3, 3, p=0.25, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 9, 4))
    sparse = nn.Sequential(_sparse_vd_noisy(SparseVDLinear(7, 30)), nn.ReLU(), nn.Linear(30, 5))
    sparse[0] = sparse[0].to_sparse()
    sparse_conv = nn.Sequential(_sparse_vd_noisy(SparseVDConv2d(3, 4, 3)), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    sparse_conv[0] = sparse_conv[0].to_sparse()
    return {
        "mlp": (mlp, torch.randn(6, 7)),
        "shared_mask": (shared, torch.randn(5, 7)),
        "concrete_per_feature": (per_feature, torch.randn(3, 7)),
        "conv": (conv, torch.randn(3, 3, 9, 9)),
        "conv1d": (conv1d, torch.randn(2, 2, 9)),
        "sparse_linear": (sparse, torch.randn(5, 7)),
        "sparse_conv": (sparse_conv, torch.randn(2, 3, 7, 7)),
    }


MODELS = _models()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("chunk", [4, 8, 12, 20])
def test_chunked_mc_predict_equals_unchunked(name, chunk):
    model, x = MODELS[name]
    model.eval()
    task = "classification" if name != "concrete_per_feature" else "regression"
    full = mc_predict(model, x, 12, seed=11, task=task).samples
    chunked = mc_predict(model, x, 12, seed=11, task=task, sample_chunk=chunk, progress=False).samples
    assert chunked.shape == full.shape
    # The same noise; the arithmetic may differ in the last bit where a kernel blocks the batch
    # of S*N rows differently from K*N (a wrong noise would differ by O(0.1)).
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    assert full.std(0).max() > 0  # the samples do differ: the comparison is not trivial


def test_chunks_context_for_users_who_call_the_model():
    model, x = MODELS["conv"]
    with bdlkern.sampling(16, seed=5) as block:
        full = block.unfold(model(x))
    with bdlkern.sampling(16, seed=5, chunk=4) as block:
        sizes, parts = [], []
        for base, size in block.chunks():
            assert block.num_samples == size and block.sample_base == base
            parts.append(block.unfold(model(x)))
            sizes.append(size)
        assert block.num_samples == 16 and block.sample_base == 0  # restored after the loop
    assert sizes == [4, 4, 4, 4]
    assert torch.equal(torch.cat(parts), full)


def test_last_chunk_may_be_short():
    model, x = MODELS["mlp"]
    full = mc_predict(model, x, 10, seed=2).samples
    chunked = mc_predict(model, x, 10, seed=2, sample_chunk=4, progress=False).samples  # 4 + 4 + 2
    assert torch.equal(chunked, full)


def test_chunk_off_a_philox_block_raises_clearly():
    # MCDropoutLinear(7, ...) on 6 rows draws 42 flags per sample: sample 1 starts mid-block.
    model, x = MODELS["mlp"]
    with pytest.raises(ValueError, match="multiple of 4"):
        mc_predict(model, x, 4, seed=0, sample_chunk=1)


def test_chunk_with_per_sample_multiple_of_4_works_for_any_chunk():
    torch.manual_seed(3)
    model = nn.Sequential(MCDropoutLinear(8, 4, p=0.3))  # 8 flags per row: every sample starts on a block
    x = torch.randn(3, 8)
    full = mc_predict(model, x, 9, seed=1, task="regression").samples
    assert torch.equal(mc_predict(model, x, 9, seed=1, task="regression", sample_chunk=1).samples, full)
    assert torch.equal(mc_predict(model, x, 9, seed=1, task="regression", sample_chunk=5).samples, full)


def test_chunked_tensors_of_one_chunk_do_not_carry_into_the_next():
    layer = MCDropoutLinear(4, 4, p=0.2)
    x = torch.randn(2, 4)
    with bdlkern.sampling(8, seed=0, chunk=4) as block:
        previous = None
        for _ in block.chunks():
            y = layer(x)
            assert y.shape == (4, 2, 4)
            if previous is not None:  # a tensor of the last chunk does not carry this chunk's samples
                assert block.carries(previous) is None
            previous = y


def test_chunk_arguments_are_checked():
    model, x = MODELS["mlp"]
    with pytest.raises(ValueError, match="sample_chunk"):
        mc_predict(model, x, 4, sample_chunk=0)
    with pytest.raises(TypeError, match="progress"):
        mc_predict(model, x, 4, sample_chunk=4, progress="yes")
    with pytest.raises(ValueError, match="chunk must be an int"):
        bdlkern.sampling(4, chunk=0)
    with bdlkern.sampling(4) as block, pytest.raises(RuntimeError, match="no chunk size"):
        next(block.chunks())


def test_progress_bar_is_shown_on_request(capsys):
    pytest.importorskip("tqdm")
    model, x = MODELS["mlp"]
    mc_predict(model, x, 8, seed=0, sample_chunk=4, progress=True)
    assert "mc_predict" in capsys.readouterr().err
    mc_predict(model, x, 8, seed=0, sample_chunk=4)  # None: a short run prints nothing
    assert "mc_predict" not in capsys.readouterr().err


def test_unseeded_chunks_draw_fresh_samples():
    model, x = MODELS["mlp"]
    out = mc_predict(model, x, 8, sample_chunk=4).samples
    assert out.shape[0] == 8
    assert not torch.equal(out[:4], out[4:])  # the chunks are not the same draw
