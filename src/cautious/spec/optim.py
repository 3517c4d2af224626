r"""Reference optimizers: pure functions over immutable state.

Every optimizer here is the same generic step around a base :class:`~cautious.spec.rules.Rule`:

.. math::

    g &\leftarrow -g \text{ if maximize} \\
    g &\leftarrow g + \lambda p \quad\text{(coupled L2 decay, when decay is coupled)} \\
    u, s' &= \text{rule.direction}(g, s, t) \\
    u &\leftarrow \text{mask}(u, g)\cdot\text{scale}\cdot u \quad\text{(when caution is on)} \\
    p' &= p \odot (1 - \eta\,\lambda\, d) - \eta\, u
    \quad\text{(decoupled decay; } d = [u \cdot p \ge 0] \text{ if cautious\_weight\_decay else } 1)

Decoupled decay is computed in the multiplicative form ``p * (1 - lr*wd)``, as
torch, timm and heavyball do: it equals ``p - lr*wd*p`` for finite ``p`` and keeps
an infinite parameter infinite, where the additive form (optax) gives NaN. The
conformance checker admits either value at a non-finite parameter
(docs/conformance.md, "Non-finite parameters").

``g`` in the mask is the gradient the rule consumed: after the maximize
negation and after coupled decay. Decoupled decay is never masked by caution.
Caution never changes ``s'``.

Each factory returns an :class:`Optimizer` with ``init(params) -> state`` and
``step(params, grads, state) -> (new_params, new_state)`` over sequences of
NumPy arrays. Arithmetic is float64; each result is rounded once to the dtype
of the array it replaces.

>>> import numpy as np, cautious.spec as spec
>>> opt = spec.adamw(lr=0.1, weight_decay=0.0)
>>> state = opt.init([np.zeros(3)])
>>> (p,), state = opt.step([np.array([1.0, 1.0, 1.0])], [np.array([1.0, -1.0, 0.0])], state)
>>> p.round(6).tolist(), state.step
([0.85, 1.15, 1.0], 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from cautious._caution import Caution, caution_arg
from cautious.spec.errors import (
    check_cautious_weight_decay,
    check_momentum_form,
    check_muon_shape,
    check_nesterov,
    check_param_dtype,
    split_betas,
    split_ns_coefficients,
    validate,
)
from cautious.spec.mask import CautionStats, apply_caution, decay_mask, whole_step, whole_update
from cautious.spec.rules import (
    Rule,
    UpdateRule,
    adafactor_momentum_rule,
    adafactor_rule,
    adam_rule,
    adopt_rule,
    cautious,
    cautious_update,
    laprop_rule,
    lion_rule,
    muon_momentum_rule,
    muon_orthogonalize,
    muon_rule,
    nadam_rule,
    rmsprop_rule,
    rmsprop_velocity_rule,
    sgd_rule,
    sgd_velocity_rule,
)

__all__ = [
    "State",
    "Optimizer",
    "adam",
    "adamw",
    "lion",
    "sgd",
    "make_optimizer",
    "nadam",
    "nadamw",
    "rmsprop",
    "adafactor",
    "adopt",
    "laprop",
    "muon",
    "cautious_optimizer",
]


class State(NamedTuple):
    """Optimizer state: ``step`` (steps taken so far) and one rule state per tensor."""

    step: int
    leaves: tuple[Any, ...]


class Optimizer(NamedTuple):
    """A reference optimizer: ``init``, ``step``, the hyperparameters it was built with, and ``stats``.

    ``stats(params, grads, state)`` is the caution telemetry of the step
    ``step(params, grads, state)`` takes: per tensor a :class:`~cautious.spec.mask.CautionStats`
    (kept ``count``, size ``n``, ``scale``), or ``None`` for every tensor without caution.
    """

    init: Any
    step: Any
    rule: str
    hparams: Mapping[str, Any]
    stats: Any = None


def _f64(x: Any) -> Any:
    return None if x is None else np.asarray(x, dtype=np.float64)


def _cast_like(new: Any, old: Any) -> Any:
    if isinstance(new, tuple) and hasattr(new, "_fields"):
        return type(new)(*(_cast_like(a, b) for a, b in zip(new, old)))
    if new is None:
        return None
    return np.asarray(new, dtype=np.asarray(old).dtype)


def make_optimizer(
    rule: Rule | UpdateRule,
    *,
    lr: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    caution: Caution | None,
    cautious_weight_decay: bool,
    hparams: Mapping[str, Any],
    step_size: Callable[[np.ndarray, int], float] | None = None,
    decay_lr: float | None = None,
    first_decay_step: int = 1,
    decay_order: str = "pre_update",
    then: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Optimizer:
    """Build the generic step around ``rule``; see the module docstring for the math.

    ``then``: a map applied to the direction after caution (Muon's orthogonalization with
    ``mask_position="before"``): ``u = then(mask(u0, g) scale u0)`` of the rule's ``u0``.

    An :class:`~cautious.spec.rules.UpdateRule` (update form) gives ``delta`` with the
    learning rate inside: ``eta * u`` is replaced by ``-delta``, and caution masks ``delta``
    in the whole-update form.

    ``step_size(p, t)``, when given, is the learning rate ``eta`` of tensor ``p`` (float64, before
    decay) at step ``t`` in place of ``lr`` (Adafactor: the relative step times the parameter scale);
    ``decay_lr`` replaces ``lr`` in the decay factor ``1 - lr * weight_decay`` (Adafactor's optax form: 1).

    ``first_decay_step``: decoupled decay applies from this step on (ADOPT: 2, its first step
    only initializes the second moment and leaves the parameters as they are).
    ``decay_order="post_update"``: decoupled decay shrinks the *updated* parameter,
    ``p' = (p - eta u)(1 - eta lambda)`` (LaProp's reference code and timm), instead of
    ``p' = p (1 - eta lambda) - eta u``; the decay mask is still decided from ``p``.
    """
    check_cautious_weight_decay(cautious_weight_decay, decoupled)
    wrap = cautious_update if isinstance(rule, UpdateRule) else cautious
    inner = wrap(rule, caution) if caution is not None else rule
    lr = float(lr)
    wd = float(weight_decay)
    decay_factor = 1.0 - (lr if decay_lr is None else float(decay_lr)) * wd

    def eta(p64: np.ndarray, t: int) -> float:
        return lr if step_size is None else float(step_size(p64, t))

    def check_params(params: Sequence[np.ndarray]) -> None:
        for i, p in enumerate(params):
            check_param_dtype(f"parameter {i}", np.asarray(p).dtype)

    def init(params: Sequence[np.ndarray]) -> State:
        check_params(params)
        return State(0, tuple(rule.init(np.asarray(p)) for p in params))

    def step(params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: State) -> tuple[list[np.ndarray], State]:
        if not (len(params) == len(grads) == len(state.leaves)):
            raise ValueError(
                f"params, grads and state must have the same length, got "
                f"{len(params)}, {len(grads)} and {len(state.leaves)}"
            )
        check_params(params)
        for p, g in zip(params, grads):
            if np.shape(g) != np.shape(p):
                raise ValueError(f"gradient shape {np.shape(g)} does not match parameter shape {np.shape(p)}")
        t = int(state.step) + 1
        new_params, new_leaves = [], []
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for p, g, s in zip(params, grads, state.leaves):
                p_new, s_new = one(np.asarray(p), g, s, t)
                new_params.append(p_new)
                new_leaves.append(s_new)
        return new_params, State(t, tuple(new_leaves))

    def consumed(p64: np.ndarray, g: np.ndarray) -> np.ndarray:
        """The gradient the rule consumes (and the mask compares with)."""
        g64 = _f64(g)
        if maximize:
            g64 = -g64
        if wd != 0 and not decoupled:
            g64 = g64 + wd * p64
        return g64

    def stats(params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: State) -> tuple:
        if caution is None:
            return tuple(None for _ in params)
        t = int(state.step) + 1
        out = []
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for p, g, s in zip(params, grads, state.leaves, strict=True):
                g64 = consumed(_f64(p), g)
                s64 = type(s)(*(_f64(x) for x in s))
                if isinstance(rule, UpdateRule):
                    delta, _ = rule.update(g64, s64, t, eta(_f64(p), t))
                    _, _, count, scale = whole_update(delta, g64, caution)
                else:
                    u, _ = rule.direction(g64, s64, t)
                    _, _, count, scale = apply_caution(u, g64, caution)
                out.append(CautionStats(count, int(np.size(p)), scale))
        return tuple(out)

    def one(p: np.ndarray, g: np.ndarray, s: Any, t: int) -> tuple[np.ndarray, Any]:
        p64 = _f64(p)
        g64 = consumed(p64, g)
        s64 = type(s)(*(_f64(x) for x in s))
        if isinstance(inner, UpdateRule):  # update form: the learning rate is inside delta
            delta, s_new = inner.update(g64, s64, t, eta(p64, t))
            u, lr_u = -delta, -delta
        else:
            u, s_new = inner.direction(g64, s64, t)
            if then is not None:
                u = then(u)
            lr_u = eta(p64, t) * u
        if wd != 0 and decoupled and t >= first_decay_step and decay_order == "post_update":
            moved = p64 - lr_u
            shrunk = moved * decay_factor
            p_new = shrunk if not cautious_weight_decay else np.where(decay_mask(u, p64), shrunk, moved)
        elif wd != 0 and decoupled and t >= first_decay_step:
            # multiplicative form p * (1 - lr*wd): an infinite parameter stays infinite (p - lr*wd*p is NaN)
            shrunk = p64 * decay_factor
            p_new = (shrunk if not cautious_weight_decay else np.where(decay_mask(u, p64), shrunk, p64)) - lr_u
        else:
            p_new = p64 - lr_u
        return np.asarray(p_new, dtype=p.dtype), _cast_like(s_new, s)

    return Optimizer(init, step, rule.name, dict(hparams), stats)


BETA_NAMES = {"beta1": "betas[0]", "beta2": "betas[1]"}


def _common(caution: Any, **flags: Any) -> Caution | None:
    validate(flags)
    return caution_arg(caution)


def adam(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    caution: bool | Caution = True,
    eps_placement: str = "corrected",
    cautious_weight_decay: bool = False,
) -> Optimizer:
    """Cautious Adam (coupled L2 decay, as torch.optim.Adam). ``caution=False`` is plain Adam."""
    b1, b2 = split_betas(betas)
    hp = dict(lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=weight_decay, eps_placement=eps_placement)
    validate(hp, BETA_NAMES)
    c = _common(
        caution,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        cautious_weight_decay=cautious_weight_decay,
    )
    rule = adam_rule(beta1=float(b1), beta2=float(b2), eps=float(eps), amsgrad=amsgrad, eps_placement=eps_placement)
    hp.update(
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled=decoupled_weight_decay,
        caution=c,
        cautious_weight_decay=cautious_weight_decay,
    )
    return make_optimizer(
        rule,
        lr=lr,
        weight_decay=weight_decay,
        decoupled=decoupled_weight_decay,
        maximize=maximize,
        caution=c,
        cautious_weight_decay=cautious_weight_decay,
        hparams=hp,
    )


def adamw(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    caution: bool | Caution = True,
    eps_placement: str = "corrected",
    cautious_weight_decay: bool = False,
) -> Optimizer:
    """Cautious AdamW (decoupled decay, as torch.optim.AdamW). ``caution=False`` is plain AdamW."""
    return adam(
        lr,
        betas,
        eps,
        weight_decay,
        amsgrad,
        maximize=maximize,
        decoupled_weight_decay=True,
        caution=caution,
        eps_placement=eps_placement,
        cautious_weight_decay=cautious_weight_decay,
    )


def lion(
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    caution: bool | Caution = True,
    cautious_weight_decay: bool = False,
) -> Optimizer:
    """Cautious Lion (decoupled decay). ``caution=False`` is plain Lion."""
    b1, b2 = split_betas(betas)
    hp = dict(lr=lr, beta1=b1, beta2=b2, weight_decay=weight_decay)
    validate(hp, BETA_NAMES)
    c = _common(caution, maximize=maximize, cautious_weight_decay=cautious_weight_decay)
    hp.update(maximize=maximize, decoupled=True, caution=c, cautious_weight_decay=cautious_weight_decay)
    return make_optimizer(
        lion_rule(beta1=float(b1), beta2=float(b2)),
        lr=lr,
        weight_decay=weight_decay,
        decoupled=True,
        maximize=maximize,
        caution=c,
        cautious_weight_decay=cautious_weight_decay,
        hparams=hp,
    )


def sgd(
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    caution: bool | Caution = True,
    cautious_weight_decay: bool = False,
    momentum_form: str = "torch",
) -> Optimizer:
    """Cautious SGD with momentum (as torch.optim.SGD, plus optional decoupled decay).

    ``momentum_form="torch"`` (default): :func:`~cautious.spec.sgd_direction`, the buffer holds
    ``m`` and the learning rate multiplies the direction. ``momentum_form="keras"``: Keras's
    velocity form, :func:`~cautious.spec.sgd_velocity` (the buffer carries ``-lr``; caution
    masks the whole update); requires ``dampening == 0``.
    """
    hp = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, momentum_form=momentum_form)
    validate(hp)
    c = _common(
        caution,
        nesterov=nesterov,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        cautious_weight_decay=cautious_weight_decay,
    )
    check_nesterov(nesterov, momentum, dampening)
    check_momentum_form(momentum_form, dampening)
    if momentum_form == "keras":
        rule: Rule | UpdateRule = sgd_velocity_rule(momentum=float(momentum), nesterov=nesterov)
    else:
        rule = sgd_rule(momentum=float(momentum), dampening=float(dampening), nesterov=nesterov)
    hp.update(
        nesterov=nesterov,
        maximize=maximize,
        decoupled=decoupled_weight_decay,
        caution=c,
        cautious_weight_decay=cautious_weight_decay,
    )
    return make_optimizer(
        rule,
        lr=lr,
        weight_decay=weight_decay,
        decoupled=decoupled_weight_decay,
        maximize=maximize,
        caution=c,
        cautious_weight_decay=cautious_weight_decay,
        hparams=hp,
    )


def nadam(
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
    caution: bool | Caution = True,
    cautious_weight_decay: bool = False,
    momentum_schedule: str = "dozat",
) -> Optimizer:
    """Cautious NAdam (as torch.optim.NAdam; :func:`~cautious.spec.nadam_direction`). ``caution=False`` is NAdam.

    ``momentum_schedule="dozat"`` (torch, Keras): ``mu_t = beta1 (1 - 0.5 * 0.96**(t * momentum_decay))``
    (Keras 3 is ``momentum_decay=1``); ``"constant"`` (optax): ``mu_t = beta1``. With
    ``decoupled_weight_decay=True`` it is NAdamW.
    """
    b1, b2 = split_betas(betas)
    hp = dict(
        lr=lr,
        beta1=b1,
        beta2=b2,
        eps=eps,
        weight_decay=weight_decay,
        momentum_decay=momentum_decay,
        momentum_schedule=momentum_schedule,
    )
    validate(hp, BETA_NAMES)
    c = _common(
        caution,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        cautious_weight_decay=cautious_weight_decay,
    )
    rule = nadam_rule(
        beta1=float(b1),
        beta2=float(b2),
        eps=float(eps),
        momentum_decay=float(momentum_decay),
        momentum_schedule=momentum_schedule,
    )
    hp.update(
        maximize=maximize, decoupled=decoupled_weight_decay, caution=c, cautious_weight_decay=cautious_weight_decay
    )
    return make_optimizer(
        rule,
        lr=lr,
        weight_decay=weight_decay,
        decoupled=decoupled_weight_decay,
        maximize=maximize,
        caution=c,
        cautious_weight_decay=cautious_weight_decay,
        hparams=hp,
    )


def nadamw(
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    momentum_decay: float = 4e-3,
    *,
    maximize: bool = False,
    caution: bool | Caution = True,
    cautious_weight_decay: bool = False,
    momentum_schedule: str = "dozat",
) -> Optimizer:
    """Cautious NAdamW: :func:`nadam` with decoupled weight decay (default 1e-2, as :func:`adamw`)."""
    return nadam(
        lr,
        betas,
        eps,
        weight_decay,
        momentum_decay,
        True,
        maximize=maximize,
        caution=caution,
        cautious_weight_decay=cautious_weight_decay,
        momentum_schedule=momentum_schedule,
    )


def rmsprop(
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    *,
    maximize: bool = False,
    nesterov: bool = False,
    eps_in_sqrt: bool = False,
    initial_scale: float = 0.0,
    decoupled_weight_decay: bool = False,
    caution: bool | Caution = True,
    cautious_weight_decay: bool = False,
    momentum_form: str = "torch",
) -> Optimizer:
    """Cautious RMSprop (as torch.optim.RMSprop; :func:`~cautious.spec.rmsprop_direction`).

    The named differences between frameworks: ``eps_in_sqrt`` (``sqrt(v + eps)``: optax's default
    and Keras; torch adds ``eps`` after the root), ``initial_scale`` (optax's starting ``v``),
    ``nesterov`` (optax), ``decoupled_weight_decay`` (Keras's decay; torch's is L2) and
    ``momentum_form="keras"`` (the buffer carries the learning rate:
    :func:`~cautious.spec.rmsprop_velocity`; caution masks the whole update).
    """
    hp = dict(
        lr=lr,
        alpha=alpha,
        eps=eps,
        weight_decay=weight_decay,
        momentum=momentum,
        initial_scale=initial_scale,
        momentum_form=momentum_form,
    )
    validate(hp)
    c = _common(
        caution,
        centered=centered,
        maximize=maximize,
        nesterov=nesterov,
        eps_in_sqrt=eps_in_sqrt,
        decoupled_weight_decay=decoupled_weight_decay,
        cautious_weight_decay=cautious_weight_decay,
    )
    check_nesterov(nesterov, momentum)
    rh = dict(
        alpha=float(alpha),
        eps=float(eps),
        momentum=float(momentum),
        centered=centered,
        nesterov=nesterov,
        eps_in_sqrt=eps_in_sqrt,
        initial_scale=float(initial_scale),
    )
    rule: Rule | UpdateRule = rmsprop_velocity_rule(**rh) if momentum_form == "keras" else rmsprop_rule(**rh)
    hp.update(
        centered=centered,
        nesterov=nesterov,
        eps_in_sqrt=eps_in_sqrt,
        maximize=maximize,
        decoupled=decoupled_weight_decay,
        caution=c,
        cautious_weight_decay=cautious_weight_decay,
    )
    return make_optimizer(
        rule,
        lr=lr,
        weight_decay=weight_decay,
        decoupled=decoupled_weight_decay,
        maximize=maximize,
        caution=c,
        cautious_weight_decay=cautious_weight_decay,
        hparams=hp,
    )


def adafactor(
    lr: float = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    caution: bool | Caution = True,
    beta1: float = 0.0,
    eps_form: str = "clamp",
    factor_dims: str = "last_two",
    min_dim_size_to_factor: int = 0,
    decay_offset: int = 0,
    relative_step: bool = True,
    multiply_by_parameter_scale: bool = True,
    weight_decay_form: str = "lr",
) -> Optimizer:
    r"""Cautious Adafactor (Shazeer & Stern 2018); defaults are torch.optim.Adafactor's. ``caution=False`` is plain.

    .. math::

        u, s' &= \text{adafactor\_direction}(g, s, t) \quad\text{(factored } \hat v\text{, clipped to rms } d) \\
        \rho_t &= \min(\eta, 1/\sqrt t) \text{ (relative\_step) else } \eta, \qquad
        \alpha_t = \rho_t \cdot \max(\epsilon_2, \operatorname{rms}(p)) \text{ (multiply\_by\_parameter\_scale)} \\
        p' &= p\,(1 - \eta\lambda) - \alpha_t\,\text{mask}(u, g)\,\text{scale}\,u

    Caution applies to ``u`` (after normalization and clipping, before the step size ``alpha_t``).
    ``beta1 > 0`` adds momentum over the scaled updates (optax, timm):
    :func:`~cautious.spec.rules.adafactor_momentum_rule`; caution then masks the momentum. Options
    (each framework's form; docs/spec.md, "Adafactor"): ``eps=(eps1, eps2)`` with ``eps1=None`` the
    parameter dtype's epsilon; ``d`` the clipping threshold (``math.inf``: none); ``eps_form``,
    ``factor_dims``, ``min_dim_size_to_factor``, ``decay_offset``, ``relative_step``,
    ``multiply_by_parameter_scale``; ``weight_decay_form``: ``"lr"`` (torch: ``p(1 - eta wd)``, the
    parameter scale from ``p`` before decay), ``"lr_before_scale"`` (Keras: the same decay, applied before
    the parameter scale is measured), ``"rate"`` (optax's ``weight_decay_rate``: ``p - wd p``).
    """
    try:
        eps1, eps2 = eps
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a pair (eps1 or None, eps2), got {eps!r}") from None
    hp = dict(
        lr=lr,
        beta2_decay=beta2_decay,
        eps1=eps1,
        eps2=eps2,
        clip_threshold=d,
        weight_decay=weight_decay,
        beta1=beta1,
        eps_form=eps_form,
        factor_dims=factor_dims,
        min_dim_size_to_factor=min_dim_size_to_factor,
        decay_offset=decay_offset,
        weight_decay_form=weight_decay_form,
    )
    if eps1 is not None:
        validate({"eps": eps1}, {"eps": "eps[0]"})
    validate({"eps": eps2}, {"eps": "eps[1]"})
    validate({k: v for k, v in hp.items() if k not in ("eps1", "eps2")}, {"clip_threshold": "d"})
    c = _common(
        caution,
        maximize=maximize,
        relative_step=relative_step,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
    )
    options = dict(
        beta2_decay=float(beta2_decay),
        eps1=None if eps1 is None else float(eps1),
        clip_threshold=float(d),
        eps_form=eps_form,
        factor_dims=factor_dims,
        min_dim_size_to_factor=int(min_dim_size_to_factor),
        decay_offset=int(decay_offset),
    )
    rule: Rule | UpdateRule = (
        adafactor_momentum_rule(beta1=float(beta1), **options) if beta1 > 0 else adafactor_rule(**options)
    )
    lr, eps2, wd = float(lr), float(eps2), float(weight_decay)

    def step_size(p64: np.ndarray, t: int) -> float:
        rho = min(lr, 1.0 / math.sqrt(t)) if relative_step else lr
        if not multiply_by_parameter_scale:
            return rho
        if weight_decay_form == "lr_before_scale":
            p64 = p64 * (1.0 - lr * wd)
        rms = float(np.sqrt(np.mean(p64 * p64))) if p64.size else 0.0
        return rho * max(eps2, rms)

    hp.update(
        maximize=maximize,
        relative_step=relative_step,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        decoupled=True,
        caution=c,
        cautious_weight_decay=False,
    )
    return make_optimizer(
        rule,
        lr=lr,
        weight_decay=wd,
        decoupled=True,
        maximize=maximize,
        caution=c,
        cautious_weight_decay=False,
        hparams=hp,
        step_size=step_size,
        decay_lr=1.0 if weight_decay_form == "rate" else None,
    )


def adopt(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.9999),
    eps: float = 1e-6,
    clip_exp: float | None = 0.333,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    nesterov: bool = False,
    maximize: bool = False,
    caution: bool | Caution = True,
    cautious_weight_decay: bool = False,
) -> Optimizer:
    """Cautious ADOPT (:func:`~cautious.spec.rules.adopt_direction`), timm's defaults. ``caution=False`` is plain ADOPT.

    ``clip_exp=None``: no clipping (timm's spelling; optax's ``use_clipping=False``). Weight
    decay is coupled (L2, timm's default) unless ``decoupled_weight_decay``; decoupled decay
    starts at step 2, since the first step does not move the parameters (as timm). On the first
    step ``u = 0``: no entry is kept (``count = 0``, ``scale = Caution.scale(0, n)``) and the
    update is 0 whatever the scale.
    """
    b1, b2 = split_betas(betas)
    hp = dict(lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=weight_decay)
    if clip_exp is not None:
        hp["clip_exp"] = clip_exp
    validate(hp, BETA_NAMES)
    c = _common(
        caution,
        nesterov=nesterov,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        cautious_weight_decay=cautious_weight_decay,
    )
    rule = adopt_rule(
        beta1=float(b1),
        beta2=float(b2),
        eps=float(eps),
        clip_exp=None if clip_exp is None else float(clip_exp),
        nesterov=nesterov,
    )
    hp.update(
        clip_exp=clip_exp,
        nesterov=nesterov,
        maximize=maximize,
        decoupled=decoupled_weight_decay,
        caution=c,
        cautious_weight_decay=cautious_weight_decay,
    )
    return make_optimizer(
        rule,
        lr=lr,
        weight_decay=weight_decay,
        decoupled=decoupled_weight_decay,
        maximize=maximize,
        caution=c,
        cautious_weight_decay=cautious_weight_decay,
        hparams=hp,
        first_decay_step=2,
    )


def laprop(
    lr: float = 4e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-15,
    weight_decay: float = 0.0,
    *,
    decay_order: str = "post_update",
    maximize: bool = False,
    caution: bool | Caution = True,
    cautious_weight_decay: bool = False,
) -> Optimizer:
    """Cautious LaProp (:func:`~cautious.spec.rules.laprop_update`), timm's defaults, decoupled decay.

    ``decay_order="post_update"`` (default; LaProp's reference code and timm) decays the updated
    parameter; ``"pre_update"`` is the AdamW form of the other rules. Caution masks the update
    ``delta`` against ``-g`` (the whole-update form of an update-form rule, before decay): for
    ``lr > 0`` that is ``mask(u, g)`` with ``u = -delta / lr``. ``caution=False`` is plain LaProp.
    """
    b1, b2 = split_betas(betas)
    hp = dict(lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=weight_decay, decay_order=decay_order)
    validate(hp, BETA_NAMES)
    c = _common(caution, maximize=maximize, cautious_weight_decay=cautious_weight_decay)
    hp.update(maximize=maximize, decoupled=True, caution=c, cautious_weight_decay=cautious_weight_decay)
    return make_optimizer(
        laprop_rule(beta1=float(b1), beta2=float(b2), eps=float(eps)),
        lr=lr,
        weight_decay=weight_decay,
        decoupled=True,
        maximize=maximize,
        caution=c,
        cautious_weight_decay=cautious_weight_decay,
        hparams=hp,
        decay_order=decay_order,
    )


#: torch.optim.Muon's Newton-Schulz coefficients (Jordan et al. 2024), also optax's and Keras's defaults.
MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def muon(
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    *,
    caution: bool | Caution = True,
    cautious_weight_decay: bool = False,
    mask_position: str = "after",
    muon_momentum: str = "ema",
    ns_eps: str = "clamp",
    shape_scale: str = "rows_over_cols",
    rms_rate: float = 0.2,
) -> Optimizer:
    r"""Cautious Muon (decoupled decay, as torch.optim.Muon); 2-d parameters only. ``caution=False`` is plain Muon.

    .. math::

        v &= \text{momentum}(g) \quad (\text{muon\_momentum}: :func:`~cautious.spec.muon_momentum_direction`) \\
        u &= \text{mask}(u_0, g)\,\text{scale}\,u_0,\; u_0 = s(R, C)\,\mathrm{NS}(v)
            \quad(\text{mask\_position="after"}) \\
        u &= s(R, C)\,\mathrm{NS}(\text{mask}(v, g)\,\text{scale}\,v)
            \quad(\text{mask\_position="before"}) \\
        p' &= p (1 - \eta\lambda) - \eta\,u

    ``NS`` is :func:`~cautious.spec.newton_schulz` (in float64 here) and ``s`` is
    :func:`~cautious.spec.muon_shape_scale`. The defaults are torch.optim.Muon's; optax's
    contrib ``muon`` is ``muon_momentum="debiased", ns_eps="add", shape_scale="cols_over_rows"``
    and Keras's ``muon_momentum="sum", ns_eps="add", shape_scale="rms"`` (docs/spec.md, "Muon").
    """
    a, b, c = split_ns_coefficients(ns_coefficients)
    hp = dict(
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        eps=eps,
        ns_steps=ns_steps,
        rms_rate=rms_rate,
        mask_position=mask_position,
        muon_momentum=muon_momentum,
        ns_eps=ns_eps,
        shape_scale=shape_scale,
    )
    validate(hp)
    c_ = _common(caution, nesterov=nesterov, cautious_weight_decay=cautious_weight_decay)
    coefficients = (float(a), float(b), float(c))
    ortho = dict(ns_coefficients=coefficients, ns_steps=int(ns_steps), eps=float(eps), ns_eps=ns_eps)
    shape = dict(shape_scale=shape_scale, rms_rate=float(rms_rate))
    momentum_kw = dict(momentum=float(momentum), nesterov=nesterov, muon_momentum=muon_momentum)
    if mask_position == "before" and c_ is not None:
        rule: Rule = muon_momentum_rule(**momentum_kw)
        then = muon_orthogonalize(**ortho, **shape)
    else:
        rule, then = muon_rule(**momentum_kw, **ortho, **shape), None
    hp.update(
        ns_coefficients=coefficients,
        nesterov=nesterov,
        maximize=False,
        decoupled=True,
        caution=c_,
        cautious_weight_decay=cautious_weight_decay,
    )
    opt = make_optimizer(
        rule,
        lr=lr,
        weight_decay=weight_decay,
        decoupled=True,
        maximize=False,
        caution=c_,
        cautious_weight_decay=cautious_weight_decay,
        hparams=hp,
        then=then,
    )

    def init(params: Sequence[np.ndarray]) -> State:
        state = opt.init(params)  # dtypes first, as every optimizer
        for i, p in enumerate(params):
            check_muon_shape(f"parameter {i}", np.shape(p))
        return state

    return opt._replace(init=init)


def cautious_optimizer(optimizer: Optimizer, caution: bool | Caution = True) -> Optimizer:
    r"""Caution for any optimizer: wrap a whole reference :class:`Optimizer` built with ``caution=False``.

    Each step runs ``optimizer`` unchanged, then masks the step it took per tensor
    (:func:`cautious.spec.whole_step`):

    .. math::

        p_{next}, s' &= \text{optimizer.step}(p, g, s) \\
        \delta &= p_{next} - p, \qquad \hat g = -g \text{ if maximize else } g \\
        p' &= p + \text{mask}(\delta, -\hat g)\cdot\text{scale}\cdot\delta

    ``maximize`` is the inner optimizer's own (its ``hparams["maximize"]``, False when absent).
    Everything the inner optimizer puts into the step is masked: weight decay too, unlike
    :func:`adamw`'s form, which masks the direction only (docs/spec.md, "Caution for any
    optimizer"). ``g`` is the gradient handed to ``step``, before coupled decay. The state is
    the inner state, untouched (so it moves freely between the bare and the wrapped optimizer).
    ``caution=False`` returns the bare step.

    Raises ``ValueError`` when ``optimizer`` already has caution on (the mask would apply twice).

    >>> import numpy as np, cautious.spec as spec
    >>> opt = spec.cautious_optimizer(spec.sgd(lr=0.1, caution=False), spec.Caution("exact"))
    >>> (p,), _ = opt.step([np.ones(4)], [np.array([1.0, -1.0, 0.0, 2.0])], opt.init([np.ones(4)]))
    >>> p.round(6).tolist()  # 3 of 4 entries move (g = 0 has no sign): each moves 4/3 as far as bare SGD
    [0.866667, 1.133333, 1.0, 0.733333]
    """
    if optimizer.hparams.get("caution") is not None:
        raise ValueError(
            "cautious_optimizer wraps an optimizer built with caution=False "
            f"(got {optimizer.rule} with caution={optimizer.hparams['caution']!r}: the mask would apply twice)"
        )
    c = caution_arg(caution)
    maximize = bool(optimizer.hparams.get("maximize", False))
    hparams = dict(optimizer.hparams, caution=c)
    name = f"cautious_optimizer({optimizer.rule})"

    def masked(params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: State) -> tuple[list, State, tuple]:
        nexts, new_state = optimizer.step(params, grads, state)
        out, stats = [], []
        for p, q, g in zip(params, nexts, grads, strict=True):
            p_c, _, count, scale = whole_step(p, q, g, c, maximize=maximize)
            out.append(p_c)
            stats.append(CautionStats(count, int(np.size(p)), scale))
        return out, new_state, tuple(stats)

    def step(params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: State) -> tuple[list, State]:
        return masked(params, grads, state)[:2]

    def stats(params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: State) -> tuple:
        return masked(params, grads, state)[2]

    if c is None:
        off = lambda params, grads, state: (None,) * len(params)  # noqa: E731
        return Optimizer(optimizer.init, optimizer.step, name, hparams, off)
    return Optimizer(optimizer.init, step, name, hparams, stats)
