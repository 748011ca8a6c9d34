"""Variational (Gaussian) dropout, Kingma, Salimans & Welling 2015 (issue 19, item 1): the layers
against an independent pure-PyTorch LRT reference with the same noise (rebuilt from the Philox
stream "lrt"), the statistics of the samples, gradients and gradcheck, the KL against the paper's
formula, the modes and sampling layouts, serialization, a digits training run, and bad input."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdlkern
from bdlkern.testing import reference as ref
from bdlkern.nn import VariationalDropoutConv2d, VariationalDropoutLinear

C1, C2, C3 = 1.16145124, -1.50204118, 0.58629921  # Kingma et al. (2015), section 3.3
KINDS = ["layer", "input", "weight"]


def _randomise(layer, seed, low=-6.0, high=0.0):
    """Random theta, bias and log_alpha in (low, high), float64-exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.theta, layer.bias, layer.log_alpha):
            if p is None:
                continue
            if p is layer.log_alpha:
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) * (high - low) + low)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return layer


def ref_alpha(layer, log_alpha=None):
    """alpha of every weight, built independently of the module: exp(clamp(log_alpha, -8, 0))
    placed weight by weight."""
    la = torch.clamp(layer.log_alpha if log_alpha is None else log_alpha, -8.0, 0.0)
    shape = layer.theta.shape
    if layer.alpha_kind == "layer":
        return torch.exp(la) * torch.ones(shape, dtype=la.dtype)
    if layer.alpha_kind == "weight":
        return torch.exp(la)
    if layer.theta.dim() == 2:  # linear, "input": [1, in]
        return torch.exp(la).repeat(shape[0], 1)
    # conv, "input": [C_in], with groups: output channel o of group g reads channels g * C_in/groups + j
    c_out_g, c_in_g = layer.out_channels // layer.groups, layer.in_channels // layer.groups
    rows = []
    for o in range(shape[0]):
        g = o // c_out_g
        rows.append(torch.exp(la[g * c_in_g : (g + 1) * c_in_g]).reshape(c_in_g, 1, 1).expand(shape[1:]))
    return torch.stack(rows)


def ref_linear(x, theta, alpha, bias, eps):
    """mu + sqrt(var + 1e-8) eps with mu = x theta^T + b, var = x^2 (alpha theta^2)^T."""
    mu = x @ theta.T + (0 if bias is None else bias)
    var = (x * x) @ (alpha * theta**2).T
    return mu + torch.sqrt(var + 1e-8) * eps, mu, var


def ref_conv(x, layer, theta, alpha, bias, eps, S):
    kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    mu = F.conv2d(x, theta, bias, **kw).repeat(S, 1, 1, 1)
    var = F.conv2d(x * x, alpha * theta**2, None, **kw).repeat(S, 1, 1, 1)
    return mu + torch.sqrt(var + 1e-8) * eps


# ---- the noise model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_op_sees_exactly_alpha_eff(kind):
    """The log_sigma2 the layer hands to the LRT op gives back log_alpha_eff through the op's own
    formula clamp(log_sigma2 - log(theta^2 + 1e-8), -8, 8) (float32, |theta| not tiny)."""
    layer = _randomise(VariationalDropoutLinear(30, 20, alpha=kind), 1, -7.5, 1.0)  # some above 1: clamped
    seen = ref.log_alpha(layer.theta, layer._lrt_log_sigma2())
    big = layer.theta.abs() > 1e-2
    assert big.float().mean() > 0.9
    torch.testing.assert_close(seen[big], layer.log_alpha_eff()[big], rtol=0, atol=2e-6)
    torch.testing.assert_close(layer.alpha(), ref_alpha(layer))
    assert layer.alpha().max() <= 1.0 and layer.log_alpha_eff().shape == (20, 30)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_samples_equal_reference_with_the_same_noise(kind, dtype, bias):
    S, N, K, O = 5, 7, 12, 9
    layer = _randomise(VariationalDropoutLinear(K, O, bias=bias, alpha=kind, dtype=torch.float64), 2)
    x = torch.randn(N, K, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    alpha = ref_alpha(layer).detach()
    eps = bdlkern.ops.normal((S, N, O), rng_state=torch.tensor([11, 0]), stream="lrt", dtype=torch.float64)
    b = None if layer.bias is None else layer.bias.detach()
    expected, _, _ = ref_linear(x, layer.theta.detach(), alpha, b, eps)
    layer.to(dtype)
    with torch.no_grad(), bdlkern.sampling(S, seed=11):
        y = layer(x.to(dtype))
    assert y.shape == (S, N, O) and y.dtype == dtype
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(y.double(), expected, **tol)
    # training mode: one sample per input, the noise of the generator's next rng_state
    layer.train()
    torch.manual_seed(5)
    r = bdlkern.ops.new_rng_state()
    eps1 = bdlkern.ops.normal((1, N, O), rng_state=r, stream="lrt", dtype=torch.float64)
    exp1, _, _ = ref_linear(x, layer.theta.detach().double(), alpha,
                            None if layer.bias is None else layer.bias.detach().double(), eps1)
    torch.manual_seed(5)
    with torch.no_grad():
        y1 = layer(x.to(dtype))
    torch.testing.assert_close(y1.double(), exp1[0], **tol)


def test_noise_is_standard_normal_and_samples_have_the_lrt_moments():
    """eps recovered from the output is N(0, 1); with two seeds the samples' mean and variance
    match mu and var (5-sigma bounds)."""
    torch.set_num_threads(1)
    S, N, K, O = 4000, 4, 10, 6
    layer = _randomise(VariationalDropoutLinear(K, O, alpha="input", dtype=torch.float64), 4, -3.0, 0.0)
    x = torch.randn(N, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, mu, var = ref_linear(x, layer.theta, ref_alpha(layer), layer.bias, 0.0)
        for seed in (0, 1):
            with bdlkern.sampling(S, seed=seed):
                y = layer(x)
            eps = (y - mu) / torch.sqrt(var + 1e-8)
            n = eps.numel()
            assert abs(eps.mean().item()) < 5 / math.sqrt(n)
            assert abs(eps.std().item() - 1) < 5 * math.sqrt(0.5 / n)
            assert abs((eps**4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # Gaussian kurtosis
            m, v = y.mean(0), y.var(0)
            assert ((m - mu).abs() <= 5 * torch.sqrt(var / S)).all()
            assert ((v - var).abs() <= 5 * math.sqrt(2 / S) * var).all()


# ---- gradients -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_autograd_through_the_reference(kind):
    S, N, K, O = 3, 6, 8, 5
    layer = _randomise(VariationalDropoutLinear(K, O, alpha=kind, dtype=torch.float64), 6, -7.0, 0.5)
    x = torch.randn(N, K, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = torch.randn(S, N, O, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with bdlkern.sampling(S, seed=4):
        y = layer(x)
    got = torch.autograd.grad(y, [layer.theta, layer.log_alpha, layer.bias], g)
    leaves = [p.detach().clone().requires_grad_() for p in (layer.theta, layer.log_alpha, layer.bias)]
    eps = bdlkern.ops.normal((S, N, O), rng_state=torch.tensor([4, 0]), stream="lrt", dtype=torch.float64)
    yr, _, _ = ref_linear(x, leaves[0], ref_alpha(layer, leaves[1]), leaves[2], eps)
    expected = torch.autograd.grad(yr, leaves, g)
    for name, a, b in zip(("theta", "log_alpha", "bias"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    if kind == "weight":  # the entries above 0 are clamped: no gradient
        above = layer.log_alpha.detach() > 0
        assert above.any() and (got[1][above] == 0).all() and (got[1][~above] != 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    layer = _randomise(VariationalDropoutLinear(3, 2, alpha=kind, dtype=torch.float64), 8, -4.0, -0.5)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    names = list(params)

    def f(x, *values):
        with bdlkern.sampling(2, seed=0):  # a fresh block: the same noise on every call
            return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params.values()))


# ---- the KL ----------------------------------------------------------------------------------------------
def paper_kl(alpha: float) -> float:
    return -(0.5 * math.log(alpha) + C1 * alpha + C2 * alpha**2 + C3 * alpha**3)


def paper_kl_dlog(alpha: float) -> float:
    return -(0.5 + C1 * alpha + 2 * C2 * alpha**2 + 3 * C3 * alpha**3)


@pytest.mark.parametrize("alpha", [1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_kl_against_the_paper_formula_and_its_gradient(alpha):
    K, O = 3, 4
    layer = VariationalDropoutLinear(K, O, alpha="layer", init_alpha=alpha, dtype=torch.float64)
    kl = layer.kl()
    assert kl.dim() == 0
    assert kl.item() == pytest.approx(K * O * paper_kl(alpha), rel=1e-12, abs=1e-12)
    (grad,) = torch.autograd.grad(kl, layer.log_alpha)
    assert grad.item() == pytest.approx(K * O * paper_kl_dlog(alpha), rel=1e-10, abs=1e-10)


def test_kl_sums_over_the_weights_each_alpha_applies_to():
    K, O = 5, 3
    alphas = [0.02, 0.1, 0.3, 0.7, 1.0]
    inp = VariationalDropoutLinear(K, O, alpha="input", dtype=torch.float64)
    wt = VariationalDropoutLinear(K, O, alpha="weight", dtype=torch.float64)
    with torch.no_grad():
        inp.log_alpha.copy_(torch.log(torch.tensor([alphas], dtype=torch.float64)))
        wt.log_alpha.copy_(torch.log(torch.tensor([alphas] * O, dtype=torch.float64)))
    expected = O * sum(paper_kl(a) for a in alphas)
    assert inp.kl().item() == pytest.approx(expected, rel=1e-12)
    assert wt.kl().item() == pytest.approx(expected, rel=1e-12)
    conv = VariationalDropoutConv2d(4, 6, 3, groups=2, alpha="input", dtype=torch.float64)
    with torch.no_grad():
        conv.log_alpha.copy_(torch.log(torch.tensor([0.1, 0.2, 0.4, 0.8], dtype=torch.float64)))
    # each input channel reaches the 3 output channels of its group, 9 kernel taps each
    assert conv.kl().item() == pytest.approx(27 * sum(paper_kl(a) for a in (0.1, 0.2, 0.4, 0.8)), rel=1e-12)


def test_kl_and_alpha_are_clamped_above_1_and_below_exp_minus_8():
    layer = VariationalDropoutLinear(2, 3, alpha="weight", dtype=torch.float64)
    with torch.no_grad():
        layer.log_alpha.copy_(torch.tensor([[0.7, -9.0], [0.0, -1.0], [3.0, -8.5]], dtype=torch.float64))
    a = layer.alpha().detach()
    assert a[0, 0] == 1.0 and a[2, 0] == 1.0 and a[0, 1] == pytest.approx(math.exp(-8.0))
    expected = 3 * paper_kl(1.0) + 2 * paper_kl(math.exp(-8.0)) + paper_kl(math.exp(-1.0))
    kl = layer.kl()
    assert kl.item() == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(kl, layer.log_alpha)
    assert grad[0, 0] == 0 and grad[2, 0] == 0 and grad[0, 1] == 0 and grad[2, 1] == 0
    assert grad[1, 1].item() == pytest.approx(paper_kl_dlog(math.exp(-1.0)), rel=1e-10)


def test_kl_differences_match_a_monte_carlo_estimate_of_the_true_kl():
    """KL(q || log-uniform) = -0.5 log alpha + E log|1 + sqrt(alpha) eps| + const (improper prior):
    the approximation's differences across alpha in (0, 1] follow the Monte-Carlo estimate."""
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    grid = [0.05, 0.1, 0.2, 0.4, 0.7, 1.0]
    true = [-0.5 * math.log(a) + torch.log((1 + math.sqrt(a) * eps).abs()).mean().item() for a in grid]
    approx = [paper_kl(a) for a in grid]
    for t, a in zip(true, approx):
        assert (t - true[-1]) == pytest.approx(a - approx[-1], abs=0.02)


# ---- modes, layouts, models ------------------------------------------------------------------------------
def test_eval_is_the_deterministic_mean_and_from_linear_copies():
    lin = nn.Linear(6, 4)
    layer = VariationalDropoutLinear.from_linear(lin, alpha="input", init_alpha=0.3)
    assert layer.training and layer.log_alpha.shape == (1, 6)
    torch.testing.assert_close(layer.alpha(), torch.full((4, 6), 0.3))
    layer.eval()
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), lin(x))
    assert torch.equal(layer(x), layer(x))
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    vconv = VariationalDropoutConv2d.from_conv(conv, alpha="weight").eval()
    xc = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(vconv(xc), conv(xc))
    assert vconv.log_alpha.shape == conv.weight.shape
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kind", KINDS)
def test_conv_samples_equal_reference_folded_layout(kind):
    S, N = 3, 2
    layer = _randomise(
        VariationalDropoutConv2d(4, 6, 3, stride=2, padding=1, groups=2, alpha=kind, dtype=torch.float64), 9
    )
    x = torch.randn(N, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad(), bdlkern.sampling(S, seed=21):
        y = layer(x)
    assert y.shape == (S * N, 6, 4, 4)
    eps = bdlkern.ops.normal(tuple(y.shape), rng_state=torch.tensor([21, 0]), stream="lrt", dtype=torch.float64)
    with torch.no_grad():
        expected = ref_conv(x, layer, layer.theta, ref_alpha(layer), layer.bias, eps, S)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    # training: one sample per image, also unbatched
    layer.train()
    assert layer(x).shape == (N, 6, 4, 4) and layer(x[0]).shape == (6, 4, 4)


def test_sampling_layouts_kl_divergence_and_mc_predict():
    mlp = nn.Sequential(VariationalDropoutLinear(8, 16, alpha="input"), nn.ReLU(), VariationalDropoutLinear(16, 3))
    x = torch.randn(5, 8)
    with bdlkern.sampling(4, seed=0):
        y = mlp(x)
    assert y.shape == (4, 5, 3) and not torch.equal(y[0], y[1])
    cnn = nn.Sequential(
        VariationalDropoutConv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), VariationalDropoutLinear(4 * 6 * 6, 3)
    )
    xc = torch.randn(5, 1, 6, 6)
    with bdlkern.sampling(4, seed=0):
        yc = cnn(xc)
    assert yc.shape == (20, 3)
    assert bdlkern.unfold_samples(yc, 4).shape == (4, 5, 3)
    pred = bdlkern.uncertainty.mc_predict(cnn, xc, 4, seed=0)
    assert pred.samples.shape == (4, 5, 3)
    total = bdlkern.nn.kl_divergence(cnn)
    torch.testing.assert_close(total, cnn[0].kl() + cnn[3].kl())
    torch.testing.assert_close(bdlkern.nn.regularization(mlp), mlp[0].kl() + mlp[2].kl())


def test_serialization_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(VariationalDropoutConv2d(2, 3, 3, alpha="input"), nn.Flatten(),
                          VariationalDropoutLinear(3 * 4 * 4, 2, alpha="weight"))
    _randomise(model[0], 1)
    _randomise(model[2], 2)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = nn.Sequential(VariationalDropoutConv2d(2, 3, 3, alpha="input"), nn.Flatten(),
                          VariationalDropoutLinear(3 * 4 * 4, 2, alpha="weight"))
    other.load_state_dict(torch.load(buf))
    assert set(model.state_dict()) == {"0.theta", "0.log_alpha", "0.bias", "2.theta", "2.log_alpha", "2.bias"}
    x = torch.randn(3, 2, 6, 6)
    with bdlkern.sampling(3, seed=5):
        a = model(x)
    with bdlkern.sampling(3, seed=5):
        b = other(x)
    assert torch.equal(a, b)
    model.eval(), other.eval()
    assert torch.equal(model(x), other(x))
    assert torch.equal(bdlkern.nn.kl_divergence(model), bdlkern.nn.kl_divergence(other))


def test_training_on_digits(threads):
    """MLP 64-100-10 of VariationalDropoutLinear, loss CE + KL / N_train: > 90% test accuracy in
    eval and as an MC ensemble (a few seconds on one thread)."""
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    torch.manual_seed(0)
    model = nn.Sequential(VariationalDropoutLinear(64, 100, alpha="input"), nn.ReLU(),
                          VariationalDropoutLinear(100, 10, alpha="layer"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    n = len(x_tr)
    for _ in range(15):
        perm = torch.randperm(n)
        for i in range(0, n, 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx]) + bdlkern.nn.kl_divergence(model) / n
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(-1) == y_te).double().mean().item()
    pred = bdlkern.uncertainty.mc_predict(model, x_te, 20, seed=0)
    mc_acc = (pred.prediction == y_te).double().mean().item()
    assert acc > 0.9, f"eval accuracy {acc:.4f}"
    assert mc_acc > 0.9, f"MC accuracy {mc_acc:.4f}"
    # the KL moved the dropout rates: the noise is learnt, not fixed at init_alpha
    assert not torch.allclose(model[0].alpha(), torch.full((100, 64), 0.1))


# ---- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,args", [(VariationalDropoutLinear, (3, 2)), (VariationalDropoutConv2d, (3, 2, 3))])
def test_bad_input_matrix(cls, args):
    for kind in ("unit", "Layer", "", None, 1):
        with pytest.raises(ValueError, match="alpha must be one of"):
            cls(*args, alpha=kind)
    for bad in (0.0, -0.1, float("nan"), float("inf"), 1.5):
        with pytest.raises(ValueError, match="init_alpha"):
            cls(*args, init_alpha=bad)
    with pytest.raises(TypeError, match="init_alpha"):
        cls(*args, init_alpha="big")
    layer = cls(*args)
    if cls is VariationalDropoutLinear:
        with pytest.raises(ValueError, match="in_features|3"):
            layer(torch.randn(4, 5))
        with pytest.raises(TypeError):
            layer(torch.randn(4, 3, dtype=torch.float64))
        with pytest.raises(TypeError, match="from_linear"):
            cls.from_linear(nn.Conv2d(3, 2, 3))
    else:
        with pytest.raises(ValueError, match="in_channels"):
            layer(torch.randn(2, 5, 6, 6))
        with pytest.raises(TypeError):
            layer(torch.randn(2, 3, 6, 6, dtype=torch.float64))
        with pytest.raises(TypeError, match="from_conv"):
            cls.from_conv(nn.Linear(3, 2))
        with pytest.raises(ValueError, match="padding_mode"):
            cls.from_conv(nn.Conv2d(3, 2, 3, padding_mode="reflect"))
    # the LRT kernel takes float32 / float64 only: bfloat16 parameters fail in training and sampling
    low = cls(*args, dtype=torch.bfloat16)
    x_low = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    x_low = x_low[..., 0, 0] if cls is VariationalDropoutLinear else x_low
    with pytest.raises(TypeError, match="LRT"):
        low(x_low)
    with bdlkern.sampling(2, seed=0), pytest.raises(TypeError, match="LRT"):
        low(x_low)


def test_non_contiguous_input_and_autocast():
    """A non-contiguous input gives the contiguous input's samples; under CPU autocast the LRT
    op runs in float32 (its autocast policy) and gives the float32 samples."""
    torch.manual_seed(0)
    lin = bdlkern.nn.VariationalDropoutLinear(6, 4, alpha="input", init_alpha=0.3)
    conv = bdlkern.nn.VariationalDropoutConv2d(3, 4, 3, padding=1, alpha="layer", init_alpha=0.3)
    for layer, x in ((lin, torch.randn(6, 5).t()), (conv, torch.randn(2, 3, 5, 5).transpose(-1, -2))):
        assert not x.is_contiguous()
        with bdlkern.sampling(3, seed=2):
            want = layer(x.contiguous())
        with bdlkern.sampling(3, seed=2):
            got = layer(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16), bdlkern.sampling(3, seed=2):
            low = layer(x)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, want, rtol=1e-6, atol=1e-6)
