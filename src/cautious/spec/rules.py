r"""Base rules: pure functions from a gradient to a descent direction.

A :class:`Rule` is the part of an optimizer that turns the gradient ``g`` into
the direction ``u`` (descent convention: the optimizer moves
``p <- p - lr * u``), before the learning rate and before decoupled weight
decay. Rules know nothing about caution; :func:`cautious` wraps any of them.

Per-tensor state is an immutable NamedTuple (``AdamState``, ``LionState``,
``SGDState``); ``step`` is the 1-based index of the step being taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from cautious._caution import Caution
from cautious.spec.mask import apply_caution, whole_update

__all__ = [
    "Rule",
    "AdamState",
    "LionState",
    "SGDState",
    "adam_rule",
    "lion_rule",
    "sgd_rule",
    "cautious",
    "UpdateRule",
    "sgd_velocity",
    "sgd_velocity_rule",
    "cautious_update",
    "adam_direction",
    "lion_direction",
    "sgd_direction",
    "AdoptState",
    "LaPropState",
    "adopt_direction",
    "adopt_rule",
    "laprop_update",
    "laprop_rule",
]


class Rule(NamedTuple):
    """A base rule: ``init(p) -> s`` and ``direction(g, s, step) -> (u, s_new)``."""

    name: str
    init: Callable[[np.ndarray], Any]
    direction: Callable[[np.ndarray, Any, int], tuple[np.ndarray, Any]]


class AdamState(NamedTuple):
    """Adam's per-tensor state: first moment ``m``, second moment ``v``, and ``v_max`` (amsgrad, else None)."""

    m: np.ndarray
    v: np.ndarray
    v_max: np.ndarray | None = None


class LionState(NamedTuple):
    """Lion's per-tensor state: the momentum ``m``."""

    m: np.ndarray


class SGDState(NamedTuple):
    """SGD's per-tensor state: the momentum buffer ``m`` (None when momentum is 0)."""

    m: np.ndarray | None


def adam_direction(
    g: np.ndarray,
    s: AdamState,
    step: int,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    amsgrad: bool = False,
    eps_placement: str = "corrected",
) -> tuple[np.ndarray, AdamState]:
    r"""Adam's direction.

    .. math::

        m' &= \beta_1 m + (1-\beta_1) g, \qquad v' = \beta_2 v + (1-\beta_2) g^2,
        \qquad \hat v = \max(v_{max}, v') \text{ if amsgrad else } v' \\
        u &= \frac{m' / (1-\beta_1^t)}{\sqrt{\hat v / (1-\beta_2^t)} + \epsilon}
        \quad\text{(eps\_placement="corrected": torch, optax)} \\
        u &= \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\cdot\frac{m'}{\sqrt{\hat v} + \epsilon}
        \quad\text{(eps\_placement="uncorrected": Keras, TF, HF)}

    Bias corrections are computed in float64 from the float64 betas.
    Because the denominator is positive, ``sign(u) == sign(m')``.
    """
    m = beta1 * s.m + (1.0 - beta1) * g
    v = beta2 * s.v + (1.0 - beta2) * (g * g)
    v_max = np.maximum(s.v_max, v) if amsgrad else None
    v_used = v_max if amsgrad else v
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    if eps_placement == "corrected":
        u = (m / bc1) / (np.sqrt(v_used / bc2) + eps)
    else:
        u = (math.sqrt(bc2) / bc1) * (m / (np.sqrt(v_used) + eps))
    return u, AdamState(m, v, v_max)


def lion_direction(
    g: np.ndarray, s: LionState, step: int, *, beta1: float, beta2: float
) -> tuple[np.ndarray, LionState]:
    r"""Lion's direction (Chen et al. 2023).

    .. math::

        u = \operatorname{sign}(\beta_1 m + (1-\beta_1) g), \qquad
        m' = \beta_2 m + (1-\beta_2) g

    ``sign(0) = 0`` and ``sign(NaN) = NaN``.
    """
    del step
    u = np.sign(beta1 * s.m + (1.0 - beta1) * g)
    m = beta2 * s.m + (1.0 - beta2) * g
    return u, LionState(m)


def sgd_direction(
    g: np.ndarray,
    s: SGDState,
    step: int,
    *,
    momentum: float,
    dampening: float = 0.0,
    nesterov: bool = False,
) -> tuple[np.ndarray, SGDState]:
    r"""SGD-momentum's direction, as torch.optim.SGD.

    .. math::

        m' = g \text{ at step 1, else } \mu m + (1-\tau) g, \qquad
        u = g + \mu m' \text{ (nesterov) else } m'

    With ``momentum == 0`` there is no buffer and ``u = g``.
    """
    if momentum == 0:
        return g, SGDState(None)
    m = g.copy() if step == 1 else momentum * s.m + (1.0 - dampening) * g
    u = g + momentum * m if nesterov else m
    return u, SGDState(m)


def _zeros_like(p: np.ndarray) -> np.ndarray:
    return np.zeros_like(p)


def adam_rule(
    *, beta1: float, beta2: float, eps: float, amsgrad: bool = False, eps_placement: str = "corrected"
) -> Rule:
    """Adam as a :class:`Rule`."""

    def init(p: np.ndarray) -> AdamState:
        return AdamState(_zeros_like(p), _zeros_like(p), _zeros_like(p) if amsgrad else None)

    def direction(g: np.ndarray, s: AdamState, step: int) -> tuple[np.ndarray, AdamState]:
        return adam_direction(
            g, s, step, beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad, eps_placement=eps_placement
        )

    return Rule("adam", init, direction)


def lion_rule(*, beta1: float, beta2: float) -> Rule:
    """Lion as a :class:`Rule`."""

    def direction(g: np.ndarray, s: LionState, step: int) -> tuple[np.ndarray, LionState]:
        return lion_direction(g, s, step, beta1=beta1, beta2=beta2)

    return Rule("lion", lambda p: LionState(_zeros_like(p)), direction)


def sgd_rule(*, momentum: float, dampening: float = 0.0, nesterov: bool = False) -> Rule:
    """SGD-momentum as a :class:`Rule`."""

    def init(p: np.ndarray) -> SGDState:
        return SGDState(_zeros_like(p) if momentum != 0 else None)

    def direction(g: np.ndarray, s: SGDState, step: int) -> tuple[np.ndarray, SGDState]:
        return sgd_direction(g, s, step, momentum=momentum, dampening=dampening, nesterov=nesterov)

    return Rule("sgd", init, direction)


def cautious(rule: Rule, caution: Caution) -> Rule:
    r"""Wrap any base rule with the cautious mask: the one place caution is written.

    .. math::  u^c = \text{mask}(u, g) \cdot \text{scale} \cdot u

    The wrapped rule has the same state as the inner rule, untouched: caution
    only changes the direction it returns. See :mod:`cautious.spec.mask`.
    """

    def direction(g: np.ndarray, s: Any, step: int) -> tuple[np.ndarray, Any]:
        u, s_new = rule.direction(g, s, step)
        u_c, _, _, _ = apply_caution(u, g, caution)
        return u_c, s_new

    return Rule(f"cautious({rule.name})", rule.init, direction)


# -- the update form: rules whose state carries the learning rate ------------------------------------


class UpdateRule(NamedTuple):
    r"""A base rule in *update form*: ``init(p) -> s`` and ``update(g, s, step, lr) -> (delta, s_new)``.

    ``delta`` is the parameter update itself (``p' = p + delta``, before decoupled decay),
    with the learning rate inside; the state may carry it too (Keras's SGD velocity), so
    the rule needs the step's ``lr``. Caution applies to ``delta`` in the whole-update
    form (:func:`cautious_update`, :func:`cautious.spec.whole_update`).
    """

    name: str
    init: Callable[[np.ndarray], Any]
    update: Callable[[np.ndarray, Any, int, float], tuple[np.ndarray, Any]]


def sgd_velocity(
    g: np.ndarray, s: SGDState, step: int, *, lr: float, momentum: float, nesterov: bool = False
) -> tuple[np.ndarray, SGDState]:
    r"""SGD-momentum in Keras's velocity form (``momentum_form="keras"``).

    .. math::

        m' = \mu m - \eta g, \qquad
        \delta = \mu m' - \eta g \text{ (nesterov) else } m'

    The buffer ``m`` is Keras's ``momentums`` slot and carries ``-lr``: for a constant
    learning rate ``m = -lr * m_torch`` and ``delta = -lr * u`` of :func:`sgd_direction`
    (``dampening=0``). With a schedule they differ: here each gradient enters the buffer
    with the learning rate of its own step. With ``momentum == 0``: ``delta = -lr * g``, no buffer.
    """
    del step
    if momentum == 0:
        return -lr * g, SGDState(None)
    m = momentum * s.m - lr * g
    delta = momentum * m - lr * g if nesterov else m
    return delta, SGDState(m)


def sgd_velocity_rule(*, momentum: float, nesterov: bool = False) -> UpdateRule:
    """SGD-momentum in Keras's velocity form as an :class:`UpdateRule`."""

    def init(p: np.ndarray) -> SGDState:
        return SGDState(_zeros_like(p) if momentum != 0 else None)

    def update(g: np.ndarray, s: SGDState, step: int, lr: float) -> tuple[np.ndarray, SGDState]:
        return sgd_velocity(g, s, step, lr=lr, momentum=momentum, nesterov=nesterov)

    return UpdateRule("sgd", init, update)


def cautious_update(rule: UpdateRule, caution: Caution) -> UpdateRule:
    r"""Wrap an update-form rule with the cautious mask, in the whole-update form.

    .. math::  \delta^c = \text{mask}(\delta, -g) \cdot \text{scale} \cdot \delta

    (the descent direction is ``-delta``; see :func:`cautious.spec.whole_update`). The
    state is the inner rule's, untouched.
    """

    def update(g: np.ndarray, s: Any, step: int, lr: float) -> tuple[np.ndarray, Any]:
        delta, s_new = rule.update(g, s, step, lr)
        delta_c, _, _, _ = whole_update(delta, g, caution)
        return delta_c, s_new

    return UpdateRule(f"cautious({rule.name})", rule.init, update)


# -- ADOPT and LaProp -----------------------------------------------------------------------------------


class AdoptState(NamedTuple):
    """ADOPT's per-tensor state: the first moment ``m`` of normalized gradients and the second moment ``v``."""

    m: np.ndarray
    v: np.ndarray


def adopt_direction(
    g: np.ndarray,
    s: AdoptState,
    step: int,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    clip_exp: float | None = 0.333,
    nesterov: bool = False,
) -> tuple[np.ndarray, AdoptState]:
    r"""ADOPT's direction (Taniguchi et al. 2024, arXiv:2411.02853).

    The first step only initializes the second moment and takes no step:

    .. math::

        t = 1:\quad v' = g^2,\quad m' = m,\quad u = 0

    Every later step normalizes ``g`` by the *previous* second moment, then updates it:

    .. math::

        n &= \operatorname{clip}\big(g / \max(\sqrt{v}, \epsilon),\ \pm c_t\big), \qquad
        c_t = (t-1)^{\text{clip\_exp}} \\
        m' &= \beta_1 m + (1-\beta_1) n, \qquad
        u = m' \text{ (or } \beta_1 m' + (1-\beta_1) n \text{ with nesterov)}, \qquad
        v' = \beta_2 v + (1-\beta_2) g^2

    ``clip_exp=None``: no clipping. ``t - 1`` is the number of steps that moved the
    parameters (timm and optax clip at ``(t-1)^e``, with ``e = 0.333`` in timm and
    ``0.25`` in optax and the paper). ``nesterov`` is optax's option.
    """
    if step == 1:
        return np.zeros_like(g), AdoptState(s.m, g * g)
    n = g / np.maximum(np.sqrt(s.v), eps)
    if clip_exp is not None:
        c = float(step - 1) ** clip_exp
        n = np.clip(n, -c, c)
    m = beta1 * s.m + (1.0 - beta1) * n
    u = beta1 * m + (1.0 - beta1) * n if nesterov else m
    v = beta2 * s.v + (1.0 - beta2) * (g * g)
    return u, AdoptState(m, v)


def adopt_rule(
    *, beta1: float, beta2: float, eps: float, clip_exp: float | None = 0.333, nesterov: bool = False
) -> Rule:
    """ADOPT as a :class:`Rule`."""

    def init(p: np.ndarray) -> AdoptState:
        return AdoptState(_zeros_like(p), _zeros_like(p))

    def direction(g: np.ndarray, s: AdoptState, step: int) -> tuple[np.ndarray, AdoptState]:
        return adopt_direction(g, s, step, beta1=beta1, beta2=beta2, eps=eps, clip_exp=clip_exp, nesterov=nesterov)

    return Rule("adopt", init, direction)


class LaPropState(NamedTuple):
    """LaProp's per-tensor state: momentum ``m`` (it carries the learning rate), second moment ``v``,
    and ``lr_avg``, the same moving average of the learning rates alone (a float64 scalar)."""

    m: np.ndarray
    v: np.ndarray
    lr_avg: np.ndarray


def laprop_update(
    g: np.ndarray, s: LaPropState, step: int, *, lr: float, beta1: float, beta2: float, eps: float
) -> tuple[np.ndarray, LaPropState]:
    r"""LaProp's update (Ziyin et al. 2020, arXiv:2002.04839), in update form.

    LaProp normalizes the gradient *before* the momentum, and its momentum carries the
    learning rate of each step:

    .. math::

        v' &= \beta_2 v + (1-\beta_2) g^2, \qquad
        n = \frac{g}{\sqrt{v' / (1-\beta_2^t)} + \epsilon} \\
        m' &= \beta_1 m + (1-\beta_1)\,\eta_t\, n, \qquad
        \bar\eta' = \beta_1 \bar\eta + (1-\beta_1)\,\eta_t, \qquad
        \delta = -\frac{\eta_t}{\bar\eta'}\, m'

    ``\bar\eta'`` is the bias correction of ``m'`` (``eta_t (1-beta1^t)`` for a constant
    learning rate, where ``delta = -eta * u`` with ``u`` Adam-like: the bias-corrected
    average of ``n``); ``delta = 0`` while ``\bar\eta' = 0``. ``sign(delta) = -sign(m')``.
    """
    v = beta2 * s.v + (1.0 - beta2) * (g * g)
    n = g / (np.sqrt(v / (1.0 - beta2**step)) + eps)
    m = beta1 * s.m + ((1.0 - beta1) * lr) * n
    lr_avg = beta1 * s.lr_avg + (1.0 - beta1) * lr
    step_size = lr / float(lr_avg) if float(lr_avg) != 0 else 0.0
    return -step_size * m, LaPropState(m, v, np.asarray(lr_avg, dtype=np.float64))


def laprop_rule(*, beta1: float, beta2: float, eps: float) -> UpdateRule:
    """LaProp as an :class:`UpdateRule` (its momentum carries the learning rate)."""

    def init(p: np.ndarray) -> LaPropState:
        return LaPropState(_zeros_like(p), _zeros_like(p), np.zeros((), np.float64))

    def update(g: np.ndarray, s: LaPropState, step: int, lr: float) -> tuple[np.ndarray, LaPropState]:
        return laprop_update(g, s, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps)

    return UpdateRule("laprop", init, update)
