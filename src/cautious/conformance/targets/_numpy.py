"""Targets that are plain step functions over NumPy arrays.

Convention: ``step(params, grads, state, **hparams) -> (params, state)`` where
``state`` is a dict ``{"step": int, NAME: [arrays per tensor], ...}`` with the
target's state names (``Target.state``), and ``state == {}`` means fresh.
"""

from __future__ import annotations

import numpy as np

from cautious import spec
from cautious.conformance.case import Case
from cautious.conformance.targets import TargetAdapterBase, resolve


class Adapter(TargetAdapterBase):
    def __init__(self, target):
        super().__init__(target)
        self.fn = resolve(target.path, target.sys_path)

    def step(self, case: Case, params, grads, state: spec.State):
        names = self.target.state_names()
        st: dict = {}
        if state.step > 0 and names:
            for field, name in names.items():
                if field == "step":
                    st[name] = int(state.step)
                else:
                    st[name] = [getattr(leaf, field, None) for leaf in state.leaves]
        new_params, new_st = self.fn([p.copy() for p in params], [g.copy() for g in grads], st, **self.kwargs(case))
        new_params = [np.asarray(p) for p in new_params]
        if not names:
            return new_params, None
        leaves = []
        for i, leaf in enumerate(state.leaves):
            fields = {}
            for field in leaf._fields:
                name = names.get(field)
                val = new_st.get(name) if name else None
                fields[field] = None if val is None else np.asarray(val[i])
            leaves.append(type(leaf)(**fields))
        step = int(new_st[names["step"]]) if "step" in names else state.step + 1
        return new_params, spec.State(step, tuple(leaves))
