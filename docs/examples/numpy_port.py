"""A cautious Lion written as a plain NumPy step function: the `numpy` target kind of `cautious verify`.

Convention: ``step(params, grads, state, **hparams) -> (params, state)``; ``state`` is a dict
keyed by the port's own names, ``{}`` when fresh.
"""

import numpy as np


def cautious_lion_step(params, grads, state, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0):
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
