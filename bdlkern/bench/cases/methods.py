"""Family ``methods`` (issue 19): training steps of the methods built on the fused kernels.

* ``methods.ard_kl``: forward + backward of :func:`bdlkern.ops.ard_kl` (the KL under the ARD
  prior, one fused pass that also writes the gradient) on a 1024x1024 float32 weight, against the
  eager formula ``0.5 softplus(-clamp(log_alpha))`` with autograd and its ``torch.compile``.
* ``methods.alpha_div_train_k10``: one alpha-divergence training step of MC dropout (Li & Gal 2017,
  :func:`bdlkern.losses.alpha_divergence`, alpha = 0.5) with K = 10 samples per input: forward,
  loss, backward (the gradients of every parameter; no optimizer step in any variant). The digits
  MLP 64-300-100-10, dropout p = 0.5 before each linear layer, ReLU between, on a batch of 128
  standardised digits (quick: 64-32-16-10, batch 16, still K = 10), float32.

  - bdlkern: ``MCDropoutLinear`` layers inside ``bdlkern.sampling(K)`` in training mode: the first
    layer reads the ``[N, 64]`` input once and draws the K masks inside its GEMM, later layers take
    ``[K, N, in]``; the masks are re-made in backward, never stored;
  - ``reference (eager)``: what a user writes without bdlkern: the input repeated K times,
    ``x.unsqueeze(0).expand(K, N, 64)``, through ``nn.Dropout -> nn.Linear`` (ReLU between) in
    training mode, giving ``[K, N, 10]``, and the same loss;
  - ``reference (torch.compile)``: ``torch.compile`` of that eager forward + loss (compiled and run
    once in setup, not timed); the backward is the compiled graph's.

The check (before timing) runs bdlkern's step inside ``sampling(K, seed=0)`` and compares its loss
and gradients with a float64 reference that applies the same Philox masks by hand: call ``k`` of a
seeded block draws ``rng_state = [seed, k << 40]``, and the layer's keep mask is
``bdlkern.ops.dropout_mask([K, N, in], p, rng_state=..., stream="mc_dropout")``; the reference is
``h = linear(h * M_k / (1 - p))`` layer by layer and the loss written out, ``-(1/alpha) log mean_k
p_k^alpha``. The baselines (torch's own masks) are checked for shape and a finite loss.

* ``methods.variational_dropout_train`` / ``methods.variance_network_train``: a training step
  (forward, squared error + KL / 50000, backward) of an MLP 1024-1024-1024, batch 256, of
  ``VariationalDropoutLinear`` (Kingma et al. 2015) / ``VarianceLinear`` (Neklyudov et al. 2018:
  zero-mean weights, one GEMM per layer forward) against the LRT formula written in torch (eager
  and ``torch.compile``); the check replays bdlkern's noise through that formula.

The registry has no field for speed-up targets; the issue's is kept in :data:`TARGETS` and printed
with the case's description: >= 1.5x the eager step on the CPU in float32 with 2 threads
(``python -m bdlkern.bench --case methods --threads 2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import bdlkern
from bdlkern.bench.registry import Workload, case
from bdlkern.losses import alpha_divergence

FULL = {"K": 10, "N": 128, "sizes": (64, 300, 100, 10)}
QUICK = {"K": 10, "N": 16, "sizes": (64, 32, 16, 10)}
P = 0.5
ALPHA = 0.5

#: The issue's speed-up targets: case -> baseline -> minimum ``baseline time / bdlkern time``.
TARGETS: dict[str, dict[str, float]] = {
    "methods.alpha_div_train_k10": {"reference (eager)": 1.5},
}


def _targets(name: str) -> str:
    return "targets: " + ", ".join(f">= {r}x {b}" for b, r in TARGETS[name].items())


def _digits_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of sklearn's bundled digits, standardised over the whole set: ``[n, 64]``
    float32 and ``[n]`` int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-3)  # a few border pixels are constant
    return x[:n], y[:n]


def _nets(sizes: tuple[int, ...], device: torch.device) -> tuple[nn.Sequential, nn.Sequential]:
    """The bdlkern MLP (``MCDropoutLinear``, ReLU between) and the eager one (``nn.Dropout(P) ->
    nn.Linear``, ReLU between) with the same parameters (seed 0), both in training mode."""
    ours: list[nn.Module] = []
    eager: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):  # leaves torch's global generator as it was
        torch.manual_seed(0)
        linears = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
    for i, linear in enumerate(linears):
        ours.append(bdlkern.nn.MCDropoutLinear.from_linear(linear, p=P))
        eager += [nn.Dropout(P), linear]
        if i < len(sizes) - 2:
            ours.append(nn.ReLU())
            eager.append(nn.ReLU())
    return nn.Sequential(*ours).to(device).train(), nn.Sequential(*eager).to(device).train()


def _flops(dims) -> int:
    """Multiply-adds of the forward over the K samples, times 3: the forward, the gradient of each
    layer's input (all but the first's) and of its weight."""
    sizes = dims["sizes"]
    forward = 2 * dims["K"] * dims["N"] * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return 3 * forward


def _grad_step(loss_fn, args, params):
    """A timed training step: ``loss_fn(*args)`` and its gradients with respect to ``params``."""

    def call():
        loss = loss_fn(*args)
        return loss, torch.autograd.grad(loss, params)

    return call


def _hand_masked_step(net: nn.Sequential, x, y, K: int, seed: int):
    """The float64 reference of bdlkern's step in ``sampling(K, seed=seed)``: (loss, grads)."""
    layers = [m for m in net if isinstance(m, bdlkern.nn.MCDropoutLinear)]
    params = [t.detach().cpu().double().requires_grad_() for t in net.parameters()]
    N = x.shape[0]
    h = x.detach().cpu().double().unsqueeze(0).expand(K, N, x.shape[1])
    for k, layer in enumerate(layers):
        state = torch.tensor([seed, k << 40], dtype=torch.int64)
        keep = bdlkern.ops.dropout_mask([K, N, layer.in_features], layer.p, rng_state=state, stream="mc_dropout")
        h = F.linear(h * keep.double() / (1 - layer.p), params[2 * k], params[2 * k + 1])
        if k < len(layers) - 1:
            h = torch.relu(h)
    log_p = torch.log_softmax(h, -1).gather(-1, y.cpu().view(1, N, 1).expand(K, N, 1)).squeeze(-1)
    loss = (-torch.log(torch.exp(ALPHA * log_p).mean(0)) / ALPHA).mean()
    return loss, torch.autograd.grad(loss, params)


@case(
    "methods.alpha_div_train_k10",
    family="methods",
    description="alpha-divergence (alpha=0.5) MC-dropout training step, K=10 samples per input, digits MLP "
    "64-300-100-10, p=0.5, batch 128: forward + loss + backward; " + _targets("methods.alpha_div_train_k10"),
    subject="bdlkern sampling(K)",
    baselines={
        "reference (eager)": "reference",
        "reference (torch.compile)": "compiled",
    },
)
def _alpha_div_train(device: torch.device, quick: bool) -> Workload:
    dims = QUICK if quick else FULL
    K, N = dims["K"], dims["N"]
    x, y = _digits_batch(N)
    x, y = x.to(device), y.to(device)
    ours, eager = _nets(dims["sizes"], device)
    ours_params, eager_params = list(ours.parameters()), list(eager.parameters())

    def ours_step(seed: int | None = None):
        with bdlkern.sampling(K, seed=seed):
            logits = ours(x)  # [K, N, 10]
        loss = alpha_divergence(logits, y, ALPHA)
        return loss, torch.autograd.grad(loss, ours_params)

    def eager_loss(x, y):
        logits = eager(x.unsqueeze(0).expand(K, *x.shape))  # [K, N, 10]
        return alpha_divergence(logits, y, ALPHA)

    compiled_loss = torch.compile(eager_loss)

    eager_step, compiled_step = (_grad_step(fn, (x, y), eager_params) for fn in (eager_loss, compiled_loss))
    compiled_step()  # compile in setup, not in the first timed call

    def check() -> None:
        seed = 0
        loss, grads = ours_step(seed)
        want_loss, want = _hand_masked_step(ours, x, y, K, seed)
        torch.testing.assert_close(loss.cpu().double(), want_loss, rtol=1e-5, atol=1e-5, msg="alpha-div loss")
        for (name, p), g, e in zip(ours.named_parameters(), grads, want):
            assert g.shape == p.shape and g.dtype == torch.float32, f"grad of {name}: {g.shape} {g.dtype}"
            torch.testing.assert_close(
                g.cpu().double(), e, rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max().item()), msg=f"grad of {name}"
            )
        for name, fn in (("eager", eager_step), ("compiled", compiled_step)):
            b_loss, b_grads = fn()
            assert torch.isfinite(b_loss), f"{name} loss {b_loss}"
            assert [g.shape for g in b_grads] == [g.shape for g in grads], f"{name} gradient shapes"

    return Workload(
        variants={
            "bdlkern sampling(K)": ours_step,
            "reference (eager)": eager_step,
            "reference (torch.compile)": compiled_step,
        },
        params={"K": K, "N": N, "sizes": "-".join(map(str, dims["sizes"])), "p": P, "alpha": ALPHA, "dtype": "float32"},
        flops=_flops(dims),
        check=check,
    )


# ---- variational (Gaussian) dropout, Kingma et al. 2015 --------------------------------------------
VD_FULL = {"N": 256, "sizes": (1024, 1024, 1024)}
VD_QUICK = {"N": 16, "sizes": (64, 32, 10)}
VD_INIT_ALPHA = 0.25


def _vd_nets(sizes, device):
    """A ``VariationalDropoutLinear`` MLP (alpha per input unit, ReLU between) and the plain
    parameters of the same net for the eager formula."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(bdlkern.nn.VariationalDropoutLinear(a, b, alpha="input", init_alpha=VD_INIT_ALPHA))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device).train()


def _vd_eager_layer(m, h, eps):
    """One ``VariationalDropoutLinear`` as users write its LRT in torch: ``mu = x theta^T + b``,
    ``var = x^2 (alpha theta^2)^T``, ``mu + sqrt(var + 1e-8) * eps``; and its KL."""
    mu = F.linear(h, m.theta, m.bias)
    var = F.linear(h * h, m.alpha() * m.theta**2)
    return mu + torch.sqrt(var + 1e-8) * (torch.randn_like(mu) if eps is None else eps), m.kl()


def _eager_forward(net, x, layer_fn, noise=None):
    """``net`` with every bdlkern LRT layer replaced by ``layer_fn(module, h, eps) -> (h, kl)``;
    ``noise``: the eps of each such layer (else drawn by ``layer_fn``). Returns (output, summed KL)."""
    h, k = x, 0
    kl = x.new_zeros(())
    for m in net:
        if isinstance(m, (bdlkern.nn.VariationalDropoutLinear, bdlkern.nn.VarianceLinear)):
            h, layer_kl = layer_fn(m, h, None if noise is None else noise[k])
            kl = kl + layer_kl
            k += 1
        else:
            h = m(h)
    return h, kl


def _lrt_train_workload(net, layer_fn, dims, device, subject: str, params: dict) -> Workload:
    """A training step of the LRT MLP ``net`` (squared error against a fixed random target + KL / 50000)
    against the eager formula of ``layer_fn`` and its ``torch.compile``; the check replays bdlkern's
    noise in ``sampling(1, seed=0)`` (layer k draws from rng_state ``[0, k << 40]``, stream "lrt", the
    output's index) through the eager formula and compares loss and gradients."""
    N, sizes = dims["N"], dims["sizes"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, sizes[0], generator=g).to(device)
    target = torch.randn(N, sizes[-1], generator=g).to(device)
    net_params = list(net.parameters())

    def ours_step():
        out = net(x)
        loss = F.mse_loss(out, target) + bdlkern.nn.kl_divergence(net) / 50_000
        return loss, torch.autograd.grad(loss, net_params)

    def eager_loss(x, target):
        out, kl = _eager_forward(net, x, layer_fn)
        return F.mse_loss(out, target) + kl / 50_000

    compiled_loss = torch.compile(eager_loss)
    eager_step, compiled_step = (_grad_step(fn, (x, target), net_params) for fn in (eager_loss, compiled_loss))
    compiled_step()  # compile in setup

    def check() -> None:
        with bdlkern.sampling(1, seed=0):
            out = net(x)[0]
        loss = F.mse_loss(out, target) + bdlkern.nn.kl_divergence(net) / 50_000
        grads = torch.autograd.grad(loss, net_params)
        noise = [
            bdlkern.ops.normal((N, w), rng_state=torch.tensor([0, k << 40], device=device), stream="lrt")
            for k, w in enumerate(sizes[1:])
        ]
        ref_out, kl = _eager_forward(net, x, layer_fn, noise)
        ref_loss = F.mse_loss(ref_out, target) + kl / 50_000
        ref_grads = torch.autograd.grad(ref_loss, net_params)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5, msg=f"{subject} loss")
        for (name, _), a, b in zip(net.named_parameters(), grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * max(1.0, b.abs().max().item()), msg=f"grad {name}")
        for name, fn in (("eager", eager_step), ("compiled", compiled_step)):
            b_loss, _ = fn()
            assert torch.isfinite(b_loss), f"{name} loss {b_loss}"

    forward = 2 * N * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return Workload(
        variants={subject: ours_step, "reference (eager)": eager_step, "reference (torch.compile)": compiled_step},
        params={"N": N, "sizes": "-".join(map(str, sizes)), **params, "dtype": "float32"},
        flops=2 * 3 * forward,
        check=check,
    )


@case(
    "methods.variational_dropout_train",
    family="methods",
    description="variational (Gaussian) dropout training step (Kingma et al. 2015, alpha per input unit) of an "
    "MLP 1024-1024-1024, batch 256: LRT forward, squared-error loss + KL / N, backward of theta, log_alpha and "
    "bias (no target in the issue; the row of the README)",
    subject="bdlkern VariationalDropoutLinear",
    baselines={
        "reference (eager)": "reference",
        "reference (torch.compile)": "compiled",
    },
)
def _variational_dropout_train(device: torch.device, quick: bool) -> Workload:
    dims = VD_QUICK if quick else VD_FULL
    return _lrt_train_workload(
        _vd_nets(dims["sizes"], device), _vd_eager_layer, dims, device, "bdlkern VariationalDropoutLinear",
        {"alpha": "input"},
    )


# ---- variance networks, Neklyudov et al. 2018 -------------------------------------------------------
def _variance_nets(sizes, device):
    """A ``VarianceLinear`` MLP (ReLU between), seed 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(bdlkern.nn.VarianceLinear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device).train()


def _variance_eager_layer(m, h, eps):
    """One ``VarianceLinear`` as users write it in torch: ``var = x^2 exp(log_sigma2)^T``,
    ``b + sqrt(var + 1e-8) * eps`` (no KL)."""
    std = torch.sqrt(F.linear(h * h, torch.exp(m.log_sigma2)) + 1e-8)
    return m.bias + std * (torch.randn_like(std) if eps is None else eps), h.new_zeros(())


@case(
    "methods.variance_network_train",
    family="methods",
    description="variance-network training step (Neklyudov et al. 2018: zero-mean weights, learnt variances) of "
    "an MLP 1024-1024-1024, batch 256: one GEMM per layer forward, squared-error loss, backward of log_sigma2 "
    "and bias (no target in the issue; the row of the README)",
    subject="bdlkern VarianceLinear",
    baselines={
        "reference (eager)": "reference",
        "reference (torch.compile)": "compiled",
    },
)
def _variance_network_train(device: torch.device, quick: bool) -> Workload:
    dims = VD_QUICK if quick else VD_FULL
    return _lrt_train_workload(
        _variance_nets(dims["sizes"], device), _variance_eager_layer, dims, device, "bdlkern VarianceLinear", {}
    )


# ---- the KL under the ARD prior, Kharitonov, Molchanov & Vetrov 2018 -----------------------------------
ARD_FULL = {"shape": (1024, 1024)}
ARD_QUICK = {"shape": (64, 64)}


def _ard_kl_eager(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """The ARD KL as users write it: the clamped log alpha, ``0.5 softplus(-log_alpha)``, summed."""
    log_alpha = torch.clamp(log_sigma2 - torch.log(theta**2 + 1e-8), -8.0, 8.0)
    return (0.5 * F.softplus(-log_alpha)).sum()


@case(
    "methods.ard_kl",
    family="methods",
    description="KL of sparse variational dropout under the ARD prior (Kharitonov et al. 2018, "
    "0.5 log1p(exp(-log_alpha))) of a 1024x1024 float32 weight: forward + backward of theta and log_sigma2 "
    "(no target in the issue)",
    subject="bdlkern ard_kl",
    baselines={
        "reference (eager)": "reference",
        "reference (torch.compile)": "compiled",
    },
)
def _ard_kl(device: torch.device, quick: bool) -> Workload:
    shape = (ARD_QUICK if quick else ARD_FULL)["shape"]
    g = torch.Generator().manual_seed(2)
    theta = (torch.randn(shape, generator=g) / 32).to(device).requires_grad_()
    # log alpha spread over (-10, 6): most weights inside the clamp, some below it
    log_sigma2 = (torch.rand(shape, generator=g) * 16 - 10).to(device) + torch.log(theta.detach() ** 2 + 1e-8)
    log_sigma2.requires_grad_()
    params = [theta, log_sigma2]
    ours_step = _grad_step(bdlkern.ops.ard_kl, params, params)
    eager_step = _grad_step(_ard_kl_eager, params, params)
    compiled_step = _grad_step(torch.compile(_ard_kl_eager), params, params)
    compiled_step()  # compile in setup

    def check() -> None:
        kl, grads = ours_step()
        leaves = [t.detach().cpu().double().requires_grad_() for t in params]
        want = _ard_kl_eager(*leaves)
        want_grads = torch.autograd.grad(want, leaves)
        torch.testing.assert_close(kl.cpu().double(), want.detach(), rtol=1e-5, atol=0, msg="ard_kl")
        for name, a, b in zip(("theta", "log_sigma2"), grads, want_grads):
            torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=f"grad {name}")
        for name, fn in (("eager", eager_step), ("compiled", compiled_step)):
            b_kl, _ = fn()
            torch.testing.assert_close(b_kl.cpu().double(), want.detach(), rtol=1e-4, atol=0, msg=f"{name} KL")

    n = theta.numel()
    return Workload(
        variants={
            "bdlkern ard_kl": ours_step,
            "reference (eager)": eager_step,
            "reference (torch.compile)": compiled_step,
        },
        params={"shape": "x".join(map(str, shape)), "dtype": "float32"},
        elements=n,
        bytes=4 * 4 * n,  # reads theta and log_sigma2, writes their two gradients
        check=check,
    )


# ---- Gaussian dropout on activations, Kingma et al. 2015 ---------------------------------------------
GD_FULL = {"B": 256, "F": 1024}
GD_QUICK = {"B": 16, "F": 64}
GD_LOG_ALPHA = -1.0


def _gaussian_eager(x, log_alpha):
    """Gaussian dropout as users write it: fresh ``torch.randn_like`` noise, autograd keeps it."""
    return x * (1 + log_alpha.mul(0.5).exp() * torch.randn_like(x))


@case(
    "methods.gaussian_dropout_fwd_bwd",
    family="methods",
    description="Gaussian dropout y = x (1 + sqrt(alpha) eps) (Kingma et al. 2015) on a [256, 1024] float32 "
    "activation with a learnt 0-d log_alpha: forward + backward (grad of x and log_alpha); the fused op "
    "re-makes eps in backward (no target in the issue; the row of the README)",
    subject="bdlkern.gaussian_dropout",
    baselines={
        "reference (eager)": "reference",
        "reference (torch.compile)": "compiled",
        "x*s and g*s (2 elementwise passes)": "limit",
    },
)
def _gaussian_dropout_fwd_bwd(device: torch.device, quick: bool) -> Workload:
    dims = GD_QUICK if quick else GD_FULL
    B, F_ = dims["B"], dims["F"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, F_, generator=g).to(device).requires_grad_()
    grad = torch.randn(B, F_, generator=g).to(device)
    log_alpha = torch.tensor(GD_LOG_ALPHA, device=device, requires_grad=True)
    state = torch.tensor([5, 0], device=device)
    compiled = torch.compile(_gaussian_eager)
    xd, scale = x.detach(), torch.tensor(1.1, device=device)

    def run(f):
        def call():
            return torch.autograd.grad(f(), (x, log_alpha), grad)

        return call

    compiled_call = run(lambda: compiled(x, log_alpha))
    compiled_call()  # compile in setup, not in the first timed call

    def check() -> None:
        # The fused op against the eager formula with the op's own noise (the normal op on stream
        # "gaussian_dropout"), forward and both gradients.
        y = bdlkern.ops.gaussian_dropout(x, log_alpha, rng_state=state)
        eps = bdlkern.ops.normal((B, F_), rng_state=state, stream="gaussian_dropout")
        y_ref = x * (1 + log_alpha.mul(0.5).exp() * eps)
        torch.testing.assert_close(y, y_ref, msg="gaussian_dropout forward")
        for a, b, name in zip(torch.autograd.grad(y, (x, log_alpha), grad), torch.autograd.grad(y_ref, (x, log_alpha), grad),
                              ("x", "log_alpha")):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()), msg=f"grad {name}")
        for name, fn in (("eager", run(lambda: _gaussian_eager(x, log_alpha))), ("compiled", compiled_call)):
            gx, gl = fn()
            assert gx.shape == x.shape and torch.isfinite(gl), f"{name} gradients"

    n = B * F_
    return Workload(
        variants={
            "bdlkern.gaussian_dropout": run(lambda: bdlkern.ops.gaussian_dropout(x, log_alpha, rng_state=state)),
            "reference (eager)": run(lambda: _gaussian_eager(x, log_alpha)),
            "reference (torch.compile)": compiled_call,
            "x*s and g*s (2 elementwise passes)": lambda: (xd * scale, grad * scale),
        },
        params={**dims, "log_alpha": GD_LOG_ALPHA, "dtype": "float32"},
        elements=n,
        bytes=4 * n * 5,  # read x, write y; read g and x, write grad_x
        check=check,
    )
