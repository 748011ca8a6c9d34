"""``bdlkern.nn.bayesianize`` (issue 17): the dense layers of a model turned into bdlkern layers in
place, checked against independent pure-PyTorch references (the dense forward with the weights
captured before the conversion, the sparse-VD pruning formula, the MC-dropout masks rebuilt from
the Philox stream), on a custom module with every kind of container, with the report, training on
the digits, sampling, and bad input. ``SparseVDLinear.from_linear`` and
``ConcreteDropoutLinear.from_linear`` are tested here too."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdlkern
from bdlkern.nn.bayesianize import BayesianizeReport, bayesianize
from bdlkern.testing import reference as ref

METHODS = ["mc_dropout", "concrete", "sparse_vd"]
OPTIONS = {"mc_dropout": {"p": 0.25}, "concrete": {"init_p": 0.2}, "sparse_vd": {}}
NEW_TYPES = {
    "mc_dropout": {nn.Linear: bdlkern.nn.MCDropoutLinear, nn.Conv2d: bdlkern.nn.MCDropoutConv2d},
    "concrete": {nn.Linear: bdlkern.nn.ConcreteDropoutLinear, nn.Conv2d: bdlkern.nn.ConcreteDropout},
    "sparse_vd": {nn.Linear: bdlkern.nn.SparseVDLinear, nn.Conv2d: bdlkern.nn.SparseVDConv2d},
}


class Block(nn.Module):
    """A custom module with its own forward: a conv attribute, a ModuleList holding a Linear and a
    nested Sequential, and a ModuleDict head."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1, dtype=dtype)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.body = nn.ModuleList([
            nn.Linear(12, 16, dtype=dtype),
            nn.Sequential(nn.ReLU(), nn.Sequential(nn.Linear(16, 16, dtype=dtype), nn.Tanh())),
        ])
        self.heads = nn.ModuleDict({"out": nn.Linear(16, 5, dtype=dtype)})

    def forward(self, x):
        h = self.pool(torch.relu(self.stem(x))).flatten(1)
        for layer in self.body:
            h = layer(h)
        return self.heads["out"](h)


#: The layers of Block in registration order, with their types.
BLOCK_LAYERS = [("stem", nn.Conv2d), ("body.0", nn.Linear), ("body.1.1.0", nn.Linear), ("heads.out", nn.Linear)]


def _away_from_zero(model: nn.Module, minimum: float = 0.01) -> nn.Module:
    """Every weight at least ``minimum`` in magnitude: typical trained weights, none pruned by the
    sparse-VD threshold at log_sigma2_init = -10 (|theta| > exp(-6.5) ~ 1.5e-3 is kept)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight"):
                param.copy_(torch.where(param >= 0, 1.0, -1.0) * param.abs().clamp(min=minimum))
    return model


def _dense_block_reference(params: dict, x: torch.Tensor) -> torch.Tensor:
    """Block's forward in plain functional PyTorch from a copy of its dense parameters."""
    h = F.adaptive_avg_pool2d(F.conv2d(x, params["stem.weight"], params["stem.bias"], padding=1).relu(), 2).flatten(1)
    h = F.linear(h, params["body.0.weight"], params["body.0.bias"])
    h = torch.tanh(F.linear(h.relu(), params["body.1.1.0.weight"], params["body.1.1.0.bias"]))
    return F.linear(h, params["heads.out.weight"], params["heads.out.bias"])


def _copy_params(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32, dtype=dtype), nn.ReLU(), nn.Linear(32, 10, dtype=dtype))


# ---- eval outputs against the dense model ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["mc_dropout", "concrete"])
def test_eval_output_is_the_dense_output_bit_for_bit(method):
    torch.manual_seed(0)
    model = Block().eval()
    params = _copy_params(model)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    report = bayesianize(model, method, **OPTIONS[method])
    assert len(report) == 4
    with torch.no_grad():
        assert torch.equal(model(x), _dense_block_reference(params, x))


def _pruning_reference(weight: torch.Tensor, log_sigma2_init: float, threshold: float) -> torch.Tensor:
    """The kept weights of the sparse-VD formula: log_alpha = clamp(log_sigma2 - log(theta^2 + 1e-8),
    -8, 8) < threshold, with theta = weight and log_sigma2 = log_sigma2_init."""
    log_alpha = (log_sigma2_init - torch.log(weight.double() ** 2 + 1e-8)).clamp(-8.0, 8.0)
    return log_alpha < threshold


def test_sparse_vd_eval_is_the_pruned_mean_and_typical_weights_are_not_pruned():
    torch.manual_seed(1)
    model = _away_from_zero(Block()).eval()
    params = _copy_params(model)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    report = bayesianize(model, "sparse_vd", log_sigma2_init=-10.0)
    assert len(report) == 4
    for path, _ in BLOCK_LAYERS:
        layer = model.get_submodule(path)
        assert _pruning_reference(params[f"{path}.weight"], -10.0, 3.0).all()
        assert torch.equal(layer.mask(), torch.ones_like(layer.mask())) and layer.sparsity() == 0.0
        assert torch.equal(layer.theta, params[f"{path}.weight"])
        assert torch.equal(layer.log_sigma2, torch.full_like(layer.theta, -10.0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _dense_block_reference(params, x), rtol=1e-12, atol=1e-12)


def test_sparse_vd_prunes_tiny_weights_as_the_formula_says():
    """|theta| tiny: log_alpha = -10 - log(theta^2 + 1e-8) >= 3 for |theta| <~ 1.5e-3, so those
    weights are pruned from the start and the eval output is that of W * keep."""
    model = _mlp()
    with torch.no_grad():
        w = model[2].weight
        w[0, :5] = torch.tensor([0.0, 1e-4, -1e-3, 2e-3, -0.5], dtype=w.dtype)
    params = _copy_params(model)
    model.eval()
    bayesianize(model, "sparse_vd", layers=["2"], threshold=3.0, log_sigma2_init=-10.0)
    keep = _pruning_reference(params["2.weight"], -10.0, 3.0)
    assert keep[0, :5].tolist() == [False, False, False, True, True]
    assert torch.equal(model[2].mask(), keep)
    x = torch.randn(7, 64, dtype=torch.float64)
    h = F.linear(x, params["0.weight"], params["0.bias"]).relu()
    expected = F.linear(h, params["2.weight"] * keep, params["2.bias"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


# ---- which layers, where, and the report ----------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_every_method_converts_every_layer_of_a_custom_module(method):
    torch.manual_seed(2)
    model = Block()
    params = _copy_params(model)
    report = bayesianize(model, method, **OPTIONS[method])
    assert isinstance(report, BayesianizeReport) and report.model is model and report.method == method
    assert [path for path, _, _ in report.converted] == [path for path, _ in BLOCK_LAYERS]
    assert report.skipped == []
    for (path, old_type), (_, old_name, new_name) in zip(BLOCK_LAYERS, report.converted):
        layer = model.get_submodule(path)
        assert type(layer) is NEW_TYPES[method][old_type]
        assert (old_name, new_name) == (old_type.__name__, type(layer).__name__)
        if method == "sparse_vd":
            weight = layer.theta
        else:
            weight = layer.layer.weight if path == "stem" and method == "concrete" else layer.weight
        assert torch.equal(weight, params[f"{path}.weight"])
    # the containers are still the model's own
    assert isinstance(model.body, nn.ModuleList) and isinstance(model.heads, nn.ModuleDict)
    assert isinstance(model.body[1][1], nn.Sequential)


def test_layers_last_predicate_and_names_select_the_right_layers():
    def converted(report):
        return [path for path, _, _ in report.converted]

    model = Block()
    report = bayesianize(model, "mc_dropout", p=0.1, layers="last")
    assert converted(report) == ["heads.out"]
    assert [(path, reason) for path, _, reason in report.skipped] == [
        (path, "not selected by layers='last'") for path, _ in BLOCK_LAYERS[:-1]
    ]
    assert type(model.stem) is nn.Conv2d and type(model.body[0]) is nn.Linear

    model = Block()
    report = bayesianize(
        model, "sparse_vd", layers=lambda name, m: isinstance(m, nn.Linear) and name.startswith("body")
    )
    assert converted(report) == ["body.0", "body.1.1.0"]
    assert type(model.heads["out"]) is nn.Linear and type(model.stem) is nn.Conv2d

    model = Block()
    report = bayesianize(model, "concrete", layers=(name for name in ["stem", "body.1.1.0"]))
    assert converted(report) == ["stem", "body.1.1.0"]
    assert type(model.body[0]) is nn.Linear and type(model.heads["out"]) is nn.Linear

    # the predicate sees every convertible layer with its qualified name, in registration order
    model, seen = Block(), []
    bayesianize(model, "mc_dropout", p=0.1, layers=lambda name, m: seen.append((name, type(m))) or name == "stem")
    assert seen == BLOCK_LAYERS


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_keys_follow_the_report(method):
    """mc_dropout keeps every key; the others rename / add what report says, and a dense
    checkpoint loads into the converted model through report.renamed_keys."""
    torch.manual_seed(3)
    model = Block()
    dense_state = _copy_params(model)
    report = bayesianize(model, method, **OPTIONS[method])
    keys = set(model.state_dict())
    assert keys == {report.renamed_keys.get(k, k) for k in dense_state} | set(report.new_keys)
    if method == "mc_dropout":
        assert keys == set(dense_state) and not report.renamed_keys and not report.new_keys
    elif method == "sparse_vd":
        assert report.renamed_keys["body.0.weight"] == "body.0.theta" and "body.0.bias" not in report.renamed_keys
        assert "body.0.log_sigma2" in report.new_keys
    else:
        assert report.renamed_keys == {"stem.weight": "stem.layer.weight", "stem.bias": "stem.layer.bias"}
        assert set(report.new_keys) == {f"{path}.p_logit" for path, _ in BLOCK_LAYERS}
    fresh = Block()
    bayesianize(fresh, method, **OPTIONS[method])
    missing, unexpected = fresh.load_state_dict(
        {report.renamed_keys.get(k, k): v for k, v in dense_state.items()}, strict=False
    )
    assert set(missing) == set(report.new_keys) and unexpected == []
    for k, v in dense_state.items():
        assert torch.equal(fresh.state_dict()[report.renamed_keys.get(k, k)], v)


def test_report_lists_skipped_layers_with_paths_and_reasons():
    class MyLinear(nn.Linear):
        pass

    shared = nn.Linear(4, 4)
    model = nn.Sequential()
    model.add_module("reflect", nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    model.add_module("mc", bdlkern.nn.MCDropoutLinear(4, 4, p=0.1))
    model.add_module("wrapped", bdlkern.nn.ConcreteDropout(nn.Conv2d(2, 2, 1)))
    model.add_module("sub", MyLinear(4, 4))
    model.add_module("tied_a", shared)
    model.add_module("tied_b", shared)
    model.add_module("up", nn.ConvTranspose2d(2, 2, 3))
    model.add_module("fc", nn.Linear(4, 4))
    report = bayesianize(model, "mc_dropout", p=0.2)
    assert report.converted == [("fc", "Linear", "MCDropoutLinear")]
    skipped = {path: (name, reason) for path, name, reason in report.skipped}
    assert set(skipped) == {"reflect", "mc", "wrapped", "sub", "tied_a", "tied_b", "up"}
    assert skipped["reflect"][0] == "Conv2d" and "padding_mode='reflect'" in skipped["reflect"][1]
    assert skipped["mc"] == ("MCDropoutLinear", "already a bdlkern layer")
    assert skipped["wrapped"] == ("ConcreteDropout", "already a bdlkern layer")  # its conv is not entered
    assert "subclass of nn.Linear" in skipped["sub"][1]
    assert "'tied_b'" in skipped["tied_a"][1] and "'tied_a'" in skipped["tied_b"][1]
    assert "transposed" in skipped["up"][1]
    assert type(model.reflect) is nn.Conv2d and model.tied_a is shared and model.tied_b is shared
    assert type(model.wrapped.layer) is nn.Conv2d
    text = str(report)
    assert "1 converted, 7 skipped" in text
    for path in ["fc", *skipped]:
        assert path in text
    assert "-> MCDropoutLinear" in text and "already a bdlkern layer" in text

    # the same reflect conv is converted by concrete (ConcreteDropout runs the conv's own forward)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    bayesianize(model, "concrete")
    assert type(model[0]) is bdlkern.nn.ConcreteDropout

    # a name inside a bdlkern layer is reported, not converted
    model = nn.Sequential(bdlkern.nn.ConcreteDropout(nn.Conv2d(2, 2, 1)), nn.Linear(3, 3))
    report = bayesianize(model, "sparse_vd", layers=["0.layer", "1"])
    assert ("0.layer", "Conv2d", "inside the bdlkern layer '0', which is not entered") in report.skipped
    assert report.converted == [("1", "Linear", "SparseVDLinear")]


def test_training_mode_device_dtype_and_requires_grad_are_kept():
    for training in (False, True):
        model = Block().train(training)
        model.body[1].train(not training)  # a mixed model keeps each layer's own mode
        bayesianize(model, "concrete")
        assert model.stem.training is training and model.stem.layer.training is training
        assert model.body[0].training is training and model.heads["out"].training is training
        assert model.body[1][1][0].training is (not training)
        assert model.body[0].weight.dtype == torch.float64 and model.body[0].p_logit.dtype == torch.float64
    model = Block()
    model.body[0].weight.requires_grad_(False)
    bayesianize(model, "sparse_vd")
    assert not model.body[0].theta.requires_grad and model.body[0].bias.requires_grad
    assert model.body[0].log_sigma2.requires_grad and model.heads["out"].theta.requires_grad


# ---- training and sampling ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


@pytest.mark.parametrize("method", METHODS)
def test_the_converted_model_trains_on_the_digits(method, digits):
    x, y = digits
    model = _mlp(torch.float32)
    report = bayesianize(model, method, **OPTIONS[method])
    assert len(report) == 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = F.cross_entropy(model(x), y).item()
        model.train()
        return loss

    before = eval_loss()
    model.train()
    torch.manual_seed(0)
    for _ in range(25):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if method == "sparse_vd":
            loss = loss + bdlkern.nn.kl_divergence(model) / len(x)
        elif method == "concrete":
            loss = loss + bdlkern.nn.regularization(model)
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.9 * before, (before, after)  # measured: 0.55 (mc_dropout), 0.48 (concrete), 0.85 (sparse_vd)
    new_param = {"mc_dropout": None, "concrete": "p_logit", "sparse_vd": "log_sigma2"}[method]
    if new_param is not None:
        grad = getattr(model[2], new_param).grad
        assert grad is not None and grad.abs().sum() > 0


def test_sampling_mc_dropout_on_the_last_layer_matches_the_fused_op_and_the_reference():
    torch.manual_seed(4)
    model = _mlp().eval()
    params = _copy_params(model)
    bayesianize(model, "mc_dropout", p=0.3, layers="last")
    assert type(model[0]) is nn.Linear and type(model[2]) is bdlkern.nn.MCDropoutLinear
    x = torch.randn(200, 64, dtype=torch.float64)
    S, seed = 8, 0
    with bdlkern.sampling(S, seed=seed):
        y = model(x)
    with bdlkern.sampling(S, seed=seed):
        again = model(x)
    with bdlkern.sampling(S, seed=seed + 1):
        other = model(x)
    assert y.shape == (S, 200, 10)
    assert torch.equal(y, again) and not torch.equal(y, other)
    h = F.linear(x, params["0.weight"], params["0.bias"]).relu()
    dense = F.linear(h, params["2.weight"], params["2.bias"])
    # The only MC layer is call 0 of the seeded block: rng_state [seed, 0 << 40] (bdlkern._sampling).
    rng_state = torch.tensor([seed, 0], dtype=torch.int64)
    expected = ref.mc_dropout_linear(h, params["2.weight"], params["2.bias"], 0.3, S, rng_state=rng_state)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    fused = bdlkern.ops.mc_dropout_linear(h, params["2.weight"], params["2.bias"], 0.3, S, rng_state=rng_state)
    assert torch.equal(y, fused)
    assert (y.std(0) > 0).float().mean() > 0.99  # the samples vary over S
    assert (y.mean(0) - dense).abs().mean() < 0.5 * dense.abs().mean()  # a loose check of the mean


@pytest.mark.parametrize("method", METHODS)
def test_a_converted_custom_module_samples(method):
    """Every method on the custom conv + linear module: inside sampling the first MC layer is the
    conv, so the samples are folded ([S * N, out]); a seed repeats them."""
    torch.manual_seed(5)
    model = Block().eval()
    bayesianize(model, method, **OPTIONS[method])
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    with bdlkern.sampling(4, seed=1):
        y = model(x)
    with bdlkern.sampling(4, seed=1):
        again = model(x)
    assert y.shape == (4 * 3, 5) and torch.equal(y, again)
    assert not torch.equal(bdlkern.unfold_samples(y, 4)[0], bdlkern.unfold_samples(y, 4)[1])


# ---- the from_linear constructors -------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_from_linear_copies_weights_device_dtype_and_mode(training):
    dense = nn.Linear(6, 4, dtype=torch.float64).train(training)
    svd = bdlkern.nn.SparseVDLinear.from_linear(dense, threshold=2.0, log_sigma2_init=-8.0)
    assert torch.equal(svd.theta, dense.weight) and torch.equal(svd.bias, dense.bias)
    assert svd.theta is not dense.weight and svd.theta.dtype == torch.float64 and svd.training is training
    assert svd.threshold == 2.0 and torch.equal(svd.log_sigma2, torch.full((4, 6), -8.0, dtype=torch.float64))
    cd = bdlkern.nn.ConcreteDropoutLinear.from_linear(dense, init_p=0.3, temperature=0.2)
    assert torch.equal(cd.weight, dense.weight) and torch.equal(cd.bias, dense.bias) and cd.training is training
    assert cd.temperature == 0.2 and math.isclose(cd.p.item(), 0.3, rel_tol=1e-12)
    nobias = nn.Linear(3, 2, bias=False)
    assert bdlkern.nn.SparseVDLinear.from_linear(nobias).bias is None
    assert bdlkern.nn.ConcreteDropoutLinear.from_linear(nobias).bias is None
    for cls in (bdlkern.nn.SparseVDLinear, bdlkern.nn.ConcreteDropoutLinear):
        with pytest.raises(TypeError, match="expected an nn.Linear, got Conv1d"):
            cls.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match="in_features is taken from linear"):
        bdlkern.nn.ConcreteDropoutLinear.from_linear(dense, in_features=3)


# ---- bad input -------------------------------------------------------------------------------------------
def test_bad_input():
    model = _mlp()
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        bayesianize({"fc": nn.Linear(2, 2)}, "mc_dropout", p=0.1)
    with pytest.raises(ValueError, match="method must be one of 'mc_dropout', 'concrete', 'sparse_vd', got 'dropout'"):
        bayesianize(model, "dropout", p=0.1)
    for p in (None, 0, 0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p"):
            bayesianize(model, "mc_dropout", p=p)
    with pytest.raises(TypeError, match="p must be a real number"):
        bayesianize(model, "mc_dropout", p="0.5")
    with pytest.raises(ValueError, match="p is an option of method='mc_dropout', not of method='concrete'"):
        bayesianize(model, "concrete", p=0.1)
    with pytest.raises(ValueError, match="init_p must be in"):
        bayesianize(model, "concrete", init_p=1.0)
    with pytest.raises(ValueError, match="mask must be 'element' or 'channel'"):
        bayesianize(model, "mc_dropout", p=0.1, mask="pixel")
    with pytest.raises(ValueError, match="threshold must be finite"):
        bayesianize(model, "sparse_vd", threshold=float("inf"))
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        bayesianize(model, "concrete", temprature=0.1)
    with pytest.raises(ValueError, match="are options of method='concrete'"):
        bayesianize(model, "mc_dropout", p=0.1, temperature=0.1)
    with pytest.raises(TypeError, match="layers must be .* got int"):
        bayesianize(model, "mc_dropout", p=0.1, layers=3)
    with pytest.raises(ValueError, match="layers must be .* got the string 'first'"):
        bayesianize(model, "mc_dropout", p=0.1, layers="first")
    with pytest.raises(ValueError, match="layers names 'fc9', which is not a submodule"):
        bayesianize(model, "mc_dropout", p=0.1, layers=["0", "fc9"])
    with pytest.raises(ValueError, match="layers names '1', a ReLU, not an nn.Linear"):
        bayesianize(model, "mc_dropout", p=0.1, layers=["1"])
    with pytest.raises(TypeError, match="module names"):
        bayesianize(model, "mc_dropout", p=0.1, layers=[0])
    with pytest.raises(ValueError, match="selected no layer"):
        bayesianize(model, "mc_dropout", p=0.1, layers=lambda name, m: False)
    with pytest.raises(ValueError, match="selected no layer"):
        bayesianize(model, "mc_dropout", p=0.1, layers=[])
    with pytest.raises(ValueError, match="selected no layer"):
        bayesianize(nn.Sequential(nn.ReLU(), nn.Flatten()), "concrete")
    with pytest.raises(ValueError, match="no layer could be converted"):
        bayesianize(nn.Sequential(nn.Conv1d(2, 2, 3, padding_mode="circular")), "sparse_vd")
    with pytest.raises(ValueError, match="model is itself an nn.Linear.*wrap it"):
        bayesianize(nn.Linear(3, 3), "mc_dropout", p=0.1)
    with pytest.raises(ValueError, match="model is itself an nn.Conv2d"):
        bayesianize(nn.Conv2d(3, 3, 1), "sparse_vd")
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))  # nothing was changed on the way
    # converting twice: every layer is already a bdlkern layer
    bayesianize(model, "mc_dropout", p=0.1)
    with pytest.raises(ValueError, match=r"(?s)selected no layer.*already a bdlkern layer"):
        bayesianize(model, "mc_dropout", p=0.1)
    with pytest.raises(ValueError, match="already a bdlkern layer"):
        bayesianize(bdlkern.nn.SparseVDLinear(3, 3), "sparse_vd")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_an_error_while_converting_leaves_the_model_untouched():
    """Every layer is converted before any is replaced: the second layer fails (a Concrete rate
    needs at least one input feature), and the first one is still the dense layer."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(0, 2))
    first = model[0]
    with pytest.raises(ValueError, match="input_dim must be an int >= 1"):
        bayesianize(model, "concrete")
    assert model[0] is first and type(model[1]) is nn.Linear
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        bayesianize(model, "concrete", temperature=-1.0)
    assert model[0] is first
