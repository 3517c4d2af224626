"""A cautious Lion written as a plain NumPy step function: the `numpy` target kind of `cautious verify`.

Convention: ``step(params, grads, state, **hparams) -> (params, state)``; ``state`` is a dict
keyed by the port's own names, ``{}`` when fresh.
"""

import numpy as np


def cautious_lion_step(params, grads, state, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0):
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    moms = state.get("exp_avg") or [np.zeros_like(p) for p in params]
    new_params, new_moms = [], []
    for p, g, m in zip(params, grads, moms):
        u = np.sign(beta1 * m + (1 - beta1) * g)
        keep = ((u > 0) & (g > 0)) | ((u < 0) & (g < 0)) | np.isnan(u) | np.isnan(g)
        scale = 1.0 / max(np.count_nonzero(keep) / max(u.size, 1), 1e-3)
        u_c = np.where(keep, u * scale, 0.0)
        new_params.append((p - lr * weight_decay * p - lr * u_c).astype(p.dtype))
        new_moms.append((beta2 * m + (1 - beta2) * g).astype(m.dtype))
    return new_params, {"exp_avg": new_moms, "steps": state.get("steps", 0) + 1}
