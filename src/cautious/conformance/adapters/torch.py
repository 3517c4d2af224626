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
from cautious.torch import SGD, Adam, AdamW, Lion

__all__ = ["TorchAdapter", "to_torch", "to_numpy"]

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

    def supports(self, case: Case) -> str | None:
        if case.rule not in ("adam", "adamw", "lion", "sgd"):
            return f"unknown rule {case.rule!r}"
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
            else:
                leaves.append(spec.SGDState(to_numpy(st.get("momentum_buffer"), sd) if momentum else None))
        out = [to_numpy(p, case.dtype) for p in ps]
        return out, spec.State(state.step + 1, tuple(leaves))
