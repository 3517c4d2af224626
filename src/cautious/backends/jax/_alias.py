r"""Cautious optimizers with optax's signatures: :func:`adamw`, :func:`adam`, :func:`lion`, :func:`sgd`.

Each is an :func:`optax.chain`::

    [negate (maximize)] -> [coupled L2 decay] -> cautious(direction) -> [decoupled decay] -> scale_by_learning_rate

so the mask sees the gradient the rule consumed (after ``maximize`` and coupled decay), and
decoupled weight decay is never masked (with ``cautious_weight_decay=True`` it applies only
where the cautious direction and the parameter do not have strictly opposite signs).
``caution=False`` leaves the mask out and reproduces optax's optimizer. See :mod:`cautious.spec`.

Hyperparameters given as Python or NumPy numbers (or concrete arrays) are checked at
construction by :func:`cautious.spec.errors.validate`; schedules and traced values (for
instance under :func:`optax.inject_hyperparams` inside ``jit``) are not.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from cautious._caution import Caution, caution_arg
from cautious.backends.jax import _transforms as tf
from cautious.backends.jax._core import _caution_parts, _cautious, _leaves_like
from cautious.spec.errors import NESTEROV_MESSAGE, check_cautious_weight_decay, check_param_dtype, validate

__all__ = ["adamw", "adam", "lion", "sgd", "nadam", "nadamw", "rmsprop", "adafactor", "adopt", "laprop", "muon"]

NAMES = {"lr": "learning_rate", "beta1": "b1", "beta2": "b2", "alpha": "decay"}


def _check(values: dict[str, Any], names: dict[str, str] | None = None) -> None:
    """Validate what can be validated now: not schedules, not traced values."""
    concrete = {k: v for k, v in values.items() if not callable(v) and not isinstance(v, jax.core.Tracer)}
    validate(concrete, {**NAMES, **(names or {})})


def _direction(inner: optax.GradientTransformation, caution: Caution | None, caution_stats: bool) -> Any:
    if caution is None:
        if caution_stats:
            raise ValueError("caution_stats=True needs caution on (caution=False has no mask to report)")
        return inner
    return _cautious(inner, caution, form="direction", keep_dtype=False, caution_stats=caution_stats)


def _dtype(x: Any) -> Any:
    return jnp.dtype(x.dtype) if hasattr(x, "dtype") else jnp.result_type(x)


def _drop_in(tx: optax.GradientTransformationExtraArgs) -> optax.GradientTransformationExtraArgs:
    """``tx`` with optax's contract at its edges, and nothing added to its state.

    ``init`` refuses parameters of a non-floating dtype (a step would truncate them); ``update``
    returns updates in the parameters' dtype (the gradients' when ``params`` is not given), as
    optax does: bfloat16/float16 leaves compute in float32 inside and round once here.
    """

    def init_fn(params: Any) -> Any:
        for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
            check_param_dtype(f"parameter {jax.tree_util.keystr(path) or '(root)'}", _dtype(p))
        return tx.init(params)

    def cast(u: Any, p: Any) -> Any:
        return u if u is None or p is None else u.astype(_dtype(p))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        new, state = tx.update(updates, state, params, **extra)
        like = updates if params is None else params
        return jax.tree.map(cast, new, like, is_leaf=lambda x: x is None), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _chain(
    direction: Any,
    caution: Caution | None,
    *,
    learning_rate: Any,
    weight_decay: Any,
    mask: Any,
    decoupled: bool,
    maximize: bool,
    cautious_weight_decay: bool,
    caution_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    check_cautious_weight_decay(cautious_weight_decay, decoupled)
    parts: list[Any] = []
    if maximize:
        parts.append(tf.negate())
    # Leave coupled decay out only for a Python 0 (as optax.adam has none): the chain's structure must
    # not depend on array values, which optax.inject_hyperparams makes concrete in init, traced in update.
    zero = isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool) and weight_decay == 0
    if not decoupled and not zero:
        parts.append(tf.add_decayed_weights(weight_decay, mask))
    parts.append(_direction(direction, caution, caution_stats))
    if decoupled:
        parts.append(tf.add_decayed_weights(weight_decay, mask, cautious=cautious_weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return _drop_in(optax.chain(*parts))


def adamw(
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    weight_decay: Any = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
    caution: bool | Caution = True,
    caution_stats: bool = False,
    cautious_weight_decay: bool = False,
    eps_placement: str = "corrected",
    amsgrad: bool = False,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Cautious AdamW: :func:`optax.adamw` with the cautious mask on Adam's direction.

    .. math::

        u = \text{mask}(u_{adam}, g)\cdot\text{scale}\cdot u_{adam},\qquad
        p' = p - \eta\lambda\, d\odot p - \eta u

    (``d = 1``, or the decay mask with ``cautious_weight_decay``). Arguments as
    :func:`optax.adamw` (note its default ``weight_decay=1e-4``), plus keyword-only
    ``caution`` (``True``, ``False`` or a :class:`cautious.Caution`), ``cautious_weight_decay``,
    ``eps_placement`` (``"corrected"``: optax/torch; ``"uncorrected"``: Keras/TF),
    ``amsgrad`` (torch's) and ``maximize``. See :func:`cautious.spec.adamw`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from cautious.jax import adamw
      >>> opt = adamw(1e-3)
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.array([1.0, -1.0, 0.0])}, state, params)
      >>> params = optax.apply_updates(params, updates)
    """
    return adam(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        nesterov=nesterov,
        caution=caution,
        caution_stats=caution_stats,
        eps_placement=eps_placement,
        amsgrad=amsgrad,
        maximize=maximize,
        weight_decay=weight_decay,
        decoupled_weight_decay=True,
        cautious_weight_decay=cautious_weight_decay,
        mask=mask,
    )


def adam(
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    caution: bool | Caution = True,
    caution_stats: bool = False,
    eps_placement: str = "corrected",
    amsgrad: bool = False,
    maximize: bool = False,
    weight_decay: Any = 0.0,
    decoupled_weight_decay: bool = False,
    cautious_weight_decay: bool = False,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Cautious Adam: :func:`optax.adam` with the cautious mask on Adam's direction.

    Arguments as :func:`optax.adam`, plus keyword-only options of :func:`adamw` and
    ``weight_decay`` (coupled L2, as torch.optim.Adam: ``g + wd*p`` enters the moments and
    the mask) or, with ``decoupled_weight_decay=True``, AdamW's decoupled decay. ``mask``
    selects the parameters that decay (as in :func:`optax.adamw`). See :func:`cautious.spec.adam`.
    """
    _check(
        dict(
            lr=learning_rate,
            beta1=b1,
            beta2=b2,
            eps=eps,
            weight_decay=weight_decay,
            eps_placement=eps_placement,
            amsgrad=amsgrad,
            maximize=maximize,
            nesterov=nesterov,
            decoupled_weight_decay=decoupled_weight_decay,
            cautious_weight_decay=cautious_weight_decay,
        )
    )
    c = caution_arg(caution)
    direction = tf.scale_by_adam(
        b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, amsgrad=amsgrad, eps_placement=eps_placement
    )
    return _chain(
        direction,
        c,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        decoupled=decoupled_weight_decay,
        maximize=maximize,
        cautious_weight_decay=cautious_weight_decay,
        caution_stats=caution_stats,
    )


def lion(
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.99,
    mu_dtype: Any = None,
    weight_decay: Any = 1e-3,
    mask: Any = None,
    *,
    caution: bool | Caution = True,
    caution_stats: bool = False,
    cautious_weight_decay: bool = False,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Cautious Lion: :func:`optax.lion` (default ``weight_decay=1e-3``) with the cautious mask.

    .. math::  u = \text{mask}(\operatorname{sign}(c), g)\cdot\text{scale}\cdot\operatorname{sign}(c),
        \quad c = \beta_1 m + (1-\beta_1) g

    See :func:`cautious.spec.lion`.
    """
    _check(
        dict(
            lr=learning_rate,
            beta1=b1,
            beta2=b2,
            weight_decay=weight_decay,
            maximize=maximize,
            cautious_weight_decay=cautious_weight_decay,
        )
    )
    c = caution_arg(caution)
    return _chain(
        tf.scale_by_lion(b1, b2, mu_dtype),
        c,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        decoupled=True,
        maximize=maximize,
        cautious_weight_decay=cautious_weight_decay,
        caution_stats=caution_stats,
    )


def sgd(
    learning_rate: Any,
    momentum: Any = None,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    *,
    caution: bool | Caution = True,
    caution_stats: bool = False,
    maximize: bool = False,
    weight_decay: Any = 0.0,
    decoupled_weight_decay: bool = False,
    cautious_weight_decay: bool = False,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Cautious SGD: :func:`optax.sgd` with the cautious mask on the momentum direction.

    Momentum follows optax (``m' = g + \mu m``, torch's rule with ``dampening=0``; there is no
    dampening). ``momentum=None`` means no buffer and ``u = g``. Keyword-only extras:
    ``weight_decay`` (coupled L2 as torch.optim.SGD, or decoupled with
    ``decoupled_weight_decay=True``), ``maximize``, ``caution``, ``cautious_weight_decay``.
    ``nesterov=True`` requires ``momentum > 0``. See :func:`cautious.spec.sgd`.
    """
    _check(
        dict(
            lr=learning_rate,
            **({} if momentum is None else {"momentum": momentum}),  # None: optax's "no momentum buffer"
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            cautious_weight_decay=cautious_weight_decay,
        )
    )
    if nesterov and (momentum is None or (tf._is_concrete_number(momentum) and float(momentum) <= 0)):
        raise ValueError(NESTEROV_MESSAGE)
    c = caution_arg(caution)
    if momentum is None:
        direction: Any = optax.identity()
    else:
        direction = tf.trace(momentum, nesterov, accumulator_dtype)
    return _chain(
        direction,
        c,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        decoupled=decoupled_weight_decay,
        maximize=maximize,
        cautious_weight_decay=cautious_weight_decay,
        caution_stats=caution_stats,
    )


DOZAT_NESTEROV_MESSAGE = "momentum_schedule='dozat' requires nesterov=True (NAdam's look-ahead)"


def nadam(
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = True,
    caution: bool | Caution = True,
    caution_stats: bool = False,
    momentum_schedule: str = "constant",
    momentum_decay: Any = 4e-3,
    maximize: bool = False,
    weight_decay: Any = 0.0,
    decoupled_weight_decay: bool = False,
    cautious_weight_decay: bool = False,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Cautious NAdam: :func:`optax.nadam` with the cautious mask on NAdam's direction.

    ``momentum_schedule="constant"`` (default, optax's form): Adam with a Nesterov look-ahead,
    :func:`scale_by_adam` with ``nesterov=True`` (state :class:`optax.ScaleByAdamState`);
    ``"dozat"``: torch.optim.NAdam's schedule ``mu_t = b1 (1 - 0.5 * 0.96**(t * momentum_decay))``,
    :func:`scale_by_nadam` (its state adds ``mu_product``). Since ``u`` mixes ``g`` and ``m'``
    its sign is neither's: the mask decides on ``u``. Other options as :func:`adam`.
    See :func:`cautious.spec.nadam`.
    """
    _check(dict(momentum_decay=momentum_decay, momentum_schedule=momentum_schedule, nesterov=nesterov))
    if momentum_schedule == "constant":
        return adam(
            learning_rate,
            b1,
            b2,
            eps,
            eps_root,
            mu_dtype,
            nesterov=nesterov,
            caution=caution,
            caution_stats=caution_stats,
            maximize=maximize,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            cautious_weight_decay=cautious_weight_decay,
            mask=mask,
        )
    if not nesterov:
        raise ValueError(DOZAT_NESTEROV_MESSAGE)
    _check(
        dict(
            lr=learning_rate,
            beta1=b1,
            beta2=b2,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            cautious_weight_decay=cautious_weight_decay,
        )
    )
    return _chain(
        tf.scale_by_nadam(b1, b2, eps, eps_root, mu_dtype, momentum_decay=momentum_decay),
        caution_arg(caution),
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        mask=mask,
        decoupled=decoupled_weight_decay,
        maximize=maximize,
        cautious_weight_decay=cautious_weight_decay,
        caution_stats=caution_stats,
    )


def nadamw(
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    weight_decay: Any = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = True,
    caution: bool | Caution = True,
    caution_stats: bool = False,
    momentum_schedule: str = "constant",
    momentum_decay: Any = 4e-3,
    maximize: bool = False,
    cautious_weight_decay: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Cautious NAdamW: :func:`optax.nadamw` (default ``weight_decay=1e-4``): :func:`nadam` with decoupled
    decay, never masked (with ``cautious_weight_decay``: the decay mask). See :func:`cautious.spec.nadamw`."""
    return nadam(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        nesterov=nesterov,
        caution=caution,
        caution_stats=caution_stats,
        momentum_schedule=momentum_schedule,
        momentum_decay=momentum_decay,
        maximize=maximize,
        weight_decay=weight_decay,
        decoupled_weight_decay=True,
        cautious_weight_decay=cautious_weight_decay,
        mask=mask,
    )


def rmsprop(
    learning_rate: Any,
    decay: Any = 0.9,
    eps: Any = 1e-8,
    initial_scale: Any = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: Any = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    *,
    caution: bool | Caution = True,
    caution_stats: bool = False,
    maximize: bool = False,
    weight_decay: Any = 0.0,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Cautious RMSprop: :func:`optax.rmsprop` with the whole update masked against the gradient.

    optax scales by the learning rate *before* the momentum trace, so with ``momentum`` its buffer
    carries ``-lr`` (the spec's ``momentum_form="keras"``, :func:`cautious.spec.rmsprop_velocity`):
    caution then masks the chain's whole output ``o`` (``o^c = mask(o, -g) * scale * o``, the
    spec's update form), which is the direction form's result for a positive learning rate.
    Without momentum it masks ``u = g / d`` before the learning rate (the direction form, as
    :func:`cautious.spec.rmsprop`), so the decision never reads a product ``lr * u`` that can
    underflow.
    The state is optax's pytree (:class:`optax.ScaleByRmsState` or
    :class:`optax.ScaleByRStdDevState`, ``EmptyState``, :class:`optax.TraceState` or
    ``EmptyState``) unless ``maximize`` or ``weight_decay`` add their transformations.
    Keyword-only extras: ``caution``, ``caution_stats``, ``maximize``, ``weight_decay``
    (coupled L2, as torch.optim.RMSprop; ``mask`` selects the parameters that decay).
    Without momentum ``u = g / d`` has the sign of ``g``: caution only rescales
    (docs/spec.md). ``bias_correction=True`` is refused (not in the spec). See :func:`cautious.spec.rmsprop`.
    """
    _check(
        dict(
            lr=learning_rate,
            alpha=decay,
            eps=eps,
            initial_scale=initial_scale,
            **({} if momentum is None else {"momentum": momentum}),
            weight_decay=weight_decay,
            eps_in_sqrt=eps_in_sqrt,
            centered=centered,
            nesterov=nesterov,
            maximize=maximize,
        )
    )
    if nesterov and (momentum is None or (tf._is_concrete_number(momentum) and float(momentum) <= 0)):
        raise ValueError(NESTEROV_MESSAGE)
    scale_by = tf.scale_by_stddev if centered else tf.scale_by_rms
    scaling = scale_by(decay, eps, initial_scale, eps_in_sqrt, bias_correction)
    c = caution_arg(caution)
    if momentum is None:
        # No buffer: u = g / d comes before the learning rate, so the mask reads its sign there (the
        # direction form), never the sign of lr * u, which can underflow to zero in the update
        whole: Any = optax.chain(
            _direction(scaling, c, caution_stats), optax.scale_by_learning_rate(learning_rate), optax.identity()
        )
    else:
        whole = optax.chain(scaling, optax.scale_by_learning_rate(learning_rate), tf.trace(momentum, nesterov))
        if c is None:
            if caution_stats:
                raise ValueError("caution_stats=True needs caution on (caution=False has no mask to report)")
        else:
            whole = _cautious(whole, c, form="update", keep_dtype=False, caution_stats=caution_stats)
    parts: list[Any] = [tf.negate()] if maximize else []
    zero = isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool) and weight_decay == 0
    if not zero:
        parts.append(tf.add_decayed_weights(weight_decay, mask))
    return _drop_in(optax.chain(*parts, whole) if parts else optax.with_extra_args_support(whole))


def _chain_masked_at(parts: list[Any], at: int, caution: Caution | None) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(*parts)`` (the same state: the tuple of the parts' states) with the output of
    ``parts[:at]`` masked against the incoming gradient (``form="direction"``: kept where it has the
    gradient's sign, rescaled per tensor) before ``parts[at]`` runs. ``caution=None``: the plain chain."""
    if caution is None:
        return optax.chain(*parts)
    parts = [optax.with_extra_args_support(p) for p in parts]

    def init_fn(params: Any) -> Any:
        return tuple(p.init(params) for p in parts)

    def mask(u: Any, g: Any) -> Any:
        u_leaves, treedef = jax.tree.flatten(u)
        out = [_caution_parts(a, b, caution)[0].astype(a.dtype) for a, b in zip(u_leaves, _leaves_like(treedef, g))]
        return jax.tree.unflatten(treedef, out)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        u, new = updates, []
        for i, (p, s) in enumerate(zip(parts, state, strict=True)):
            if i == at:
                u = mask(u, updates)
            u, s = p.update(u, s, params, **extra)
            new.append(s)
        if at == len(parts):
            u = mask(u, updates)
        return u, tuple(new)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adafactor(
    learning_rate: Any = None,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    dtype_momentum: Any = jnp.float32,
    weight_decay_rate: float | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: Any = None,
    *,
    caution: bool | Caution = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Cautious Adafactor: :func:`optax.adafactor` (same signature, defaults and state) with the cautious mask.

    optax's chain, with the mask inserted where the spec puts it::

        scale_by_factored_rms -> [clip_by_block_rms] -> (mask: no momentum) -> [scale_by_learning_rate]
        -> [scale_by_param_block_rms] -> [ema (momentum)] -> (mask: momentum) -> [add_decayed_weights] -> scale(-1)

    Without momentum the mask acts on the clipped, normalized ``u`` (which has the gradient's sign: caution
    only rescales, where ``g`` has exact zeros); with ``momentum`` it acts on the momentum of the scaled
    updates (``m' = b m + (1 - b) alpha u``). Weight decay (``weight_decay_rate``, not multiplied by the
    learning rate, as optax) is never masked. The state is ``optax.adafactor``'s pytree. This is
    :func:`cautious.spec.adafactor` with ``factor_dims="largest_two"``, ``eps_form="add"``,
    ``relative_step=False``, ``weight_decay_form="rate"``, ``beta2_decay=-decay_rate``, ``beta1=momentum``,
    ``d=clipping_threshold`` (``None``: ``inf``), ``eps=(eps, 1e-3)``, ``lr=learning_rate`` (``None``: 1).
    """
    _check(
        dict(
            **({} if learning_rate is None else {"lr": learning_rate}),
            beta2_decay=-decay_rate if tf._is_concrete_number(decay_rate) else decay_rate,
            decay_offset=decay_offset,
            **({} if clipping_threshold is None else {"clip_threshold": clipping_threshold}),
            **({} if momentum is None else {"beta1": momentum}),
            **({} if weight_decay_rate is None else {"weight_decay": weight_decay_rate}),
            eps=eps,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            min_dim_size_to_factor=min_dim_size_to_factor,
        ),
        {
            "beta2_decay": "decay_rate (negated)",
            "clip_threshold": "clipping_threshold",
            "beta1": "momentum",
            "weight_decay": "weight_decay_rate",
        },
    )
    c = caution_arg(caution)
    parts: list[Any] = [optax.scale_by_factored_rms(factored, decay_rate, decay_offset, min_dim_size_to_factor, eps)]
    if clipping_threshold is not None:
        parts.append(optax.clip_by_block_rms(clipping_threshold))
    at = len(parts)
    if learning_rate is not None:
        parts.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        parts.append(optax.scale_by_param_block_rms())
    if momentum is not None:
        parts.append(optax.ema(momentum, debias=False, accumulator_dtype=dtype_momentum))
        at = len(parts)
    if weight_decay_rate is not None:
        parts.append(optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
    parts.append(optax.scale(-1))
    return _drop_in(_chain_masked_at(parts, at, c))


def adopt(
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.9999,
    eps: Any = 1e-6,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Any = tf._adopt_default_clip,
    caution: bool | Caution = True,
    caution_stats: bool = False,
    maximize: bool = False,
    weight_decay: Any = 0.0,
    decoupled_weight_decay: bool = False,
    cautious_weight_decay: bool = False,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Cautious ADOPT: :func:`optax.contrib.adopt` (same signature and defaults: clipping at
    ``count**0.25``) with the cautious mask on ADOPT's direction.

    The first step only sets ``v = g^2``: ``u = 0``, so no entry is kept (count 0). Keyword-only
    extras as :func:`adam`: ``weight_decay`` is coupled (L2, timm's default) or, with
    ``decoupled_weight_decay=True``, decoupled and applied from the second step (the first does
    not move the parameters). ``caution=False`` with no decay is :func:`optax.contrib.adopt`, same
    state pytree. See :func:`cautious.spec.adopt` (its ``clip_exp=e`` is ``clip_value_fn=lambda c: c**e``).
    """
    _check(
        dict(
            lr=learning_rate,
            beta1=b1,
            beta2=b2,
            eps=eps,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            cautious_weight_decay=cautious_weight_decay,
        )
    )
    if not isinstance(use_clipping, bool):
        raise TypeError(f"use_clipping must be a bool (True or False), got {use_clipping!r}")
    check_cautious_weight_decay(cautious_weight_decay, decoupled_weight_decay)
    c = caution_arg(caution)
    direction = tf.scale_by_adopt(
        b1, b2, eps, mu_dtype, nesterov=nesterov, use_clipping=use_clipping, clip_value_fn=clip_value_fn
    )
    zero = isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool) and weight_decay == 0
    parts: list[Any] = [tf.negate()] if maximize else []
    if not decoupled_weight_decay and not zero:
        parts.append(tf.add_decayed_weights(weight_decay, mask))
    parts += [_direction(direction, c, caution_stats), optax.scale_by_learning_rate(learning_rate)]
    if decoupled_weight_decay:
        parts.append(
            tf.decoupled_decay(learning_rate, weight_decay, mask, first_decay_step=2, cautious=cautious_weight_decay)
        )
    return _drop_in(optax.chain(*parts))


def laprop(
    learning_rate: Any,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-15,
    mu_dtype: Any = None,
    weight_decay: Any = 0.0,
    mask: Any = None,
    *,
    decay_order: str = "post_update",
    caution: bool | Caution = True,
    caution_stats: bool = False,
    cautious_weight_decay: bool = False,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Cautious LaProp (optax has none): optax-style arguments, timm's defaults.

    .. math::  o = \text{mask}(\delta, -g)\cdot\text{scale}\cdot\delta, \qquad
        \delta = -\frac{\eta_t}{\bar\eta'} m'

    :func:`scale_by_laprop` gives the update ``delta`` (its momentum carries the learning rate),
    masked in the whole-update form before decay, then decoupled decay of the updated parameter
    (``decay_order="post_update"``, timm and the reference code) or of ``p`` (``"pre_update"``).
    See :func:`cautious.spec.laprop`.
    """
    _check(
        dict(
            lr=learning_rate,
            beta1=b1,
            beta2=b2,
            eps=eps,
            weight_decay=weight_decay,
            decay_order=decay_order,
            maximize=maximize,
            cautious_weight_decay=cautious_weight_decay,
        )
    )
    c = caution_arg(caution)
    inner = tf.scale_by_laprop(learning_rate, b1, b2, eps, mu_dtype)
    if c is not None:
        inner = _cautious(inner, c, form="update", keep_dtype=False, caution_stats=caution_stats)
    elif caution_stats:
        raise ValueError("caution_stats=True needs caution on (caution=False has no mask to report)")
    parts: list[Any] = [tf.negate()] if maximize else []
    parts.append(inner)
    zero = isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool) and weight_decay == 0
    if not zero or cautious_weight_decay:
        parts.append(
            tf.decoupled_decay(
                learning_rate, weight_decay, mask, decay_order=decay_order, cautious=cautious_weight_decay
            )
        )
    return _drop_in(optax.chain(*parts))


def muon(
    learning_rate: Any,
    ns_coeffs: Any = (3.4445, -4.7750, 2.0315),
    ns_steps: int = 5,
    beta: Any = 0.95,
    eps: Any = 1e-8,
    weight_decay: Any = 0.0,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: str = "frobenius",
    adam_b1: Any = 0.9,
    adam_b2: Any = 0.999,
    adam_eps_root: Any = 0.0,
    adam_weight_decay: Any = 0.0,
    adam_learning_rate: Any = None,
    consistent_rms: Any = None,
    caution: bool | Caution = True,
    caution_stats: bool = False,
    cautious_weight_decay: bool = False,
    mask_position: str = "after",
) -> optax.GradientTransformationExtraArgs:
    r"""Cautious Muon: :func:`optax.contrib.muon` with the cautious mask on the Muon and the Adam parts.

    2-d leaves (optax's default partition) take the Muon step
    ``chain(scale_by_muon, [caution], scale_by_shape, add_decayed_weights, scale_by_learning_rate)``:

    .. math::

        u = \text{mask}(u_0, g)\,\text{scale}\,u_0,\; u_0 = \mathrm{NS}(v)
        \text{ (mask\_position="after")},\qquad
        u = \mathrm{NS}(\text{mask}(v, g)\,\text{scale}\,v) \text{ ("before")}

    with ``v`` optax's bias-corrected (Nesterov) momentum (the spec's ``muon_momentum="debiased"``),
    optax's ``X / (|X|_F + eps)`` (``ns_eps="add"``) and width scale ``sqrt(max(1, fan_out/fan_in))``
    (``shape_scale="cols_over_rows"``, or ``"rms"`` with ``consistent_rms``); the positive shape
    scale never changes a mask. Other leaves take optax's Adam branch, :func:`adamw` here (cautious
    when ``caution`` is on, with the same ``nesterov``). Arguments and defaults as optax's, plus
    ``caution``, ``caution_stats``, ``cautious_weight_decay`` (Muon leaves) and ``mask_position``;
    ``muon_weight_dimension_numbers`` (non-2-d Muon leaves) is not supported. The state is optax's
    pytree. See :func:`cautious.spec.muon`.
    """
    _check(
        dict(
            lr=learning_rate,
            eps=eps,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            nesterov=nesterov,
            cautious_weight_decay=cautious_weight_decay,
            mask_position=mask_position,
        )
    )
    concrete = {"momentum": beta, **({} if consistent_rms is None else {"rms_rate": consistent_rms})}
    validate(
        {k: v for k, v in concrete.items() if not callable(v) and not isinstance(v, jax.core.Tracer)},
        {"momentum": "beta", "rms_rate": "consistent_rms"},
    )
    c = caution_arg(caution)
    if c is not None and mask_position == "before":
        if adaptive:
            raise ValueError("adaptive=True is not supported with mask_position='before' in cautious.jax.muon")
        if caution_stats:
            raise ValueError("caution_stats=True is not supported with mask_position='before' in cautious.jax.muon")
        direction: Any = tf.scale_by_muon_masked_first(
            c, ns_coeffs, ns_steps, beta, eps, mu_dtype, nesterov=nesterov, preconditioning=preconditioning
        )
    else:
        direction = _direction(
            optax.contrib.scale_by_muon(
                ns_coeffs,
                ns_steps,
                beta,
                eps,
                mu_dtype,
                nesterov=nesterov,
                adaptive=adaptive,
                preconditioning=preconditioning,
                weight_dimension_numbers=tf._muon_dim_nums,
            ),
            c,
            caution_stats,
        )
    from optax.contrib import _muon

    decay: Any = (
        tf.add_decayed_weights(weight_decay, weight_decay_mask, cautious=True)
        if cautious_weight_decay
        else optax.add_decayed_weights(weight_decay, weight_decay_mask)
    )
    muon_part = optax.chain(
        direction,
        _muon.scale_by_shape(weight_dimension_numbers=tf._muon_dim_nums, consistent_rms=consistent_rms),
        decay,
        optax.scale_by_learning_rate(learning_rate),
    )
    adam_kw = dict(
        b1=adam_b1,
        b2=adam_b2,
        eps=eps,
        eps_root=adam_eps_root,
        weight_decay=adam_weight_decay,
        mu_dtype=mu_dtype,
        nesterov=nesterov,
    )
    adam_lr = learning_rate if adam_learning_rate is None else adam_learning_rate
    # caution off: optax's own AdamW (bit for bit); on: cautious adamw (the same state pytree)
    adam_part = optax.adamw(adam_lr, **adam_kw) if c is None else adamw(adam_lr, **adam_kw, caution=c)
    return _drop_in(
        optax.partition(
            {"muon": muon_part, "adam": adam_part},
            lambda params: jax.tree.map(lambda x: "muon" if x.ndim == 2 else "adam", params),
        )
    )
