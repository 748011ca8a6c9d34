"""Serialisation of every bdlkern module: state_dict into a fresh module and torch.save/torch.load
of the whole module give the same outputs in eval, in training (same seed) and inside sampling."""

import io

import pytest
import torch
from torch import nn

import bdlkern


def _mlp_with(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mc_dropout":
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), bdlkern.nn.MCDropoutLinear(16, 3, p=0.3))
    if kind == "concrete_linear":
        return nn.Sequential(bdlkern.nn.ConcreteDropoutLinear(6, 16, init_p=0.2, per_feature=True), nn.ReLU(), nn.Linear(16, 3))
    if kind == "concrete_wrapper":
        return nn.Sequential(bdlkern.nn.ConcreteDropout(nn.Linear(6, 16), init_p=0.25), nn.ReLU(), nn.Linear(16, 3))
    if kind == "sparse_vd":
        model = nn.Sequential(bdlkern.nn.SparseVDLinear(6, 16), nn.ReLU(), bdlkern.nn.SparseVDLinear(16, 3))
        with torch.no_grad():
            for m in model:
                if isinstance(m, bdlkern.nn.SparseVDLinear):
                    m.log_sigma2.copy_(torch.randn_like(m.log_sigma2) * 4 + torch.log(m.theta**2))
        return model
    if kind == "sparse_linear":
        layer = bdlkern.nn.SparseVDLinear(6, 16)
        with torch.no_grad():
            layer.log_sigma2.copy_(torch.randn_like(layer.log_sigma2) * 4 + torch.log(layer.theta**2))
        return nn.Sequential(layer.to_sparse(), nn.ReLU(), nn.Linear(16, 3))
    raise ValueError(kind)


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    out = [model(x)]
    with bdlkern.sampling(4, seed=7):
        out.append(model(x))
    model.train()
    torch.manual_seed(3)
    out.append(model(x))
    model.eval()
    return [o.detach() for o in out]


KINDS = ["mc_dropout", "concrete_linear", "concrete_wrapper", "sparse_vd", "sparse_linear"]


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    model = _mlp_with(kind)
    x = torch.randn(5, 6)
    expected = _outputs(model, x)
    fresh = _mlp_with(kind)
    with torch.no_grad():  # make sure the fresh module differs before loading
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(model.state_dict())
    for got, exp in zip(_outputs(fresh, x), expected):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_save_load_whole_module(kind):
    model = _mlp_with(kind)
    x = torch.randn(5, 6)
    expected = _outputs(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for got, exp in zip(_outputs(loaded, x), expected):
        torch.testing.assert_close(got, exp)
    # and the weights-only format, through state_dict
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _mlp_with(kind)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for got, exp in zip(_outputs(fresh, x), expected):
        torch.testing.assert_close(got, exp)
