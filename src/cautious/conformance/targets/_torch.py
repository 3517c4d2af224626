"""Targets that are ``torch.optim.Optimizer`` classes.

State is loaded in the port's own format: the suite first learns the structure of the
port's ``state_dict()`` (every per-parameter key with its type, every param-group
key) from a throw-away instance that took one step, then writes the spec's state into
that structure: param groups keep all their keys (a ``caution`` flag stays), ``step``
keeps the type the port stores (a Python int, a float, or a tensor of its dtype), and
keys nobody mapped are reported. A step counter held in the param group is mapped as
``step = "group:step"``. Nested or transformed state goes through the target's
``load_state`` / ``dump_state`` hooks.

Resuming from a *plain* ``torch.optim`` checkpoint (param groups with only
torch.optim's keys, ``step`` a float32 tensor) is its own check
(:meth:`Adapter.step_plain_checkpoint`, the profile clause ``resume_plain_checkpoint``):
a port whose caution lives in the param groups and is lost on such a load deviates there.
"""

from __future__ import annotations

import copy
from typing import Any

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
GROUP = "group:"


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy().copy()


def _like(template: Any, step: int) -> Any:
    """``step`` in the type the port stores its counter in."""
    if isinstance(template, torch.Tensor):
        return torch.full_like(template, float(step))
    if isinstance(template, float):
        return float(step)
    return int(step)


class Adapter(TargetAdapterBase):
    def __init__(self, target):
        super().__init__(target)
        self.cls = resolve(target.path, target.sys_path)
        self.load_hook = resolve(target.load_state, target.sys_path) if target.load_state else None
        self.dump_hook = resolve(target.dump_state, target.sys_path) if target.dump_state else None
        self.unmapped: set[str] = set()

    # -------------------------------------------------------------------------------- building
    def _build(self, case: Case, params) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        dt = DTYPES[case.dtype]
        tp = [torch.tensor(np.asarray(p), dtype=dt) for p in params]
        return self.cls(tp, **self.kwargs(case)), tp

    def _template(self, case: Case, params) -> dict:
        """The port's own ``state_dict()`` after one step from zeros: its keys and types."""
        opt, tp = self._build(case, [np.zeros_like(p) for p in params])
        for p in tp:
            p.grad = torch.ones_like(p)
        opt.step()
        return opt.state_dict()

    def _load(self, opt, tp, case: Case, state: spec.State, plain: bool) -> None:
        if state.step == 0:
            return
        if self.load_hook is not None:
            self.load_hook(opt, state)
            return
        names = self.target.state_names()
        field_of = {name: field for field, name in names.items()}
        sdt = DTYPES[case.state_storage]
        own = opt.state_dict()
        tmpl = {"state": {}, "param_groups": own["param_groups"]} if plain else self._template(case, state_params(tp))
        groups = copy.deepcopy(own["param_groups"])
        if plain:
            groups = [{k: v for k, v in g.items() if k in TORCH_GROUP_KEYS} for g in groups]
        loaded: dict = {}
        for i, leaf in enumerate(state.leaves):
            entry: dict = {}
            keys = dict(tmpl["state"].get(i, {}))
            if plain:  # what torch.optim itself writes: the mapped keys, step a float32 tensor
                keys = {n: torch.tensor(0.0) if f == "step" else None for f, n in names.items()}
                keys = {n: v for n, v in keys.items() if not n.startswith(GROUP)}
            for key, tval in keys.items():
                field = field_of.get(key)
                if field == "step":
                    entry[key] = _like(tval, state.step)
                elif field is not None and getattr(leaf, field, None) is not None:
                    dtype = tval.dtype if isinstance(tval, torch.Tensor) and tval.is_floating_point() else sdt
                    entry[key] = torch.tensor(np.asarray(getattr(leaf, field)), dtype=dtype)
                elif field is None:
                    self.unmapped.add(key)
                    entry[key] = tval  # not mapped: the port's own value after one step from zeros
            loaded[i] = entry
        step_name = names.get("step", "")
        if step_name.startswith(GROUP):
            key = step_name[len(GROUP) :]
            for g, tg in zip(groups, tmpl["param_groups"]):
                g[key] = _like(tg.get(key, 0), state.step)
        opt.load_state_dict({"state": loaded, "param_groups": groups})

    def _dump(self, opt, tp, state: spec.State, step: int) -> spec.State | None:
        if self.dump_hook is not None:
            out = self.dump_hook(opt)
            leaves = tuple(
                type(leaf)(**{f: (None if d.get(f) is None else _np(d[f])) for f in leaf._fields})
                for leaf, d in zip(state.leaves, out["leaves"])
            )
            return spec.State(int(out["step"]), leaves)
        names = self.target.state_names()
        if not names:
            return None
        leaves = []
        for p, leaf in zip(tp, state.leaves):
            st = opt.state.get(p, {})
            self.unmapped.update(k for k in st if k not in names.values())
            fields = {}
            for field in leaf._fields:
                name = names.get(field)
                val = st.get(name) if name else None
                fields[field] = None if not isinstance(val, torch.Tensor) else to_numpy(val)
            leaves.append(type(leaf)(**fields))
        step_name = names.get("step")
        if step_name and step_name.startswith(GROUP):
            step = int(float(opt.param_groups[0][step_name[len(GROUP) :]]))
        elif step_name:
            found = [opt.state[p][step_name] for p in tp if step_name in opt.state.get(p, {})]
            if found:
                step = int(float(found[0]))
        return spec.State(step, tuple(leaves))

    # -------------------------------------------------------------------------------- the protocol
    def trajectory(self, case: Case, params, grad_seq, state: spec.State, plain: bool = False):
        """Every step of ``grad_seq`` on ONE instance of the port."""
        opt, tp = self._build(case, params)
        self._load(opt, tp, case, state, plain)
        out = []
        step = state.step
        for grads in grad_seq:
            for p, g in zip(tp, grads):
                p.grad = torch.tensor(np.asarray(g), dtype=p.dtype)
            opt.step()
            step += 1
            got = self._dump(opt, tp, state, step)
            out.append(([to_numpy(p) for p in tp], got))
            if got is not None:
                step = got.step
        return out

    def step(self, case: Case, params, grads, state: spec.State):
        return self.trajectory(case, params, [grads], state)[0]

    def step_plain_checkpoint(self, case: Case, params, grads, state: spec.State):
        """One step after loading ``state`` as a plain torch.optim checkpoint."""
        return self.trajectory(case, params, [grads], state, plain=True)[0]

    def notes(self) -> list[str]:
        return [f"state keys nobody mapped: {', '.join(sorted(self.unmapped))}"] if self.unmapped else []


def state_params(tp: list[torch.Tensor]) -> list[np.ndarray]:
    return [to_numpy(p) for p in tp]


def _np(x: Any) -> np.ndarray:
    return to_numpy(x) if isinstance(x, torch.Tensor) else np.asarray(x)
