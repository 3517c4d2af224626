"""Conformance adapter: drive the Keras optimizers of :mod:`cautious.tensorflow` through the suite.

``TFAdapter(mode)`` runs one ``apply`` of the real optimizer class, eagerly
(``mode="eager"``), inside ``tf.function`` (``"function"``) or under XLA
(``"xla"``, ``tf.function(jit_compile=True)``), from exactly the state the suite
gives: the adapter writes ``state.step`` into ``optimizer.iterations`` and the
spec's state tensors into the optimizer's own variables, then reads them back.

Mapping (spec -> Keras): ``lr`` -> ``learning_rate``, ``betas`` -> ``beta_1``/``beta_2``,
``eps`` -> ``epsilon``; ``spec.adamw`` -> :class:`AdamW`, ``spec.adam`` with decoupled decay
(or none) -> :class:`Adam`, ``spec.lion`` -> :class:`Lion`, ``spec.sgd`` with decoupled decay
(or none) -> :class:`SGD`. AdamState ``(m, v, v_max)`` is ``(momentum, velocity,
velocity_hat)``; SGD is built with the case's ``momentum_form`` (the spec's default,
``"torch"``, unless the case says ``"keras"``), whose buffer is the spec's ``m`` in either
form (see :class:`cautious.tensorflow.SGD`), so no conversion is needed. Optimizers are built under
``keras.config.floatx() == case.dtype`` for float64 so that the learning-rate variable is
float64, and are cached per case and shapes so that each ``tf.function`` traces once.

Declined (Keras semantics cannot express them): coupled L2 weight decay (every Keras
optimizer decays decoupled), SGD ``dampening != 0``, and state stored in a dtype other
than the parameters' (Keras keeps optimizer state in the variable's dtype).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from cautious import spec  # noqa: E402
from cautious.conformance.case import Case  # noqa: E402
from cautious.spec.dtypes import numpy_dtype  # noqa: E402
from cautious.tensorflow import SGD, Adam, AdamW, Lion  # noqa: E402

__all__ = ["TFAdapter", "build_optimizer"]

_MODES = ("eager", "function", "xla")
_TF_DTYPES = {"float32": tf.float32, "float64": tf.float64, "bfloat16": tf.bfloat16, "float16": tf.float16}
_SPEC_DEFAULTS = {
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
    "lion": {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
    "sgd": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0},
}


def _hp(case: Case) -> dict[str, Any]:
    return {**_SPEC_DEFAULTS[case.rule], **dict(case.hparams)}


def build_optimizer(case: Case) -> keras.optimizers.Optimizer:
    """The :mod:`cautious.tensorflow` optimizer equivalent to ``spec_optimizer(case)``."""
    hp = _hp(case)
    common = dict(
        learning_rate=float(hp["lr"]),
        caution=hp.get("caution", True),
        cautious_weight_decay=bool(hp.get("cautious_weight_decay", False)),
        maximize=bool(hp.get("maximize", False)),
        caution_stats=case.caution is not None,  # the telemetry the suite checks (TFAdapter.last_stats)
    )
    wd = float(hp["weight_decay"])
    if case.rule in ("adam", "adamw"):
        b1, b2 = hp["betas"]
        cls = AdamW if case.rule == "adamw" else Adam
        return cls(
            beta_1=float(b1),
            beta_2=float(b2),
            epsilon=float(hp["eps"]),
            amsgrad=bool(hp.get("amsgrad", False)),
            weight_decay=wd,
            eps_placement=hp.get("eps_placement", "corrected"),
            **common,
        )
    if case.rule == "lion":
        b1, b2 = hp["betas"]
        return Lion(beta_1=float(b1), beta_2=float(b2), weight_decay=wd, **common)
    return SGD(
        momentum=float(hp["momentum"]),
        nesterov=bool(hp.get("nesterov", False)),
        weight_decay=wd,
        momentum_form=hp.get("momentum_form", "torch"),
        **common,
    )


class _Entry:
    def __init__(self, case: Case, shapes: list[tuple[int, ...]], mode: str) -> None:
        dtype = _TF_DTYPES[case.dtype]
        previous = keras.config.floatx()
        keras.config.set_floatx("float64" if case.dtype == "float64" else "float32")
        try:
            self.opt = build_optimizer(case)
        finally:
            keras.config.set_floatx(previous)
        self.vars = [tf.Variable(tf.zeros(s, dtype), name=f"p{i}") for i, s in enumerate(shapes)]
        self.opt.build(self.vars)
        self.dtype = dtype

        def apply(grads: list[tf.Tensor]) -> None:
            self.opt.apply(grads, self.vars)

        if mode == "eager":
            self.apply = apply
        else:
            self.apply = tf.function(apply, jit_compile=(mode == "xla"), reduce_retracing=False)

    def state_vars(self, rule: str, i: int) -> list[Any]:
        opt = self.opt
        if rule in ("adam", "adamw"):
            vh = opt._velocity_hats[i] if opt.amsgrad else None
            return [opt._momentums[i], opt._velocities[i], vh]
        if rule == "lion":
            return [opt._momentums[i]]
        return [opt.momentums[i] if opt.momentum != 0 else None]


class TFAdapter:
    """Conformance adapter for :mod:`cautious.tensorflow` (``mode``: ``"eager"``, ``"function"``, ``"xla"``)."""

    def __init__(self, mode: str = "eager", cache_size: int = 64) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.name = f"tensorflow-{mode}"
        self._cache: collections.OrderedDict[Any, _Entry] = collections.OrderedDict()
        self._cache_size = cache_size

    def supports(self, case: Case) -> str | None:
        hp = _hp(case)
        if case.dtype not in _TF_DTYPES:
            return f"dtype {case.dtype!r} is not supported"
        if case.state_storage != case.dtype:
            return "Keras stores optimizer state in the parameter's dtype"
        decoupled = case.rule in ("adamw", "lion") or bool(hp.get("decoupled_weight_decay", False))
        if float(hp.get("weight_decay", 0.0)) != 0 and not decoupled:
            return "coupled (L2) weight decay: Keras weight decay is always decoupled"
        if case.rule == "sgd" and float(hp.get("dampening", 0.0)) != 0:
            return "SGD dampening: Keras SGD has no dampening"
        return None

    def _entry(self, case: Case, shapes: list[tuple[int, ...]]) -> _Entry:
        key = (case.rule, repr(sorted(case.hparams.items())), case.dtype, tuple(shapes))
        entry = self._cache.get(key)
        if entry is None:
            entry = _Entry(case, shapes, self.mode)
            self._cache[key] = entry
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return entry

    def _to_tf(self, x: np.ndarray, dtype: tf.DType) -> tf.Tensor:
        wide = np.float64 if dtype == tf.float64 else np.float32
        return tf.cast(tf.constant(np.asarray(x, dtype=wide)), dtype)

    def last_stats(self) -> list[tuple[int, int, float]] | None:
        """The optimizer's ``caution_stats()`` after the last :meth:`step`: ``(count, n, scale)`` per variable."""
        return getattr(self, "_stats", None)

    def step(
        self, case: Case, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: spec.State
    ) -> tuple[list[np.ndarray], spec.State]:
        shapes = [tuple(np.shape(p)) for p in params]
        entry = self._entry(case, shapes)
        dt = entry.dtype
        for var, p in zip(entry.vars, params):
            var.assign(self._to_tf(p, dt))
        entry.opt.iterations.assign(int(state.step))
        for i, leaf in enumerate(state.leaves):
            for var, x in zip(entry.state_vars(case.rule, i), leaf):
                if var is not None and x is not None:
                    var.assign(self._to_tf(x, dt))
        entry.apply([self._to_tf(g, dt) for g in grads])
        self._stats = None
        if case.caution is not None:
            self._stats = [(int(c.numpy()), int(k), float(sc.numpy())) for c, k, sc in entry.opt.caution_stats()]
        out = numpy_dtype(case.dtype)
        read = lambda v: None if v is None else np.asarray(v.numpy()).astype(out)  # noqa: E731
        new_params = [read(v) for v in entry.vars]
        leaves = []
        for i, leaf in enumerate(state.leaves):
            leaves.append(type(leaf)(*(read(v) for v in entry.state_vars(case.rule, i))))
        return new_params, spec.State(int(entry.opt.iterations.numpy()), tuple(leaves))
