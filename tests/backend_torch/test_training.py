"""A small MLP trains with every base rule, cautious or not."""

import pytest
import torch

import cautious.torch as ct
from cautious import Caution

MAKERS = {
    "adamw": lambda ps, c: ct.AdamW(ps, lr=3e-3, caution=c),
    "adam": lambda ps, c: ct.Adam(ps, lr=3e-3, weight_decay=1e-4, caution=c),
    "lion": lambda ps, c: ct.Lion(ps, lr=1e-3, weight_decay=1e-2, caution=c),
    "sgd": lambda ps, c: ct.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, caution=c),
}


@pytest.mark.parametrize("caution", [False, True, Caution("count_plus_one")], ids=repr)
@pytest.mark.parametrize("rule", list(MAKERS))
def test_mlp_loss_decreases_over_200_steps(rule, caution):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=gen)
    w_true = torch.randn(8, 1, generator=gen)
    y = torch.tanh(x @ w_true) + 0.05 * torch.randn(128, 1, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = MAKERS[rule](model.parameters(), caution)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
