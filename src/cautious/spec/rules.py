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
