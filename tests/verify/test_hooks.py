"""Target hooks: ``setup`` runs before the import, ``load_state``/``dump_state`` map nested state, ``group:step``."""

import sys
import types

import numpy as np
import torch

from cautious import spec
from cautious.conformance.profile import conformance_profile
from cautious.conformance.targets import Target, load_adapter

HP = {"lr": "lr", "betas": "betas", "eps": "eps", "weight_decay": "weight_decay"}


class NestedAdamW(torch.optim.Optimizer):
    """A correct cautious AdamW whose state is nested (``state[p]["moments"] = {"first", "second"}``)
    and whose step counter lives in the param group."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, k=0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["k"] += 1
            t = group["k"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = self.state[p].setdefault("moments", {"first": torch.zeros_like(p), "second": torch.zeros_like(p)})
                m, v, g = st["first"], st["second"], p.grad
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
                keep = ((u > 0) & (g > 0)) | ((u < 0) & (g < 0)) | u.isnan() | g.isnan()
                scale = 1.0 / max(int(keep.sum()) / max(u.numel(), 1), 1e-3)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.sub_(torch.where(keep, u * scale, torch.zeros_like(u)), alpha=group["lr"])


def load(opt, state):
    for group in opt.param_groups:
        group["k"] = int(state.step)
    for p, leaf in zip(opt.param_groups[0]["params"], state.leaves):
        opt.state[p]["moments"] = {
            "first": torch.tensor(leaf.m, dtype=p.dtype),
            "second": torch.tensor(leaf.v, dtype=p.dtype),
        }


def dump(opt):
    leaves = [{"m": opt.state[p]["moments"]["first"], "v": opt.state[p]["moments"]["second"]}
              for p in opt.param_groups[0]["params"]]  # fmt: skip
    return {"step": opt.param_groups[0]["k"], "leaves": leaves}


SETUP_CALLS = []


def setup():
    SETUP_CALLS.append(1)


def _module() -> str:
    mod = types.ModuleType("nested_port")
    mod.NestedAdamW, mod.load, mod.dump, mod.setup = NestedAdamW, load, dump, setup
    sys.modules["nested_port"] = mod
    return "nested_port"


CLAUSES = ["step_counting", "state_untouched", "trajectory", "bias_correction", "mask_boundary"]


def test_load_and_dump_hooks_and_setup():
    name = _module()
    t = Target(kind="torch", path=f"{name}:NestedAdamW", rule="adamw", hparams=HP, state={"m": "first"},
               load_state=f"{name}:load", dump_state=f"{name}:dump", setup=f"{name}:setup")  # fmt: skip
    adapter = load_adapter(t)
    assert SETUP_CALLS
    with np.errstate(all="ignore"):
        prof = conformance_profile(adapter, rules=("adamw",), clauses=CLAUSES)
    assert prof.conforms, prof.table()
    assert all(prof.clauses[c].status == "matches" for c in CLAUSES), prof.table()
    # the dump hook exposes the state: a wrong m is seen
    st = spec.State(3, (spec.AdamState(np.ones(2), np.ones(2)),))
    _, got = adapter.step(prof_case(), [np.ones(2)], [np.ones(2)], st)
    assert got.step == 4 and got.leaves[0].m is not None


def test_without_hooks_unmapped_keys_are_reported():
    name = _module()
    t = Target(kind="torch", path=f"{name}:NestedAdamW", rule="adamw", hparams=HP, state={"step": "group:k"})
    adapter = load_adapter(t)
    with np.errstate(all="ignore"):
        prof = conformance_profile(adapter, rules=("adamw",), clauses=["trajectory", "step_counting"])
    # from fresh, on one instance, the unmapped state is the port's own: it matches
    assert prof.clauses["trajectory"].status == "matches", prof.table()
    # resumed at step 99, the moments cannot be loaded (nobody mapped them): it shows, and the keys are named
    assert prof.clauses["step_counting"].status == "deviates"
    assert "state keys nobody mapped: moments" in " ".join(adapter.notes())


def prof_case():
    from cautious.conformance import Case

    return Case("adamw", {"lr": 0.1, "caution": spec.Caution()}, "float64")
