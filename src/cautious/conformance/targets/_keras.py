"""Targets that are Keras 3 optimizer classes.

State is loaded into the optimizer's slot variables by attribute name: by default
``iterations`` -> step, ``_momentums`` -> m, ``_velocities`` -> v,
``_velocity_hats`` -> v_max (Adam, AdamW, Lion). Keras's SGD buffer carries
``-lr`` times the spec's momentum, so SGD targets are checked from fresh states
unless a mapping is given.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from cautious import spec  # noqa: E402
from cautious.conformance.case import Case  # noqa: E402
from cautious.conformance.targets import DEFAULT_STATE_NAMES, TargetAdapterBase, resolve  # noqa: E402

DEFAULT_STATE_NAMES.setdefault(
    "keras",
    {
        "adam": {"m": "_momentums", "v": "_velocities", "v_max": "_velocity_hats", "step": "iterations"},
        "lion": {"m": "_momentums", "step": "iterations"},
        "sgd": {},
    },
)


def _np(v) -> np.ndarray:
    x = keras.ops.convert_to_numpy(v)
    return x.astype(np.float32) if x.dtype.name in ("bfloat16", "float16") else np.array(x)


class Adapter(TargetAdapterBase):
    def __init__(self, target):
        super().__init__(target)
        self.cls = resolve(target.path, target.sys_path)

    def step(self, case: Case, params, grads, state: spec.State):
        names = self.target.state_names()
        variables = [keras.Variable(np.asarray(p), dtype=case.dtype) for p in params]
        opt = self.cls(**self.kwargs(case))
        opt.build(variables)
        if state.step > 0 and names:
            for field, name in names.items():
                if field == "step":
                    getattr(opt, name).assign(state.step)
                    continue
                slots = getattr(opt, name, None) or []
                for slot, leaf in zip(slots, state.leaves):
                    value = getattr(leaf, field, None)
                    if value is not None and slot is not None:
                        slot.assign(np.asarray(value))
        opt.apply_gradients(
            zip([keras.ops.convert_to_tensor(np.asarray(g), dtype=case.dtype) for g in grads], variables)
        )
        new_params = [_np(v) for v in variables]
        if not names:
            return new_params, None
        leaves = []
        for i, leaf in enumerate(state.leaves):
            fields = {}
            for field in leaf._fields:
                slots = getattr(opt, names[field], None) if field in names else None
                fields[field] = _np(slots[i]) if slots and slots[i] is not None else None
            leaves.append(type(leaf)(**fields))
        step = int(_np(opt.iterations)) if "step" in names else state.step + 1
        return new_params, spec.State(step, tuple(leaves))
