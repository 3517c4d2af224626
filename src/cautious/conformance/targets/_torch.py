"""Targets that are ``torch.optim.Optimizer`` classes.

State is loaded the way a user resumes from a plain ``torch.optim`` checkpoint:
``load_state_dict`` with param groups that hold only torch.optim's own keys (no
``caution`` or other extra keys). An implementation whose caution setting lives in
the param groups and is lost on such a load is therefore caught.
"""

from __future__ import annotations

import numpy as np
import torch

from cautious import spec
from cautious.conformance.case import Case
from cautious.conformance.targets import TargetAdapterBase, resolve

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
TORCH_GROUP_KEYS = {
    "params", "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
    "differentiable", "fused", "momentum", "dampening", "nesterov", "decoupled_weight_decay", "initial_lr",
}  # fmt: skip


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy().copy()


class Adapter(TargetAdapterBase):
    def __init__(self, target):
        super().__init__(target)
        self.cls = resolve(target.path, target.sys_path)

    def step(self, case: Case, params, grads, state: spec.State):
        dt = DTYPES[case.dtype]
        sdt = DTYPES[case.state_storage]
        names = self.target.state_names()
        tp = [torch.tensor(np.asarray(p), dtype=dt) for p in params]
        opt = self.cls(tp, **self.kwargs(case))
        sd = opt.state_dict()
        groups = [{k: v for k, v in g.items() if k in TORCH_GROUP_KEYS} for g in sd["param_groups"]]
        loaded: dict = {}
        if state.step > 0 and names:
            for i, leaf in enumerate(state.leaves):
                entry = {}
                for field, name in names.items():
                    if field == "step":
                        entry[name] = torch.tensor(float(state.step))
                    elif getattr(leaf, field, None) is not None:
                        entry[name] = torch.tensor(np.asarray(getattr(leaf, field)), dtype=sdt)
                loaded[i] = entry
        opt.load_state_dict({"state": loaded, "param_groups": groups})
        for p, g in zip(tp, grads):
            p.grad = torch.tensor(np.asarray(g), dtype=dt)
        opt.step()
        new_params = [to_numpy(p) for p in tp]
        if not names:
            return new_params, None
        leaves = []
        step = state.step + 1
        for p, leaf in zip(tp, state.leaves):
            st = opt.state.get(p, {})
            fields = {}
            for field in leaf._fields:
                name = names.get(field)
                val = st.get(name) if name else None
                fields[field] = None if not isinstance(val, torch.Tensor) else to_numpy(val)
            if "step" in names and names["step"] in st:
                step = int(float(st[names["step"]]))
            leaves.append(type(leaf)(**fields))
        return new_params, spec.State(step, tuple(leaves))
