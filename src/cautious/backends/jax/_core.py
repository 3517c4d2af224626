r"""The cautious mask in JAX: mask, integer count, scale, and the :func:`cautious` wrapper.

See :mod:`cautious.spec.mask` for the algorithm. For one tensor with base
direction ``u`` and consumed gradient ``g``:

.. math::

    \text{mask} = [u>0 \wedge g>0] \vee [u<0 \wedge g<0] \vee \text{isnan}(u) \vee \text{isnan}(g),
    \qquad u^c = \text{where}(\text{mask}, \text{scale}(\text{count}, n)\cdot u, 0)

Decisions come from signs, never from the product ``u * g``; ``count`` is an
integer (int32, or int64 when ``jax_enable_x64`` is on: with int32 a tensor may
hold at most ``2**31 - 1`` elements).

Why the count is written the way it is: on CPU, XLA hands a reduction whose
elementwise body uses only arithmetic (``mul``, ``max``, ``min``, ``sign``) to a
fast fused reduction, but splits comparisons, selects and integer arithmetic
out into materialised temporaries that run at a fraction of the speed. So large
tensors count with an arithmetic indicator (``max(sign(a) * sign(g), 0)``, a
product of -1, 0 and 1) summed in floating point, which is
exact (every partial sum is an integer below ``2**24`` in float32, ``2**53`` in
float64), and fall back, under :func:`jax.lax.cond`, to the plain integer count
of the boolean mask when the indicator sum is NaN (a NaN in ``u`` or ``g``, or an
overflow). Small tensors always use the plain integer count.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cautious._caution import Caution, caution_arg
from cautious.spec.errors import ERROR_TABLE, validate
from cautious.spec.mask import CautionStats

__all__ = [
    "FORMS",
    "cautious",
    "caution_stats",
    "CautionStatsState",
    "cautious_mask",
    "kept_count",
    "caution_denominator",
    "caution_scale",
    "apply_caution",
    "whole_update",
]

#: What :func:`cautious` wraps: a descent ``"direction"`` (before the learning rate) or a whole
#: optimizer's ``"update"`` (the parameter delta, ``-lr`` and decay included).
FORMS = next(c.choices for c in ERROR_TABLE if c.key == "form")

# Tensors with fewer entries use the plain integer count (cheap at that size, and trivially consistent).
FAST_COUNT_MIN_SIZE = 1 << 15

# Largest exact float sum of 0/1 values by compute dtype (every partial sum of integers below it is exact).
EXACT_SUM_LIMIT = {"float32": 2**24, "float64": 2**53}

# update function of a direction transformation -> the same update that also returns a sign proxy
# tree: arrays whose sign and NaN-ness equal the direction's (see :func:`register_sign_proxy`).
_PROXY_UPDATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_sign_proxy(update: Callable, update_with_proxy: Callable) -> None:
    """Declare that ``update_with_proxy(g, state, params, **extra) -> (u, state, proxy)`` returns,
    besides ``update``'s results, a tree whose entries have exactly the sign (and NaN-ness) of ``u``.

    :func:`cautious` then decides the mask from the proxy (for Adam, the new first moment ``m``),
    which lets XLA count and update in fewer passes over memory.
    """
    _PROXY_UPDATES[update] = update_with_proxy


def count_dtype() -> Any:
    """int64 when ``jax_enable_x64`` is on, else int32."""
    return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32


def _compute_dtype(*dtypes: Any) -> Any:
    """float64 if any input is float64, else float32 (bfloat16 and float16 compute in float32)."""
    return jnp.float64 if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.float32


def cautious_mask(u: jax.Array, g: jax.Array) -> jax.Array:
    """Boolean mask: ``u`` and ``g`` strictly agree in sign, or either is NaN (see :mod:`cautious.spec.mask`)."""
    return ((u > 0) & (g > 0)) | ((u < 0) & (g < 0)) | jnp.isnan(u) | jnp.isnan(g)


def _exact_count(a: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.sum(cautious_mask(a, g), dtype=count_dtype())


def _scaled_product(a: jax.Array, g: jax.Array, big: float) -> jax.Array:
    return jnp.minimum(jnp.maximum(a * (g * big), -0.0) * big, 1.0)


def _sign_product(a: jax.Array, g: jax.Array, big: float) -> jax.Array:
    return jnp.maximum(jnp.sign(a) * jnp.sign(g), 0.0)  # a product of -1, 0, 1 (or NaN): exact


#: Arithmetic 0/1 indicators of ``a*g > 0`` (NaN where an input is NaN), by name; :data:`INDICATOR`
#: is the one used. Both are exact; docs/benchmarks.md records what each gave (``bench_jax.py --count``).
INDICATORS = {"scaled_product": _scaled_product, "sign_product": _sign_product}
INDICATOR = "sign_product"


def _indicator_sum(a: jax.Array, g: jax.Array) -> jax.Array:
    r"""Sum of an arithmetic 0/1 indicator of ``a*g > 0``, in a float that holds every partial sum exactly.

    ``sign_product`` (used): ``max(sign(a) * sign(g), 0)`` is exactly 1 where the signs agree and
    0 otherwise (a product of -1, 0 and 1 cannot underflow). ``scaled_product`` (the earlier
    form): with ``C = 2**(emax-1)`` (``2**126`` in float32) every normal ``g`` has ``|g*C| >= 1``,
    so ``y = a*(g*C)`` is 0 or at least the smallest normal in magnitude, or overflows to an
    infinity of the right sign; ``min(max(y, -0)*C', 1)`` is then exactly 1 for ``y > 0`` and 0
    otherwise (``0*inf`` when ``|g| >= 4`` meets ``a == 0`` is NaN). NaN propagates to the sum,
    and the caller falls back to the exact count. Subnormal inputs behave as the platform's
    comparisons do (CPU flushes them to zero).
    """
    cd = _compute_dtype(a.dtype, g.dtype)
    big = 2.0**1022 if cd == jnp.float64 else 2.0**126
    a = a.astype(cd)
    g = g.astype(cd)
    ind = INDICATORS[INDICATOR](a, g, big)
    limit = EXACT_SUM_LIMIT[jnp.dtype(cd).name]
    if ind.size <= limit:
        return jnp.sum(ind)
    # Partial sums over trailing axes, each below `limit`, then an integer sum.
    axes, size = [], 1
    for ax in range(ind.ndim - 1, -1, -1):
        if size * ind.shape[ax] > limit:
            break
        size *= ind.shape[ax]
        axes.append(ax)
    if not axes:
        return jnp.asarray(jnp.nan, cd)  # one axis longer than `limit`: use the exact count
    partial = jnp.sum(ind, axis=tuple(axes))
    bad = jnp.any(jnp.isnan(partial))
    total = jnp.sum(jnp.where(bad, 0, partial).astype(count_dtype()))
    return jnp.where(bad, jnp.nan, total.astype(cd))


def kept_count(a: jax.Array, g: jax.Array) -> jax.Array:
    """Integer number of entries where ``a`` and ``g`` strictly agree in sign or either is NaN."""
    if a.size < FAST_COUNT_MIN_SIZE:
        return _exact_count(a, g)
    total = _indicator_sum(a, g)
    return jax.lax.cond(jnp.isnan(total), lambda: _exact_count(a, g), lambda: total.astype(count_dtype()))


def caution_scale(count: jax.Array, n: int | jax.Array, caution: Caution, dtype: Any) -> jax.Array:
    """The per-tensor scale for ``count`` kept entries of ``n`` (see :meth:`cautious.Caution.scale`).

    ``n`` is the tensor's size (a Python int) or, with ``denominator="nonzero"``, a count array
    (then a zero ``n`` gives scale 1).
    """
    if not isinstance(n, int):
        nn = n.astype(dtype)
        if caution.normalize == "mean_clamp":
            scale = jnp.where(count >= caution.floor * nn, nn / count.astype(dtype), 1.0 / caution.floor)
        elif caution.normalize == "count_plus_one":
            scale = nn / (count + 1).astype(dtype)
        elif caution.normalize == "exact":
            scale = nn / jnp.maximum(count, 1).astype(dtype)
        else:
            return jnp.asarray(1.0, dtype)
        return jnp.where(n > 0, scale, jnp.asarray(1.0, dtype)).astype(dtype)
    nn = jnp.asarray(float(n), dtype)
    if caution.normalize == "mean_clamp":
        # 1 / max(k/n, floor): n/k when k/n >= floor, else 1/floor. thr = least integer k with k/n >= floor.
        thr = max(1, math.ceil(caution.floor * n))
        while thr > 1 and (thr - 1) / n >= caution.floor:
            thr -= 1
        while thr / n < caution.floor:
            thr += 1
        return jnp.where(count >= thr, nn / count.astype(dtype), jnp.asarray(1.0 / caution.floor, dtype))
    if caution.normalize == "count_plus_one":
        return nn / (count + 1).astype(dtype)
    if caution.normalize == "exact":
        return nn / jnp.maximum(count, 1).astype(dtype)
    return jnp.asarray(1.0, dtype)


def caution_denominator(g: jax.Array, caution: Caution) -> int | jax.Array:
    """The ``n`` of the scale: ``g``'s size, or with ``denominator="nonzero"`` its entries that are not 0."""
    if caution.denominator == "size":
        return int(g.size)
    return jnp.count_nonzero(g).astype(count_dtype())  # +0/-0 are zero, NaN is not


def _caution_parts(
    u: jax.Array, g: jax.Array, caution: Caution, proxy: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(where(mask, scale * u, 0), count, scale)`` for one tensor (see :func:`apply_caution`)."""
    cd = jnp.promote_types(u.dtype, jnp.float32)
    if u.size == 0:
        return u, jnp.zeros((), count_dtype()), jnp.ones((), cd)
    a = u if proxy is None else proxy
    mask = cautious_mask(a, g)
    count = kept_count(a, g)
    scale = caution_scale(count, caution_denominator(g, caution), caution, cd)
    return jnp.where(mask, u.astype(cd) * scale, jnp.zeros((), cd)), count, scale


def apply_caution(u: jax.Array, g: jax.Array, caution: Caution, proxy: jax.Array | None = None) -> jax.Array:
    """``where(mask, scale * u, 0)`` for one tensor; the mask from ``proxy`` (same signs as ``u``) if given.

    The result has ``u``'s dtype, or float32 when ``u`` is bfloat16/float16 (scaling in float32;
    :func:`cautious` rounds once to ``u``'s dtype, the aliases once into the update).
    """
    return _caution_parts(u, g, caution, proxy)[0]


class CautionStatsState(NamedTuple):
    """State of :func:`cautious` with ``caution_stats=True``: the wrapped state and, per leaf of the
    parameters (in ``jax.tree.leaves`` order), the last step's kept ``counts``, ``sizes`` and ``scales``."""

    inner_state: Any
    counts: tuple[jax.Array, ...]
    sizes: tuple[jax.Array, ...]
    scales: tuple[jax.Array, ...]


def caution_stats(state: Any) -> list[CautionStats]:
    """The caution telemetry in an optimizer state built with ``caution_stats=True``.

    Returns, per parameter leaf, ``CautionStats(count, n, scale)`` of the last step (arrays; reading
    them is the only host transfer). Raises ``ValueError`` when ``state`` holds no telemetry.
    """
    found = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, CautionStatsState))
        if isinstance(x, CautionStatsState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"caution_stats() needs a state built with caution_stats=True (found {len(found)} telemetry records)"
        )
    s = found[0]
    return [CautionStats(c, n, sc) for c, n, sc in zip(s.counts, s.sizes, s.scales, strict=True)]


def whole_update(update: jax.Array, g: jax.Array, caution: Caution) -> jax.Array:
    r"""A whole optimizer's update (``p' = p + update``), masked against the gradient.

    As :func:`cautious.spec.whole_update`: the descent direction is ``-update``, so the
    update is kept where it has the sign of ``-g``:
    ``where(mask(update, -g), scale * update, 0)``.
    """
    return _whole_parts(update, g, caution)[0]


def _whole_parts(update: jax.Array, g: jax.Array, caution: Caution) -> tuple[jax.Array, jax.Array, jax.Array]:
    out, count, scale = _caution_parts(update, -g, caution)
    return out.astype(update.dtype), count, scale


def _leaves_like(treedef: Any, tree: Any) -> list:
    return treedef.flatten_up_to(tree)


def cautious(
    inner: optax.GradientTransformation,
    caution: bool | Caution = True,
    *,
    form: str | None = None,
    caution_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Wrap a direction transformation, or a whole optimizer, with the cautious mask.

    ``form`` says which ``inner`` is; it has no default, because the two have opposite signs
    and a wrong guess masks every entry (training silently stops):

    * ``form="direction"``: ``inner`` maps the gradient to a descent direction ``u`` with optax's
      sign convention, before the learning rate (``optax.scale_by_adam()``,
      ``optax.scale_by_lion()``, ``optax.trace(...)``): ``+u`` points along the gradient and a
      later ``scale_by_learning_rate`` multiplies by ``-lr``. The entries of ``u`` that agree in
      sign with the incoming gradient ``g`` are kept (NaN kept) and rescaled per tensor:

      .. math::  u^c = \text{mask}(u, g)\cdot\text{scale}\cdot u

      Put it right after the direction, before decoupled weight decay and the learning rate
      (as :func:`cautious.jax.adamw` does), so decay is never masked.

    * ``form="update"``: ``inner`` is a whole optimizer (``optax.adamw(1e-3)``,
      ``optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, 0.9))``) whose output is
      the parameter update ``o`` (``p' = p + o``: ``-lr`` and weight decay included). The whole
      update is masked against the gradient, decay included (the spec's
      :func:`cautious.spec.whole_update`):

      .. math::  o^c = \text{mask}(o, -g)\cdot\text{scale}\cdot o

      This equals ``form="direction"`` for rules without decoupled decay and a positive
      learning rate; with decoupled decay it differs from :func:`cautious.jax.adamw`, which
      never masks the decay.

      This is caution for any optimizer, the one definition the three backends share
      (:func:`cautious.spec.cautious_optimizer`): torch's and Keras's ``Cautious`` wrappers
      measure ``o`` as ``p_next - p`` after an in-place step (:func:`cautious.spec.whole_step`),
      optax hands it over, so here ``o`` is exact and no buffer is needed.

    The state is exactly the inner state (the same pytree as without caution), so states and
    checkpoints move freely between ``inner`` and ``cautious(inner)``. Outputs keep the dtype
    that ``inner`` returns (bfloat16/float16 are scaled in float32 and rounded once). See
    :mod:`cautious.spec` for the algorithm.

    Args:
      inner: the direction transformation or the whole optimizer.
      caution: ``True`` (``Caution()``), ``False`` (no mask) or a :class:`cautious.Caution`.
      form: ``"direction"`` or ``"update"`` (required).
      caution_stats: opt-in telemetry: the state becomes :class:`CautionStatsState`, which also
        holds each leaf's kept count, size and scale of the last step (read them with
        :func:`caution_stats`). Off by default, so the state keeps the inner structure.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from cautious.jax import cautious
      >>> opt = optax.chain(cautious(optax.scale_by_adam(), form="direction"), optax.scale_by_learning_rate(0.1))
      >>> params = jnp.array([1.0, 1.0])
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.array([1.0, -1.0]), state, params)
      >>> [round(x, 3) for x in updates.tolist()]
      [-0.1, 0.1]
      >>> whole = cautious(optax.adamw(0.1), form="update")
      >>> updates, _ = whole.update(jnp.array([1.0, -1.0]), whole.init(params), params)
      >>> [round(x, 3) for x in updates.tolist()]
      [-0.1, 0.1]
    """
    return _cautious(inner, caution, form=form, keep_dtype=True, caution_stats=caution_stats)


def _cautious(
    inner: optax.GradientTransformation,
    caution: bool | Caution,
    *,
    form: str | None,
    keep_dtype: bool,
    caution_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """:func:`cautious`; ``keep_dtype=False`` leaves a low-precision direction in float32 (the
    aliases round once, into the update)."""
    if form is None:
        raise TypeError(
            "cautious() needs form='direction' (inner is a descent direction before the learning rate, such as "
            "optax.scale_by_adam()) or form='update' (inner is a whole optimizer, such as optax.adamw(1e-3), "
            "whose whole update is masked)"
        )
    validate({"form": form})
    c = caution_arg(caution)
    if not isinstance(caution_stats, bool):
        raise TypeError(f"caution_stats must be a bool, got {caution_stats!r}")
    if caution_stats and c is None:
        raise ValueError("caution_stats=True needs caution on (caution=False has no mask to report)")
    by_update = form == "update"
    proxy_update = None if by_update else _PROXY_UPDATES.get(inner.update)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> Any:
        state = inner.init(params)
        if not caution_stats:
            return state
        leaves = jax.tree.leaves(params)
        return CautionStatsState(
            state,
            tuple(jnp.zeros((), count_dtype()) for _ in leaves),
            tuple(jnp.asarray(x.size, count_dtype()) for x in leaves),
            tuple(jnp.ones((), jnp.promote_types(x.dtype, jnp.float32)) for x in leaves),
        )

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any):
        inner_state = state.inner_state if caution_stats else state
        if proxy_update is not None and c is not None:
            u, new_state, proxy = proxy_update(updates, inner_state, params, **extra)
        else:
            u, new_state = inner.update(updates, inner_state, params, **extra)
            proxy = None
        if c is None:
            return u, new_state
        u_leaves, treedef = jax.tree.flatten(u)
        g_leaves = _leaves_like(treedef, updates)
        if by_update:
            parts = [_whole_parts(o, g, c) for o, g in zip(u_leaves, g_leaves)]
        else:
            p_leaves = _leaves_like(treedef, proxy) if proxy is not None else [None] * len(u_leaves)
            parts = [_caution_parts(a, b, c, p) for a, b, p in zip(u_leaves, g_leaves, p_leaves)]
        out = [o for o, _, _ in parts]
        if keep_dtype and not by_update:
            out = [o.astype(a.dtype) for o, a in zip(out, u_leaves)]
        out_tree = jax.tree.unflatten(treedef, out)
        if not caution_stats:
            return out_tree, new_state
        counts = tuple(k.astype(count_dtype()) for _, k, _ in parts)
        scales = tuple(sc.astype(old.dtype) for (_, _, sc), old in zip(parts, state.scales))
        return out_tree, CautionStatsState(new_state, counts, state.sizes, scales)

    return optax.GradientTransformationExtraArgs(init_fn if caution_stats else inner.init, update_fn)
