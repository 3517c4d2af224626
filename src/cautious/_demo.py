"""``cautious demo``: every base rule, with and without caution, on a toy problem (NumPy reference)."""

from __future__ import annotations

import numpy as np

import cautious
from cautious import spec


def _problem(seed: int = 0):
    """A small logistic regression with an ill-conditioned design: X (256x32), labels y."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((256, 32)) * np.logspace(0, 1.5, 32)
    w_true = rng.standard_normal(32)
    y = (X @ w_true + 0.5 * rng.standard_normal(256) > 0).astype(np.float64)
    return X, y


def _loss_grad(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    z = X @ w
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    grad = X.T @ (1.0 / (1.0 + np.exp(-z)) - y) / len(y)
    return loss, grad


CONFIGS = {
    "adamw": dict(lr=3e-2, weight_decay=1e-2),
    "adam": dict(lr=3e-2),
    "lion": dict(lr=3e-3, weight_decay=1e-2),
    "sgd": dict(lr=1e-3, momentum=0.9),
}


def run(steps: int = 200, seed: int = 0) -> list[tuple[str, float, float, float]]:
    """Rows of (rule, initial loss, final loss without caution, final loss with caution)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    X, y = _problem(seed)
    rows = []
    for rule, hp in CONFIGS.items():
        finals = []
        for caution in (False, cautious.Caution()):
            opt = getattr(spec, rule)(**hp, caution=caution)
            w = [np.zeros(32)]
            state = opt.init(w)
            first = _loss_grad(w[0], X, y)[0]
            for _ in range(steps):
                _, g = _loss_grad(w[0], X, y)
                w, state = opt.step(w, [g], state)
            finals.append(_loss_grad(w[0], X, y)[0])
        rows.append((rule, first, finals[0], finals[1]))
    return rows


def main(steps: int = 200) -> int:
    print(f"cautious {cautious.__version__}: reference optimizers on a 32-feature logistic regression, {steps} steps")
    print(f"{'rule':<8}{'initial':>10}{'plain':>10}{'cautious':>10}")
    for rule, first, plain, caut in run(steps):
        print(f"{rule:<8}{first:>10.4f}{plain:>10.4f}{caut:>10.4f}")
    return 0
