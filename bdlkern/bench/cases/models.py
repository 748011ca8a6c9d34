"""Family ``models`` (issue 17): whole models, bdlkern against every free route a user would take
instead, on the CPU in float32.

MC dropout. Three nets built with torch's dropout modules; bdlkern runs ``bdlkern.nn.convert(model)``
(done in setup) and ``with bdlkern.sampling(S) as st: st.unfold(model(x))``, giving ``[S, N, 10]``:

* ``models.mlp_mc``: the digits MLP 64-300-100-10, ``nn.Dropout(0.5)`` before each ``nn.Linear`` and
  ReLU between, on the 540 standardised digits of the test split (30% of ``load_digits``), S = 32
  (quick: 16 digits, S = 4). Every layer is an MC layer: bdlkern fuses mask and GEMM.
* ``models.lenet_mc``: LeNet-5 on 1x32x32 inputs, conv(1,6,5)-relu-maxpool-Dropout2d-conv(6,16,5)-
  relu-maxpool-flatten-Dropout-Linear(400,120)-relu-Dropout-Linear(120,84)-relu-Dropout-Linear(84,10),
  p = 0.5, batch 64, S = 32 (quick: batch 8, S = 4). The first MC layer is the second conv (channel
  masks), so bdlkern runs the first conv once.
* ``models.vgg_head_mc``: VGG-11 at a quarter of its widths, conv3x3 16-M-32-M-64-64-M-128-128-M-
  128-128-M (ReLU after each conv) on 3x32x32 inputs, about 20 MFLOP an image (the full VGG-11 widths
  64-128-256-256-512-512 with these maxpools cost ~16x that: seconds per call of an S = 32 baseline
  on 2 cores); dropout only in the head, flatten-Dropout-Linear(128,512)-ReLU-Dropout-Linear(512,10),
  batch 64, S = 32 (quick: 8-M-16-M-16-M on 3x16x16, head 64-32-10, batch 4, S = 4). bdlkern runs
  the trunk once.

Their free baselines, each a few lines of torch written here: the eager model with its dropout
modules in training mode and the rest in eval mode, under ``torch.no_grad``:

* ``eager loop over S``: S passes in a Python loop, ``torch.stack``ed;
* ``eager batch replication``: ``x.repeat(S, ...)`` through the model once;
* ``torch.func.vmap``: ``vmap(lambda _: model(x), randomness="different")`` over a dummy ``[S]``
  (``x`` is not batched: passing ``x`` with ``in_dims=None`` is refused, since vmap needs a batched
  input). The layers before the first dropout then see an unbatched input, so vmap, like bdlkern,
  runs them once: in ``vgg_head_mc`` that is the whole trunk;
* ``torch.compile batch replication``: ``torch.compile`` of the replicated model, compiled and run
  once in setup (not timed).

Sparse VD. A ``SparseVDLinear`` MLP 64-300-100-10 (ReLU between) trained in setup on the digits
training split (standardised, fixed seeds, Adam 5e-3, batch 128, KL weight annealed 0 -> 1 over the
first 15 of 60 epochs: a few seconds, ~98% of the weights pruned; quick: 20 epochs, annealed over
5), cached for the process:

* ``models.pruned_mlp_eval``: deterministic eval of 64 test digits (quick 16): ``prune(model)``
  (compacted CSR layers) against ``prune(model, compact=False)`` (the uncompacted CSR net) and the
  dense eval model (an ``nn.Sequential`` of ``nn.Linear`` holding the pruned weights
  ``theta * mask``);
* ``models.pruned_mlp_lrt``: S = 32 stochastic LRT samples of the same 64 digits (quick S = 4, 16
  digits) inside ``sampling``: the compacted pruned net against the dense LRT formula on the
  replicated batch ``x.repeat(S, 1)``: per layer ``mu = x W^T + b``, ``var = x^2 V^T``, ``y = mu +
  sqrt(var + 1e-8) * eps`` with ``W = theta * mask``, ``V = alpha theta^2 * mask`` (the pruned net's
  distribution) and ``eps = torch.randn``, eager and ``torch.compile``d, and the uncompacted net.

Memory. ``models.mc_predict_chunk_memory``: ``mc_predict(lenet, x, 64, seed=0, sample_chunk=4)``
against the unchunked call on the converted LeNet (activations of every sample dominate its 60k
weights), batch 128 (quick 16); the harness's peak-memory column is the comparison, time is
reported too. The free baselines (eager loop, which holds one pass at a time, and batch
replication) return the raw samples only, without ``mc_predict``'s summaries.

Checks (before timing): the converted / pruned models in deterministic eval equal the originals;
every MC variant returns ``[S, N, 10]`` with samples that differ; the per-output MC mean and spread of
bdlkern and of every baseline agree with the eager loop's (or the dense LRT's) over at least
:data:`CHECK_SAMPLES` samples each (mean within 0.35 of the average per-output standard deviation,
spreads within a factor 1.25), which catches a wrong rate, scaling or mask layout; compacted and
uncompacted pruned nets agree within 1e-4 in eval and, with one seed, sample for sample within the
documented dead-unit term; chunked ``mc_predict`` equals the unchunked call (same masks; the logits
differ by GEMM / conv rounding, ~1e-7, since 4 samples are blocked differently from 64).

The speed-up targets are in :data:`TARGETS` (printed with each description), the memory target in
:data:`MEMORY_TARGETS`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import bdlkern
from bdlkern.bench.registry import Workload, case

P = 0.5
#: Samples (at least) each variant draws in the statistical checks.
CHECK_SAMPLES = 64
MLP_SIZES = (64, 300, 100, 10)

MLP = {"full": {"S": 32, "N": 540}, "quick": {"S": 4, "N": 16}}
LENET = {"full": {"S": 32, "N": 64}, "quick": {"S": 4, "N": 8}}
VGG = {
    "full": {"S": 32, "N": 64, "size": 32, "widths": (16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"),
             "hidden": 512},
    "quick": {"S": 4, "N": 4, "size": 16, "widths": (8, "M", 16, "M", 16, "M"), "hidden": 32},
}
PRUNED = {"full": {"S": 32, "N": 64, "epochs": 60, "anneal": 15}, "quick": {"S": 4, "N": 16, "epochs": 20, "anneal": 5}}
CHUNK = {"full": {"S": 64, "N": 128, "chunk": 4}, "quick": {"S": 64, "N": 16, "chunk": 4}}

#: The issue's speed-up targets: case -> baseline -> minimum ``baseline time / bdlkern time``.
TARGETS: dict[str, dict[str, float]] = {
    "models.mlp_mc": {"best free baseline": 1.5},
    "models.lenet_mc": {"best free baseline": 1.3},
    "models.vgg_head_mc": {"best free baseline": 10.0},
    "models.pruned_mlp_eval": {"dense eval model (nn.Linear)": 10.0, "bdlkern prune(compact=False)": 3.0},
    "models.pruned_mlp_lrt": {"dense LRT, batch replication (eager)": 5.0},
}
#: Memory targets: case -> maximum ``peak bytes of the subject / peak bytes of the baseline``.
MEMORY_TARGETS: dict[str, dict[str, float]] = {
    "models.mc_predict_chunk_memory": {"bdlkern mc_predict unchunked": 1 / 8},
}


def _targets(name: str) -> str:
    return "targets: " + ", ".join(f">= {r:g}x {b}" for b, r in TARGETS[name].items())


def _size(quick: bool) -> str:
    return "quick" if quick else "full"


def _no_grad(f: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``f`` run under ``torch.no_grad()``: inference."""

    def call():
        with torch.no_grad():
            return f()

    return call


# ---- models and data ----------------------------------------------------------------------------
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's digits split 70/30 (stratified, seed 0) and standardised with the training
    statistics: (x_train [1257, 64], y_train [1257], x_test [540, 64], y_test [540]), float32 / int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-3)  # a few pixels are constant
    return (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te


def _mlp() -> nn.Sequential:
    """64-300-100-10, ``nn.Dropout(P)`` before each ``nn.Linear``, ReLU between."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:])):
        layers += [nn.Dropout(P), nn.Linear(a, b)]
        if i < len(MLP_SIZES) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _lenet() -> nn.Sequential:
    """LeNet-5 for ``[N, 1, 32, 32]`` with dropout (module docstring) -> ``[N, 10]``."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout2d(P),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Dropout(P), nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Dropout(P), nn.Linear(120, 84), nn.ReLU(),
        nn.Dropout(P), nn.Linear(84, 10),
    )


def _vgg(widths: tuple, size: int, hidden: int) -> nn.Sequential:
    """A VGG-style net for ``[N, 3, size, size]``: 3x3 convs (padding 1) + ReLU of ``widths``, "M" a
    2x2 maxpool, then the head flatten-Dropout-Linear(., hidden)-ReLU-Dropout-Linear(hidden, 10)."""
    layers: list[nn.Module] = []
    channels = 3
    for w in widths:
        if w == "M":
            layers.append(nn.MaxPool2d(2))
            size //= 2
        else:
            layers += [nn.Conv2d(channels, w, 3, padding=1), nn.ReLU()]
            channels = w
    layers += [nn.Flatten(), nn.Dropout(P), nn.Linear(channels * size * size, hidden), nn.ReLU(), nn.Dropout(P),
               nn.Linear(hidden, 10)]
    return nn.Sequential(*layers)


def _dropout_active(model: nn.Module) -> nn.Module:
    """``model`` in eval mode except its dropout modules, which drop (training mode): the eager MC
    dropout model of the free baselines."""
    model.eval()
    for m in model.modules():
        if isinstance(m, _DROPOUTS):
            m.train()
    return model


def _forward_flops(model: nn.Sequential, x: torch.Tensor) -> tuple[int, int]:
    """(trunk, rest): FLOPs (2 per multiply-add) of the convolutions and linear layers of one
    deterministic forward of ``model`` on ``x``, split at its first dropout module (what bdlkern
    runs once, and what it runs per sample)."""
    trunk = rest = 0
    seen_dropout = False
    h = x
    with torch.no_grad():
        for m in model:
            out = m(h)
            seen_dropout = seen_dropout or isinstance(m, _DROPOUTS)
            flops = 0
            if isinstance(m, nn.Conv2d):
                flops = 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            elif isinstance(m, nn.Linear):
                flops = 2 * out.numel() * m.in_features
            if seen_dropout:
                rest += flops
            else:
                trunk += flops
            h = out
    return trunk, rest


# ---- the free MC baselines ----------------------------------------------------------------------
def _replicate(x: torch.Tensor, S: int) -> torch.Tensor:
    """``[N, ...] -> [S * N, ...]``, sample-major (``x.repeat``)."""
    return x.repeat(S, *([1] * (x.dim() - 1)))


def _loop(model: nn.Module, x: torch.Tensor, S: int) -> torch.Tensor:
    """S passes through the eager dropout model: ``[S, N, 10]``."""
    return torch.stack([model(x) for _ in range(S)])


def _replicated(model: nn.Module, x: torch.Tensor, S: int) -> torch.Tensor:
    """One pass of the replicated batch: ``[S * N, ...] -> [S, N, 10]``."""
    return model(_replicate(x, S)).unflatten(0, (S, x.shape[0]))


def _vmapped(model: nn.Module, x: torch.Tensor, S: int) -> torch.Tensor:
    """``torch.func.vmap`` over a dummy ``[S]`` with ``randomness="different"``: ``[S, N, 10]``."""
    return torch.func.vmap(lambda _: model(x), randomness="different")(x.new_empty(S))


MC_BASELINES = {
    "eager loop over S": "reference",
    "eager batch replication": "reference",
    "torch.func.vmap": "library",
    "torch.compile batch replication": "compiled",
}


def _mc_case_variants(
    model: nn.Module, x: torch.Tensor, S: int
) -> tuple[Callable[[int, torch.Tensor], dict[str, Callable[[], torch.Tensor]]], nn.Module, nn.Module]:
    """The subject and the :data:`MC_BASELINES` of an MC-dropout model with torch dropout modules.

    Returns:
        (``variants(samples, inp)``: name -> callable giving ``[samples, N, 10]`` for the input
        ``inp`` (shaped like ``x``), except the compiled baseline, which is compiled for ``S`` and
        gives ``[S, N, 10]``; the converted model; the eager model in eval mode). ``model`` is not
        modified.
    """
    eager = _dropout_active(copy.deepcopy(model))
    plain = copy.deepcopy(model).eval()
    converted = bdlkern.nn.convert(copy.deepcopy(model).eval())
    compiled = torch.compile(lambda x: _replicated(eager, x, S))
    with torch.no_grad():
        compiled(x)  # compile here, not in the timed calls

    def variants(samples: int, inp: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
        def subject():
            with bdlkern.sampling(samples) as st:
                return st.unfold(converted(inp))

        return {
            "bdlkern convert + sampling": _no_grad(subject),
            "eager loop over S": _no_grad(lambda: _loop(eager, inp, samples)),
            "eager batch replication": _no_grad(lambda: _replicated(eager, inp, samples)),
            "torch.func.vmap": _no_grad(lambda: _vmapped(eager, inp, samples)),
            "torch.compile batch replication": _no_grad(lambda: compiled(inp)),
        }

    return variants, converted, plain


def _draws(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """At least :data:`CHECK_SAMPLES` samples of ``fn`` (which gives ``[S, ...]`` a call)."""
    out = [fn()]
    while sum(len(y) for y in out) < CHECK_SAMPLES:
        out.append(fn())
    return torch.cat(out)


def _check_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` with image ``n`` scaled by ``c_n``, log-spaced over [1/4, 4] in a fixed shuffled order:
    the inputs of the statistical checks, whose images differ in their outputs' scale, so that a
    variant that mixes up samples and images (a wrong fold or unfold) fails the per-image spreads."""
    N = x.shape[0]
    c = torch.logspace(-2, 2, N, base=2)[torch.randperm(N, generator=torch.Generator().manual_seed(7))]
    return x * c.reshape(-1, *([1] * (x.dim() - 1))).to(x)


def _check_distribution(name: str, samples: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    """``samples`` and ``ref`` (``[>= 64, N, C]``, independent draws) have the same distribution:

    * the per-output MC means differ by less than 0.35 of the average standard deviation on average
      (with 64 draws each the expected difference is ~0.14);
    * the average standard deviations are within a factor 1.25;
    * each image's average standard deviation is within a factor 2 of ``ref``'s (a 64-draw estimate
      is within ~10%).
    """
    spread_ref = ref.std(0).mean().item()
    spread = samples.std(0).mean().item()
    gap = (samples.mean(0) - ref.mean(0)).abs().mean().item()
    assert spread_ref > 0, f"{ref_name}: the samples do not vary"
    assert gap < 0.35 * spread_ref, f"{name}: MC mean {gap:.4g} away from {ref_name}'s (spread {spread_ref:.4g})"
    assert 0.8 < spread / spread_ref < 1.25, f"{name}: spread {spread:.4g}, {ref_name}'s {spread_ref:.4g}"
    per_image = samples.std(0).flatten(1).mean(1) / ref.std(0).flatten(1).mean(1)
    worst = per_image.log().abs().argmax()
    assert per_image[worst].log().abs() < math.log(2), (
        f"{name}: image {int(worst)}'s spread is {per_image[worst]:.3g} times {ref_name}'s "
        "(are samples and images mixed up?)"
    )


def _check_mc(
    variants: dict[str, Callable[[], torch.Tensor]],
    many: dict[str, Callable[[], torch.Tensor]],
    S: int,
    N: int,
    ref_name: str,
    deterministic: Callable[[], None],
) -> Callable[[], None]:
    """Check of an MC case: ``deterministic()``; every timed variant gives ``[S, N, 10]`` with samples
    that differ; and the distribution of each variant, drawn with ``many`` (the same computations on
    :func:`_check_input` with at least :data:`CHECK_SAMPLES` samples a call, or S where a variant is
    fixed to S), agrees with ``ref_name``'s (:func:`_check_distribution`)."""

    def check() -> None:
        deterministic()
        ref = _draws(many[ref_name])
        for name, fn in variants.items():
            y = fn()
            assert y.shape == (S, N, 10), f"{name}: shape {tuple(y.shape)}, expected {(S, N, 10)}"
            assert not torch.equal(y, fn()), f"{name}: two calls gave the same samples"
            assert S == 1 or not torch.equal(y[0], y[-1]), f"{name}: the samples of one call do not differ"
            if name != ref_name:
                _check_distribution(name, _draws(many[name]), ref, ref_name)

    return check


def _mc_workload(model: nn.Sequential, x: torch.Tensor, S: int, params: dict) -> Workload:
    variants, converted, plain = _mc_case_variants(model, x, S)

    def deterministic() -> None:
        with torch.no_grad():  # outside sampling the converted model in eval mode is the plain model
            torch.testing.assert_close(converted(x), plain(x), rtol=1e-5, atol=1e-5)

    trunk, rest = _forward_flops(plain, x)
    N = x.shape[0]
    timed = variants(S, x)
    return Workload(
        variants=timed,
        params={**params, "p": P, "dtype": "float32"},
        elements=S * N * 10,
        flops={name: (trunk + S * rest if name == "bdlkern convert + sampling" else S * (trunk + rest))
               for name in timed},
        check=_check_mc(
            timed, variants(max(S, CHECK_SAMPLES), _check_input(x)), S, N, "eager loop over S", deterministic
        ),
    )


# ---- MC-dropout cases ---------------------------------------------------------------------------
@case(
    "models.mlp_mc",
    family="models",
    description="MC dropout of the digits MLP 64-300-100-10 (nn.Dropout(0.5) before each Linear), S samples of the "
    "540 test digits; " + _targets("models.mlp_mc"),
    subject="bdlkern convert + sampling",
    baselines=MC_BASELINES,
    devices=("cpu",),
)
def _mlp_mc(device: torch.device, quick: bool) -> Workload:
    dims = MLP[_size(quick)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _mlp()
    x = _digits()[2][: dims["N"]].contiguous().to(device)
    return _mc_workload(model.to(device), x, dims["S"], dict(dims))


@case(
    "models.lenet_mc",
    family="models",
    description="MC dropout of LeNet-5 (Dropout2d before conv2, Dropout before each Linear), S samples of a batch of "
    "1x32x32 images; bdlkern runs conv1 once; " + _targets("models.lenet_mc"),
    subject="bdlkern convert + sampling",
    baselines=MC_BASELINES,
    devices=("cpu",),
)
def _lenet_mc(device: torch.device, quick: bool) -> Workload:
    dims = LENET[_size(quick)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _lenet()
    x = torch.randn(dims["N"], 1, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    return _mc_workload(model.to(device), x, dims["S"], dict(dims))


@case(
    "models.vgg_head_mc",
    family="models",
    description="MC dropout of a VGG-11-style net at 1/4 width (convs 16-32-64-64-128-128-128-128, dropout only in "
    "the head), S samples of a batch of 3x32x32 images; bdlkern (and vmap) run the trunk once; "
    + _targets("models.vgg_head_mc"),
    subject="bdlkern convert + sampling",
    baselines=MC_BASELINES,
    devices=("cpu",),
)
def _vgg_mc(device: torch.device, quick: bool) -> Workload:
    dims = VGG[_size(quick)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _vgg(dims["widths"], dims["size"], dims["hidden"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(dims["N"], 3, dims["size"], dims["size"], generator=g).to(device)
    params = {**dims, "widths": "-".join(str(w) for w in dims["widths"])}
    return _mc_workload(model.to(device), x, dims["S"], params)


# ---- the trained sparse-VD MLP ------------------------------------------------------------------
def _vd_mlp() -> nn.Sequential:
    """``SparseVDLinear`` 64-300-100-10, ReLU between."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:])):
        layers.append(bdlkern.nn.SparseVDLinear(a, b))
        if i < len(MLP_SIZES) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@functools.lru_cache(maxsize=2)
def _trained_state(epochs: int, anneal: int) -> dict[str, torch.Tensor]:
    """The state dict of :func:`_vd_mlp` trained on the digits training split (module docstring):
    ``epochs`` epochs of Adam, the KL weight rising linearly to 1 over the first ``anneal``."""
    x_tr, y_tr, _, _ = _digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small GEMMs: one thread is faster, and the result the same for every --threads
    try:
        return _train(x_tr, y_tr, epochs, anneal)
    finally:
        torch.set_num_threads(threads)


def _train(x_tr: torch.Tensor, y_tr: torch.Tensor, epochs: int, anneal: int) -> dict[str, torch.Tensor]:
    """Trains a fresh :func:`_vd_mlp` on ``x_tr [n, 64]``, ``y_tr [n]`` (see :func:`_trained_state`)."""
    n = len(x_tr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _vd_mlp()
        opt = torch.optim.Adam(model.parameters(), lr=5e-3)
        for epoch in range(epochs):
            kl_weight = min(1.0, epoch / anneal)
            perm = torch.randperm(n)
            for i in range(0, n, 128):
                idx = perm[i : i + 128]
                opt.zero_grad()
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx]) + kl_weight * bdlkern.nn.kl_divergence(model) / n
                loss.backward()
                opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trained_vd(quick: bool, device: torch.device) -> nn.Sequential:
    """A fresh copy of the trained sparse-VD MLP, in eval mode on ``device``."""
    dims = PRUNED[_size(quick)]
    model = _vd_mlp()
    model.load_state_dict(_trained_state(dims["epochs"], dims["anneal"]))
    return model.to(device).eval()


def _vd_weights(model: nn.Sequential) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(W, V, b) of each ``SparseVDLinear``: ``W = theta * mask``, ``V = alpha theta^2 * mask``."""
    out = []
    with torch.no_grad():
        for m in model:
            if isinstance(m, bdlkern.nn.SparseVDLinear):
                keep = m.mask().to(m.theta.dtype)
                out.append((m.theta * keep, torch.exp(m.log_alpha) * m.theta**2 * keep, m.bias.clone()))
    return out


def _pruned_nets(quick: bool, device: torch.device):
    """(the trained sparse-VD model, prune(compacted) report, the uncompacted pruned model)."""
    vd = _trained_vd(quick, device)
    report = bdlkern.nn.prune(copy.deepcopy(vd))
    plain = bdlkern.nn.prune(copy.deepcopy(vd), compact=False).model
    return vd, report, plain.eval()


def _pruned_params(dims: dict, report, weights) -> dict:
    dense = sum(w.numel() for w, _, _ in weights)
    return {
        **{k: dims[k] for k in ("N", "epochs", "anneal")},
        "sizes": "-".join(map(str, MLP_SIZES)),
        "kept_weights": report.kept_weights,
        "density": round(report.kept_weights / dense, 4),
        "compacted": "-".join(str(r.shape_after[1]) for r in report.layers[:1])
        + "-" + "-".join(str(r.shape_after[0]) for r in report.layers),
        "dtype": "float32",
    }


@case(
    "models.pruned_mlp_eval",
    family="models",
    description="deterministic eval of a sparse-VD MLP 64-300-100-10 trained on the digits (~98% pruned), 64 test "
    "digits: prune() (compacted) vs the uncompacted pruned net and the dense eval model; "
    + _targets("models.pruned_mlp_eval"),
    subject="bdlkern prune(model)",
    baselines={"bdlkern prune(compact=False)": "variant", "dense eval model (nn.Linear)": "reference"},
    devices=("cpu",),
)
def _pruned_eval(device: torch.device, quick: bool) -> Workload:
    dims = PRUNED[_size(quick)]
    vd, report, plain = _pruned_nets(quick, device)
    compact = report.model.eval()
    weights = _vd_weights(vd)
    layers: list[nn.Module] = []
    for i, (w, _, b) in enumerate(weights):
        linear = nn.Linear(w.shape[1], w.shape[0]).to(device)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        layers.append(linear)
        if i < len(weights) - 1:
            layers.append(nn.ReLU())
    dense = nn.Sequential(*layers).eval()
    x = _digits()[2][: dims["N"]].contiguous().to(device)

    def check() -> None:
        with torch.no_grad():
            want = vd(x)
            for name, net in (("compacted", compact), ("uncompacted", plain), ("dense", dense)):
                torch.testing.assert_close(net(x), want, rtol=1e-4, atol=1e-4, msg=f"{name} vs the sparse-VD model")
            torch.testing.assert_close(compact(x), plain(x), rtol=1e-4, atol=1e-4)

    N = dims["N"]
    nnz, full = report.kept_weights, sum(w.numel() for w, _, _ in weights)
    return Workload(
        variants={
            "bdlkern prune(model)": _no_grad(lambda: compact(x)),
            "bdlkern prune(compact=False)": _no_grad(lambda: plain(x)),
            "dense eval model (nn.Linear)": _no_grad(lambda: dense(x)),
        },
        params=_pruned_params(dims, report, weights),
        elements=N * 10,
        flops={"bdlkern prune(model)": 2 * N * nnz, "bdlkern prune(compact=False)": 2 * N * nnz,
               "dense eval model (nn.Linear)": 2 * N * full},
        check=check,
    )


def _dense_lrt(weights, x: torch.Tensor, S: int) -> torch.Tensor:
    """S LRT samples of the MLP with dense ``(W, V, b)`` per layer on the replicated batch:
    ``[N, 64] -> [S, N, 10]`` (module docstring)."""
    h = _replicate(x, S)
    for i, (w, v, b) in enumerate(weights):
        mu = F.linear(h, w, b)
        var = F.linear(h * h, v)
        h = mu + torch.sqrt(var + 1e-8) * torch.randn_like(mu)
        if i < len(weights) - 1:
            h = torch.relu(h)
    return h.unflatten(0, (S, x.shape[0]))


@case(
    "models.pruned_mlp_lrt",
    family="models",
    description="S stochastic LRT samples of the trained sparse-VD MLP (~98% pruned) on 64 test digits: the "
    "compacted pruned net in sampling(S) vs the dense LRT formula on x.repeat(S, 1); "
    + _targets("models.pruned_mlp_lrt"),
    subject="bdlkern prune(model) + sampling",
    baselines={
        "dense LRT, batch replication (eager)": "reference",
        "dense LRT, batch replication (torch.compile)": "compiled",
        "bdlkern prune(compact=False) + sampling": "variant",
    },
    devices=("cpu",),
)
def _pruned_lrt(device: torch.device, quick: bool) -> Workload:
    dims = PRUNED[_size(quick)]
    S, N = dims["S"], dims["N"]
    vd, report, plain = _pruned_nets(quick, device)
    compact = report.model.eval()
    weights = _vd_weights(vd)
    x = _digits()[2][:N].contiguous().to(device)
    compiled = torch.compile(lambda x: _dense_lrt(weights, x, S))
    with torch.no_grad():
        compiled(x)  # compile here, not in the timed calls

    def sampled(net: nn.Module, samples: int, inp: torch.Tensor, seed: int | None = None) -> Callable[[], torch.Tensor]:
        def call():
            with bdlkern.sampling(samples, seed=seed) as st:
                return st.unfold(net(inp))

        return _no_grad(call)

    def variants_for(samples: int, inp: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
        return {
            "bdlkern prune(model) + sampling": sampled(compact, samples, inp),
            "dense LRT, batch replication (eager)": _no_grad(lambda: _dense_lrt(weights, inp, samples)),
            "dense LRT, batch replication (torch.compile)": _no_grad(lambda: compiled(inp)),  # compiled for S
            "bdlkern prune(compact=False) + sampling": sampled(plain, samples, inp),
        }

    variants = variants_for(S, x)

    def deterministic() -> None:
        with torch.no_grad():
            torch.testing.assert_close(compact(x), vd(x), rtol=1e-4, atol=1e-4)
        # One seed: the compacted net's samples are the uncompacted net's but for the dead units'
        # noise (std 1e-4 each, see bdlkern.nn.prune), far below the samples' own spread.
        a, b = sampled(compact, S, x, 0)(), sampled(plain, S, x, 0)()
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * scale)

    nnz, full = report.kept_weights, sum(w.numel() for w, _, _ in weights)
    return Workload(
        variants=variants,
        params={**_pruned_params(dims, report, weights), "S": S},
        elements=S * N * 10,
        # mean and variance products
        flops={name: 4 * S * N * (full if name.startswith("dense") else nnz) for name in variants},
        check=_check_mc(
            variants,
            variants_for(max(S, CHECK_SAMPLES), _check_input(x)),
            S,
            N,
            "dense LRT, batch replication (eager)",
            deterministic,
        ),
    )


# ---- memory of chunked MC prediction ------------------------------------------------------------
def _prediction_tensors(pred) -> tuple[torch.Tensor, ...]:
    """The tensors of an ``MCPrediction`` (what the harness measures as the call's output)."""
    return tuple(v for v in (getattr(pred, f.name) for f in dataclasses.fields(pred)) if isinstance(v, torch.Tensor))


@case(
    "models.mc_predict_chunk_memory",
    family="models",
    description="peak memory of mc_predict(lenet, x, 64, seed=0, sample_chunk=4) vs unchunked on the converted "
    "LeNet-5, batch 128 of 1x32x32; target: chunked peak <= 1/8 of the unchunked peak (the peak MiB column)",
    subject="bdlkern mc_predict sample_chunk=4",
    baselines={
        "bdlkern mc_predict unchunked": "variant",
        "eager loop over S": "reference",
        "eager batch replication": "reference",
    },
    devices=("cpu",),
)
def _chunk_memory(device: torch.device, quick: bool) -> Workload:
    dims = CHUNK[_size(quick)]
    S, N, chunk = dims["S"], dims["N"], dims["chunk"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _lenet().to(device)
    eager = _dropout_active(copy.deepcopy(model))
    converted = bdlkern.nn.convert(copy.deepcopy(model).eval())
    x = torch.randn(N, 1, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)

    def predict(sample_chunk: int | None) -> Callable[[], tuple[torch.Tensor, ...]]:
        def call():
            pred = bdlkern.uncertainty.mc_predict(converted, x, S, seed=0, sample_chunk=sample_chunk, progress=False)
            return _prediction_tensors(pred)

        return call

    variants = {
        "bdlkern mc_predict sample_chunk=4": predict(chunk),
        "bdlkern mc_predict unchunked": predict(None),
        "eager loop over S": _no_grad(lambda: _loop(eager, x, S)),
        "eager batch replication": _no_grad(lambda: _replicated(eager, x, S)),
    }

    def check() -> None:
        chunked, whole = variants["bdlkern mc_predict sample_chunk=4"](), variants["bdlkern mc_predict unchunked"]()
        assert chunked[0].shape == (S, N, 10), tuple(chunked[0].shape)
        assert len(chunked) == len(whole)
        # The same masks, so equal up to rounding: a GEMM / conv over 4 samples rounds differently
        # from one over 64 (~1e-7 here); a different mask would move a logit by O(1).
        for a, b in zip(chunked, whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg="chunked mc_predict differs from unchunked")
        assert not torch.equal(chunked[0][0], chunked[0][1]), "the samples do not differ"

    trunk, rest = _forward_flops(copy.deepcopy(model).eval(), x)
    return Workload(
        variants=variants,
        params={**dims, "p": P, "dtype": "float32"},
        elements=S * N * 10,
        flops={
            "bdlkern mc_predict sample_chunk=4": -(-S // chunk) * trunk + S * rest,  # the trunk once per chunk
            "bdlkern mc_predict unchunked": trunk + S * rest,
            "eager loop over S": S * (trunk + rest),
            "eager batch replication": S * (trunk + rest),
        },
        check=check,
    )
