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

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from cautious._caution import Caution, caution_arg
from cautious.spec.errors import (
    check_cautious_weight_decay,
    check_momentum_form,
    check_nesterov,
    check_param_dtype,
    split_betas,
    validate,
)
from cautious.spec.mask import CautionStats, apply_caution, decay_mask, whole_step, whole_update
from cautious.spec.rules import (
    Rule,
    UpdateRule,
    adam_rule,
    cautious,
    cautious_update,
    lion_rule,
    sgd_rule,
    sgd_velocity_rule,
)

__all__ = ["State", "Optimizer", "adam", "adamw", "lion", "sgd", "make_optimizer", "cautious_optimizer"]


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
) -> Optimizer:
    """Build the generic step around ``rule``; see the module docstring for the math.

    An :class:`~cautious.spec.rules.UpdateRule` (update form) gives ``delta`` with the
    learning rate inside: ``eta * u`` is replaced by ``-delta``, and caution masks ``delta``
    in the whole-update form.
    """
    check_cautious_weight_decay(cautious_weight_decay, decoupled)
    wrap = cautious_update if isinstance(rule, UpdateRule) else cautious
    inner = wrap(rule, caution) if caution is not None else rule
    lr = float(lr)
    wd = float(weight_decay)

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
                    delta, _ = rule.update(g64, s64, t, lr)
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
            delta, s_new = inner.update(g64, s64, t, lr)
            u, lr_u = -delta, -delta
        else:
            u, s_new = inner.direction(g64, s64, t)
            lr_u = lr * u
        if wd != 0 and decoupled:
            # multiplicative form p * (1 - lr*wd): an infinite parameter stays infinite (p - lr*wd*p is NaN)
            shrunk = p64 * (1.0 - lr * wd)
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
