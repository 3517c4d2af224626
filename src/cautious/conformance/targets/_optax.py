"""Targets that are optax ``GradientTransformation`` factories.

State is loaded by field name anywhere in the optimizer state tree
(``optax.tree_utils.tree_set``): by default ``count`` -> step, ``mu`` -> m,
``nu`` -> v, ``nu_max`` -> v_max (``trace`` -> m for SGD). float64 needs
``JAX_ENABLE_X64=1``, which ``cautious verify`` sets for optax targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cautious import spec
from cautious.conformance.case import Case
from cautious.conformance.targets import TargetAdapterBase, resolve

DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _np(x) -> np.ndarray:
    x = np.asarray(jax.device_get(x))
    return x.astype(np.float32) if x.dtype.name in ("bfloat16", "float16") else x.copy()


class Adapter(TargetAdapterBase):
    def __init__(self, target):
        super().__init__(target)
        self.factory = resolve(target.path, target.sys_path)

    def supports(self, case: Case) -> str | None:
        if case.dtype == "float64" and not jax.config.jax_enable_x64:
            return "float64 needs JAX_ENABLE_X64=1"
        return super().supports(case)

    def step(self, case: Case, params, grads, state: spec.State):
        dt, sdt = DTYPES[case.dtype], DTYPES[case.state_storage]
        names = self.target.state_names()
        ps = [jnp.asarray(p, dtype=dt) for p in params]
        gs = [jnp.asarray(g, dtype=dt) for g in grads]
        tx = self.factory(**self.kwargs(case))
        st = tx.init(ps)
        if state.step > 0 and names:
            values = {}
            for field, name in names.items():
                if field == "step":
                    values[name] = jnp.asarray(state.step, dtype=jnp.int32)
                elif all(getattr(leaf, field, None) is not None for leaf in state.leaves):
                    values[name] = [jnp.asarray(getattr(leaf, field), dtype=sdt) for leaf in state.leaves]
            st = optax.tree_utils.tree_set(st, **values)
        updates, st2 = tx.update(gs, st, ps)
        new_params = [_np(p) for p in optax.apply_updates(ps, updates)]
        if not names:
            return new_params, None
        found = {
            field: optax.tree_utils.tree_get_all_with_path(st2, name) for field, name in names.items()
        }  # first match of each name
        step = int(found["step"][0][1]) if found.get("step") else state.step + 1
        leaves = []
        for i, leaf in enumerate(state.leaves):
            fields = {}
            for field in leaf._fields:
                hits = found.get(field) or []
                fields[field] = _np(hits[0][1][i]) if hits and hits[0][1] is not None else None
            leaves.append(type(leaf)(**fields))
        return new_params, spec.State(step, tuple(leaves))
