"""Bit-exact snapshot of the torch backend's outputs, to prove a refactor changes no result.

Runs fixed cases (Adam, AdamW, Lion, SGD x every normalization x caution off, decoupled /
coupled / cautious weight decay, amsgrad, eps == 0, maximize, mixed precision, stochastic
rounding) through every torch path and saves params + state after three steps::

    python benchmarks/bitexact_snapshot.py save    /tmp/before.npz            # single, foreach, fused CPU
    TRITON_INTERPRET=1 python benchmarks/bitexact_snapshot.py save /tmp/before_triton.npz
    ... refactor ...
    python benchmarks/bitexact_snapshot.py compare /tmp/before.npz            # exit 1 on any bit change

Paths: the optimizer classes with ``foreach=False`` / ``foreach=True`` / ``fused=True`` and the
fused functions with ``backend="cpu"`` (native C++) and ``"eager"`` (or ``"triton"`` under
``TRITON_INTERPRET=1``, with smaller tensors).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

import cautious
import cautious.torch as ct

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
NORMS = ("off", "mean_clamp", "count_plus_one", "exact", "none")


def _fused_module():
    try:
        from cautious.backends.torch import fused as mod  # after the refactor
    except ImportError:
        from cautious.backends.torch import _fused as mod  # before
    return mod


def _caution(name):
    return False if name == "off" else cautious.Caution(name)


def _shapes():
    return [(5, 7), (0,), (130,), (3,)] if INTERP else [(5, 7), (0,), (130,), (3,), (70000, 2)]


def _tensors(seed, shapes, dtype):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        x = torch.randn(s, generator=g, dtype=torch.float64)
        if x.numel() > 4:
            x.view(-1)[:: max(1, x.numel() // 7)] = 0.0
        out.append(x.to(dtype))
    return out


def _np(x):
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().copy()
    return x.detach().numpy().copy()


CLASS_CASES = {
    "adam": (ct.Adam, dict(lr=0.01, weight_decay=0.1)),
    "adam_ams_max": (ct.Adam, dict(lr=0.01, amsgrad=True, maximize=True)),
    "adam_eps0_unc": (ct.Adam, dict(lr=0.01, eps=0.0, eps_placement="uncorrected")),
    "adamw": (ct.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw_cwd": (ct.AdamW, dict(lr=0.01, weight_decay=0.1, cautious_weight_decay=True)),
    "lion": (ct.Lion, dict(lr=0.01, weight_decay=0.1)),
    "lion_cwd_max": (ct.Lion, dict(lr=0.01, weight_decay=0.1, cautious_weight_decay=True, maximize=True)),
    "sgd": (ct.SGD, dict(lr=0.01)),
    "sgd_mom_l2": (ct.SGD, dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.1)),
    "sgd_nest_cwd": (
        ct.SGD,
        dict(
            lr=0.01,
            momentum=0.9,
            nesterov=True,
            weight_decay=0.1,
            decoupled_weight_decay=True,
            cautious_weight_decay=True,
        ),
    ),
}


def class_cases(out):
    paths = (
        {"fused_triton": dict(fused=True)}
        if INTERP
        else {
            "single": dict(foreach=False),
            "foreach": dict(foreach=True),
            "fused": dict(fused=True),
        }
    )
    dtypes = (torch.float32,) if INTERP else (torch.float32, torch.float64, torch.bfloat16)
    for name, (cls, kw) in CLASS_CASES.items():
        for norm in NORMS:
            for dt in dtypes:
                for path, pkw in paths.items():
                    ps = [p.requires_grad_() for p in _tensors(1, _shapes(), dt)]
                    opt = cls(ps, caution=_caution(norm), **kw, **pkw)
                    for step in range(3):
                        for p, g in zip(ps, _tensors(10 + step, _shapes(), dt), strict=True):
                            p.grad = g
                        opt.step()
                    key = f"class/{name}/{norm}/{str(dt)[6:]}/{path}"
                    for i, p in enumerate(ps):
                        out[f"{key}/p{i}"] = _np(p)
                        for k, v in opt.state[p].items():
                            if isinstance(v, torch.Tensor):
                                out[f"{key}/p{i}/{k}"] = _np(v)


def fused_cases(out):
    fused = _fused_module()
    fa = getattr(fused, "fused_adam_", None) or fused.adam_
    fl = getattr(fused, "fused_lion_", None) or fused.lion_
    fs = getattr(fused, "fused_sgd_", None) or fused.sgd_
    backends = ("triton",) if INTERP else ("cpu", "eager")
    pairs = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
    if not INTERP:
        pairs += [(torch.float64, torch.float64), (torch.float16, torch.float32)]
    for backend in backends:
        for pdt, sdt in pairs:
            for sr in (False, True):
                if sr and pdt != torch.bfloat16:
                    continue
                for norm in NORMS:
                    caution = None if norm == "off" else cautious.Caution(norm)
                    for rule in ("adamw", "adam_ams", "adam_eps0", "lion", "sgd", "sgd_first", "sgd_nomom"):
                        shapes = _shapes()
                        ps = _tensors(1, shapes, pdt)
                        m = [x.to(sdt) * 0.1 for x in _tensors(2, shapes, torch.float64)]
                        v = [x.abs().to(sdt) for x in _tensors(3, shapes, torch.float64)]
                        vm = [x.abs().to(sdt) for x in _tensors(4, shapes, torch.float64)]
                        kw = dict(caution=caution, stochastic_rounding=sr, seed=7, _backend=backend)
                        for step in range(1, 4):
                            gs = _tensors(10 + step, shapes, pdt)
                            if rule.startswith("adam"):
                                fa(
                                    ps,
                                    gs,
                                    m,
                                    v,
                                    vm if rule == "adam_ams" else None,
                                    step=step,
                                    lr=0.01,
                                    beta1=0.9,
                                    beta2=0.99,
                                    eps=0.0 if rule == "adam_eps0" else 1e-8,
                                    weight_decay=0.1,
                                    decoupled=rule != "adam_ams",
                                    amsgrad=rule == "adam_ams",
                                    maximize=rule == "adam_ams",
                                    eps_placement="corrected" if step != 2 else "uncorrected",
                                    cautious_weight_decay=rule == "adamw",
                                    **kw,
                                )
                            elif rule == "lion":
                                fl(
                                    ps,
                                    gs,
                                    m,
                                    lr=torch.tensor(0.01),
                                    beta1=0.9,
                                    beta2=0.99,
                                    weight_decay=0.1,
                                    maximize=False,
                                    cautious_weight_decay=True,
                                    **kw,
                                )
                            else:
                                mom = 0.0 if rule == "sgd_nomom" else 0.9
                                fs(
                                    ps,
                                    gs,
                                    m if mom else None,
                                    first_step=rule == "sgd_first" and step == 1,
                                    lr=0.01,
                                    momentum=mom,
                                    dampening=0.0,
                                    nesterov=rule == "sgd_first",
                                    weight_decay=0.1,
                                    decoupled=rule == "sgd",
                                    maximize=False,
                                    cautious_weight_decay=rule == "sgd",
                                    **kw,
                                )
                        key = f"fused/{backend}/{str(pdt)[6:]}-{str(sdt)[6:]}/sr{int(sr)}/{norm}/{rule}"
                        for i in range(len(shapes)):
                            out[f"{key}/p{i}"] = _np(ps[i])
                            out[f"{key}/m{i}"] = _np(m[i])
                            out[f"{key}/v{i}"] = _np(v[i])
                            out[f"{key}/vm{i}"] = _np(vm[i])


def collect():
    out: dict[str, np.ndarray] = {}
    class_cases(out)
    fused_cases(out)
    return out


def main() -> int:
    mode, path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(2)
    out = collect()
    if mode == "save":
        np.savez_compressed(path, **out)
        print(f"saved {len(out)} arrays to {path}")
        return 0
    ref = np.load(path)
    bad = [k for k in ref.files if k not in out or ref[k].tobytes() != out[k].tobytes() or ref[k].dtype != out[k].dtype]
    extra = sorted(set(out) - set(ref.files))
    print(f"compared {len(ref.files)} arrays: {len(bad)} differ, {len(extra)} new")
    for k in bad[:20]:
        print("  DIFFERS:", k)
    return 1 if bad or extra else 0


if __name__ == "__main__":
    sys.exit(main())
