"""Conformance adapter: drives :mod:`cautious.jax` through :func:`cautious.conformance.run_conformance`.

>>> from cautious.conformance import run_conformance        # doctest: +SKIP
>>> run_conformance(JaxAdapter(jit=True))                     # doctest: +SKIP

float64 cases need ``jax.config.update("jax_enable_x64", True)`` before any array is made.

bfloat16/float16 parameters are passed in float32 (their values are exact there) with
gradients and state in the case's dtypes: the optimizer computes exactly as for bfloat16
parameters (in float32), but returns float32 updates, so ``p + update`` rounds once to the
storage dtype, as the spec's parameter rounds. With real bfloat16 parameters the updates
are rounded to bfloat16 first (optax's contract, see :mod:`cautious.backends.jax`); that
cast is tested on its own in ``tests/backend_jax``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cautious.jax as cjax
from cautious import spec
from cautious.conformance.case import Case
from cautious.spec.dtypes import numpy_dtype

__all__ = ["JaxAdapter"]

_JNP = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_STATE_TYPES = (optax.ScaleByAdamState, cjax.ScaleByAmsgradState, optax.ScaleByLionState, optax.TraceState)


def _spec_hparams(case: Case) -> dict[str, Any]:
    """The case's hyperparameters with the spec factory's defaults filled in."""
    sig = inspect.signature(getattr(spec, case.rule))
    hp = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    hp.update(case.hparams)
    return hp


def build_optimizer(case: Case) -> optax.GradientTransformationExtraArgs:
    """The :mod:`cautious.jax` optimizer that implements ``case`` (spec defaults, not optax's)."""
    hp = _spec_hparams(case)
    common = dict(caution=hp["caution"], maximize=hp["maximize"], cautious_weight_decay=hp["cautious_weight_decay"])
    common["caution_stats"] = case.caution is not None  # the telemetry the suite checks (JaxAdapter.last_stats)
    if case.rule in ("adam", "adamw"):
        b1, b2 = hp["betas"]
        kw = dict(
            learning_rate=hp["lr"],
            b1=b1,
            b2=b2,
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
            amsgrad=hp["amsgrad"],
            eps_placement=hp["eps_placement"],
            **common,
        )
        if case.rule == "adam":
            return cjax.adam(decoupled_weight_decay=hp["decoupled_weight_decay"], **kw)
        return cjax.adamw(**kw)
    if case.rule == "lion":
        b1, b2 = hp["betas"]
        return cjax.lion(hp["lr"], b1, b2, weight_decay=hp["weight_decay"], **common)
    momentum = hp["momentum"]
    return cjax.sgd(
        hp["lr"],
        momentum=None if float(momentum) == 0 else momentum,
        nesterov=hp["nesterov"],
        weight_decay=hp["weight_decay"],
        decoupled_weight_decay=hp["decoupled_weight_decay"],
        **common,
    )


def _replace_direction_state(state: Any, make: Any) -> Any:
    """Rebuild an optax state tree, replacing every direction state by ``make(old)``."""
    if isinstance(state, _STATE_TYPES):
        return make(state)
    if isinstance(state, tuple):
        items = [_replace_direction_state(s, make) for s in state]
        return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
    return state


def _find_direction_state(state: Any) -> Any:
    if isinstance(state, _STATE_TYPES):
        return state
    if isinstance(state, tuple):
        for s in state:
            found = _find_direction_state(s)
            if found is not None:
                return found
    return None


class JaxAdapter:
    """Runs one step of :mod:`cautious.jax` from the given spec state (eagerly, or under ``jax.jit``)."""

    def __init__(self, jit: bool = True) -> None:
        self.jit = bool(jit)
        self.name = "jax-jit" if self.jit else "jax-eager"
        self._compiled: dict[Any, Any] = {}
        self._stats: list[tuple[int, int, float]] | None = None

    def last_stats(self) -> list[tuple[int, int, float]] | None:
        """``cautious.jax.caution_stats`` of the state after the last :meth:`step`: ``(count, n, scale)`` per leaf."""
        return self._stats

    def supports(self, case: Case) -> str | None:
        if "float64" in (case.dtype, case.state_storage) and not jax.config.jax_enable_x64:
            return "float64 needs jax.config.update('jax_enable_x64', True)"
        if case.rule == "sgd" and float(case.hparams.get("dampening", 0.0)) != 0:
            return "optax's momentum (optax.trace) has no dampening"
        return None

    def _step_fn(self, case: Case) -> Any:
        key = (case.rule, tuple(sorted((k, repr(v)) for k, v in case.hparams.items())), case.dtype, case.state_storage)
        fn = self._compiled.get(key)
        if fn is None:
            opt = build_optimizer(case)

            def fn(params: Any, grads: Any, state: Any) -> Any:
                updates, new_state = opt.update(grads, state, params)
                return optax.apply_updates(params, updates), new_state

            fn = (jax.jit(fn), opt) if self.jit else (fn, opt)
            self._compiled[key] = fn
        return fn

    def step(
        self, case: Case, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: spec.State
    ) -> tuple[list[np.ndarray], spec.State]:
        fn, opt = self._step_fn(case)
        pd, sd = _JNP[case.dtype], _JNP[case.state_storage]
        wide = jnp.float32 if case.dtype in ("bfloat16", "float16") else pd  # see the module docstring
        p = [jnp.asarray(np.asarray(x), wide) for x in params]
        g = [jnp.asarray(np.asarray(x), pd) for x in grads]
        arr = lambda x: jnp.asarray(np.asarray(x), sd)  # noqa: E731
        count = jnp.asarray(state.step, jnp.int32)
        leaves = state.leaves

        def make(old: Any) -> Any:
            if isinstance(old, optax.ScaleByAdamState):
                return optax.ScaleByAdamState(count, [arr(s.m) for s in leaves], [arr(s.v) for s in leaves])
            if isinstance(old, cjax.ScaleByAmsgradState):
                return cjax.ScaleByAmsgradState(
                    count, [arr(s.m) for s in leaves], [arr(s.v) for s in leaves], [arr(s.v_max) for s in leaves]
                )
            if isinstance(old, optax.ScaleByLionState):
                return optax.ScaleByLionState(count, [arr(s.m) for s in leaves])
            return optax.TraceState([arr(s.m) for s in leaves])

        opt_state = _replace_direction_state(opt.init(p), make)
        new_p, new_state = fn(p, g, opt_state)
        out = lambda x, d: np.asarray(jnp.asarray(x).astype(jnp.float32 if d == "bfloat16" else _JNP[d])).astype(  # noqa: E731
            numpy_dtype(d)
        )
        self._stats = None
        if case.caution is not None:
            self._stats = [(int(c), int(k), float(sc)) for c, k, sc in cjax.caution_stats(new_state)]
        ds = _find_direction_state(new_state)
        n = len(leaves)
        if isinstance(ds, optax.ScaleByAdamState):
            new_leaves = tuple(
                spec.AdamState(out(ds.mu[i], case.state_storage), out(ds.nu[i], case.state_storage), None)
                for i in range(n)
            )
        elif isinstance(ds, cjax.ScaleByAmsgradState):
            new_leaves = tuple(
                spec.AdamState(*(out(x[i], case.state_storage) for x in (ds.mu, ds.nu, ds.nu_max))) for i in range(n)
            )
        elif isinstance(ds, optax.ScaleByLionState):
            new_leaves = tuple(spec.LionState(out(ds.mu[i], case.state_storage)) for i in range(n))
        elif isinstance(ds, optax.TraceState):
            new_leaves = tuple(spec.SGDState(out(ds.trace[i], case.state_storage)) for i in range(n))
        else:  # SGD without momentum: no state
            new_leaves = tuple(spec.SGDState(None) for _ in range(n))
        return [out(x, case.dtype) for x in new_p], spec.State(int(state.step) + 1, new_leaves)
