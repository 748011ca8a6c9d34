"""Tests of MC prediction in bdlkern.uncertainty: mc_predict and the MCPrediction it returns for
classification and regression, its sampling (seeds, chunking by batch_size, the samples being the
outputs of a sampling block), the training flags it restores, the warning for a model without a
stochastic layer, and its bad-input messages.

The fields are recomputed from the samples in NumPy; the metrics themselves are tested in
test_uncertainty_metrics.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bdlkern
from bdlkern import uncertainty as U


def mc_model(p: float = 0.5, out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), bdlkern.nn.MCDropoutLinear(16, out, p=p)).eval()


def inputs(n: int = 10) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------------------------
# mc_predict
# --------------------------------------------------------------------------------------------


def np_entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def test_mc_predict_classification():
    model, x = mc_model(), inputs(10)
    pred = U.mc_predict(model, x, 16, seed=0)
    assert pred.samples.shape == (16, 10, 3)
    assert pred.mean_probs.shape == (10, 3)
    for field in (pred.predictive_entropy, pred.expected_entropy, pred.mutual_information, pred.prediction):
        assert field.shape == (10,)
    assert pred.prediction.dtype == torch.int64
    assert pred.mean is None and pred.variance is None
    assert not pred.samples.requires_grad
    torch.testing.assert_close(pred.mean_probs.sum(-1), torch.ones(10))
    assert (pred.mutual_information >= 0).all()
    torch.testing.assert_close(
        pred.mutual_information, (pred.predictive_entropy - pred.expected_entropy).clamp(min=0)
    )
    torch.testing.assert_close(pred.mutual_information, pred.predictive_entropy - pred.expected_entropy,
                               atol=1e-6, rtol=0)
    assert pred.mutual_information.max() > 1e-3  # dropout at p = 0.5 gives visible epistemic uncertainty

    # independent recomputation from the samples, in float64 NumPy
    logits = pred.samples.double().numpy()
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mean_probs = probs.mean(0)
    np.testing.assert_allclose(pred.mean_probs.numpy(), mean_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.predictive_entropy.numpy(), np_entropy(mean_probs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.expected_entropy.numpy(), np_entropy(probs).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pred.prediction.numpy(), mean_probs.argmax(-1))


def test_mc_predict_samples_are_the_sampling_outputs():
    model, x = mc_model(), inputs(6)
    with bdlkern.sampling(5, seed=3), torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(U.mc_predict(model, x, 5, seed=3).samples, expected, rtol=0, atol=0)


def test_mc_predict_seed_is_reproducible():
    model, x = mc_model(), inputs(10)
    a = U.mc_predict(model, x, 8, seed=1)
    torch.randn(100)  # the global generator moving on does not matter
    b = U.mc_predict(model, x, 8, seed=1)
    c = U.mc_predict(model, x, 8, seed=2)
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    torch.testing.assert_close(a.mutual_information, b.mutual_information, rtol=0, atol=0)
    assert not torch.equal(a.samples, c.samples)
    # without a seed, torch's generator decides
    torch.manual_seed(5)
    d = U.mc_predict(model, x, 8)
    torch.manual_seed(5)
    e = U.mc_predict(model, x, 8)
    assert torch.equal(d.samples, e.samples)


def test_mc_predict_batch_size():
    model, x = mc_model(), inputs(10)
    full = U.mc_predict(model, x, 8, seed=4)
    chunked = U.mc_predict(model, x, 8, seed=4, batch_size=3)
    assert chunked.samples.shape == full.samples.shape == (8, 10, 3)
    assert chunked.mean_probs.shape == (10, 3)
    assert chunked.mutual_information.shape == (10,)
    torch.testing.assert_close(chunked.mean_probs.sum(-1), torch.ones(10))
    # deterministic with a seed
    again = U.mc_predict(model, x, 8, seed=4, batch_size=3)
    torch.testing.assert_close(chunked.samples, again.samples, rtol=0, atol=0)
    # chunk i is the chunk run alone with seed + i
    for i, start in enumerate(range(0, 10, 3)):
        alone = U.mc_predict(model, x[start : start + 3], 8, seed=4 + i)
        torch.testing.assert_close(chunked.samples[:, start : start + 3], alone.samples, rtol=0, atol=0)
    # one chunk (batch_size >= N) is the unchunked run
    one = U.mc_predict(model, x, 8, seed=4, batch_size=10)
    torch.testing.assert_close(one.samples, full.samples, rtol=0, atol=0)


@pytest.mark.parametrize("training", [False, True])
def test_mc_predict_keeps_training_flag(training):
    model = mc_model()
    model.train(training)
    model[0].train(not training)  # mixed flags survive too
    flags = [m.training for m in model.modules()]
    pred = U.mc_predict(model, inputs(4), 4, seed=0)
    assert pred.samples.shape == (4, 4, 3)
    assert [m.training for m in model.modules()] == flags


def test_mc_predict_restores_training_flag_on_error():
    class Flipper(nn.Module):
        def forward(self, x):
            self.eval()
            raise RuntimeError("boom")

    model = Flipper().train()
    with pytest.raises(RuntimeError, match="boom"):
        U.mc_predict(model, inputs(4), 4)
    assert model.training


@pytest.mark.parametrize("n", [5, 8])  # n = 8 = S: the output [8, 3] must not be taken as samples
def test_mc_predict_deterministic_model(n):
    torch.manual_seed(0)
    model, x = nn.Linear(4, 3), inputs(n)
    with pytest.warns(bdlkern.NoStochasticLayerWarning, match="no bdlkern stochastic layer ran"):
        pred = U.mc_predict(model, x, 8)
    assert pred.samples.shape == (8, n, 3)
    with torch.no_grad():
        torch.testing.assert_close(pred.samples, model(x).expand(8, n, 3))
    assert torch.equal(pred.mutual_information, torch.zeros(n))  # exactly, not up to rounding
    assert torch.equal(pred.predictive_entropy, pred.expected_entropy)


def test_mc_predict_deterministic_regression_with_n_equal_s():
    torch.manual_seed(0)
    model, x = nn.Linear(4, 2), inputs(8)
    with pytest.warns(bdlkern.NoStochasticLayerWarning, match="no bdlkern stochastic layer ran"):
        pred = U.mc_predict(model, x, 8, task="regression")
    assert pred.samples.shape == (8, 8, 2)
    assert pred.variance.abs().max().item() == 0.0
    with torch.no_grad():
        torch.testing.assert_close(pred.mean, model(x))


@pytest.mark.parametrize("out", [1, 2])
def test_mc_predict_regression(out):
    model, x = mc_model(p=0.3, out=out), inputs(12)
    if out == 1:
        model = nn.Sequential(model, nn.Flatten(-2))  # [S, N, 1] -> [S, N]
    pred = U.mc_predict(model, x, 16, seed=0, task="regression")
    shape = (12,) if out == 1 else (12, out)
    assert pred.samples.shape == (16, *shape)
    assert pred.mean.shape == pred.variance.shape == shape
    torch.testing.assert_close(pred.mean, torch.mean(pred.samples, 0))
    torch.testing.assert_close(pred.variance, torch.var(pred.samples, 0, unbiased=False))
    assert (pred.variance > 0).all()
    assert pred.mean_probs is None and pred.prediction is None and pred.mutual_information is None


def test_mc_predict_rejects_output_without_sample_dim():
    layer = bdlkern.nn.MCDropoutLinear(4, 3).eval()
    with pytest.raises(ValueError, match="leading sample dimension"):
        U.mc_predict(lambda x: layer(x).mean(0), inputs(5), 8)  # an MC layer ran, S was reduced


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_samples=0), ValueError, "num_samples must be >= 1"),
        (dict(num_samples=2.0), TypeError, "num_samples must be an int"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(seed=1.5), TypeError, "seed must be an int or None"),
        (dict(task="segmentation"), ValueError, "task must be 'classification' or 'regression'"),
        (dict(x=[[0.0] * 4]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.empty(0, 4)), ValueError, "x must be a non-empty batch"),
        (dict(x=torch.full((2, 4), float("nan"))), ValueError, "x contains NaN"),
        (dict(model="not a model"), TypeError, "model must be callable"),
        (dict(model=lambda x: x.tolist()), TypeError, "model must return a torch.Tensor"),
        # a classifier's logits must be [N, C] per sample
        (dict(model=lambda x: x[:, 0]), ValueError, r"task='classification'.*logits \[N, C\]"),
        (dict(model=lambda x: x[:, None, :], task="regression"), ValueError, r"task='regression'"),
    ],
)
def test_mc_predict_rejects_bad_input(kwargs, exc, match):
    args = dict(model=mc_model(), x=inputs(3), num_samples=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        U.mc_predict(args.pop("model"), args.pop("x"), args.pop("num_samples"), **args)
