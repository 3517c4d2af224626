r"""Direction transformations that follow :mod:`cautious.spec` exactly, as optax transformations.

They keep optax's state types (:class:`optax.ScaleByAdamState`, :class:`optax.ScaleByLionState`,
:class:`optax.TraceState`) and, for float32 and float64, optax's arithmetic, with three
differences that make them match the spec:

* Adam's bias corrections ``1 - b**t`` are computed as ``-expm1(t * log(b))`` (float64 when
  ``jax_enable_x64`` is on), not as ``1 - b**t`` in float32, whose error reaches 1.7e-4 relative
  at ``b2 = 0.9999``; ``eps_placement`` and ``amsgrad`` (torch's: max of the raw ``v``) are added;
* low-precision tensors (bfloat16, float16) compute in float32 and round once into the state;
* Adam and Lion register a *sign proxy* (the new moment before rounding) with :func:`cautious`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cautious._caution import Caution
from cautious.backends.jax import _core
from cautious.backends.jax._core import _compute_dtype, register_sign_proxy

__all__ = [
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "scale_by_adam",
    "scale_by_lion",
    "trace",
    "negate",
    "add_decayed_weights",
    "ScaleByNadamState",
    "scale_by_nadam",
    "scale_by_rms",
    "scale_by_stddev",
    "scale_by_adopt",
    "LaPropState",
    "scale_by_laprop",
    "decoupled_decay",
    "scale_by_muon_masked_first",
]

ScaleByAdamState = optax.ScaleByAdamState


#: State of a scheduled weight decay: optax's own class (not exported by optax, so taken from
#: its public transformation), so that the state pytree equals :func:`optax.add_decayed_weights`'s.
WeightDecaySchedule = type(optax.add_decayed_weights(lambda count: 0.0).init(None))


class ScaleByAmsgradState(NamedTuple):
    """Adam state with ``amsgrad=True``: ``nu_max`` is the running max of the raw ``nu`` (torch's rule).

    (optax's own ``ScaleByAmsgradState`` keeps the max of the bias-corrected ``nu``.)
    """

    count: jax.Array
    mu: Any
    nu: Any
    nu_max: Any


def _is_concrete_number(x: Any) -> bool:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    try:
        float(x)
    except Exception:
        return False
    return not isinstance(x, jax.core.Tracer)


def _safe_increment(count: jax.Array) -> jax.Array:
    return jnp.where(count < jnp.iinfo(count.dtype).max, count + 1, count)


def _bias_correction(b: Any, t: jax.Array) -> jax.Array:
    """``1 - b**t`` as ``-expm1(t log b)`` in float64 (x64) or float32."""
    sd = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    tf = t.astype(sd)
    if _is_concrete_number(b):
        b = float(b)
        if b == 0.0:
            return jnp.ones((), sd)
        return -jnp.expm1(tf * jnp.asarray(math.log(b), sd))
    return -jnp.expm1(tf * jnp.log(jnp.asarray(b).astype(sd)))


def _unzip(treedef: Any, rows: list[tuple], k: int) -> tuple:
    return tuple(jax.tree.unflatten(treedef, [r[i] for r in rows]) for i in range(k))


def _cast(x: jax.Array, dtype: Any) -> jax.Array:
    return x.astype(dtype)


def _canonical(dtype: Any) -> Any:
    return None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)


def scale_by_adam(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    eps_placement: str = "corrected",
) -> optax.GradientTransformationExtraArgs:
    r"""Adam's direction, as :func:`cautious.spec.adam_direction` (optax's signature plus options).

    .. math::

        m' = \beta_1 m + (1-\beta_1) g,\quad v' = \beta_2 v + (1-\beta_2) g^2,\quad
        u = \frac{m'/(1-\beta_1^t)}{\sqrt{v'/(1-\beta_2^t)} + \epsilon}\ \text{(corrected)}
        \ \text{or}\ \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\frac{m'}{\sqrt{v'}+\epsilon}\ \text{(uncorrected)}

    ``amsgrad`` uses ``max(nu_max, v')`` in place of ``v'`` (state :class:`ScaleByAmsgradState`);
    ``nesterov`` follows :func:`optax.scale_by_adam` (NAdam). ``eps_root`` is added under the root.
    """
    mu_dtype = _canonical(mu_dtype)

    def init_fn(params: Any):
        mu = optax.tree.zeros_like(params, dtype=mu_dtype)
        nu = optax.tree.zeros_like(params)
        count = jnp.zeros([], jnp.int32)
        if amsgrad:
            return ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=optax.tree.zeros_like(params))
        return ScaleByAdamState(count=count, mu=mu, nu=nu)

    def update_with_proxy(updates: Any, state: Any, params: Any = None, **extra: Any):
        del params, extra
        t = _safe_increment(state.count)
        bc1 = _bias_correction(b1, t)
        bc2 = _bias_correction(b2, t)
        bc1_next = _bias_correction(b1, _safe_increment(t)) if nesterov else None
        g_leaves, treedef = jax.tree.flatten(updates)
        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)
        vms = treedef.flatten_up_to(state.nu_max) if amsgrad else [None] * len(g_leaves)
        rows = []
        for g, m, v, vm in zip(g_leaves, mus, nus, vms):
            cd = _compute_dtype(g.dtype, m.dtype, v.dtype)
            gc = g.astype(cd)
            m_new = (1 - b1) * gc + b1 * m.astype(cd)
            v_new = (1 - b2) * (gc * gc) + b2 * v.astype(cd)
            m_new = m_new.astype(cd)
            v_new = v_new.astype(cd)
            if amsgrad:  # max by select, NaN propagating: a stored subnormal survives (no arithmetic on it)
                vmc = vm.astype(cd)
                vm_new = jnp.where(jnp.isnan(v_new) | (v_new > vmc), v_new, vmc)
            else:
                vm_new = None
            v_used = vm_new if amsgrad else v_new
            c1, c2 = bc1.astype(cd), bc2.astype(cd)
            if eps_placement == "corrected":
                if nesterov:
                    m_hat = b1 * (m_new / bc1_next.astype(cd)) + (1 - b1) * (gc / c1)
                else:
                    m_hat = m_new / c1
                u = m_hat / (jnp.sqrt(v_used / c2 + eps_root) + eps)
            else:  # Keras/TF: eps added to sqrt(v), the corrections folded into one step factor
                if nesterov:
                    m_eff = b1 * (m_new * (c1 / bc1_next.astype(cd))) + (1 - b1) * gc
                else:
                    m_eff = m_new
                u = (jnp.sqrt(c2) / c1) * (m_eff / (jnp.sqrt(v_used + eps_root) + eps))
            u = u.astype(cd)
            new_m = _cast(m_new, mu_dtype if mu_dtype is not None else m.dtype)
            new_vm = _cast(vm_new, vm.dtype) if amsgrad else None
            rows.append((u, new_m, _cast(v_new, v.dtype), new_vm, m_new))
        u, mu, nu, vmax, proxy = _unzip(treedef, rows, 5)
        if amsgrad:
            new_state = ScaleByAmsgradState(count=t, mu=mu, nu=nu, nu_max=vmax)
        else:
            new_state = ScaleByAdamState(count=t, mu=mu, nu=nu)
        return u, new_state, proxy

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any):
        u, new_state, _ = update_with_proxy(updates, state, params, **extra)
        return u, new_state

    # sign(u) == sign(m') and isnan(u) == isnan(m') | isnan(g) whenever the denominator is a
    # positive finite number: guaranteed by a concrete eps > 0 and eps_root >= 0 (up to a stored
    # v that is already inf, see the module notes of cautious.backends.jax).
    if (
        not nesterov
        and _is_concrete_number(eps)
        and float(eps) > 0
        and _is_concrete_number(eps_root)
        and float(eps_root) >= 0
    ):
        register_sign_proxy(update_fn, update_with_proxy)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_lion(b1: Any = 0.9, b2: Any = 0.99, mu_dtype: Any = None) -> optax.GradientTransformationExtraArgs:
    r"""Lion's direction, as :func:`cautious.spec.lion_direction` and :func:`optax.scale_by_lion`.

    .. math::  u = \operatorname{sign}(\beta_1 m + (1-\beta_1) g),\qquad m' = \beta_2 m + (1-\beta_2) g
    """
    mu_dtype = _canonical(mu_dtype)

    def init_fn(params: Any):
        return optax.ScaleByLionState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params, dtype=mu_dtype))

    def update_with_proxy(updates: Any, state: Any, params: Any = None, **extra: Any):
        del params, extra
        g_leaves, treedef = jax.tree.flatten(updates)
        rows = []
        for g, m in zip(g_leaves, treedef.flatten_up_to(state.mu)):
            cd = _compute_dtype(g.dtype, m.dtype)
            gc, mc = g.astype(cd), m.astype(cd)
            c = ((1 - b1) * gc + b1 * mc).astype(cd)
            m_new = ((1 - b2) * gc + b2 * mc).astype(cd)
            rows.append((jnp.sign(c), _cast(m_new, mu_dtype if mu_dtype is not None else m.dtype), c))
        u, mu, proxy = _unzip(treedef, rows, 3)
        return u, optax.ScaleByLionState(count=_safe_increment(state.count), mu=mu), proxy

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any):
        u, new_state, _ = update_with_proxy(updates, state, params, **extra)
        return u, new_state

    register_sign_proxy(update_fn, update_with_proxy)  # sign(sign(c)) == sign(c), NaN alike
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def trace(decay: Any, nesterov: bool = False, accumulator_dtype: Any = None) -> optax.GradientTransformationExtraArgs:
    r"""SGD momentum, as :func:`optax.trace` (and torch with ``dampening=0``): ``m' = g + \mu m``,
    ``u = g + \mu m'`` (nesterov) else ``m'``; low precision computes in float32."""
    accumulator_dtype = _canonical(accumulator_dtype)

    def init_fn(params: Any):
        return optax.TraceState(trace=optax.tree.zeros_like(params, dtype=accumulator_dtype))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any):
        del params, extra
        g_leaves, treedef = jax.tree.flatten(updates)
        rows = []
        for g, m in zip(g_leaves, treedef.flatten_up_to(state.trace)):
            cd = _compute_dtype(g.dtype, m.dtype)
            gc = g.astype(cd)
            m_new = (gc + decay * m.astype(cd)).astype(cd)
            u = (gc + decay * m_new).astype(cd) if nesterov else m_new
            dt = accumulator_dtype if accumulator_dtype is not None else m.dtype
            rows.append((u, _cast(m_new, dt)))
        u, tr = _unzip(treedef, rows, 2)
        return u, optax.TraceState(trace=tr)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def negate() -> optax.GradientTransformationExtraArgs:
    """``g -> -g`` (the spec's ``maximize``)."""

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any):
        return jax.tree.map(jnp.negative, updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def add_decayed_weights(
    weight_decay: Any = 0.0, mask: Any = None, *, cautious: bool = False
) -> optax.GradientTransformation:
    r"""Weight decay ``u + \lambda p``, as :func:`optax.add_decayed_weights` (schedules, ``mask``).

    With ``cautious=True`` the decay applies only where ``u`` and ``p`` do not have strictly
    opposite signs (:func:`cautious.spec.decay_mask`, arXiv:2510.12402); placed after
    :func:`cautious`, ``u`` is the cautious direction ``u_c``. bfloat16/float16 inputs compute in
    float32 (optax would round ``g + wd*p`` to the low precision before the moments).
    """

    def init_fn(params: Any):
        del params
        if callable(weight_decay):
            return WeightDecaySchedule(count=jnp.zeros([], jnp.int32))
        return optax.EmptyState()

    def update_fn(updates: Any, state: Any, params: Any):
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(g, state, params)")
        if callable(weight_decay):
            s = weight_decay(state.count)
            new_state = WeightDecaySchedule(count=_safe_increment(state.count))
        else:
            s, new_state = weight_decay, state
            if _is_concrete_number(s) and float(s) == 0.0 and not cautious:
                return updates, new_state

        def leaf(u: jax.Array, p: jax.Array) -> jax.Array:
            cd = jnp.promote_types(jnp.promote_types(u.dtype, p.dtype), jnp.float32)
            pc = p.astype(cd)
            if cautious:
                opposite = ((u > 0) & (p < 0)) | ((u < 0) & (p > 0))
                pc = jnp.where(opposite, jnp.zeros((), cd), pc)
            return u.astype(cd) + s * pc

        return jax.tree.map(leaf, updates, params), new_state

    tx = optax.GradientTransformation(init_fn, update_fn)
    if mask is not None:
        return optax.masked(tx, mask)
    return tx


# -- NAdam (Dozat's momentum schedule) and RMSprop -----------------------------------------------------


class ScaleByNadamState(NamedTuple):
    """NAdam state with Dozat's momentum schedule: optax's Adam fields plus ``mu_product`` (a scalar,
    the product of the schedule's ``mu_t``; float64 under x64, else float32). optax's ``nadam`` (the
    constant schedule) keeps :class:`optax.ScaleByAdamState`."""

    count: jax.Array
    mu: Any
    nu: Any
    mu_product: jax.Array


def scale_by_nadam(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    eps_root: Any = 0.0,
    mu_dtype: Any = None,
    *,
    momentum_decay: Any = 4e-3,
) -> optax.GradientTransformationExtraArgs:
    r"""NAdam's direction with Dozat's momentum schedule, as :func:`cautious.spec.nadam_direction`
    (torch.optim.NAdam's rule; ``momentum_schedule="dozat"``).

    .. math::

        \mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi}),\quad \Pi_t = \Pi_{t-1}\mu_t,\quad
        u = \frac{1-\mu_t}{1-\Pi_t}\frac{g}{d} + \frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\frac{m'}{d},\quad
        d = \sqrt{v'/(1-\beta_2^t) + \epsilon_{root}} + \epsilon

    The schedule and ``Pi_t`` are scalars in float64 (x64) or float32; low-precision tensors
    compute in float32. (optax's :func:`optax.nadam` is the constant schedule: :func:`scale_by_adam`
    with ``nesterov=True``.)
    """
    mu_dtype = _canonical(mu_dtype)

    def init_fn(params: Any):
        sd = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        return ScaleByNadamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
            mu_product=jnp.ones([], sd),
        )

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any):
        del params, extra
        t = _safe_increment(state.count)
        sd = state.mu_product.dtype
        tf_ = t.astype(sd)
        mu_t = b1 * (1.0 - 0.5 * jnp.power(jnp.asarray(0.96, sd), tf_ * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * jnp.power(jnp.asarray(0.96, sd), (tf_ + 1.0) * momentum_decay))
        prod = state.mu_product * mu_t
        a = (1.0 - mu_t) / (1.0 - prod)
        b = mu_next / (1.0 - prod * mu_next)
        bc2 = _bias_correction(b2, t)
        g_leaves, treedef = jax.tree.flatten(updates)
        rows = []
        for g, m, v in zip(g_leaves, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)):
            cd = _compute_dtype(g.dtype, m.dtype, v.dtype)
            gc = g.astype(cd)
            m_new = ((1 - b1) * gc + b1 * m.astype(cd)).astype(cd)
            v_new = ((1 - b2) * (gc * gc) + b2 * v.astype(cd)).astype(cd)
            d = jnp.sqrt(v_new / bc2.astype(cd) + eps_root) + eps
            u = (a.astype(cd) * (gc / d) + b.astype(cd) * (m_new / d)).astype(cd)
            rows.append((u, _cast(m_new, mu_dtype if mu_dtype is not None else m.dtype), _cast(v_new, v.dtype)))
        u, mu, nu = _unzip(treedef, rows, 3)
        return u, ScaleByNadamState(count=t, mu=mu, nu=nu, mu_product=prod.astype(sd))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _rms_leaf(g: jax.Array, m: jax.Array | None, v: jax.Array, decay: Any, eps: Any, eps_in_sqrt: bool):
    """``(g / d, g_avg', v')`` for one leaf, in optax's operations (``g * rsqrt(q + eps)``)."""
    cd = _compute_dtype(g.dtype, v.dtype, *(() if m is None else (m.dtype,)))
    gc = g.astype(cd)
    v_new = ((1 - decay) * (gc * gc) + decay * v.astype(cd)).astype(cd)
    m_new = None if m is None else ((1 - decay) * gc + decay * m.astype(cd)).astype(cd)
    q = v_new if m is None else v_new - m_new * m_new
    scaling = jax.lax.rsqrt(q + eps) if eps_in_sqrt else 1 / (jnp.sqrt(q) + eps)
    return (scaling * gc).astype(cd), m_new, v_new


def _no_bias_correction(bias_correction: bool) -> None:
    if bias_correction:
        raise ValueError(
            "bias_correction=True is not supported by cautious.jax's RMSprop (the spec has no bias-corrected "
            "RMSprop); use bias_correction=False"
        )


def scale_by_rms(
    decay: Any = 0.9,
    eps: Any = 1e-8,
    initial_scale: Any = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""RMSprop's scaling, as :func:`optax.scale_by_rms` (state :class:`optax.ScaleByRmsState`).

    .. math::  v' = \rho v + (1-\rho) g^2,\qquad u = g / \sqrt{v' + \epsilon} \text{ (eps\_in\_sqrt) or }
        g / (\sqrt{v'} + \epsilon)

    (:func:`cautious.spec.rmsprop_direction` without momentum); low precision computes in float32.
    ``bias_correction=True`` is refused (not in the spec).
    """
    _no_bias_correction(bias_correction)

    def init_fn(params: Any):
        return optax.ScaleByRmsState(nu=optax.tree.full_like(params, initial_scale))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any):
        del params, extra
        g_leaves, treedef = jax.tree.flatten(updates)
        rows = []
        for g, v in zip(g_leaves, treedef.flatten_up_to(state.nu)):
            r, _, v_new = _rms_leaf(g, None, v, decay, eps, eps_in_sqrt)
            rows.append((r, _cast(v_new, v.dtype)))
        u, nu = _unzip(treedef, rows, 2)
        return u, optax.ScaleByRmsState(nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_stddev(
    decay: Any = 0.9,
    eps: Any = 1e-8,
    initial_scale: Any = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Centered RMSprop's scaling, as :func:`optax.scale_by_stddev` (state :class:`optax.ScaleByRStdDevState`).

    .. math::  \bar g' = \rho \bar g + (1-\rho) g,\quad q = v' - \bar g'^2,\quad
        u = g / \sqrt{q + \epsilon} \text{ (eps\_in\_sqrt) or } g / (\sqrt{q} + \epsilon)

    ``q`` is not clamped (as optax and torch): a ``q`` that rounds below ``-eps`` gives NaN.
    """
    _no_bias_correction(bias_correction)

    def init_fn(params: Any):
        return optax.ScaleByRStdDevState(
            mu=optax.tree.zeros_like(params), nu=optax.tree.full_like(params, initial_scale)
        )

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any):
        del params, extra
        g_leaves, treedef = jax.tree.flatten(updates)
        rows = []
        for g, m, v in zip(g_leaves, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)):
            r, m_new, v_new = _rms_leaf(g, m, v, decay, eps, eps_in_sqrt)
            rows.append((r, _cast(m_new, m.dtype), _cast(v_new, v.dtype)))
        u, mu, nu = _unzip(treedef, rows, 3)
        return u, optax.ScaleByRStdDevState(mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _adopt_default_clip(count: jax.Array) -> jax.Array:
    return count**0.25


def scale_by_adopt(
    b1: Any = 0.9,
    b2: Any = 0.9999,
    eps: Any = 1e-6,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Any = _adopt_default_clip,
) -> optax.GradientTransformationExtraArgs:
    r"""ADOPT's direction, as :func:`cautious.spec.adopt_direction` and :func:`optax.contrib.scale_by_adopt`.

    .. math::

        t = 1:\ u = 0,\ v' = g^2; \qquad
        t > 1:\ n = \operatorname{clip}(g / \max(\sqrt v, \epsilon), \pm c(t-1)),\
        m' = \beta_1 m + (1-\beta_1) n,\ u = m',\ v' = \beta_2 v + (1-\beta_2) g^2

    optax's signature, arithmetic and state (:class:`optax.ScaleByAdamState`); ``clip_value_fn``
    gets optax's ``count`` (``t - 1``). On the first step ``u`` and ``m'`` are exactly ``0`` and ``m``
    (optax computes ``0 * n + m``, NaN where ``n`` is not finite).
    """
    mu_dtype = _canonical(mu_dtype)

    def init_fn(params: Any):
        mu = optax.tree.zeros_like(params, dtype=mu_dtype)
        return ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=optax.tree.zeros_like(params))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any):
        del params, extra
        first = state.count == 0
        b2_ = jnp.where(state.count > 0, b2, 0)
        b1_ = jnp.where(state.count > 0, b1, 1)
        clip = clip_value_fn(state.count) if use_clipping else None
        g_leaves, treedef = jax.tree.flatten(updates)
        rows = []
        for g, m, v in zip(g_leaves, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)):
            cd = _compute_dtype(g.dtype, m.dtype, v.dtype)
            gc, mc, vc = g.astype(cd), m.astype(cd), v.astype(cd)
            v_new = ((1 - b2_) * (gc**2) + b2_ * vc).astype(cd)
            n = gc / jnp.maximum(jnp.sqrt(vc), eps)
            if clip is not None:
                n = jnp.clip(n, -clip, clip)
            m_new = jnp.where(first, mc, ((1 - b1_) * n + b1_ * mc).astype(cd))
            u = ((1 - b1_) * n + b1_ * m_new).astype(cd) if nesterov else m_new
            u = jnp.where(first, jnp.zeros((), cd), u)
            rows.append((u, _cast(m_new, mu_dtype if mu_dtype is not None else m.dtype), _cast(v_new, v.dtype)))
        u, mu, nu = _unzip(treedef, rows, 3)
        return u, ScaleByAdamState(count=_safe_increment(state.count), mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scalar_dtype() -> Any:
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _lr_at(learning_rate: Any, count: jax.Array) -> Any:
    return learning_rate(count) if callable(learning_rate) else learning_rate


class LaPropState(NamedTuple):
    """LaProp's state: ``count``, ``mu`` (the momentum, learning rate inside), ``nu`` and ``lr_avg``
    (the same moving average of the learning rates alone; a float32 scalar, float64 under x64)."""

    count: jax.Array
    mu: Any
    nu: Any
    lr_avg: jax.Array


def scale_by_laprop(
    learning_rate: Any, b1: Any = 0.9, b2: Any = 0.999, eps: Any = 1e-15, mu_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
    r"""LaProp's *update* (learning rate and sign included), as :func:`cautious.spec.laprop_update`.

    .. math::

        v' = \beta_2 v + (1-\beta_2) g^2,\quad
        m' = \beta_1 m + (1-\beta_1)\,\eta_t \frac{g}{\sqrt{v'/(1-\beta_2^t)} + \epsilon},\quad
        \bar\eta' = \beta_1 \bar\eta + (1-\beta_1)\eta_t,\quad
        \delta = -\frac{\eta_t}{\bar\eta'} m'

    The momentum carries each step's learning rate (``learning_rate`` may be a schedule of optax's
    ``count``), so this transformation outputs the parameter update itself: wrap it with
    ``cautious(..., form="update")``, never follow it with ``scale_by_learning_rate``.
    """
    mu_dtype = _canonical(mu_dtype)

    def init_fn(params: Any):
        return LaPropState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
            lr_avg=jnp.zeros([], _scalar_dtype()),
        )

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any):
        del params, extra
        t = _safe_increment(state.count)
        lr = jnp.asarray(_lr_at(learning_rate, state.count), _scalar_dtype())
        lr_avg = (b1 * state.lr_avg + (1 - b1) * lr).astype(_scalar_dtype())
        step_size = jnp.where(lr_avg != 0, lr / jnp.where(lr_avg != 0, lr_avg, 1), 0)
        bc2 = _bias_correction(b2, t)
        g_leaves, treedef = jax.tree.flatten(updates)
        rows = []
        for g, m, v in zip(g_leaves, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)):
            cd = _compute_dtype(g.dtype, m.dtype, v.dtype)
            gc = g.astype(cd)
            v_new = ((1 - b2) * (gc * gc) + b2 * v.astype(cd)).astype(cd)
            n = gc / (jnp.sqrt(v_new / bc2.astype(cd)) + eps)
            m_new = (b1 * m.astype(cd) + ((1 - b1) * lr).astype(cd) * n).astype(cd)
            delta = (-step_size.astype(cd) * m_new).astype(cd)
            rows.append((delta, _cast(m_new, mu_dtype if mu_dtype is not None else m.dtype), _cast(v_new, v.dtype)))
        delta, mu, nu = _unzip(treedef, rows, 3)
        return delta, LaPropState(count=t, mu=mu, nu=nu, lr_avg=lr_avg)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def decoupled_decay(
    learning_rate: Any,
    weight_decay: Any,
    mask: Any = None,
    *,
    decay_order: str = "pre_update",
    first_decay_step: int = 1,
    cautious: bool = False,
) -> optax.GradientTransformation:
    r"""Decoupled weight decay on a parameter *update* ``o`` (learning rate inside), as the spec's step.

    .. math::

        o' = o - \eta\lambda\, d\, p \ \text{(pre\_update)} \quad\text{or}\quad
        o' = o - \eta\lambda\, d\, (p + o) \ \text{(post\_update: the updated parameter decays)}

    from step ``first_decay_step`` on (ADOPT: 2), with ``d = 1``, or with ``cautious`` the decay mask
    of ``u = -o`` and ``p`` (:func:`cautious.spec.decay_mask`). ``learning_rate`` and ``weight_decay``
    may be schedules of the step count (state: optax's weight-decay-schedule state, a ``count``).
    """

    def init_fn(params: Any):
        del params
        return WeightDecaySchedule(count=jnp.zeros([], jnp.int32))

    def update_fn(updates: Any, state: Any, params: Any):
        if params is None:
            raise ValueError("decoupled_decay needs params: call update(g, state, params)")
        rate = _lr_at(learning_rate, state.count) * _lr_at(weight_decay, state.count)
        on = state.count >= first_decay_step - 1

        def leaf(o: jax.Array, p: jax.Array) -> jax.Array:
            cd = jnp.promote_types(jnp.promote_types(o.dtype, p.dtype), jnp.float32)
            oc, pc = o.astype(cd), p.astype(cd)
            base = pc + oc if decay_order == "post_update" else pc
            keep = on
            if cautious:
                opposite = ((oc < 0) & (pc < 0)) | ((oc > 0) & (pc > 0))  # u = -o and p strictly opposite
                keep = keep & ~opposite
            return jnp.where(keep, oc - rate * base, oc)

        return jax.tree.map(leaf, updates, params), WeightDecaySchedule(count=_safe_increment(state.count))

    tx = optax.GradientTransformation(init_fn, update_fn)
    if mask is not None:
        return optax.masked(tx, mask)
    return tx


def _muon_dim_nums(tree: Any) -> Any:
    """optax.contrib.muon's default dimension numbers inside its ``"muon"`` partition: one
    ``MuonDimensionNumbers()`` per matrix leaf, the partition's ``MaskedNode``\\ s kept."""
    from optax.contrib import MuonDimensionNumbers

    return jax.tree.map(lambda x: MuonDimensionNumbers(), tree)


def scale_by_muon_masked_first(
    caution: Caution,
    ns_coeffs: Any = (3.4445, -4.7750, 2.0315),
    ns_steps: int = 5,
    beta: Any = 0.95,
    eps: Any = 1e-8,
    mu_dtype: Any = None,
    *,
    nesterov: bool = True,
    preconditioning: str = "frobenius",
) -> optax.GradientTransformationExtraArgs:
    r""":func:`optax.contrib.scale_by_muon` with caution *before* orthogonalization (``mask_position="before"``).

    .. math::

        m' = \beta m + (1-\beta) g,\quad
        v = \frac{\beta m'}{1-\beta^{t+1}} + \frac{(1-\beta) g}{1-\beta^t}
            \text{ (nesterov) else } \frac{m'}{1-\beta^t},\quad
        u = \mathrm{NS}(\text{mask}(v, g)\,\text{scale}\,v)

    The mask is :func:`cautious.backends.jax._core.apply_caution` (the one JAX implementation);
    the state is optax's ``MuonState``, and 2-d leaves with the default dimension numbers only.
    """
    from optax.contrib import _muon

    native = optax.contrib.scale_by_muon(
        ns_coeffs, ns_steps, beta, eps, mu_dtype, nesterov=nesterov, preconditioning=preconditioning
    )
    dtype = _canonical(mu_dtype)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any):
        del params, extra
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count_inc = _safe_increment(state.count)
        if nesterov:
            mu_hat = jax.tree.map(
                lambda m, g: beta * m + (1 - beta) * g,
                optax.tree.bias_correction(mu, beta, _safe_increment(count_inc)),
                optax.tree.bias_correction(updates, beta, count_inc),
            )
        else:
            mu_hat = optax.tree.bias_correction(mu, beta, count_inc)
        masked = jax.tree.map(lambda v, g: _core.apply_caution(v, g, caution), mu_hat, updates)
        out = jax.tree.map(
            lambda v: _muon.orthogonalize_via_newton_schulz(v, state.ns_coeffs, ns_steps, preconditioning, eps),
            masked,
        )
        return out, optax.contrib.MuonState(count=count_inc, mu=optax.tree.cast(mu, dtype), ns_coeffs=state.ns_coeffs)

    return optax.GradientTransformationExtraArgs(native.init, update_fn)
