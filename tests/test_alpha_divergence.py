"""``bdlkern.losses.alpha_divergence`` (Li & Gal 2017) and alpha-divergence training of MC-dropout nets.

The references here are written independently of the implementation: float64, the naive
``-(1/alpha) * log(mean_k(p_k ** alpha))`` with the likelihoods computed from their densities
(``exp(logit) / sum(exp(logits))``, the Gaussian density), on moderate values where that is exact
enough; the training path is checked against the same network applied by hand with the Philox masks
of the seeded ``sampling`` block.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bdlkern
from bdlkern.losses import alpha_divergence
from bdlkern.nn import MCDropoutLinear

ALPHAS = [0.0, 1e-4, 0.5, 1.0]


# ---- independent references ------------------------------------------------------------------------


def _naive_energy(likelihood: torch.Tensor, alpha: float) -> torch.Tensor:
    """``likelihood`` ``[K, N]`` (densities, float64) -> ``[N]``; alpha = 0: ``-mean_k log p_k``."""
    if alpha == 0.0:
        return -torch.log(likelihood).mean(0)
    return -torch.log((likelihood**alpha).mean(0)) / alpha


def _softmax_likelihood(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``p(y_n | logits[k, n])`` from the softmax written out: ``[K, N]``."""
    e = torch.exp(logits.double())
    picked = e[:, torch.arange(logits.shape[1]), target]
    return picked / e.sum(-1)


def _gaussian_likelihood(mu: torch.Tensor, y: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Product over D of the Gaussian densities ``N(y; mu, var)``: ``[K, N]``."""
    mu, y, var = mu.double(), y.double(), var.double()
    density = torch.exp(-((y - mu) ** 2) / (2 * var)) / torch.sqrt(2 * math.pi * var)
    return density.prod(-1) if mu.dim() == 3 else density


def _classification_problem(K=6, N=5, C=4, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(K, N, C, generator=g)).to(dtype)
    target = torch.randint(0, C, (N,), generator=g)
    return logits, target


def _regression_problem(K=6, N=5, D=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (N,) if D is None else (N, D)
    mu = torch.randn(K, *shape, generator=g).to(dtype)
    y = torch.randn(*shape, generator=g).to(dtype)
    log_var = (0.5 * torch.randn(K, *shape, generator=g)).to(dtype)
    return mu, y, log_var


# ---- values -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_classification_matches_naive_reference(alpha, reduction):
    logits, target = _classification_problem()
    got = alpha_divergence(logits, target, alpha, reduction=reduction)
    per_input = _naive_energy(_softmax_likelihood(logits, target), alpha)
    want = {"mean": per_input.mean(), "sum": per_input.sum(), "none": per_input}[reduction]
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("D", [None, 3])
def test_regression_precision_matches_naive_reference(alpha, D):
    mu, y, _ = _regression_problem(D=D)
    tau = 2.5
    got = alpha_divergence(mu, y, alpha, task="regression", precision=tau, reduction="none")
    want = _naive_energy(_gaussian_likelihood(mu, y, torch.full_like(mu, 1 / tau)), alpha)
    assert got.shape == (mu.shape[1],)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("lv_shape", ["per_sample", "per_input", "per_output"])
def test_regression_log_variance_matches_naive_reference(alpha, lv_shape):
    mu, y, log_var = _regression_problem(D=3)
    log_var = {"per_sample": log_var, "per_input": log_var[0], "per_output": log_var[0, 0]}[lv_shape]
    got = alpha_divergence(mu, y, alpha, task="regression", log_variance=log_var, reduction="none")
    want = _naive_energy(_gaussian_likelihood(mu, y, torch.exp(log_var).expand_as(mu)), alpha)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_small_alpha_tends_to_the_alpha_zero_limit():
    # L(alpha) = L(0) - alpha * Var_k(log p_k) / 2 + O(alpha^2): 1e-4 is within 1e-4 * Var of the limit ...
    logits, target = _classification_problem(K=8, N=16)
    log_p = torch.log(_softmax_likelihood(logits, target))
    zero = alpha_divergence(logits, target, 0.0, reduction="none")
    small = alpha_divergence(logits, target, 1e-4, reduction="none")
    torch.testing.assert_close(zero, -log_p.mean(0), rtol=1e-12, atol=1e-12)
    expected_gap = 1e-4 * log_p.var(0, unbiased=False) / 2
    torch.testing.assert_close(zero - small, expected_gap, rtol=1e-3, atol=1e-12)
    # ... and computed accurately in float32 too (no cancellation of the sum against log K).
    small32 = alpha_divergence(logits.float(), target, 1e-4, reduction="none")
    torch.testing.assert_close(small32.double(), small, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_huge_logits_give_a_finite_loss(alpha):
    logits, target = _classification_problem(K=5, N=7, C=6, scale=1e3)
    with torch.no_grad():  # the naive formula overflows (exp(1000) = inf in float64)
        naive = _naive_energy(_softmax_likelihood(logits, target), alpha)
    assert not torch.isfinite(naive).all()
    x = logits.clone().requires_grad_()
    got = alpha_divergence(x, target, alpha, reduction="none")
    assert torch.isfinite(got).all()
    # the direct formula with log-softmax and logsumexp, which cannot overflow
    log_p = torch.log_softmax(logits, -1)[:, torch.arange(7), target]
    want = -log_p.mean(0) if alpha == 0 else -(torch.logsumexp(alpha * log_p, 0) - math.log(5)) / alpha
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    got.sum().backward()
    assert torch.isfinite(x.grad).all()
    # float32: also finite
    assert torch.isfinite(alpha_divergence(logits.float(), target, alpha)).all()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 4.0])
def test_one_sample_is_the_plain_nll(alpha):
    logits, target = _classification_problem(K=1, N=9)
    got = alpha_divergence(logits, target, alpha, reduction="none")
    torch.testing.assert_close(got, F.cross_entropy(logits[0], target, reduction="none"), rtol=1e-12, atol=1e-12)
    mu, y, log_var = _regression_problem(K=1, N=9)
    got = alpha_divergence(mu, y, alpha, task="regression", log_variance=log_var, reduction="none")
    want = F.gaussian_nll_loss(mu[0], y, torch.exp(log_var[0]), full=True, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got = alpha_divergence(mu, y, alpha, task="regression", precision=4.0, reduction="none")
    want = F.gaussian_nll_loss(mu[0], y, torch.full_like(y, 0.25), full=True, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_low_precision_outputs_are_computed_in_float32():
    logits, target = _classification_problem(scale=1.0)
    got = alpha_divergence(logits.bfloat16(), target, 0.5)
    assert got.dtype == torch.float32
    want = alpha_divergence(logits.bfloat16().double(), target, 0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_a_folded_conv_output_unfolds_to_the_stacked_loss():
    logits, target = _classification_problem(K=4, N=3)
    folded = logits.flatten(0, 1)  # [K * N, C], sample-major, as a conv net returns it
    torch.testing.assert_close(
        alpha_divergence(bdlkern.unfold_samples(folded, 4), target, 0.5), alpha_divergence(logits, target, 0.5)
    )


# ---- gradients ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_gradcheck_classification(alpha):
    logits, target = _classification_problem(K=4, N=3, C=5)
    x = logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda o: alpha_divergence(o, target, alpha, reduction="none"), (x,))
    assert torch.autograd.gradgradcheck(lambda o: alpha_divergence(o, target, alpha), (x,))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_gradcheck_regression(alpha):
    mu, y, log_var = _regression_problem(K=4, N=3, D=2)
    mu, log_var = mu.requires_grad_(), log_var.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, v: alpha_divergence(m, y, alpha, task="regression", log_variance=v, reduction="none"), (mu, log_var)
    )
    assert torch.autograd.gradcheck(
        lambda m: alpha_divergence(m, y, alpha, task="regression", precision=3.0, reduction="sum"), (mu,)
    )


def test_gradient_matches_the_naive_reference():
    # Autograd through the loss against autograd through the naive formula (its weights per sample
    # are the normalised p_k^alpha: the gradient of alpha-divergence training).
    logits, target = _classification_problem(K=6, N=4)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    alpha_divergence(a, target, 0.5).backward()
    _naive_energy(_softmax_likelihood(b, target), 0.5).mean().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


# ---- the training path: K samples per step inside bdlkern.sampling(K) ---------------------------------


def _mlp(sizes, ps, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (fan_in, fan_out, p) in enumerate(zip(sizes[:-1], sizes[1:], ps)):
        layers.append(MCDropoutLinear(fan_in, fan_out, p=p))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def test_training_step_matches_the_same_masks_applied_by_hand():
    K, N, seed = 5, 7, 123
    model = _mlp([6, 8, 5, 3], [0.2, 0.5, 0.3]).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, generator=g)
    target = torch.randint(0, 3, (N,), generator=g)
    with bdlkern.sampling(K, seed=seed):
        logits = model(x)
    assert logits.shape == (K, N, 3)
    loss = alpha_divergence(logits, target, 0.5)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    # Reference: call k of a seeded block draws rng_state [seed, k << 40]; its mask is [K, N, in].
    linears = [m for m in model if isinstance(m, MCDropoutLinear)]
    params = [t.detach().double().requires_grad_() for t in model.parameters()]
    h = x.double().unsqueeze(0).expand(K, N, 6)
    for k, layer in enumerate(linears):
        state = torch.tensor([seed, k << 40], dtype=torch.int64)
        keep = bdlkern.ops.dropout_mask([K, N, layer.in_features], layer.p, rng_state=state, stream="mc_dropout")
        h = F.linear(h * keep.double() / (1 - layer.p), params[2 * k], params[2 * k + 1])
        if k < len(linears) - 1:
            h = h.relu()
    want_loss = _naive_energy(_softmax_likelihood(h, target), 0.5).mean()
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(logits.double(), h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-5)


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)  # constant border pixels stay 0
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def test_digits_mlp_trains_with_alpha_divergence(threads):
    # Measured (1 thread, ~0.6 s): test accuracy 0.96, epoch losses 0.90 -> 0.14.
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = _digits()
    model = _mlp([64, 100, 10], [0.2, 0.5], seed=0).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    K, batch, weight_decay = 10, 64, 1e-4
    order = torch.Generator().manual_seed(1)
    epoch_losses = []
    for epoch in range(5):
        perm = torch.randperm(len(x_train), generator=order)
        total = 0.0
        for start in range(0, len(x_train), batch):
            idx = perm[start : start + batch]
            with bdlkern.sampling(K):
                logits = model(x_train[idx])
            assert logits.shape == (K, len(idx), 10)
            loss = alpha_divergence(logits, y_train[idx], 0.5)
            loss = loss + weight_decay * sum(w.pow(2).sum() for w in model.parameters())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if epoch == 0 and start == 0:
                for name, w in model.named_parameters():  # gradients reach every layer
                    assert w.grad is not None and w.grad.abs().sum() > 0, name
            opt.step()
            total += loss.item() * len(idx)
        epoch_losses.append(total / len(x_train))
    assert epoch_losses[-1] < 0.5 * epoch_losses[0], epoch_losses
    assert all(b < a for a, b in zip(epoch_losses[:2], epoch_losses[1:3])), epoch_losses
    model.eval()
    pred = bdlkern.uncertainty.mc_predict(model, x_test, 20, seed=0)
    accuracy = (pred.prediction == y_test).float().mean().item()
    assert accuracy > 0.9, accuracy


# ---- bad input ------------------------------------------------------------------------------------------


def _cls(**overrides):
    logits, target = _classification_problem(K=3, N=4, C=5)
    kwargs = {"outputs": logits, "target": target, "alpha": 0.5}
    kwargs.update(overrides)
    return kwargs


def _reg(**overrides):
    mu, y, log_var = _regression_problem(K=3, N=4, D=2)
    kwargs = {"outputs": mu, "target": y, "alpha": 0.5, "task": "regression", "log_variance": log_var}
    kwargs.update(overrides)
    return kwargs


_NAN = torch.full((3, 4, 5), float("nan"), dtype=torch.float64)

BAD_INPUTS = [
    # (name, kwargs, exception, message fragment)
    ("alpha_negative", _cls(alpha=-0.5), ValueError, "alpha"),
    ("alpha_nan", _cls(alpha=float("nan")), ValueError, "alpha"),
    ("alpha_inf", _cls(alpha=float("inf")), ValueError, "alpha"),
    ("alpha_bool", _cls(alpha=True), TypeError, "alpha"),
    ("alpha_str", _cls(alpha="0.5"), TypeError, "alpha"),
    ("task", _cls(task="ranking"), ValueError, "task"),
    ("reduction", _cls(reduction="avg"), ValueError, "reduction"),
    ("outputs_not_tensor", _cls(outputs=[[1.0]]), TypeError, "outputs"),
    ("outputs_int", _cls(outputs=torch.zeros(3, 4, 5, dtype=torch.int64)), TypeError, "outputs"),
    ("outputs_nan", _cls(outputs=_NAN), ValueError, "outputs contains NaN"),
    ("cls_K_missing", _cls(outputs=torch.randn(4, 5)), ValueError, "sample dimension K"),
    ("cls_rank_4", _cls(outputs=torch.randn(3, 4, 5, 1)), ValueError, "sample dimension K"),
    ("cls_K_zero", _cls(outputs=torch.randn(0, 4, 5)), ValueError, "K = 0"),
    ("cls_target_float", _cls(target=torch.zeros(4)), TypeError, "target"),
    ("cls_target_bool", _cls(target=torch.zeros(4, dtype=torch.bool)), TypeError, "target"),
    ("cls_target_not_tensor", _cls(target=[0, 1, 2, 3]), TypeError, "target"),
    ("cls_target_short", _cls(target=torch.zeros(3, dtype=torch.int64)), ValueError, "target"),
    ("cls_target_2d", _cls(target=torch.zeros(3, 4, dtype=torch.int64)), ValueError, "target"),
    ("cls_target_range_high", _cls(target=torch.tensor([0, 1, 5, 2])), ValueError, "target"),
    ("cls_target_range_negative", _cls(target=torch.tensor([0, -1, 2, 2])), ValueError, "target"),
    ("cls_precision", _cls(precision=1.0), ValueError, "precision"),
    ("cls_log_variance", _cls(log_variance=torch.zeros(3, 4, 5)), ValueError, "log_variance"),
    ("reg_both", _reg(precision=1.0), ValueError, "log_variance"),
    ("reg_neither", _reg(log_variance=None), ValueError, "precision"),
    ("reg_precision_zero", _reg(log_variance=None, precision=0.0), ValueError, "precision"),
    ("reg_precision_negative", _reg(log_variance=None, precision=-2.0), ValueError, "precision"),
    ("reg_precision_nan", _reg(log_variance=None, precision=float("nan")), ValueError, "precision"),
    ("reg_precision_tensor", _reg(log_variance=None, precision=torch.tensor(1.0)), TypeError, "precision"),
    ("reg_log_variance_shape", _reg(log_variance=torch.zeros(3, 4, 3)), ValueError, "log_variance"),
    ("reg_log_variance_bigger", _reg(log_variance=torch.zeros(2, 3, 4, 2)), ValueError, "log_variance"),
    ("reg_log_variance_not_tensor", _reg(log_variance=0.0), TypeError, "log_variance"),
    ("reg_log_variance_int", _reg(log_variance=torch.zeros(3, 4, 2, dtype=torch.int64)), TypeError, "log_variance"),
    ("reg_log_variance_nan", _reg(log_variance=torch.full((3, 4, 2), float("nan"))), ValueError, "log_variance"),
    ("reg_K_missing", _reg(outputs=torch.randn(4, 2, dtype=torch.float64)), ValueError, "sample dimension K"),
    ("reg_K_missing_1d", _reg(outputs=torch.randn(4), target=torch.randn(4)), ValueError, "K"),
    ("reg_target_shape", _reg(target=torch.randn(4, 3)), ValueError, "target"),
    ("reg_target_rank", _reg(target=torch.randn(4)), ValueError, "target"),
    ("reg_target_int", _reg(target=torch.zeros(4, 2, dtype=torch.int64)), TypeError, "target"),
    ("reg_outputs_nan", _reg(outputs=torch.full((3, 4, 2), float("nan"))), ValueError, "outputs contains NaN"),
]


@pytest.mark.parametrize("name,kwargs,exc,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(name, kwargs, exc, fragment):
    kwargs = dict(kwargs)
    outputs, target = kwargs.pop("outputs"), kwargs.pop("target")
    with pytest.raises(exc, match=fragment):
        alpha_divergence(outputs, target, **kwargs)


def test_empty_batch_is_allowed():
    logits = torch.randn(3, 0, 5)
    target = torch.zeros(0, dtype=torch.int64)
    assert alpha_divergence(logits, target, 0.5, reduction="none").shape == (0,)
    assert alpha_divergence(logits, target, 0.5, reduction="sum").item() == 0.0
