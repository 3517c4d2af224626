"""The conformance adapter: drives :mod:`cautious.backends.torch` through :mod:`cautious.conformance`.

>>> from cautious.conformance import run_conformance          # doctest: +SKIP
>>> run_conformance(TorchAdapter("foreach"))                   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cautious import spec
from cautious.conformance.case import Case
from cautious.spec.dtypes import numpy_dtype
from cautious.torch import SGD, Adafactor, Adam, AdamW, Adopt, LaProp, Lion, Muon, NAdam, RMSprop

__all__ = ["TorchAdapter", "TorchWrapperAdapter", "to_torch", "to_numpy"]

_TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_IMPLS = ("single", "foreach", "fused")


def to_torch(x: np.ndarray | None, dtype: torch.dtype, device: str) -> torch.Tensor | None:
    """A fresh torch tensor of ``dtype`` from a NumPy array (bfloat16 values arrive in float32)."""
    if x is None:
        return None
    return torch.tensor(np.array(x, copy=True), device=device).to(dtype)


def to_numpy(t: torch.Tensor | None, storage: str) -> np.ndarray | None:
    """A NumPy copy of ``t`` in the carrier dtype of ``storage`` (bfloat16 as float32)."""
    if t is None:
        return None
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return t.numpy().astype(numpy_dtype(storage), copy=True)


def _fused_reason(device: str) -> str | None:
    try:
        from cautious.backends.torch import fused
    except ImportError as e:
        return f"cautious.backends.torch.fused cannot be imported: {e}"
    if not fused.is_available(torch.device(device)):
        return f"the fused implementation is not available on {device}"
    return None


class TorchAdapter:
    """One stateless step of a cautious.torch optimizer from a given spec state.

    Args:
      impl: ``"single"`` (per-tensor ops), ``"foreach"`` (``torch._foreach_*``) or
        ``"fused"`` (:mod:`cautious.backends.torch.fused`).
      device: a torch device string.
    """

    def __init__(self, impl: str = "foreach", device: str = "cpu") -> None:
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        self.impl = impl
        self.device = device
        self.name = f"torch-{impl}" + ("" if device == "cpu" else f"-{device}")
        self._stats: list[tuple[int, int, float] | None] | None = None

    #: torch.optim.Adafactor's forms of the spec's Adafactor options (docs/spec.md, "Adafactor").
    ADAFACTOR_FORMS = {
        "eps_form": "clamp",
        "factor_dims": "last_two",
        "min_dim_size_to_factor": 0,
        "relative_step": True,
        "multiply_by_parameter_scale": True,
        "weight_decay_form": "lr",
    }

    #: torch.optim's forms of the spec's named options, per rule (nothing pinned for the other rules):
    #: RMSprop's ``eps`` after the root, no Nesterov, ``v`` from 0; Muon with ``adjust_lr_fn="original"``.
    FORMS = {
        "rmsprop": {"eps_in_sqrt": False, "nesterov": False, "initial_scale": 0.0},
        "adafactor": ADAFACTOR_FORMS,
        "muon": {"muon_momentum": "ema", "ns_eps": "clamp", "shape_scale": "rows_over_cols"},
    }

    def fixed_hparams(self, rule: str) -> dict[str, Any]:
        """torch.optim's forms of ``rule`` (:attr:`FORMS`)."""
        return dict(self.FORMS.get(rule, {}))

    def supports(self, case: Case) -> str | None:
        if case.rule == "adafactor" and self.impl == "fused":
            return "Adafactor has no fused kernel (fused=True is refused); use single or foreach"
        if case.rule == "adafactor":
            bad = {k: v for k, v in self.ADAFACTOR_FORMS.items() if case.hparams.get(k, v) != v}
            if bad or case.hparams.get("decay_offset", 0):
                return f"torch.optim.Adafactor has only torch's forms, not {bad or 'decay_offset'}"
        elif case.rule not in ("adam", "adamw", "lion", "sgd", "nadam", "rmsprop", "adopt", "laprop", "muon"):
            return f"unknown rule {case.rule!r}"
        if case.rule == "rmsprop" and (
            case.hparams.get("eps_in_sqrt") or case.hparams.get("nesterov") or case.hparams.get("initial_scale")
        ):
            return "torch.optim.RMSprop adds eps after the root, has no Nesterov momentum and starts v at 0"
        if self.impl == "fused" and case.rule == "rmsprop":
            return "no fused kernel for rmsprop (cautious.torch.RMSprop refuses fused=True)"
        if case.rule == "adopt" and case.hparams.get("nesterov", False):
            return "cautious.torch.Adopt has timm's signature: no nesterov (optax's option)"
        if case.rule == "muon":
            if self.impl == "fused":
                return "no fused kernel for Muon (cautious.torch.Muon refuses fused=True)"
            hp = case.hparams
            forms = (hp.get("muon_momentum", "ema"), hp.get("ns_eps", "clamp"), hp.get("shape_scale"))
            if forms[:2] != ("ema", "clamp") or forms[2] not in (None, "rows_over_cols", "rms"):
                return f"torch.optim.Muon's forms are muon_momentum='ema', ns_eps='clamp', got {forms}"
            if hp.get("shape_scale") == "rms" and float(hp.get("rms_rate", 0.2)) != 0.2:
                return "torch's match_rms_adamw has rms_rate 0.2"
        if case.dtype not in _TORCH_DTYPES:
            return f"unknown dtype {case.dtype!r}"
        if case.state_storage != case.dtype:
            return "torch.optim keeps optimizer state in the parameter dtype"
        if self.impl == "fused":
            return _fused_reason(self.device)
        if case.dtype in ("bfloat16", "float16"):
            return "single/foreach compute in the parameter dtype, like torch.optim (not float32 then round once)"
        return None

    # -- building -----------------------------------------------------------------------------------------

    def _optimizer(self, case: Case, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        hp: dict[str, Any] = dict(case.hparams)
        kw: dict[str, Any] = {}
        if self.impl == "fused":
            kw["fused"] = True
        else:
            kw["foreach"] = self.impl == "foreach"
        if case.caution is not None:
            kw["caution_stats"] = True  # the telemetry the suite checks (last_stats)
        if case.rule == "adamw":
            hp.pop("decoupled_weight_decay", None)
            return AdamW(params, **hp, **kw)
        if case.rule == "adam":
            return Adam(params, **hp, **kw)
        if case.rule == "lion":
            return Lion(params, **hp, **kw)
        if case.rule == "nadam":
            return NAdam(params, **hp, **kw)
        if case.rule == "rmsprop":
            for k in ("eps_in_sqrt", "nesterov", "initial_scale"):  # pinned to torch's forms (fixed_hparams)
                hp.pop(k, None)
            return RMSprop(params, **hp, **kw)
        if case.rule == "adafactor":
            for k in (*self.ADAFACTOR_FORMS, "decay_offset"):
                hp.pop(k, None)
            return Adafactor(params, **hp, **kw)
        if case.rule == "adopt":
            hp.pop("nesterov", None)
            hp["decoupled"] = hp.pop("decoupled_weight_decay", False)
            return Adopt(params, **hp, **kw)
        if case.rule == "laprop":
            return LaProp(params, **hp, **kw)
        if case.rule == "muon":
            for k in ("muon_momentum", "ns_eps", "rms_rate"):
                hp.pop(k, None)
            shape = hp.pop("shape_scale", "rows_over_cols")
            adjust = "match_rms_adamw" if shape == "rms" else "original"
            # orthogonalize in the parameters' dtype (torch's is bfloat16): docs/conformance.md, "Muon"
            kw.pop("fused", None)  # declined in supports(): Muon has no fused kernel
            return Muon(params, **hp, adjust_lr_fn=adjust, ns_dtype=case.dtype, **kw)
        return SGD(params, **hp, **kw)

    def _tensor(self, x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return to_torch(x, dtype, self.device)

    def last_stats(self) -> list[tuple[int, int, float] | None] | None:
        """The telemetry (``caution_stats()``) of the last :meth:`step`: ``(count, n, scale)`` per tensor."""
        return self._stats

    # -- one step -----------------------------------------------------------------------------------------

    def step(
        self, case: Case, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: spec.State
    ) -> tuple[list[np.ndarray], spec.State]:
        if case.rule == "laprop" and case.dtype == "float64":
            # LaProp keeps 1 - b2^t as a scalar of the default dtype (as timm): float64 training sets it
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)
            try:
                return self._step(case, params, grads, state)
            finally:
                torch.set_default_dtype(default)
        return self._step(case, params, grads, state)

    def _step(
        self, case: Case, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: spec.State
    ) -> tuple[list[np.ndarray], spec.State]:
        dtype = _TORCH_DTYPES[case.dtype]
        ps = [self._tensor(p, dtype).requires_grad_(True) for p in params]
        opt = self._optimizer(case, ps)
        rule = case.rule
        momentum = float(case.hparams.get("momentum", 0.0))
        for p, g, leaf in zip(ps, grads, state.leaves, strict=False):
            p.grad = self._tensor(g, dtype)
            st = opt.state[p]
            step_t = torch.tensor(float(state.step), dtype=torch.float32)
            if rule in ("adam", "adamw"):
                st["step"] = step_t
                st["exp_avg"] = self._tensor(leaf.m, dtype)
                st["exp_avg_sq"] = self._tensor(leaf.v, dtype)
                if case.hparams.get("amsgrad"):
                    st["max_exp_avg_sq"] = self._tensor(leaf.v_max, dtype)
            elif rule == "lion":
                st["step"] = step_t
                st["exp_avg"] = self._tensor(leaf.m, dtype)
            elif rule == "nadam":
                st["step"] = step_t
                # the scalar state in float64 for float64 parameters (torch.optim keeps it in the default dtype)
                st["mu_product"] = torch.tensor(
                    float(leaf.mu_product), dtype=torch.float64 if dtype == torch.float64 else torch.float32
                )
                st["exp_avg"] = self._tensor(leaf.m, dtype)
                st["exp_avg_sq"] = self._tensor(leaf.v, dtype)
            elif rule == "rmsprop":
                st["step"] = step_t
                st["square_avg"] = self._tensor(leaf.v, dtype)
                if leaf.g_avg is not None:
                    st["grad_avg"] = self._tensor(leaf.g_avg, dtype)
                if leaf.m is not None:
                    st["momentum_buffer"] = self._tensor(leaf.m, dtype)
            elif rule == "adafactor":
                st["step"] = step_t
                for key, x in (("row_var", leaf.v_row), ("col_var", leaf.v_col), ("variance", leaf.v)):
                    if x is not None:
                        st[key] = self._tensor(x, dtype)
                if leaf.m is not None:
                    st["exp_avg"] = self._tensor(leaf.m, dtype)
            elif rule in ("adopt", "laprop"):
                st["step"] = torch.tensor(float(state.step), dtype=torch.get_default_dtype())
                st["exp_avg"] = self._tensor(leaf.m, dtype)
                st["exp_avg_sq"] = self._tensor(leaf.v, dtype)
                if rule == "laprop":
                    b2 = float(case.hparams.get("betas", (0.9, 0.999))[1])
                    st["exp_avg_lr_1"] = float(leaf.lr_avg)
                    st["exp_avg_lr_2"] = torch.tensor(1.0 - b2 ** int(state.step), dtype=torch.get_default_dtype())
            elif rule == "muon":  # torch.optim.Muon keeps no step: the case's debiased form is declined
                st["momentum_buffer"] = self._tensor(leaf.m, dtype)
            elif momentum != 0 and state.step > 0:
                # torch.optim.SGD has no step counter: a missing buffer means "first step".
                st["momentum_buffer"] = self._tensor(leaf.m, dtype)
        opt.step()
        self._stats = None
        if case.caution is not None:
            self._stats = [None if x is None else (int(x.count), int(x.n), float(x.scale)) for x in opt.caution_stats()]
        sd = case.state_storage
        leaves: list[Any] = []
        for p in ps:
            st = opt.state[p]
            if rule in ("adam", "adamw"):
                leaves.append(
                    spec.AdamState(
                        to_numpy(st["exp_avg"], sd),
                        to_numpy(st["exp_avg_sq"], sd),
                        to_numpy(st.get("max_exp_avg_sq"), sd) if case.hparams.get("amsgrad") else None,
                    )
                )
            elif rule == "lion":
                leaves.append(spec.LionState(to_numpy(st["exp_avg"], sd)))
            elif rule == "nadam":
                leaves.append(
                    spec.NAdamState(
                        to_numpy(st["exp_avg"], sd),
                        to_numpy(st["exp_avg_sq"], sd),
                        np.asarray(float(st["mu_product"]), numpy_dtype(sd)),
                    )
                )
            elif rule == "rmsprop":
                leaves.append(
                    spec.RMSpropState(
                        to_numpy(st["square_avg"], sd),
                        to_numpy(st.get("grad_avg"), sd),
                        to_numpy(st.get("momentum_buffer"), sd),
                    )
                )
            elif rule == "adafactor":
                leaves.append(
                    spec.AdafactorState(
                        *(to_numpy(st.get(k), sd) for k in ("row_var", "col_var", "variance", "exp_avg"))
                    )
                )
            elif rule == "adopt":
                leaves.append(spec.AdoptState(to_numpy(st["exp_avg"], sd), to_numpy(st["exp_avg_sq"], sd)))
            elif rule == "laprop":
                m, v = to_numpy(st["exp_avg"], sd), to_numpy(st["exp_avg_sq"], sd)
                leaves.append(spec.LaPropState(m, v, np.asarray(float(st["exp_avg_lr_1"]), np.float64)))
            elif rule == "muon":
                leaves.append(spec.MuonState(to_numpy(st["momentum_buffer"], sd)))
            else:
                leaves.append(spec.SGDState(to_numpy(st.get("momentum_buffer"), sd) if momentum else None))
        out = [to_numpy(p, case.dtype) for p in ps]
        return out, spec.State(state.step + 1, tuple(leaves))


class TorchWrapperAdapter(TorchAdapter):
    """The conformance wrapper adapter (:mod:`cautious.conformance.wrapper`) for ``cautious.torch.Cautious``:
    with ``wrap_caution`` set, the case's caution-free optimizer runs wrapped."""

    measures_delta = True

    def __init__(self, impl: str = "foreach", device: str = "cpu") -> None:
        super().__init__(impl, device)
        self.name = f"{self.name}-wrapper"
        self.wrap_caution: Any = None

    def _optimizer(self, case: Case, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        from cautious.torch import Cautious

        opt = super()._optimizer(case, params)
        return opt if self.wrap_caution is None else Cautious(opt, self.wrap_caution)
