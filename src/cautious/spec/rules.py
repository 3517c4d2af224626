r"""Base rules: pure functions from a gradient to a descent direction.

A :class:`Rule` is the part of an optimizer that turns the gradient ``g`` into
the direction ``u`` (descent convention: the optimizer moves
``p <- p - lr * u``), before the learning rate and before decoupled weight
decay. Rules know nothing about caution; :func:`cautious` wraps any of them.

Per-tensor state is an immutable NamedTuple (``AdamState``, ``LionState``,
``SGDState``, ``AdafactorState``); ``step`` is the 1-based index of the step being taken.
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
    "NAdamState",
    "RMSpropState",
    "nadam_mu",
    "nadam_direction",
    "nadam_rule",
    "rmsprop_direction",
    "rmsprop_rule",
    "rmsprop_velocity",
    "rmsprop_velocity_rule",
    "AdafactorState",
    "factored_axes",
    "adafactor_direction",
    "adafactor_rule",
    "adafactor_momentum_rule",
    "AdoptState",
    "LaPropState",
    "adopt_direction",
    "adopt_rule",
    "laprop_update",
    "laprop_rule",
    "MuonState",
    "muon_momentum_direction",
    "newton_schulz",
    "muon_shape_scale",
    "muon_momentum_rule",
    "muon_orthogonalize",
    "then",
    "muon_rule",
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


# -- NAdam and RMSprop ---------------------------------------------------------------------------------


class NAdamState(NamedTuple):
    """NAdam's per-tensor state: ``m``, ``v`` and ``mu_product`` (0-d: the product of the momentum schedule)."""

    m: np.ndarray
    v: np.ndarray
    mu_product: np.ndarray


class RMSpropState(NamedTuple):
    """RMSprop's per-tensor state: ``v`` (mean square), ``g_avg`` (mean gradient, centered, else None) and the
    momentum buffer ``m`` (None when momentum is 0)."""

    v: np.ndarray
    g_avg: np.ndarray | None
    m: np.ndarray | None


def nadam_mu(step: int, *, beta1: float, momentum_decay: float, momentum_schedule: str) -> float:
    r"""The momentum coefficient of step ``t``: Dozat's schedule or the constant ``beta1``.

    .. math::

        \mu_t = \beta_1\,(1 - \tfrac12\,0.96^{t\,\psi}) \quad\text{(momentum\_schedule="dozat")},
        \qquad \mu_t = \beta_1 \quad\text{("constant")}

    computed in float64 (``psi`` is ``momentum_decay``).
    """
    if momentum_schedule == "constant":
        return float(beta1)
    return float(beta1) * (1.0 - 0.5 * 0.96 ** (step * float(momentum_decay)))


def nadam_direction(
    g: np.ndarray,
    s: NAdamState,
    step: int,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    momentum_decay: float = 4e-3,
    momentum_schedule: str = "dozat",
) -> tuple[np.ndarray, NAdamState]:
    r"""NAdam's direction (Dozat 2016), as torch.optim.NAdam.

    .. math::

        m' &= \beta_1 m + (1-\beta_1) g, \qquad v' = \beta_2 v + (1-\beta_2) g^2, \qquad
        \Pi_t = \Pi_{t-1}\,\mu_t \\
        u &= \frac{1-\mu_t}{1-\Pi_t}\cdot\frac{g}{d} + \frac{\mu_{t+1}}{1-\Pi_t\,\mu_{t+1}}\cdot\frac{m'}{d},
        \qquad d = \sqrt{v' / (1-\beta_2^t)} + \epsilon

    with :func:`nadam_mu`'s ``mu_t``. With ``momentum_schedule="constant"`` (``mu_t = beta1``,
    ``Pi_t = beta1**t``) this is optax's ``nadam``: Adam with a Nesterov look-ahead. ``u`` is a
    positive combination of ``g`` and ``m'``: its sign is neither's in general, so caution
    decides on ``u`` itself. Coefficients are float64.
    """
    hp = dict(beta1=beta1, momentum_decay=momentum_decay, momentum_schedule=momentum_schedule)
    mu = nadam_mu(step, **hp)
    mu_next = nadam_mu(step + 1, **hp)
    prod = s.mu_product * mu
    prod_next = prod * mu_next
    m = beta1 * s.m + (1.0 - beta1) * g
    v = beta2 * s.v + (1.0 - beta2) * (g * g)
    d = np.sqrt(v / (1.0 - beta2**step)) + eps
    u = ((1.0 - mu) / (1.0 - prod)) * (g / d) + (mu_next / (1.0 - prod_next)) * (m / d)
    return u, NAdamState(m, v, np.asarray(prod))


def _rms_denominator(g: np.ndarray, s: RMSpropState, *, alpha: float, eps: float, eps_in_sqrt: bool, centered: bool):
    """``(d, v', g_avg')``: RMSprop's denominator and its new statistics (shared by both forms)."""
    v = alpha * s.v + (1.0 - alpha) * (g * g)
    g_avg = alpha * s.g_avg + (1.0 - alpha) * g if centered else None
    q = v - g_avg * g_avg if centered else v
    d = np.sqrt(q + eps) if eps_in_sqrt else np.sqrt(q) + eps
    return d, v, g_avg


def rmsprop_direction(
    g: np.ndarray,
    s: RMSpropState,
    step: int,
    *,
    alpha: float,
    eps: float,
    momentum: float = 0.0,
    centered: bool = False,
    nesterov: bool = False,
    eps_in_sqrt: bool = False,
) -> tuple[np.ndarray, RMSpropState]:
    r"""RMSprop's direction, as torch.optim.RMSprop (and optax.rmsprop).

    .. math::

        v' &= \alpha v + (1-\alpha) g^2, \qquad \bar g' = \alpha \bar g + (1-\alpha) g \text{ (centered)} \\
        q &= v' - \bar g'^2 \text{ (centered) else } v', \qquad
        d = \sqrt{q} + \epsilon \text{ (torch) or } \sqrt{q + \epsilon} \text{ (eps\_in\_sqrt: optax, Keras)} \\
        r &= g / d, \qquad m' = \mu m + r, \qquad u = r + \mu m' \text{ (nesterov) else } m'

    With ``momentum == 0`` there is no buffer and ``u = r = g / d``: ``d > 0`` gives ``u`` the sign
    of ``g``, so caution masks only exact zeros of ``g`` (where ``u`` is 0 anyway) and changes
    nothing but the scale. Centered: ``q`` is never clamped (as torch): a ``q`` that rounds below
    zero gives ``sqrt(q) = NaN``, which reaches the parameter (caution keeps NaN).
    """
    del step
    d, v, g_avg = _rms_denominator(g, s, alpha=alpha, eps=eps, eps_in_sqrt=eps_in_sqrt, centered=centered)
    r = g / d
    if momentum == 0:
        return r, RMSpropState(v, g_avg, None)
    m = momentum * s.m + r
    u = r + momentum * m if nesterov else m
    return u, RMSpropState(v, g_avg, m)


def rmsprop_velocity(
    g: np.ndarray,
    s: RMSpropState,
    step: int,
    *,
    lr: float,
    alpha: float,
    eps: float,
    momentum: float = 0.0,
    centered: bool = False,
    nesterov: bool = False,
    eps_in_sqrt: bool = True,
) -> tuple[np.ndarray, RMSpropState]:
    r"""RMSprop in Keras's form (``momentum_form="keras"``): the momentum buffer carries the learning rate.

    .. math::

        r = \eta\, g / d, \qquad m' = \mu m + r, \qquad
        \delta = -(r + \mu m') \text{ (nesterov) else } -m'

    (``d`` as :func:`rmsprop_direction`; Keras puts ``eps`` inside the square root). For a
    constant learning rate ``m = lr * m_torch`` and ``delta = -lr * u``; with a schedule each
    ``r`` enters the buffer with its own step's rate. With ``momentum == 0``: ``delta = -lr * g / d``.
    """
    del step
    d, v, g_avg = _rms_denominator(g, s, alpha=alpha, eps=eps, eps_in_sqrt=eps_in_sqrt, centered=centered)
    r = lr * g / d
    if momentum == 0:
        return -r, RMSpropState(v, g_avg, None)
    m = momentum * s.m + r
    return -(r + momentum * m if nesterov else m), RMSpropState(v, g_avg, m)


def nadam_rule(
    *, beta1: float, beta2: float, eps: float, momentum_decay: float = 4e-3, momentum_schedule: str = "dozat"
) -> Rule:
    """NAdam as a :class:`Rule` (``mu_product`` starts at 1)."""

    def init(p: np.ndarray) -> NAdamState:
        return NAdamState(_zeros_like(p), _zeros_like(p), np.asarray(1.0))

    def direction(g: np.ndarray, s: NAdamState, step: int) -> tuple[np.ndarray, NAdamState]:
        return nadam_direction(
            g,
            s,
            step,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            momentum_decay=momentum_decay,
            momentum_schedule=momentum_schedule,
        )

    return Rule("nadam", init, direction)


def _rms_init(initial_scale: float, centered: bool, momentum: float) -> Callable[[np.ndarray], RMSpropState]:
    def init(p: np.ndarray) -> RMSpropState:
        return RMSpropState(
            np.full_like(p, initial_scale),
            _zeros_like(p) if centered else None,
            _zeros_like(p) if momentum != 0 else None,
        )

    return init


def rmsprop_rule(
    *,
    alpha: float,
    eps: float,
    momentum: float = 0.0,
    centered: bool = False,
    nesterov: bool = False,
    eps_in_sqrt: bool = False,
    initial_scale: float = 0.0,
) -> Rule:
    """RMSprop as a :class:`Rule` (``v`` starts at ``initial_scale``: optax's option, 0 in torch and Keras)."""
    hp = dict(alpha=alpha, eps=eps, momentum=momentum, centered=centered, nesterov=nesterov, eps_in_sqrt=eps_in_sqrt)

    def direction(g: np.ndarray, s: RMSpropState, step: int) -> tuple[np.ndarray, RMSpropState]:
        return rmsprop_direction(g, s, step, **hp)

    return Rule("rmsprop", _rms_init(initial_scale, centered, momentum), direction)


def rmsprop_velocity_rule(
    *,
    alpha: float,
    eps: float,
    momentum: float = 0.0,
    centered: bool = False,
    nesterov: bool = False,
    eps_in_sqrt: bool = True,
    initial_scale: float = 0.0,
) -> UpdateRule:
    """RMSprop in Keras's form as an :class:`UpdateRule`."""
    hp = dict(alpha=alpha, eps=eps, momentum=momentum, centered=centered, nesterov=nesterov, eps_in_sqrt=eps_in_sqrt)

    def update(g: np.ndarray, s: RMSpropState, step: int, lr: float) -> tuple[np.ndarray, RMSpropState]:
        return rmsprop_velocity(g, s, step, lr=lr, **hp)

    return UpdateRule("rmsprop", _rms_init(initial_scale, centered, momentum), update)


# -- Adafactor (Shazeer & Stern 2018): factored second moments ----------------------------------------


class AdafactorState(NamedTuple):
    """Adafactor's per-tensor state.

    ``v_row``/``v_col``: the factored second moment (row and column means of ``g^2``, kept dims) when the
    tensor is factored, else None; ``v``: the full second moment when it is not, else None; ``m``: the
    momentum (``beta1 > 0``), else None; ``eps1``: the dtype's machine epsilon when ``eps1`` was left to
    the dtype (torch's ``eps=(None, ...)``; a constant, resolved once at ``init``), else None.
    """

    v_row: np.ndarray | None
    v_col: np.ndarray | None
    v: np.ndarray | None
    m: np.ndarray | None = None
    eps1: np.ndarray | None = None


def factored_axes(shape: tuple[int, ...], factor_dims: str, min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """The axes ``(r, c)`` a tensor's second moment is factored over, or None when it is not factored.

    ``factor_dims="last_two"`` (torch, Keras): the last two axes of every tensor with ``ndim >= 2``.
    ``"largest_two"`` (optax): the two largest axes (``np.argsort(shape)``, as optax). Either way the
    tensor is not factored when the smaller of the two has fewer than ``min_dim_size_to_factor`` entries
    (optax's 128; torch and Keras: 0). The row statistic averages over ``c``, the column one over ``r``.
    """
    if len(shape) < 2:
        return None
    if factor_dims == "last_two":
        axes = (len(shape) - 2, len(shape) - 1)
    else:
        order = np.argsort(shape)
        axes = (int(order[-2]), int(order[-1]))
    if min(shape[axes[0]], shape[axes[1]]) < min_dim_size_to_factor:
        return None
    return axes


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


def adafactor_direction(
    g: np.ndarray,
    s: AdafactorState,
    step: int,
    *,
    beta2_decay: float,
    eps1: float,
    clip_threshold: float,
    eps_form: str = "clamp",
    factor_dims: str = "last_two",
    min_dim_size_to_factor: int = 0,
    decay_offset: int = 0,
) -> tuple[np.ndarray, AdafactorState]:
    r"""Adafactor's normalized, clipped direction (no momentum, no step size).

    With :math:`w_t = (t - t_0)^{c}` (``c = beta2_decay`` :math:`\le 0`, ``t_0 = decay_offset``) the weight
    of the new statistics (:math:`\hat\beta_{2,t} = 1 - w_t`), and :math:`q = g^2` (``eps_form="clamp"``,
    torch) or :math:`q = g^2 + \epsilon_1` (``"add"``: optax, Keras, the paper):

    .. math::

        \text{factored: } R' &= (1-w_t) R + w_t\,\overline{q}^{\,c}, \quad
        C' = (1-w_t) C + w_t\,\overline{q}^{\,r}, \quad
        \hat v = \frac{R' C'}{\overline{R'}^{\,r}} \\
        \text{else: } v' &= (1-w_t) v + w_t\, q, \quad \hat v = v' \\
        \hat u &= g / \sqrt{\hat v}
        \qquad\text{("clamp": } \overline{R'}^{\,r} \to \max(\overline{R'}^{\,r}, \epsilon_1),\;
        \hat v \to \max(\hat v, \epsilon_1^2)\text{)} \\
        u &= \hat u / \max(1, \operatorname{rms}(\hat u) / d)

    (:math:`\overline{x}^{\,a}`: the mean over axis ``a``, kept; axes from :func:`factored_axes`;
    ``d = clip_threshold``, ``inf`` for no clipping). ``sign(u) == sign(g)`` entrywise: the
    denominators are positive. An empty tensor keeps its state.
    """
    if g.size == 0:  # nothing to update; the statistics of an empty tensor stay as they are
        return g, s
    eps1 = float(s.eps1) if s.eps1 is not None else eps1
    w = float(step - decay_offset) ** beta2_decay
    q = g * g + eps1 if eps_form == "add" else g * g
    axes = factored_axes(g.shape, factor_dims, min_dim_size_to_factor)
    if axes is not None:
        r, c = axes
        v_row = (1.0 - w) * s.v_row + w * np.mean(q, axis=c, keepdims=True)
        v_col = (1.0 - w) * s.v_col + w * np.mean(q, axis=r, keepdims=True)
        row_mean = np.mean(v_row, axis=r, keepdims=True)
        if eps_form == "clamp":
            row_mean = np.maximum(row_mean, eps1)
        v_hat, new = v_row * v_col / row_mean, AdafactorState(v_row, v_col, None, s.m, s.eps1)
    else:
        v = (1.0 - w) * s.v + w * q
        v_hat, new = v, AdafactorState(None, None, v, s.m, s.eps1)
    if eps_form == "clamp":
        v_hat = np.maximum(v_hat, eps1 * eps1)
    u = g / np.sqrt(v_hat)
    u = u / max(1.0, _rms(u) / clip_threshold)
    return u, new


def _adafactor_init(p: np.ndarray, axes: tuple[int, int] | None, eps1: float | None, momentum: bool) -> AdafactorState:
    m = _zeros_like(p) if momentum else None
    e = None if eps1 is not None else np.asarray(np.finfo(p.dtype).eps)
    if axes is None:
        return AdafactorState(None, None, _zeros_like(p), m, e)
    r, c = axes
    return AdafactorState(
        np.zeros_like(p.sum(axis=c, keepdims=True)), np.zeros_like(p.sum(axis=r, keepdims=True)), None, m, e
    )


def adafactor_rule(
    *,
    beta2_decay: float,
    eps1: float | None,
    clip_threshold: float,
    eps_form: str = "clamp",
    factor_dims: str = "last_two",
    min_dim_size_to_factor: int = 0,
    decay_offset: int = 0,
) -> Rule:
    """Adafactor without momentum as a :class:`Rule` (``eps1=None``: each tensor's dtype epsilon)."""
    opts = dict(
        eps_form=eps_form,
        factor_dims=factor_dims,
        min_dim_size_to_factor=min_dim_size_to_factor,
        decay_offset=decay_offset,
    )

    def init(p: np.ndarray) -> AdafactorState:
        return _adafactor_init(p, factored_axes(p.shape, factor_dims, min_dim_size_to_factor), eps1, False)

    def direction(g: np.ndarray, s: AdafactorState, step: int) -> tuple[np.ndarray, AdafactorState]:
        return adafactor_direction(
            g, s, step, beta2_decay=beta2_decay, eps1=eps1 or 0.0, clip_threshold=clip_threshold, **opts
        )

    return Rule("adafactor", init, direction)


def adafactor_momentum_rule(*, beta1: float, **options: Any) -> UpdateRule:
    r"""Adafactor with momentum (optax's ``momentum``, timm's ``beta1``) as an :class:`UpdateRule`.

    .. math::  m' = \beta_1 m + (1-\beta_1)\,\alpha_t u, \qquad \delta = -m'

    where ``u`` is :func:`adafactor_direction` and :math:`\alpha_t` (the ``lr`` the update receives) the
    step size of this tensor at this step (learning rate times parameter scale): the momentum averages
    *scaled* updates, as optax and timm do, so the learning rate lives in the state and caution masks
    ``delta`` in the whole-update form. ``options`` are :func:`adafactor_rule`'s.
    """
    inner = adafactor_rule(**options)
    factor = (options.get("factor_dims", "last_two"), options.get("min_dim_size_to_factor", 0))

    def init(p: np.ndarray) -> AdafactorState:
        return _adafactor_init(p, factored_axes(p.shape, *factor), options["eps1"], True)

    def update(g: np.ndarray, s: AdafactorState, step: int, lr: float) -> tuple[np.ndarray, AdafactorState]:
        u, s_new = inner.direction(g, s, step)
        m = beta1 * s.m + (1.0 - beta1) * (lr * u)
        return -m, s_new._replace(m=m)

    return UpdateRule("adafactor", init, update)


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


# -- Muon: momentum orthogonalized by Newton-Schulz iterations --------------------------------------------


class MuonState(NamedTuple):
    """Muon's per-tensor state: the momentum buffer ``m``."""

    m: np.ndarray


def muon_momentum_direction(
    g: np.ndarray, s: MuonState, step: int, *, momentum: float, nesterov: bool, muon_momentum: str = "ema"
) -> tuple[np.ndarray, MuonState]:
    r"""Muon's momentum: the matrix ``v`` that Newton-Schulz orthogonalizes.

    .. math::

        \text{"ema" (torch.optim.Muon):}\quad & m' = \mu m + (1-\mu) g, \quad
            v = (1-\mu) g + \mu m' \text{ (nesterov) else } m' \\
        \text{"debiased" (optax.contrib.muon):}\quad & m' = \mu m + (1-\mu) g, \quad
            v = \frac{\mu m'}{1-\mu^{t+1}} + \frac{(1-\mu) g}{1-\mu^t} \text{ (nesterov) else }
            \frac{m'}{1-\mu^t} \\
        \text{"sum" (keras.optimizers.Muon):}\quad & m' = \mu m + g, \quad
            v = g + \mu m' \text{ (nesterov) else } m'

    "ema" is ``(1-mu)`` times "sum" (same zero start), the same direction: orthogonalization is
    scale-invariant up to its ``eps``. "debiased" weighs ``g`` and ``m'`` differently with nesterov.
    """
    if muon_momentum == "sum":
        m = momentum * s.m + g
        return (g + momentum * m if nesterov else m), MuonState(m)
    m = momentum * s.m + (1.0 - momentum) * g
    if muon_momentum == "ema":
        return ((1.0 - momentum) * g + momentum * m if nesterov else m), MuonState(m)
    if nesterov:
        v = momentum * m / (1.0 - momentum ** (step + 1)) + (1.0 - momentum) * g / (1.0 - momentum**step)
    else:
        v = m / (1.0 - momentum**step)
    return v, MuonState(m)


def newton_schulz(
    x: np.ndarray,
    *,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    ns_eps: str = "clamp",
) -> np.ndarray:
    r"""Orthogonalize a matrix by ``ns_steps`` quintic Newton-Schulz iterations (Jordan et al. 2024), in float64.

    .. math::

        X_0 &= X / \max(\lVert X\rVert_F, \epsilon) \text{ (ns\_eps="clamp": torch)}
              \text{ or } X / (\lVert X\rVert_F + \epsilon) \text{ ("add": optax, Keras)} \\
        A_k &= X_k X_k^\top, \qquad X_{k+1} = a X_k + (b A_k + c A_k^2) X_k

    on the wide orientation (a tall ``X`` is transposed first and back at the end). With
    ``X = U S V^T`` the result is ``U p(S) V^T`` for the odd polynomial ``p`` iterated: the
    singular vectors of ``X`` are kept and the singular values pushed towards (0.7, 1.2) with
    torch's default coefficients. Entries are not sign-preserving: ``sign(NS(X)_ij)`` need not be
    ``sign(X_ij)``, which is why the mask position matters (docs/spec.md, "Muon").
    """
    a, b, c = (float(k) for k in ns_coefficients)
    x = np.asarray(x, dtype=np.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    norm = float(np.linalg.norm(x))
    x = x / (max(norm, eps) if ns_eps == "clamp" else norm + eps)
    for _ in range(int(ns_steps)):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if tall else x


def muon_shape_scale(shape: tuple[int, ...], *, shape_scale: str, rms_rate: float = 0.2) -> float:
    r"""The per-matrix factor of Muon's update, from the matrix shape ``(R, C)``.

    .. math::

        \text{"rows\_over\_cols" (torch adjust\_lr\_fn="original")} &: \sqrt{\max(1, R/C)} \\
        \text{"cols\_over\_rows" (optax, fan\_out/fan\_in of its (in, out) layout)} &: \sqrt{\max(1, C/R)} \\
        \text{"rms" (torch "match\_rms\_adamw", optax consistent\_rms, Keras rms\_rate)} &:
            \text{rms\_rate}\cdot\sqrt{\max(R, C)} \\
        \text{"none"} &: 1

    Computed in float64. It is positive, so it never changes a mask decision.
    """
    rows, cols = int(shape[0]), int(shape[1])
    if shape_scale == "rows_over_cols":
        return math.sqrt(max(1.0, rows / cols))
    if shape_scale == "cols_over_rows":
        return math.sqrt(max(1.0, cols / rows))
    if shape_scale == "rms":
        return float(rms_rate) * math.sqrt(max(rows, cols))
    return 1.0


def muon_momentum_rule(*, momentum: float, nesterov: bool, muon_momentum: str = "ema") -> Rule:
    """Muon's momentum as a :class:`Rule`: its direction is the matrix ``v`` to orthogonalize."""

    def direction(g: np.ndarray, s: MuonState, step: int) -> tuple[np.ndarray, MuonState]:
        return muon_momentum_direction(g, s, step, momentum=momentum, nesterov=nesterov, muon_momentum=muon_momentum)

    return Rule("muon", lambda p: MuonState(_zeros_like(p)), direction)


def muon_orthogonalize(
    *,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    ns_eps: str = "clamp",
    shape_scale: str = "rows_over_cols",
    rms_rate: float = 0.2,
) -> Callable[[np.ndarray], np.ndarray]:
    r"""The map ``v -> shape_scale(shape) * NS(v)`` that turns Muon's momentum into its direction ``u``."""

    def orthogonalize(v: np.ndarray) -> np.ndarray:
        o = newton_schulz(v, ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps, ns_eps=ns_eps)
        return muon_shape_scale(np.shape(v), shape_scale=shape_scale, rms_rate=rms_rate) * o

    return orthogonalize


def then(rule: Rule, fn: Callable[[np.ndarray], np.ndarray], name: str | None = None) -> Rule:
    """The rule whose direction is ``fn(u)`` of ``rule``'s direction ``u``; same state."""

    def direction(g: np.ndarray, s: Any, step: int) -> tuple[np.ndarray, Any]:
        u, s_new = rule.direction(g, s, step)
        return fn(u), s_new

    return Rule(name or rule.name, rule.init, direction)


def muon_rule(
    *,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    muon_momentum: str = "ema",
    ns_eps: str = "clamp",
    shape_scale: str = "rows_over_cols",
    rms_rate: float = 0.2,
) -> Rule:
    r"""Muon as a :class:`Rule`: ``u = shape_scale * NS(v)`` of :func:`muon_momentum_direction`'s ``v``.

    Wrapped by :func:`cautious`, this is ``mask_position="after"``. For ``"before"`` the factory
    (:func:`cautious.spec.muon`) wraps :func:`muon_momentum_rule` instead and orthogonalizes the
    masked ``v`` (``make_optimizer(..., then=muon_orthogonalize(...))``).
    """
    base = muon_momentum_rule(momentum=momentum, nesterov=nesterov, muon_momentum=muon_momentum)
    ortho = muon_orthogonalize(
        ns_coefficients=ns_coefficients,
        ns_steps=ns_steps,
        eps=eps,
        ns_eps=ns_eps,
        shape_scale=shape_scale,
        rms_rate=rms_rate,
    )
    return then(base, ortho)
