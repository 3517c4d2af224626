"""Conformance adapter that drives :mod:`cautious.backends.torch.fused` directly (no Optimizer class).

>>> from cautious.conformance import run_conformance      # doctest: +SKIP
>>> run_conformance(FusedAdapter("cpu"))                   # doctest: +SKIP

``backend``: ``None`` (what the device would use: Triton on CUDA or under
``TRITON_INTERPRET=1``, else the native CPU loop), ``"triton"``, ``"cpu"`` (native loop, eager
fallback) or ``"eager"`` (the eager torch fallback).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cautious import spec
from cautious.backends.torch import fused
from cautious.conformance.adapters.torch import to_numpy, to_torch
from cautious.conformance.case import Case

__all__ = ["FusedAdapter", "FUSED_RULES"]

#: The spec rules with a fused kernel (:class:`cautious.backends.torch.fused.contract.Rule`).
FUSED_RULES = ("adam", "adamw", "lion", "sgd", "nadam", "adopt", "laprop")

_TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _hparams(case: Case) -> dict[str, Any]:
    """The case's hyperparameters with the spec factory's defaults filled in."""
    sig = inspect.signature(getattr(spec, case.rule))
    bound = sig.bind_partial(**case.hparams)
    bound.apply_defaults()
    return dict(bound.arguments)


class FusedAdapter:
    """One in-place fused step from a given spec state, results read back to NumPy."""

    #: the suite draws both denominators of :class:`cautious.Caution` (``nonzero``: the gradient's nonzero entries)
    denominators = ("size", "nonzero")

    def __init__(self, backend: str | None = None, device: str = "cpu", stochastic_rounding: bool = False) -> None:
        if backend not in (None, "triton", "cpu", "eager"):
            raise ValueError(f"backend must be None, 'triton', 'cpu' or 'eager', got {backend!r}")
        self.backend = backend
        self.device = device
        self.stochastic_rounding = stochastic_rounding
        self.name = f"torch-fused-{backend or 'auto'}" + ("" if device == "cpu" else f"-{device}")

    def supports(self, case: Case) -> str | None:
        if case.rule == "rmsprop":
            return "no fused kernel for RMSprop (single-tensor and foreach paths only)"
        if case.rule == "adafactor":
            return "no fused kernel for Adafactor (its row/column statistics are reductions; torch runs single/foreach)"
        if case.rule == "muon":
            return "no fused kernel for Muon (Newton-Schulz is a matrix iteration, not an elementwise step)"
        if case.rule not in FUSED_RULES:
            return f"unknown rule {case.rule!r}"
        if case.dtype not in _TORCH_DTYPES or case.state_storage not in _TORCH_DTYPES:
            return f"unsupported dtype {case.dtype!r} / {case.state_storage!r}"
        if not fused.is_available(torch.device(self.device)):
            return f"the fused implementation is not available on {self.device}"
        if self.stochastic_rounding:
            return "stochastic rounding is not round-to-nearest (checked statistically elsewhere)"
        return None

    def _tensor(self, x: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
        return to_torch(x, dtype, self.device)

    def step(
        self, case: Case, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: spec.State
    ) -> tuple[list[np.ndarray], spec.State]:
        hp = _hparams(case)
        pd, sd = _TORCH_DTYPES[case.dtype], _TORCH_DTYPES[case.state_storage]
        ps = [self._tensor(p, pd) for p in params]
        gs = [self._tensor(g, pd) for g in grads]
        caution = spec.as_caution(hp.get("caution", True))
        common = dict(
            lr=hp["lr"],
            weight_decay=hp["weight_decay"],
            maximize=hp["maximize"],
            caution=caution,
            cautious_weight_decay=hp["cautious_weight_decay"],
            _backend=self.backend,
        )
        rule = case.rule
        leaves: list[Any] = []
        if rule in ("adam", "adamw"):
            b1, b2 = hp["betas"]
            ms = [self._tensor(s.m, sd) for s in state.leaves]
            vs = [self._tensor(s.v, sd) for s in state.leaves]
            amsgrad = bool(hp["amsgrad"])
            vmax = [self._tensor(s.v_max, sd) for s in state.leaves] if amsgrad else None
            decoupled = True if rule == "adamw" else bool(hp["decoupled_weight_decay"])
            fused.fused_adam_(
                ps,
                gs,
                ms,
                vs,
                vmax,
                step=state.step + 1,
                beta1=b1,
                beta2=b2,
                eps=hp["eps"],
                decoupled=decoupled,
                amsgrad=amsgrad,
                eps_placement=hp["eps_placement"],
                **common,
            )
            for i in range(len(ps)):
                leaves.append(
                    spec.AdamState(
                        to_numpy(ms[i], case.state_storage),
                        to_numpy(vs[i], case.state_storage),
                        to_numpy(vmax[i], case.state_storage) if amsgrad else None,
                    )
                )
        elif rule == "lion":
            b1, b2 = hp["betas"]
            ms = [self._tensor(s.m, sd) for s in state.leaves]
            fused.fused_lion_(ps, gs, ms, beta1=b1, beta2=b2, **common)
            leaves = [spec.LionState(to_numpy(m, case.state_storage)) for m in ms]
        elif rule in ("nadam", "adopt", "laprop"):
            return self._adam_family(case, hp, ps, gs, state, common)
        else:
            momentum = float(hp["momentum"])
            bufs = None
            if momentum != 0:
                bufs = [
                    self._tensor(s.m, sd) if s.m is not None else torch.zeros_like(p, dtype=sd)
                    for s, p in zip(state.leaves, ps, strict=False)
                ]
            fused.fused_sgd_(
                ps,
                gs,
                bufs,
                first_step=state.step == 0,
                momentum=momentum,
                dampening=hp["dampening"],
                nesterov=hp["nesterov"],
                decoupled=bool(hp["decoupled_weight_decay"]),
                **common,
            )
            leaves = [
                spec.SGDState(to_numpy(b, case.state_storage) if bufs is not None else None)
                for b in (bufs or [None] * len(ps))
            ]
        return [to_numpy(p, case.dtype) for p in ps], spec.State(state.step + 1, tuple(leaves))

    def _adam_family(self, case: Case, hp: dict[str, Any], ps, gs, state: spec.State, common: dict[str, Any]):
        """NAdam, ADOPT and LaProp: state ``(m, v)`` plus the scalars each keeps outside its tensors."""
        sd = _TORCH_DTYPES[case.state_storage]
        b1, b2 = (float(x) for x in hp["betas"])
        t = state.step + 1
        ms = [self._tensor(s.m, sd) for s in state.leaves]
        vs = [self._tensor(s.v, sd) for s in state.leaves]
        tail: list[Any] = [() for _ in ps]
        if case.rule == "nadam":
            schedule = dict(beta1=b1, momentum_decay=hp["momentum_decay"], momentum_schedule=hp["momentum_schedule"])
            prods = [float(s.mu_product) * spec.nadam_mu(t, **schedule) for s in state.leaves]
            if len(set(prods)) != 1:
                raise ValueError("the tensors of one case must share NAdam's mu_product")
            fused.fused_nadam_(
                ps,
                gs,
                ms,
                vs,
                step=t,
                mu_product=prods[0],
                beta1=b1,
                beta2=b2,
                eps=hp["eps"],
                momentum_decay=hp["momentum_decay"],
                momentum_schedule=hp["momentum_schedule"],
                decoupled=bool(hp["decoupled_weight_decay"]),
                **common,
            )
            tail = [(np.asarray(x, dtype=np.float64),) for x in prods]
        elif case.rule == "adopt":
            fused.fused_adopt_(
                ps,
                gs,
                ms,
                vs,
                step=t,
                beta1=b1,
                beta2=b2,
                eps=hp["eps"],
                clip_exp=hp["clip_exp"],
                nesterov=bool(hp["nesterov"]),
                decoupled=bool(hp["decoupled_weight_decay"]),
                **common,
            )
        else:
            lr = float(hp["lr"])
            lr_avgs = [b1 * float(s.lr_avg) + (1.0 - b1) * lr for s in state.leaves]
            if len(set(lr_avgs)) != 1:
                raise ValueError("the tensors of one case must share LaProp's lr_avg")
            fused.fused_laprop_(
                ps,
                gs,
                ms,
                vs,
                step_lr=lr / lr_avgs[0] if lr_avgs[0] != 0 else 0.0,
                bias_correction2=1.0 - b2**t,
                beta1=b1,
                beta2=b2,
                eps=hp["eps"],
                decay_order=hp["decay_order"],
                **common,
            )
            tail = [(np.asarray(x, dtype=np.float64),) for x in lr_avgs]
        kind = {"nadam": spec.NAdamState, "adopt": spec.AdoptState, "laprop": spec.LaPropState}[case.rule]
        leaves = [
            kind(to_numpy(m, case.state_storage), to_numpy(v, case.state_storage), *extra)
            for m, v, extra in zip(ms, vs, tail, strict=True)
        ]
        return [to_numpy(p, case.dtype) for p in ps], spec.State(t, tuple(leaves))
