"""The SparseVD MLP on sklearn's bundled digits, shared by the training tests: the README's
sparsity claim (test_sparse_vd.py) and the log-uniform vs ARD prior comparison (test_ard.py)."""

from __future__ import annotations

import torch
from torch import nn

import bdlkern


def digits_split():
    """(x_train, x_test, y_train, y_test): pixels scaled to [0, 1], a stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def train_sparse_vd_mlp(prior: str = "log_uniform", epochs: int = 100, seed: int = 0) -> tuple[float, float]:
    """Trains the MLP 64-300-100-10 of SparseVDLinear with KL prior ``prior`` (Adam 5e-3, batches
    of 128, the KL warmed up linearly over the first 20 epochs as in the papers' experiments, loss
    CE + KL / N_train) and returns (test accuracy of the pruned deterministic network, fraction of
    the weights pruned at log_alpha >= 3). The caller sets the thread count."""
    x_tr, x_te, y_tr, y_te = digits_split()
    torch.manual_seed(seed)
    model = nn.Sequential(
        bdlkern.nn.SparseVDLinear(64, 300, prior=prior), nn.ReLU(),
        bdlkern.nn.SparseVDLinear(300, 100, prior=prior), nn.ReLU(),
        bdlkern.nn.SparseVDLinear(100, 10, prior=prior),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    n = len(x_tr)
    for epoch in range(epochs):
        kl_weight = min(1.0, epoch / 20)
        perm = torch.randperm(n)
        for i in range(0, n, 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]) + kl_weight * bdlkern.nn.kl_divergence(model) / n
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(-1) == y_te).double().mean().item()
    layers = [m for m in model if isinstance(m, bdlkern.nn.SparseVDLinear)]
    total = sum(m.theta.numel() for m in layers)
    pruned = sum(m.sparsity() * m.theta.numel() for m in layers) / total
    return acc, pruned
