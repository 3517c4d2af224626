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
from cautious.tensorflow import SGD, Adafactor, Adam, AdamW, Adopt, Cautious, LaProp, Lion, Muon, Nadam, RMSprop  # noqa: E402

__all__ = ["TFAdapter", "TFWrapperAdapter", "build_optimizer"]

_MODES = ("eager", "function", "xla")
_TF_DTYPES = {"float32": tf.float32, "float64": tf.float64, "bfloat16": tf.bfloat16, "float16": tf.float16}
_SPEC_DEFAULTS = {
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2},
    "lion": {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
    "sgd": {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0},
    "nadam": {
        "lr": 2e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum_decay": 4e-3,
        "momentum_schedule": "dozat",
    },
    "rmsprop": {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "centered": False},
    "adafactor": {"lr": 1e-2, "weight_decay": 0.0},
    "adopt": {"lr": 1e-3, "betas": (0.9, 0.9999), "eps": 1e-6, "clip_exp": 0.333, "weight_decay": 0.0},
    "laprop": {"lr": 4e-4, "betas": (0.9, 0.999), "eps": 1e-15, "weight_decay": 0.0},
    "muon": {"lr": 1e-3, "momentum": 0.95, "weight_decay": 0.1, "nesterov": True, "ns_steps": 5, "rms_rate": 0.2},
}

#: keras.optimizers.Adafactor's forms of the spec's Adafactor options (docs/spec.md, "Adafactor").
ADAFACTOR_FORMS = {
    "eps_form": "add",
    "factor_dims": "last_two",
    "min_dim_size_to_factor": 0,
    "relative_step": True,
    "multiply_by_parameter_scale": True,
    "weight_decay_form": "lr_before_scale",
    "decay_offset": 0,
    "eps": (None, float(np.float32(1e-3))),  # eps[0] is drawn; Keras casts epsilon_2 through float32
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
    if case.rule == "muon":
        common.pop("maximize")
        common.pop("caution_stats")  # Keras's Muon has no telemetry here yet (README, gaps)
        return Muon(
            weight_decay=wd,
            momentum=float(hp["momentum"]),
            nesterov=bool(hp["nesterov"]),
            ns_steps=int(hp["ns_steps"]),
            rms_rate=float(hp["rms_rate"]) if hp.get("shape_scale", "rms") == "rms" else None,
            mask_position=hp.get("mask_position", "after"),
            **common,
        )
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
    if case.rule == "nadam":
        b1, b2 = hp["betas"]
        return Nadam(
            beta_1=float(b1),
            beta_2=float(b2),
            epsilon=float(hp["eps"]),
            weight_decay=wd,
            momentum_decay=float(hp["momentum_decay"]),
            momentum_schedule=hp["momentum_schedule"],
            **common,
        )
    if case.rule == "rmsprop":  # momentum 0, eps under the root (TFAdapter.fixed_hparams)
        return RMSprop(
            rho=float(hp["alpha"]), epsilon=float(hp["eps"]), centered=bool(hp["centered"]), weight_decay=wd, **common
        )
    if case.rule == "adafactor":
        common.pop("cautious_weight_decay")
        eps1, eps2 = hp["eps"]
        return Adafactor(
            beta_2_decay=float(hp.get("beta2_decay", -0.8)),
            epsilon_1=float(eps1),
            epsilon_2=float(eps2),
            clip_threshold=float(hp.get("d", 1.0)),
            weight_decay=wd,
            beta_1=float(hp.get("beta1", 0.0)),
            **common,
        )
    if case.rule == "adopt":
        b1, b2 = hp["betas"]
        return Adopt(
            beta_1=float(b1),
            beta_2=float(b2),
            epsilon=float(hp["eps"]),
            clip_exp=hp["clip_exp"],
            weight_decay=wd,
            nesterov=bool(hp.get("nesterov", False)),
            **common,
        )
    if case.rule == "laprop":
        b1, b2 = hp["betas"]
        return LaProp(
            beta_1=float(b1),
            beta_2=float(b2),
            epsilon=float(hp["eps"]),
            weight_decay=wd,
            decay_order=hp.get("decay_order", "post_update"),
            **common,
        )
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
        if case.rule == "muon":  # keras.optimizers.Muon routes variables by their Keras path
            self.vars = [keras.Variable(tf.zeros(s, dtype), dtype=dtype, name=f"p{i}") for i, s in enumerate(shapes)]
        else:
            self.vars = [tf.Variable(tf.zeros(s, dtype), name=f"p{i}") for i, s in enumerate(shapes)]
        self.opt.build(self.vars)
        self.dtype = dtype

        def apply(grads: list[tf.Tensor]) -> None:
            self.opt.apply(grads, self.vars)

        self.apply = self._compiled(apply, case, mode)

    @staticmethod
    def _compiled(apply: Any, case: Case, mode: str) -> Any:
        """``apply`` as the mode runs it (eager, ``tf.function``, XLA), with Keras Muon's float64 floatx."""
        run = apply if mode == "eager" else tf.function(apply, jit_compile=(mode == "xla"), reduce_retracing=False)
        if case.rule != "muon" or case.dtype != "float64":
            return run

        # keras.optimizers.Muon multiplies by floatx constants while it steps: float64 needs floatx float64
        def apply_float64(grads: list[tf.Tensor]) -> None:
            previous = keras.config.floatx()
            keras.config.set_floatx("float64")
            try:
                run(grads)
            finally:
                keras.config.set_floatx(previous)

        return apply_float64

    def state_vars(self, rule: str, i: int) -> list[Any]:
        opt = self.opt
        if rule in ("adam", "adamw"):
            vh = opt._velocity_hats[i] if opt.amsgrad else None
            return [opt._momentums[i], opt._velocities[i], vh]
        if rule == "lion":
            return [opt._momentums[i]]
        if rule == "nadam":  # Pi_t is one variable per optimizer: every leaf holds the same value
            return [opt._momentums[i], opt._velocities[i], opt._u_product]
        if rule == "rmsprop":
            return [opt._velocities[i], opt._average_gradients[i] if opt.centered else None, None]
        if rule == "adafactor":
            factored = len(self.vars[i].shape) >= 2
            m = opt.momentums[i] if opt.beta_1 > 0 else None
            return [opt._r[i], opt._c[i], None, m] if factored else [None, None, opt._v[i], m]
        if rule == "adopt":
            return [opt._momentums[i], opt._velocities[i]]
        if rule == "laprop":
            return [opt._momentums[i], opt._velocities[i], opt._lr_avgs[i]]
        if rule == "muon":
            return [opt.momentums[i]]
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

    #: Keras's forms of the spec's named options, per rule (nothing pinned for the other rules). RMSprop:
    #: eps under the root, v from 0, momentum 0 (with momentum its buffer carries the learning rate, the
    #: spec's momentum_form='keras', an update form the suite does not draw); Muon: its Newton-Schulz eps
    #: is a fixed 1e-7.
    FORMS = {
        "rmsprop": {"eps_in_sqrt": True, "initial_scale": 0.0, "momentum": 0.0, "nesterov": False},
        "adafactor": ADAFACTOR_FORMS,
        "muon": {"muon_momentum": "sum", "ns_eps": "add", "eps": 1e-7, "shape_scale": "rms"},
    }

    def fixed_hparams(self, rule: str) -> dict[str, Any]:
        """Keras's forms of ``rule`` (:attr:`FORMS`)."""
        return dict(self.FORMS.get(rule, {}))

    def supports(self, case: Case) -> str | None:
        hp = _hp(case)
        if case.rule == "rmsprop" and (
            not hp.get("eps_in_sqrt") or float(hp.get("momentum", 0.0)) != 0 or hp.get("initial_scale")
        ):
            return "Keras RMSprop: eps under the root, v from 0, momentum only in its velocity (update) form"
        if case.rule == "adafactor":
            bad = {k: v for k, v in ADAFACTOR_FORMS.items() if k != "eps" and hp.get(k, v) != v}
            if bad or hp["eps"][1] != ADAFACTOR_FORMS["eps"][1] or hp["eps"][0] is None:
                return f"keras.optimizers.Adafactor has only Keras's forms, not {bad or hp['eps']}"
        if case.rule == "muon":
            forms = (hp.get("muon_momentum", "ema"), hp.get("ns_eps", "clamp"), hp.get("shape_scale"))
            if forms[:2] != ("sum", "add") or forms[2] not in ("rms", "none") or hp.get("eps", 1e-7) != 1e-7:
                return f"keras.optimizers.Muon's forms are muon_momentum='sum', ns_eps='add', eps=1e-7, got {forms}"
        if case.dtype not in _TF_DTYPES:
            return f"dtype {case.dtype!r} is not supported"
        if case.state_storage != case.dtype:
            return "Keras stores optimizer state in the parameter's dtype"
        decoupled = case.rule in ("adamw", "lion", "laprop", "muon") or bool(hp.get("decoupled_weight_decay", False))
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
                    # Adafactor's r and c drop the reduced dim that the spec keeps; a float64 scalar slot
                    # (LaProp's lr_avg) keeps float64 whatever the parameters' dtype
                    var.assign(
                        tf.reshape(self._to_tf(x, dt), var.shape)
                        if var.dtype == dt
                        else tf.constant(np.asarray(x, np.float64))
                    )
        entry.apply([self._to_tf(g, dt) for g in grads])
        self._stats = None
        if case.caution is not None and getattr(entry.opt, "caution_stats_enabled", False):  # not Keras's Muon
            self._stats = [(int(c.numpy()), int(k), float(sc.numpy())) for c, k, sc in entry.opt.caution_stats()]
        out = numpy_dtype(case.dtype)
        read = lambda v: None if v is None else np.asarray(v.numpy()).astype(out)  # noqa: E731
        new_params = [read(v) for v in entry.vars]
        leaves = []
        for i, leaf in enumerate(state.leaves):
            got = [read(v) for v in entry.state_vars(case.rule, i)]
            if case.rule == "adafactor":  # back to the spec's kept dims
                got = [None if x is None else x.reshape(np.shape(y)) for x, y in zip(got, leaf)]
            leaves.append(type(leaf)(*got))
        return new_params, spec.State(int(entry.opt.iterations.numpy()), tuple(leaves))


class _WrappedEntry(_Entry):
    """An :class:`_Entry` whose ``apply`` runs ``cautious.tensorflow.Cautious`` around the entry's optimizer."""

    def __init__(self, case: Case, shapes: list[tuple[int, ...]], mode: str, caution: Any) -> None:
        super().__init__(case, shapes, mode)
        self.wrapper = Cautious(self.opt, caution)
        self.wrapper.build(self.vars)

        def apply(grads: list[tf.Tensor]) -> None:
            self.wrapper.apply(grads, self.vars)

        self.apply = self._compiled(apply, case, mode)


class TFWrapperAdapter(TFAdapter):
    """The conformance wrapper adapter (:mod:`cautious.conformance.wrapper`) for ``cautious.tensorflow.Cautious``:
    with ``wrap_caution`` set, the case's caution-free optimizer runs wrapped."""

    measures_delta = True

    def __init__(self, mode: str = "eager", cache_size: int = 64) -> None:
        super().__init__(mode, cache_size)
        self.name = f"{self.name}-wrapper"
        self.wrap_caution: Any = None

    def supports(self, case: Case) -> str | None:
        if case.hparams.get("maximize"):
            return "the wrapper masks against -g (descent): an optimizer that ascends (maximize=True) is not wrapped"
        return super().supports(case)

    def _entry(self, case: Case, shapes: list[tuple[int, ...]]) -> _Entry:
        if self.wrap_caution is None:
            return super()._entry(case, shapes)
        hp = repr(sorted(case.hparams.items()))
        key = ("wrapper", repr(self.wrap_caution), case.rule, hp, case.dtype, tuple(shapes))
        entry = self._cache.get(key)
        if entry is None:
            entry = _WrappedEntry(case, shapes, self.mode, self.wrap_caution)
            self._cache[key] = entry
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return entry
