"""The reference's base rules (caution off) equal torch.optim's, in float64, over several steps."""

import numpy as np
import pytest
import torch

from cautious import spec

CASES = [
    ("adamw", torch.optim.AdamW, dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)),
    ("adamw", torch.optim.AdamW, dict(lr=0.05, betas=(0.5, 0.9), eps=1e-3, weight_decay=0.0, amsgrad=True)),
    ("adamw", torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01, maximize=True)),
    ("adam", torch.optim.Adam, dict(lr=0.05, weight_decay=0.1)),
    ("adam", torch.optim.Adam, dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True)),
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)),
    ("sgd", torch.optim.SGD, dict(lr=0.1)),
]


@pytest.mark.parametrize(("rule", "cls", "hp"), CASES, ids=lambda x: str(x) if isinstance(x, str) else None)
def test_caution_off_equals_torch_optim(rule, cls, hp):
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5,), ()]
    params = [rng.standard_normal(s) for s in shapes]
    tparams = [torch.tensor(p, requires_grad=True) for p in params]
    topt = cls(tparams, **hp)
    opt = getattr(spec, rule)(**hp, caution=False)
    state = opt.init(params)
    for _ in range(6):
        grads = [rng.standard_normal(s) for s in shapes]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        topt.step()
        params, state = opt.step(params, grads, state)
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)
