r"""Cautious ``torch.optim.Optimizer`` classes: ``AdamW``, ``Adam``, ``Lion``, ``SGD``.

Drop-in replacements for ``torch.optim.AdamW``, ``Adam`` and ``SGD`` (same
signatures, defaults and state names), plus the cautious options as keyword-only
arguments. The algorithm is :mod:`cautious.spec` (Liang et al. 2024,
arXiv:2411.16085):

.. math::

    u^c = \text{mask}(u, g)\cdot\text{scale}\cdot u, \qquad
    p' = p - \eta\lambda\,p - \eta\,u^c

``caution=False`` reproduces the torch optimizer. The functional code lives in
:mod:`cautious.backends.torch._functional`; the fused kernels are :mod:`cautious.backends.torch.fused`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cautious._caution import Caution, as_caution, caution_arg
from cautious.backends.torch import _distributed
from cautious.backends.torch import _functional as functional
from cautious.spec.errors import (
    check_cautious_weight_decay,
    check_muon_shape,
    check_nesterov,
    check_param_dtype,
    split_betas,
    split_ns_coefficients,
    validate,
)
from cautious.spec.mask import CautionStats

__all__ = ["AdamW", "Adam", "Lion", "SGD", "NAdam", "RMSprop", "Adafactor", "Adopt", "LaProp", "Muon"]

BETA_NAMES = {"beta1": "betas[0]", "beta2": "betas[1]"}

try:  # torch.optim's decorator: no_grad during the step, with the graph breaks dynamo expects
    from torch.optim.optimizer import _use_grad_for_differentiable as _use_grad
except ImportError:  # pragma: no cover - older/newer torch

    def _use_grad(func: Callable) -> Callable:
        return torch.no_grad()(func)


try:  # let torch.load(weights_only=True) read older checkpoints whose param groups hold a Caution
    torch.serialization.add_safe_globals([Caution])
except AttributeError:  # pragma: no cover - torch < 2.4
    pass


def _caution_data(caution: Any) -> dict[str, Any] | None:
    """What a param group stores: the caution options as plain data (``{"normalize": ..., "floor": ...}``),
    ``None`` when off, so that a checkpoint loads with plain ``torch.load`` in a process without cautious.

    Accepts what older checkpoints and pickles hold as well: a :class:`Caution`, ``False`` or ``None``.
    """
    if isinstance(caution, dict):
        caution = Caution(**caution)
    caution = as_caution(caution)
    return None if caution is None else dataclasses.asdict(caution)


def _caution_of(data: dict[str, Any] | None) -> Caution | None:
    """The :class:`Caution` the functional code receives for a group's stored ``caution`` (``None``: off)."""
    return None if data is None else Caution(**data)


#: The functional steps as torch.compile runs ``fused=True``: not traced (as torch.optim's fused steps), so a
#: compiled step runs the fused kernels eagerly instead of tracing their host-side launch (one graph break).
_UNTRACED_FUSED = {
    f: torch.compiler.disable(f)
    for f in (functional.adam, functional.lion, functional.sgd, functional.nadam, functional.adopt, functional.laprop)
}


def _step_fn(f: Callable, group: dict[str, Any]) -> Callable:
    return _UNTRACED_FUSED[f] if group["fused"] else f


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class _CautiousOptimizer(torch.optim.Optimizer):
    """Shared machinery: group validation, caution normalisation, checkpoint rules, fused checks."""

    #: Group keys that come from the constructor/current groups, never from a loaded state dict.
    _CAUTION_KEYS: tuple[str, ...] = ("caution", "cautious_weight_decay")

    def __init__(self, params: Any, defaults: dict[str, Any], caution_stats: bool = False) -> None:
        if not isinstance(caution_stats, bool):
            raise TypeError(f"caution_stats must be a bool, got {caution_stats!r}")
        if defaults.get("capturable") and defaults.get("fused"):
            raise ValueError(
                f"capturable=True with fused=True is not supported by cautious.torch.{type(self).__name__} "
                "(the fused kernels take the step on the host): use foreach or the single-tensor path"
            )
        if defaults.get("differentiable"):
            raise ValueError(f"differentiable=True is not supported by cautious.torch.{type(self).__name__}")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = dict(defaults)
        if "caution" in defaults:  # the user's argument: True, False or a Caution (None is an error)
            caution_arg(defaults["caution"])
        defaults["caution"] = self._validate(defaults)
        if caution_stats and defaults["caution"] is None:
            raise ValueError("caution_stats=True needs caution on (caution=False has no mask to report)")
        #: Telemetry of the last step per parameter (``caution_stats=True``); never in the state dict.
        self._caution_stats: dict[Tensor, CautionStats] | None = {} if caution_stats else None
        if defaults.get("fused"):
            try:
                from cautious.backends.torch import fused  # noqa: F401
            except ImportError as e:
                raise RuntimeError(
                    f"fused=True needs cautious.backends.torch.fused, which cannot be imported: {e}"
                ) from e
        super().__init__(params, defaults)

    def caution_stats(self) -> list[CautionStats | None]:
        """Per parameter (in ``param_groups`` order): ``CautionStats(count, n, scale)`` of its last step.

        ``count`` is an int64 tensor and ``scale`` a float64 tensor on the parameter's device (reading them
        is the only synchronisation); ``None`` for a parameter that has not stepped with caution. Needs the
        optimizer built with ``caution_stats=True``.
        """
        stats = getattr(self, "_caution_stats", None)
        if stats is None:
            raise ValueError("caution_stats() needs the optimizer built with caution_stats=True")
        return [stats.get(p) for group in self.param_groups for p in group["params"]]

    # -- validation ---------------------------------------------------------------------------------------

    def _validate(self, group: dict[str, Any]) -> dict[str, Any] | None:
        """Check a group's hyperparameters (spec.errors messages); return its caution as stored.

        This is the only validation: steps take the group's hyperparameters as checked. A group
        stores its caution as plain data (:func:`_caution_data`), ``None`` when off; the step
        hands the functional code a :class:`Caution` or ``None``.
        """
        raise NotImplementedError

    @staticmethod
    def _check_caution(group: dict[str, Any]) -> dict[str, Any] | None:
        return _caution_data(group["caution"])

    @staticmethod
    def _check_cwd(group: dict[str, Any], decoupled: bool) -> None:
        check_cautious_weight_decay(group["cautious_weight_decay"], decoupled)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its own hyperparameters (caution options included) are validated like the defaults."""
        if isinstance(param_group, dict) and not isinstance(param_group.get("caution", {}), dict):
            caution_arg(param_group["caution"])  # the user's own option: True, False or a Caution, never None
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        try:
            group["caution"] = self._validate(group)
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                name = repr(names[i]) if names else f"param_groups[{gi}]['params'][{i}]"
                # a complex parameter is its real view (docs/spec.md): its real dtype is checked
                check_param_dtype(f"parameter {name}", torch.view_as_real(p).dtype if p.is_complex() else p.dtype)
        except Exception:
            self.param_groups.pop()
            raise

    # -- checkpoints --------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state and hyperparameters, except the caution options, which stay as they are.

        A checkpoint of ``torch.optim`` (or one saved with other caution options)
        never turns caution off or changes it: ``caution`` and
        ``cautious_weight_decay`` (and ``eps_placement`` for Adam) keep the values of
        the current param groups. Hyperparameters missing from the loaded groups
        keep their current values too.
        """
        current = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, cur in zip(self.param_groups, current, strict=False):
            for k in self._CAUTION_KEYS:
                if k in cur:
                    group[k] = cur[k]
            for k, v in cur.items():
                if k != "params":
                    group.setdefault(k, v)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self.defaults.items():
                if k != "params":
                    group.setdefault(k, v)
            group["caution"] = _caution_data(group["caution"])  # older pickles hold a Caution, or False for off

    # -- step helpers -------------------------------------------------------------------------------------

    def _check_grads(self) -> None:
        """Reject sparse gradients before anything is mutated."""
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        f"cautious.torch.{type(self).__name__} does not support sparse gradients "
                        f"(param_groups[{gi}]['params'][{i}])"
                    )

    def _check_fused(self, group: dict[str, Any], params: list[Tensor]) -> None:
        if not group.get("fused"):
            return
        from cautious.backends.torch import fused

        for device in {p.device for p in params}:
            if not fused.is_available(device):
                raise RuntimeError(f"fused=True is not available on device {device}")


class Adam(_CautiousOptimizer):
    r"""Cautious Adam, a drop-in for ``torch.optim.Adam`` (L2 decay unless ``decoupled_weight_decay``).

    .. math::

        m' = \beta_1 m + (1-\beta_1) g,\quad v' = \beta_2 v + (1-\beta_2) g^2,\quad
        u = \frac{m'/(1-\beta_1^t)}{\sqrt{v'/(1-\beta_2^t)} + \epsilon},\quad
        p' = p - \eta\,\text{mask}(u, g)\,\text{scale}\,u

    See :func:`cautious.spec.adam` for the full algorithm.

    Args:
      params, lr, betas, eps, weight_decay, amsgrad, foreach, maximize, capturable,
        differentiable, fused, decoupled_weight_decay: as ``torch.optim.Adam``
        (``differentiable`` must stay False; ``capturable=True`` keeps ``step``, a tensor ``lr`` and
        the bias corrections on the device, with no host sync, and is not available with ``fused=True``).
      caution: ``True`` (``Caution()``), ``False`` (plain Adam) or a :class:`cautious.Caution`.
      eps_placement: ``"corrected"`` (torch/optax) or ``"uncorrected"`` (Keras/TF/HF).
      cautious_weight_decay: decay only where the cautious update and the parameter
        do not have strictly opposite signs (needs ``decoupled_weight_decay``).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq``
    (amsgrad), as torch.optim.Adam: checkpoints load both ways.

    .. note::
       ``load_state_dict`` keeps the caution options of this optimizer: loading a
       plain ``torch.optim`` checkpoint never turns caution off.
    """

    _CAUTION_KEYS = ("caution", "eps_placement", "cautious_weight_decay")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        caution: bool | Caution = True,
        caution_stats: bool = False,
        eps_placement: str = "corrected",
        cautious_weight_decay: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            caution=caution,
            eps_placement=eps_placement,
            cautious_weight_decay=cautious_weight_decay,
        )
        super().__init__(params, defaults, caution_stats=caution_stats)

    def _validate(self, group: dict[str, Any]) -> dict[str, Any] | None:
        b1, b2 = split_betas(group["betas"])
        validate(
            dict(
                lr=group["lr"],
                beta1=b1,
                beta2=b2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                eps_placement=group["eps_placement"],
            ),
            BETA_NAMES,
        )
        validate(
            dict(
                amsgrad=group["amsgrad"],
                maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                cautious_weight_decay=group["cautious_weight_decay"],
            )
        )
        c = self._check_caution(group)
        self._check_cwd(group, group["decoupled_weight_decay"])
        return c

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                # capturable: the step lives on the parameter's device (as torch.optim), else on the CPU
                device = p.device if group["capturable"] else None
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype(), device=device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])

    @_use_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = [], [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
            self._check_fused(group, params)
            beta1, beta2 = group["betas"]
            _step_fn(functional.adam, group)(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                state_steps,
                foreach=group["foreach"],
                fused=group["fused"],
                amsgrad=group["amsgrad"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                caution=_caution_of(group["caution"]),
                eps_placement=group["eps_placement"],
                cautious_weight_decay=group["cautious_weight_decay"],
                capturable=group["capturable"],
                stats=getattr(self, "_caution_stats", None),
            )
        return loss


class AdamW(Adam):
    r"""Cautious AdamW, a drop-in for ``torch.optim.AdamW`` (decoupled weight decay, default 1e-2).

    .. math::

        u = \frac{m'/(1-\beta_1^t)}{\sqrt{v'/(1-\beta_2^t)} + \epsilon},\qquad
        p' = p - \eta\lambda p - \eta\,\text{mask}(u, g)\,\text{scale}\,u

    See :func:`cautious.spec.adamw`. Same arguments as ``torch.optim.AdamW`` plus
    ``caution``, ``eps_placement`` and ``cautious_weight_decay`` (see :class:`Adam`).
    State: ``step``, ``exp_avg``, ``exp_avg_sq`` (, ``max_exp_avg_sq``), as torch.

    .. note::
       ``load_state_dict`` keeps the caution options of this optimizer: loading a
       ``torch.optim.AdamW`` checkpoint never turns caution off.

    Example::

        opt = cautious.torch.AdamW(model.parameters(), lr=1e-3)   # was torch.optim.AdamW
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        caution: bool | Caution = True,
        caution_stats: bool = False,
        eps_placement: str = "corrected",
        cautious_weight_decay: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            caution=caution,
            caution_stats=caution_stats,
            eps_placement=eps_placement,
            cautious_weight_decay=cautious_weight_decay,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class Lion(_CautiousOptimizer):
    r"""Cautious Lion (Chen et al. 2023), decoupled weight decay.

    .. math::

        u = \operatorname{sign}(\beta_1 m + (1-\beta_1) g),\quad
        m' = \beta_2 m + (1-\beta_2) g,\quad
        p' = p - \eta\lambda p - \eta\,\text{mask}(u, g)\,\text{scale}\,u

    See :func:`cautious.spec.lion`. ``sign(NaN)`` is NaN (as the spec; unlike
    ``torch.sign``). State per parameter: ``step`` and ``exp_avg``.

    .. note::
       ``load_state_dict`` keeps the caution options of this optimizer.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-4,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        caution: bool | Caution = True,
        caution_stats: bool = False,
        cautious_weight_decay: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            differentiable=False,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
        )
        super().__init__(params, defaults, caution_stats=caution_stats)

    def _validate(self, group: dict[str, Any]) -> dict[str, Any] | None:
        b1, b2 = split_betas(group["betas"])
        validate(dict(lr=group["lr"], beta1=b1, beta2=b2, weight_decay=group["weight_decay"]), BETA_NAMES)
        validate(dict(maximize=group["maximize"], cautious_weight_decay=group["cautious_weight_decay"]))
        return self._check_caution(group)

    def _init_group(self, group, params, grads, exp_avgs, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if "step" not in state:  # (not setdefault: its default would be built, and traced, every step)
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            exp_avgs.append(state["exp_avg"])
            state_steps.append(state["step"])

    @_use_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        for group in self.param_groups:
            params, grads, exp_avgs, state_steps = [], [], [], []
            self._init_group(group, params, grads, exp_avgs, state_steps)
            self._check_fused(group, params)
            beta1, beta2 = group["betas"]
            _step_fn(functional.lion, group)(
                params,
                grads,
                exp_avgs,
                state_steps,
                foreach=group["foreach"],
                fused=group["fused"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                caution=_caution_of(group["caution"]),
                cautious_weight_decay=group["cautious_weight_decay"],
                stats=getattr(self, "_caution_stats", None),
            )
        return loss


class SGD(_CautiousOptimizer):
    r"""Cautious SGD with momentum, a drop-in for ``torch.optim.SGD``.

    .. math::

        m' = g \text{ (first step) else } \mu m + (1-\tau) g,\quad
        u = g + \mu m' \text{ (nesterov) else } m',\quad
        p' = p - \eta\,\text{mask}(u, g)\,\text{scale}\,u

    See :func:`cautious.spec.sgd`. Same arguments as ``torch.optim.SGD``, plus
    ``decoupled_weight_decay`` (``p <- p (1 - lr wd)`` instead of ``g += wd p``),
    ``caution`` and ``cautious_weight_decay``. State: ``momentum_buffer`` (as torch).

    .. note::
       ``load_state_dict`` keeps the caution options of this optimizer: loading a
       ``torch.optim.SGD`` checkpoint never turns caution off.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        caution: bool | Caution = True,
        caution_stats: bool = False,
        cautious_weight_decay: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
        )
        super().__init__(params, defaults, caution_stats=caution_stats)

    def _validate(self, group: dict[str, Any]) -> dict[str, Any] | None:
        validate(
            dict(
                lr=group["lr"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
            )
        )
        validate(
            dict(
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                cautious_weight_decay=group["cautious_weight_decay"],
            )
        )
        c = self._check_caution(group)
        check_nesterov(group["nesterov"], group["momentum"], group["dampening"])
        self._check_cwd(group, group["decoupled_weight_decay"])
        return c

    def _init_group(self, group, params, grads, momentum_buffer_list):
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            if group["momentum"] != 0:
                momentum_buffer_list.append(self.state[p].get("momentum_buffer"))

    @_use_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        for group in self.param_groups:
            params, grads, momentum_buffer_list = [], [], []
            self._init_group(group, params, grads, momentum_buffer_list)
            self._check_fused(group, params)
            _step_fn(functional.sgd, group)(
                params,
                grads,
                momentum_buffer_list,
                foreach=group["foreach"],
                fused=group["fused"],
                lr=group["lr"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                caution=_caution_of(group["caution"]),
                cautious_weight_decay=group["cautious_weight_decay"],
                stats=getattr(self, "_caution_stats", None),
            )
            if group["momentum"] != 0:
                for p, buf in zip(params, momentum_buffer_list, strict=False):
                    self.state[p]["momentum_buffer"] = buf
        return loss


def _refuse_capturable(name: str, capturable: Any) -> None:
    if capturable:
        raise ValueError(f"capturable=True is not supported by cautious.torch.{name}")


class NAdam(_CautiousOptimizer):
    r"""Cautious NAdam, a drop-in for ``torch.optim.NAdam`` (NAdamW: ``decoupled_weight_decay=True``, as torch).

    .. math::

        \mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi}),\quad \Pi_t = \Pi_{t-1}\mu_t,\quad
        u = \frac{1-\mu_t}{1-\Pi_t}\frac{g}{d} + \frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\frac{m'}{d},\quad
        p' = p - \eta\,\text{mask}(u, g)\,\text{scale}\,u

    with ``d = sqrt(v' / (1 - beta2**t)) + eps`` (:func:`cautious.spec.nadam`). Same arguments as
    ``torch.optim.NAdam`` (``capturable`` and ``differentiable`` must stay False; ``fused=True`` runs the
    fused kernels, which torch's NAdam does not have), plus ``caution``, ``caution_stats``, ``cautious_weight_decay``
    (needs ``decoupled_weight_decay``) and ``momentum_schedule`` (``"dozat"``: torch's; ``"constant"``:
    ``mu_t = beta1``, optax's ``nadam``). State per parameter: ``step``, ``mu_product``, ``exp_avg``,
    ``exp_avg_sq``, as torch.optim.NAdam: checkpoints load both ways.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        caution: bool | Caution = True,
        caution_stats: bool = False,
        cautious_weight_decay: bool = False,
        momentum_schedule: str = "dozat",
    ) -> None:
        _refuse_capturable("NAdam", capturable)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
            momentum_schedule=momentum_schedule,
        )
        super().__init__(params, defaults, caution_stats=caution_stats)

    def _validate(self, group: dict[str, Any]) -> dict[str, Any] | None:
        b1, b2 = split_betas(group["betas"])
        validate(
            dict(
                lr=group["lr"],
                beta1=b1,
                beta2=b2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                momentum_decay=group["momentum_decay"],
                momentum_schedule=group["momentum_schedule"],
            ),
            BETA_NAMES,
        )
        validate(
            dict(
                maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                cautious_weight_decay=group["cautious_weight_decay"],
            )
        )
        c = self._check_caution(group)
        self._check_cwd(group, group["decoupled_weight_decay"])
        return c

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, mu_products, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["mu_product"] = torch.tensor(1.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            mu_products.append(state["mu_product"])
            state_steps.append(state["step"])

    @_use_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, mu_products, state_steps = [], [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, mu_products, state_steps)
            self._check_fused(group, params)
            beta1, beta2 = group["betas"]
            _step_fn(functional.nadam, group)(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                mu_products,
                state_steps,
                foreach=group["foreach"],
                fused=group["fused"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum_decay=group["momentum_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                caution=_caution_of(group["caution"]),
                cautious_weight_decay=group["cautious_weight_decay"],
                momentum_schedule=group["momentum_schedule"],
                stats=getattr(self, "_caution_stats", None),
            )
        return loss


class RMSprop(_CautiousOptimizer):
    r"""Cautious RMSprop, a drop-in for ``torch.optim.RMSprop``.

    .. math::

        v' = \alpha v + (1-\alpha) g^2,\quad d = \sqrt{v' - \bar g'^2 \text{ (centered)}} + \epsilon,\quad
        m' = \mu m + g / d,\quad u = m' \text{ (momentum) else } g / d,\quad
        p' = p - \eta\,\text{mask}(u, g)\,\text{scale}\,u

    (:func:`cautious.spec.rmsprop`). Same arguments as ``torch.optim.RMSprop`` (``capturable`` and
    ``differentiable`` must stay False; ``fused=True`` is refused: RMSprop has no fused kernel), plus
    ``decoupled_weight_decay`` (``p <- p (1 - lr wd)`` instead of ``g += wd p``), ``caution``,
    ``caution_stats`` and ``cautious_weight_decay``. Without momentum ``u`` has the sign of ``g``:
    caution then only rescales (docs/spec.md). State per parameter: ``step``, ``square_avg``,
    ``momentum_buffer`` (momentum > 0), ``grad_avg`` (centered), as torch.optim.RMSprop.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        caution: bool | Caution = True,
        caution_stats: bool = False,
        cautious_weight_decay: bool = False,
    ) -> None:
        functional._no_fused("RMSprop", foreach, fused)
        _refuse_capturable("RMSprop", capturable)
        defaults = dict(
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
        )
        super().__init__(params, defaults, caution_stats=caution_stats)

    def _validate(self, group: dict[str, Any]) -> dict[str, Any] | None:
        validate(
            dict(
                lr=group["lr"],
                alpha=group["alpha"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
            )
        )
        validate(
            dict(
                centered=group["centered"],
                maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                cautious_weight_decay=group["cautious_weight_decay"],
            )
        )
        c = self._check_caution(group)
        self._check_cwd(group, group["decoupled_weight_decay"])
        return c

    def _init_group(self, group, params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["centered"]:
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            square_avgs.append(state["square_avg"])
            state_steps.append(state["step"])
            if group["momentum"] > 0:
                momentum_buffer_list.append(state["momentum_buffer"])
            if group["centered"]:
                grad_avgs.append(state["grad_avg"])

    @_use_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        for group in self.param_groups:
            params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps = [], [], [], [], [], []
            self._init_group(group, params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps)
            functional.rmsprop(
                params,
                grads,
                square_avgs,
                grad_avgs,
                momentum_buffer_list,
                state_steps,
                foreach=group["foreach"],
                fused=group["fused"],
                lr=group["lr"],
                alpha=group["alpha"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                centered=group["centered"],
                maximize=group["maximize"],
                decoupled_weight_decay=group["decoupled_weight_decay"],
                caution=_caution_of(group["caution"]),
                cautious_weight_decay=group["cautious_weight_decay"],
                stats=getattr(self, "_caution_stats", None),
            )
        return loss


class Adafactor(_CautiousOptimizer):
    r"""Cautious Adafactor (Shazeer & Stern 2018), a drop-in for ``torch.optim.Adafactor``.

    .. math::

        u &= \hat u / \max(1, \operatorname{rms}(\hat u)/d), \quad \hat u = g / \sqrt{\hat v}
        \quad\text{(factored } \hat v = R C / \max(\bar R, \epsilon_1) \text{ over the last two dims)} \\
        \alpha_t &= \min(\eta, 1/\sqrt t)\,\max(\epsilon_2, \operatorname{rms}(p)), \qquad
        p' = p(1 - \eta\lambda) - \alpha_t\,\text{mask}(u, g)\,\text{scale}\,u

    See :func:`cautious.spec.adafactor` (torch's forms are its defaults). ``u`` has the sign of ``g``, so
    without momentum caution only rescales (by ``n / count``, where ``g`` has exact zeros). ``beta1 > 0``
    (keyword-only, off by default as in torch) adds timm's and optax's momentum over the scaled
    updates, ``m <- beta1 m + (1 - beta1) alpha_t u`` (state ``exp_avg``), and caution masks ``m``.
    ``caution=False, beta1=0`` reproduces ``torch.optim.Adafactor`` bit for bit, state keys included
    (``step``, ``row_var``/``col_var`` for tensors with ``dim() > 1``, else ``variance``). ``eps[0]=None``
    is each parameter's dtype epsilon (torch.optim takes the first parameter's for the whole group).
    Paths: single-tensor and foreach; no fused path. DTensor parameters are refused.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        beta1: float = 0.0,
        caution: bool | Caution = True,
        caution_stats: bool = False,
        fused: bool | None = None,
    ) -> None:
        functional._no_fused("Adafactor", foreach, fused)
        defaults = dict(
            lr=lr,
            beta2_decay=beta2_decay,
            eps=eps,
            d=d,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
            beta1=beta1,
            caution=caution,
        )
        super().__init__(params, defaults, caution_stats=caution_stats)

    _CAUTION_KEYS = ("caution",)

    def _validate(self, group: dict[str, Any]) -> dict[str, Any] | None:
        try:
            eps1, eps2 = group["eps"]
        except (TypeError, ValueError):
            raise TypeError(f"eps must be a pair (eps1 or None, eps2), got {group['eps']!r}") from None
        if eps1 is not None:
            validate({"eps": eps1}, {"eps": "eps[0]"})
        validate({"eps": eps2}, {"eps": "eps[1]"})
        validate(
            dict(
                lr=group["lr"],
                beta2_decay=group["beta2_decay"],
                clip_threshold=group["d"],
                weight_decay=group["weight_decay"],
                beta1=group["beta1"],
                maximize=group["maximize"],
            ),
            {"clip_threshold": "d"},
        )
        return self._check_caution(group)

    def _init_group(self, group, params, grads, row_vars, col_vars, variances, exp_avgs, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.is_complex():
                raise RuntimeError("Adafactor does not support complex parameters")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                if p.grad.dim() > 1:
                    state["row_var"] = p.grad.new_zeros([*p.grad.shape[:-1], 1])
                    state["col_var"] = p.grad.new_zeros([*p.grad.shape[:-2], 1, p.grad.shape[-1]])
                else:
                    state["variance"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            if group["beta1"] > 0 and "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            row_vars.append(state.get("row_var"))
            col_vars.append(state.get("col_var"))
            variances.append(state.get("variance"))
            if group["beta1"] > 0:
                exp_avgs.append(state["exp_avg"])
            state_steps.append(state["step"])

    @torch.no_grad()  # as torch.optim.Adafactor (its param groups have no ``differentiable`` key)
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        for group in self.param_groups:
            functional._refuse_dtensor(group["params"], "cautious.torch.Adafactor")
        for group in self.param_groups:
            params, grads, row_vars, col_vars, variances, exp_avgs, state_steps = [], [], [], [], [], [], []
            self._init_group(group, params, grads, row_vars, col_vars, variances, exp_avgs, state_steps)
            if not params:
                continue
            eps1, eps2 = group["eps"]
            functional.adafactor(
                params,
                grads,
                row_vars,
                col_vars,
                variances,
                exp_avgs,
                state_steps,
                foreach=group["foreach"],
                lr=group["lr"],
                beta2_decay=group["beta2_decay"],
                eps1=eps1,
                eps2=eps2,
                d=group["d"],
                weight_decay=group["weight_decay"],
                beta1=group["beta1"],
                maximize=group["maximize"],
                caution=_caution_of(group["caution"]),
                stats=getattr(self, "_caution_stats", None),
            )
        return loss


class Adopt(_CautiousOptimizer):
    r"""Cautious ADOPT (Taniguchi et al. 2024), a drop-in for ``timm.optim.Adopt`` (same name, signature,
    defaults and state: ``step``, ``exp_avg``, ``exp_avg_sq``).

    .. math::

        t = 1:\ v' = g^2,\ p' = p; \qquad
        t > 1:\ n = \operatorname{clip}(g / \max(\sqrt v, \epsilon), \pm (t-1)^{e}),\
        m' = \beta_1 m + (1-\beta_1) n,\
        p' = p - \eta\lambda p - \eta\,\text{mask}(m', g)\,\text{scale}\,m',\
        v' = \beta_2 v + (1-\beta_2) g^2

    See :func:`cautious.spec.adopt`. ``clip_exp=None``: no clipping. ``weight_decay`` is coupled (L2) unless
    ``decoupled``; decoupled decay starts at step 2 (step 1 moves nothing). ``caution=False`` runs timm's
    operations (bit for bit). ``foreach`` and ``fused`` choose the path as in ``torch.optim`` (timm's Adopt
    has ``foreach`` only; ``fused=True`` runs the fused kernels). timm's ``corrected_weight_decay``,
    ``capturable`` and ``differentiable`` are not supported.

    .. note::
       ``load_state_dict`` keeps the caution options of this optimizer.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        clip_exp: float | None = 0.333,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        *,
        maximize: bool = False,
        caution: bool | Caution = True,
        caution_stats: bool = False,
        cautious_weight_decay: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            clip_exp=clip_exp,
            weight_decay=weight_decay,
            decoupled=decoupled,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            differentiable=False,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
        )
        super().__init__(params, defaults, caution_stats=caution_stats)

    def _validate(self, group: dict[str, Any]) -> dict[str, Any] | None:
        b1, b2 = split_betas(group["betas"])
        hp = dict(lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"], weight_decay=group["weight_decay"])
        if group["clip_exp"] is not None:
            hp["clip_exp"] = group["clip_exp"]
        validate(hp, BETA_NAMES)
        flags = dict(
            decoupled_weight_decay=group["decoupled"],
            maximize=group["maximize"],
            cautious_weight_decay=group["cautious_weight_decay"],
        )
        validate(flags, {"decoupled_weight_decay": "decoupled"})
        self._check_cwd(group, group["decoupled"])
        return self._check_caution(group)

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])

    @_use_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, state_steps = [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, state_steps)
            self._check_fused(group, params)
            beta1, beta2 = group["betas"]
            _step_fn(functional.adopt, group)(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                state_steps,
                foreach=group["foreach"],
                fused=group["fused"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                eps=group["eps"],
                clip_exp=group["clip_exp"],
                weight_decay=group["weight_decay"],
                decoupled=group["decoupled"],
                maximize=group["maximize"],
                caution=_caution_of(group["caution"]),
                cautious_weight_decay=group["cautious_weight_decay"],
                stats=getattr(self, "_caution_stats", None),
            )
        return loss


class LaProp(_CautiousOptimizer):
    r"""Cautious LaProp (Ziyin et al. 2020), a drop-in for ``timm.optim.LaProp`` (same name, signature, defaults
    and state: ``step``, ``exp_avg``, ``exp_avg_lr_1``, ``exp_avg_lr_2``, ``exp_avg_sq``).

    .. math::

        v' = \beta_2 v + (1-\beta_2) g^2,\quad
        m' = \beta_1 m + (1-\beta_1)\,\eta\,\frac{g}{\sqrt{v'/(1-\beta_2^t)} + \epsilon},\quad
        p' = \big(p - \tfrac{\eta}{\bar\eta'}\,\text{mask}(m', g)\,\text{scale}\,m'\big)(1 - \eta\lambda)

    See :func:`cautious.spec.laprop`. The momentum ``exp_avg`` carries the learning rate; ``exp_avg_lr_1`` is
    ``\bar\eta``, the same average of the learning rates (its bias correction), and ``exp_avg_lr_2`` is
    ``1 - beta2^t`` as a running product in the default scalar dtype (as timm). Decoupled decay applies to the
    updated parameter (``decay_order="post_update"``, timm and the reference code; ``"pre_update"`` is
    AdamW's order). ``caution=False`` runs timm's operations (bit for bit). ``foreach`` and ``fused`` choose
    the path as in ``torch.optim`` (``fused=True`` runs the fused kernels). timm's ``corrected_weight_decay``
    is not supported.

    .. note::
       ``load_state_dict`` keeps the caution options of this optimizer.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 4e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-15,
        weight_decay: float = 0.0,
        caution: bool | Caution = True,
        *,
        decay_order: str = "post_update",
        maximize: bool = False,
        caution_stats: bool = False,
        cautious_weight_decay: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decay_order=decay_order,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            differentiable=False,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
        )
        super().__init__(params, defaults, caution_stats=caution_stats)

    def _validate(self, group: dict[str, Any]) -> dict[str, Any] | None:
        b1, b2 = split_betas(group["betas"])
        hp = dict(
            lr=group["lr"],
            beta1=b1,
            beta2=b2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decay_order=group["decay_order"],
        )
        validate(hp, BETA_NAMES)
        validate(dict(maximize=group["maximize"], cautious_weight_decay=group["cautious_weight_decay"]))
        return self._check_caution(group)

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs):
        """Lazy state initialization only (torch.compile calls ``_init_group`` once, at trace time, as
        torch.optim's): the per-step bookkeeping is :meth:`_advance`."""
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_lr_1"] = 0.0
                state["exp_avg_lr_2"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg_sq"] = torch.zeros_like(p)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])

    # timm's state keeps the learning-rate average as a Python float: traced, every step would recompile on its
    # new value, so this host-side bookkeeping runs eagerly under torch.compile (a graph break, no recompiles)
    @torch.compiler.disable
    def _advance(self, group: dict[str, Any], params: list[Tensor]) -> tuple[list[float], list[Tensor]]:
        """One step of the scalars timm keeps per parameter: ``step``, the learning-rate average ``exp_avg_lr_1``
        and ``exp_avg_lr_2 = 1 - beta2^t``. Returns the rates ``lr / lr_avg`` (0 while ``lr_avg`` is 0) and the
        bias corrections."""
        beta1, beta2 = group["betas"]
        lr = functional._scalar(group["lr"])
        step_sizes, bias_corrections2 = [], []
        for p in params:
            state = self.state[p]
            state["step"].add_(1)
            state["exp_avg_lr_1"] = state["exp_avg_lr_1"] * beta1 + (1 - beta1) * lr
            state["exp_avg_lr_2"] = state["exp_avg_lr_2"] * beta2 + (1 - beta2)
            lr_avg = state["exp_avg_lr_1"]
            step_sizes.append(lr / lr_avg if lr_avg != 0 else 0.0)
            bias_corrections2.append(state["exp_avg_lr_2"])
        return step_sizes, bias_corrections2

    @_use_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs)
            self._check_fused(group, params)
            step_sizes, bias_corrections2 = self._advance(group, params)
            beta1, beta2 = group["betas"]
            _step_fn(functional.laprop, group)(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                step_sizes,
                bias_corrections2,
                foreach=group["foreach"],
                fused=group["fused"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decay_order=group["decay_order"],
                maximize=group["maximize"],
                caution=_caution_of(group["caution"]),
                cautious_weight_decay=group["cautious_weight_decay"],
                stats=getattr(self, "_caution_stats", None),
            )
        return loss


class Muon(_CautiousOptimizer):
    r"""Cautious Muon (momentum orthogonalized by Newton-Schulz), a drop-in for ``torch.optim.Muon``.

    .. math::

        m' = \mu m + (1-\mu) g,\quad v = (1-\mu) g + \mu m' \text{ (nesterov) else } m',\quad
        u = s(R, C)\,\mathrm{NS}(v),\quad
        p' = p (1 - \eta\lambda) - \eta\,\text{mask}(u, g)\,\text{scale}\,u

    See :func:`cautious.spec.muon`. Same arguments and defaults as ``torch.optim.Muon`` (2-d
    parameters only; Newton-Schulz in bfloat16, as torch), plus ``caution``, ``caution_stats``,
    ``cautious_weight_decay`` and ``mask_position`` (``"after"``: mask the orthogonalized update,
    the default; ``"before"``: mask ``v`` and orthogonalize the masked matrix) and ``ns_dtype``
    (``"bfloat16"``, torch's, by default; ``"float32"``/``"float64"`` orthogonalize in that dtype,
    which the conformance suite uses: docs/conformance.md, "Muon"). State:
    ``momentum_buffer`` (as torch). ``foreach=True`` runs the momentum and the mask with foreach
    ops (torch's Muon has no foreach path); there is no fused path (``fused=True`` is refused).
    DTensor parameters are refused: Newton-Schulz needs the whole matrix, and a shard is not one.
    """

    _CAUTION_KEYS = ("caution", "cautious_weight_decay", "mask_position")

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        caution: bool | Caution = True,
        caution_stats: bool = False,
        cautious_weight_decay: bool = False,
        mask_position: str = "after",
        ns_dtype: str = "bfloat16",
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        functional._no_fused("Muon", foreach, fused)
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            foreach=foreach,
            differentiable=False,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
            mask_position=mask_position,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults, caution_stats=caution_stats)

    def _validate(self, group: dict[str, Any]) -> dict[str, Any] | None:
        validate(
            dict(
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                eps=group["eps"],
                ns_steps=group["ns_steps"],
                mask_position=group["mask_position"],
                ns_dtype=group.get("ns_dtype", "bfloat16"),
            )
        )
        validate(dict(nesterov=group["nesterov"], cautious_weight_decay=group["cautious_weight_decay"]))
        if group["adjust_lr_fn"] is not None:  # torch's None means "original"
            validate(dict(adjust_lr_fn=group["adjust_lr_fn"]))
        split_ns_coefficients(group["ns_coefficients"])
        return self._check_caution(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group: its parameters must be 2-d, and not DTensors (Newton-Schulz needs the whole matrix)."""
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        dtensor = _distributed._dtensor_type()
        try:
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                name = repr(names[i]) if names else f"param_groups[{gi}]['params'][{i}]"
                if dtensor is not None and isinstance(p, dtensor):
                    raise ValueError(
                        f"cautious.torch.Muon does not support DTensor parameters (parameter {name}): "
                        "Newton-Schulz orthogonalizes the whole matrix, and a shard is not one"
                    )
                check_muon_shape(f"parameter {name}", tuple(p.shape))
        except Exception:
            self.param_groups.pop()
            raise

    def _init_group(self, group, params, grads, momentum_buffer_list):
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("cautious.torch.Muon does not support complex parameters (as torch.optim.Muon)")
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            momentum_buffer_list.append(state["momentum_buffer"])

    @_use_grad
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        groups = []
        for group in self.param_groups:  # every check before the first change
            params, grads, momentum_buffer_list = [], [], []
            self._init_group(group, params, grads, momentum_buffer_list)
            groups.append((group, params, grads, momentum_buffer_list))
        for group, params, grads, momentum_buffer_list in groups:
            functional.muon(
                params,
                grads,
                momentum_buffer_list,
                foreach=group["foreach"],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                ns_coefficients=group["ns_coefficients"],
                eps=group["eps"],
                ns_steps=group["ns_steps"],
                adjust_lr_fn=group["adjust_lr_fn"],
                caution=_caution_of(group["caution"]),
                cautious_weight_decay=group["cautious_weight_decay"],
                mask_position=group["mask_position"],
                ns_dtype=group.get("ns_dtype", "bfloat16"),
                stats=getattr(self, "_caution_stats", None),
            )
        return loss
