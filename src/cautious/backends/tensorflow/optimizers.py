r"""Cautious AdamW, Adam, Lion and SGD as Keras 3 optimizers (TensorFlow backend).

Every class is the same generic step around a base direction (see :mod:`cautious.spec.optim`):

.. math::

    u, s' &= \text{rule}(g, s, t) \qquad
    u^c = \text{mask}(u, g)\cdot\text{scale}\cdot u \quad\text{(when caution is on)} \\
    p' &= p - \eta\,\lambda\, d \odot p - \eta\, u^c
    \qquad (d = [\text{not } u^c, p \text{ of strictly opposite signs}]
    \text{ if cautious\_weight\_decay else } 1)

with Keras's names and defaults. Weight decay is decoupled, as in every Keras
optimizer; it is never masked by caution, honours ``exclude_from_weight_decay`` and is
applied inside :meth:`update_step` (fused with the update) rather than in Keras's
separate ``_apply_weight_decay`` pass. Caution never changes the optimizer state.

Numerics:
  * Parameters stored in float64 compute in float64; float32, bfloat16 and float16
    compute in float32 and round once to the storage dtype.
  * Adam's bias corrections ``1 - beta**t`` and every scalar factor (learning rate times
    bias corrections times the caution scale, learning rate times weight decay) are
    computed in float64 from the Python-float hyperparameters and cast once. Keras
    computes the powers from float32 betas even for float64 variables, so for float64
    ``caution=False`` matches ``keras.optimizers.Adam`` only within that float32 error
    (about ``1e-7`` relative); it matches :mod:`cautious.spec` to float64 rounding.
  * Adam decides the mask from ``m'`` and ``g`` (``sign(u) = sign(m')`` since the
    denominator is positive), with ``u``'s NaNs carried over; so a ``u`` that underflows
    to a flushed subnormal keeps its sign. One corner differs from deciding on ``u``:
    an infinite ``v'`` (overflowed ``g**2``) with finite ``m'``, where ``u = 0``.
  * The count is an exact integer (int32, int64 above ``2**31 - 1`` entries); the
    caution scale is computed from it in float64 and folded into the learning rate.
  * Hyperparameters (betas, epsilon, momentum, weight decay) must be real numbers, not
    callables or tensors; the learning rate may be a float, a
    ``LearningRateSchedule`` or a callable, as in Keras. The learning-rate variable has
    Keras's ``floatx`` dtype: call ``keras.config.set_floatx("float64")`` before building
    an optimizer for float64 training to keep the learning rate exact.

SGD follows Keras by default (``momentum_form="keras"``, the spec's velocity form
:func:`cautious.spec.sgd_velocity`): the buffer is Keras's velocity, which carries the
learning rate (``m' = momentum * m - lr * g``, ``p' = p + m'``), so with ``caution=False``
it is ``keras.optimizers.SGD`` bit for bit (float32 and float64, schedules and weight
decay included) and a Keras SGD state keeps its meaning. Caution masks the whole update
``m'`` against ``-g`` (:func:`cautious.spec.whole_update`). ``momentum_form="torch"``
keeps torch's ``m`` instead (``m' = momentum * m + g``, ``p' = p - lr * u``); the two are
the same algorithm for a constant learning rate, and differ under a schedule.

References: Liang et al. 2024, *Cautious Optimizers*, arXiv:2411.16085; Chen et al.
2025, *Cautious Weight Decay*, arXiv:2510.12402.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from cautious._caution import Caution, caution_arg  # noqa: E402
from cautious.backends.tensorflow import _ops  # noqa: E402
from cautious.spec.errors import check_nesterov, check_param_dtype, split_ns_coefficients, validate  # noqa: E402
from cautious.spec.mask import CautionStats  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "cautious.tensorflow needs Keras 3 with the TensorFlow backend, but Keras was already "
        f"imported with KERAS_BACKEND={keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow "
        "before importing keras"
    )

__all__ = [
    "AdamW",
    "Adam",
    "Lion",
    "SGD",
    "Nadam",
    "RMSprop",
    "CautiousOptimizer",
    "Adafactor",
    "Adopt",
    "LaProp",
    "Muon",
]

NAMES = {"lr": "learning_rate", "beta1": "beta_1", "beta2": "beta_2", "eps": "epsilon"}

_BASE_KWARGS_DOC = """Every other keyword of ``keras.optimizers.Optimizer`` is accepted: ``clipnorm``,
        ``clipvalue``, ``global_clipnorm``, ``use_ema``, ``ema_momentum``,
        ``ema_overwrite_frequency``, ``loss_scale_factor``, ``gradient_accumulation_steps``,
        ``name``."""


def _caution_to_config(caution: Caution | None) -> dict[str, Any] | bool:
    if caution is None:
        return False
    config = {"normalize": caution.normalize, "floor": caution.floor}
    if caution.denominator != "size":  # written only when set: older configs and readers stay valid
        config["denominator"] = caution.denominator
    return config


def _caution_from_config(value: Any) -> Any:
    if isinstance(value, dict):
        return Caution(**value)
    return value


class CautiousOptimizer(keras.optimizers.Optimizer):
    """Shared machinery: validation, the cautious step, decay, config. Subclasses give the rule.

    A subclass implements :meth:`_direction`, returning the base direction (up to a
    positive scalar factor), the factor, and the state it will assign.
    """

    def __init__(
        self,
        *,
        learning_rate: Any,
        weight_decay: float | None,
        caution: bool | Caution,
        cautious_weight_decay: bool,
        maximize: bool,
        spec_values: dict[str, Any],
        caution_stats: bool = False,
        **kwargs: Any,
    ) -> None:
        # Validate everything before any state exists (the spec's one error table). A schedule
        # or callable learning rate and Keras's weight_decay=None ("no decay") are left out.
        validate(
            {
                **({} if callable(learning_rate) else {"lr": learning_rate}),
                **spec_values,
                **({} if weight_decay is None else {"weight_decay": weight_decay}),
                "cautious_weight_decay": cautious_weight_decay,
                "maximize": maximize,
            },
            NAMES,
        )
        caution_obj = caution_arg(caution)
        if not callable(learning_rate):
            learning_rate = float(learning_rate.item() if hasattr(learning_rate, "item") else learning_rate)
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=None if weight_decay is None else float(weight_decay),
            **kwargs,
        )
        self.caution = caution_obj
        self.cautious_weight_decay = bool(cautious_weight_decay)
        self.maximize = bool(maximize)
        if not isinstance(caution_stats, bool):
            raise TypeError(f"caution_stats must be a bool, got {caution_stats!r}")
        if caution_stats and caution_obj is None:
            raise ValueError("caution_stats=True needs caution on (caution=False has no mask to report)")
        self.caution_stats_enabled = caution_stats
        self._caution_counts: list[Any] = []
        self._caution_scales: list[Any] = []

    def _build_caution_stats(self, var_list: list[Any]) -> None:
        """With ``caution_stats=True``: two scalar variables per variable (count, scale of the last step)."""
        if self.caution_stats_enabled:
            for v in var_list:
                name = (getattr(v, "path", None) or v.name).replace("/", "_")
                self._caution_counts.append(self.add_variable((), "zeros", "int64", name=f"{name}_caution_count"))
                self._caution_scales.append(self.add_variable((), "ones", "float64", name=f"{name}_caution_scale"))

    def _caution_scale(self, mask: tf.Tensor, g: tf.Tensor, n: int, variable: Any) -> tf.Tensor:
        """The float64 scale of one variable's step (kept count, denominator); recorded with caution_stats."""
        count = _ops.kept_count(mask, n)
        scale = _ops.cautious_scale(count, _ops.caution_denominator(g, n, self.caution), self.caution)
        if self._caution_counts:
            i = self._get_variable_index(variable)
            self._caution_counts[i].assign(tf.cast(count, tf.int64))
            self._caution_scales[i].assign(scale)
        return scale

    def caution_stats(self) -> list[CautionStats]:
        """Per built variable: ``CautionStats(count, n, scale)`` of its last step (Keras variables; read
        with ``.numpy()``). Needs ``caution_stats=True``."""
        if not self.caution_stats_enabled:
            raise ValueError("caution_stats() needs the optimizer built with caution_stats=True")
        variables = self._trainable_variables
        return [
            CautionStats(c, v.shape.num_elements(), s)
            for v, c, s in zip(variables, self._caution_counts, self._caution_scales, strict=True)
        ]

    # -- Keras hooks ------------------------------------------------------------------------
    def build(self, var_list: list[Any]) -> None:
        """Refuse non-floating variables (a step would truncate them), then build as Keras does."""
        for v in var_list:
            check_param_dtype(f"variable {getattr(v, 'path', None) or v.name!r}", tf.as_dtype(v.dtype).name)
        super().build(var_list)
        self._build_caution_stats(var_list)

    def _apply_weight_decay(self, variables: Any) -> None:
        # Decoupled decay is applied inside update_step, fused with the update, so that
        # cautious_weight_decay can see the cautious direction. Nothing to do here.
        return None

    def _direction(
        self, g: tf.Tensor, variable: Any, cdt: tf.DType
    ) -> tuple[tf.Tensor, tf.Tensor | None, list[tuple[Any, tf.Tensor]], tf.Tensor | None]:
        """Return ``(u', alpha, assigns, sign)``.

        The base direction is ``u = alpha * u'`` (``alpha > 0``: a float64 scalar, or None
        for 1); ``assigns`` lists the new state values; ``sign`` is a tensor with the
        sign and NaN pattern of ``u`` that the mask is decided from (None: ``u'`` itself).
        """
        raise NotImplementedError

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One cautious step for one variable; see the module docstring for the math."""
        n = variable.shape.num_elements()
        if n == 0:
            return
        cdt = _ops.compute_dtype(variable.dtype)
        g = tf.cast(tf.convert_to_tensor(gradient), cdt)
        if self.maximize:
            g = -g
        p = tf.cast(tf.convert_to_tensor(variable), cdt)
        u, alpha, assigns, sign = self._direction(g, variable, cdt)
        if sign is None:
            sign = u

        coef = tf.cast(learning_rate, tf.float64)
        if alpha is not None:
            coef = coef * alpha
        mask = None
        if self.caution is not None:
            mask = _ops.cautious_mask(sign, g)
            if self.caution.normalize != "none" or self._caution_counts:
                coef = coef * self._caution_scale(mask, g, n, variable)
        step = tf.cast(coef, cdt) * u
        if mask is not None:
            step = tf.where(mask, step, tf.zeros((), cdt))
        p_new = p - step
        if self.weight_decay and self._use_weight_decay(variable):
            decay = tf.cast(tf.cast(learning_rate, tf.float64) * self.weight_decay, cdt)
            d = p
            if self.cautious_weight_decay:
                d = tf.where(_ops.decay_keep(sign, p, mask), p, tf.zeros((), cdt))
            on = self._decay_on()
            p_new = p_new - decay * d if on is None else tf.where(on, p_new - decay * d, p_new)
        for state_var, value in assigns:
            self.assign(state_var, value)
        self.assign(variable, p_new)

    def _decay_on(self) -> tf.Tensor | None:
        """Whether decoupled decay applies at this step (a bool tensor), or None: at every step."""
        return None

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "caution": _caution_to_config(self.caution),
                "caution_stats": self.caution_stats_enabled,
                "cautious_weight_decay": self.cautious_weight_decay,
                "maximize": self.maximize,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> CautiousOptimizer:
        config = dict(config)
        if "caution" in config:
            config["caution"] = _caution_from_config(config["caution"])
        return super().from_config(config, custom_objects=custom_objects)


def _c(x: float, dtype: tf.DType) -> tf.Tensor:
    return tf.constant(x, dtype)


@keras.saving.register_keras_serializable(package="cautious")
class Adam(CautiousOptimizer):
    r"""Cautious Adam (Keras names and defaults; decoupled weight decay, as every Keras optimizer).

    .. math::

        m' = \beta_1 m + (1-\beta_1) g,\quad v' = \beta_2 v + (1-\beta_2) g^2,\quad
        u = \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m'}{\sqrt{\hat v} + \epsilon}
        \ \text{(eps\_placement="uncorrected", Keras)}

    or ``u = (m'/(1-beta_1^t)) / (sqrt(v_hat/(1-beta_2^t)) + epsilon)`` with
    ``eps_placement="corrected"`` (torch, optax); ``v_hat = max(v_max, v')`` with amsgrad.
    See :func:`cautious.spec.adam` for the algorithm.

    Args:
        learning_rate: float, ``LearningRateSchedule`` or callable. Defaults to 0.001.
        beta_1, beta_2: decay rates of the moments, in [0, 1).
        epsilon: added to the denominator; >= 0. Defaults to 1e-7 (Keras).
        amsgrad: use the running maximum of ``v``.
        weight_decay: decoupled weight decay (``p -= lr * weight_decay * p``), or None.
        caution: ``True`` (``cautious.Caution()``), ``False`` (plain Adam, equal to
            ``keras.optimizers.Adam`` within rounding) or a :class:`cautious.Caution`.
        eps_placement: ``"uncorrected"`` (default, Keras) or ``"corrected"``.
        cautious_weight_decay: decay only where the cautious direction and the
            parameter do not have strictly opposite signs (arXiv:2510.12402).
        maximize: ascend the objective (the gradient is negated before the rule and the mask).
        **kwargs: {base}
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        weight_decay: float | None = None,
        *,
        caution: bool | Caution = True,
        eps_placement: str = "uncorrected",
        cautious_weight_decay: bool = False,
        maximize: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
            maximize=maximize,
            spec_values={
                "beta1": beta_1,
                "beta2": beta_2,
                "eps": epsilon,
                "amsgrad": amsgrad,
                "eps_placement": eps_placement,
            },
            **kwargs,
        )
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.amsgrad = bool(amsgrad)
        self.eps_placement = eps_placement

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(var_list, ["momentum", "velocity"])
        if self.amsgrad:
            self._velocity_hats = self.add_optimizer_variables(var_list, "velocity_hat")

    def _direction(self, g, variable, cdt):
        i = self._get_variable_index(variable)
        m_var, v_var = self._momentums[i], self._velocities[i]
        b1, b2 = self.beta_1, self.beta_2
        m = _c(b1, cdt) * tf.cast(m_var, cdt) + _c(1.0 - b1, cdt) * g
        v = _c(b2, cdt) * tf.cast(v_var, cdt) + _c(1.0 - b2, cdt) * (g * g)
        assigns = [(m_var, m), (v_var, v)]
        v_used = v
        if self.amsgrad:
            vh_var = self._velocity_hats[i]
            vh = tf.cast(vh_var, cdt)
            # max(vh, v) as a select (NaN propagates): a select copies bits, so a subnormal
            # v_max survives on CPUs that flush subnormal operands of arithmetic (tf.maximum).
            v_used = tf.where(tf.logical_or(vh >= v, tf.math.is_nan(vh)), vh, v)
            assigns.append((vh_var, v_used))
        # Bias corrections in float64 from the Python-float betas (never float32 powers).
        t = tf.cast(self.iterations + 1, tf.float64)
        bc1 = 1.0 - tf.pow(tf.constant(b1, tf.float64), t)
        bc2 = 1.0 - tf.pow(tf.constant(b2, tf.float64), t)
        eps = _c(self.epsilon, cdt)
        if self.eps_placement == "uncorrected":
            u = m / (tf.sqrt(v_used) + eps)
            alpha = tf.sqrt(bc2) / bc1
        else:
            u = m / (tf.sqrt(v_used) * tf.cast(tf.math.rsqrt(bc2), cdt) + eps)
            alpha = 1.0 / bc1
        # The denominator is > 0, so sign(u) = sign(m') (the spec's note): deciding the mask
        # from m' keeps it exact where u itself would underflow to a flushed subnormal, and
        # lets the count pass read g and m only. u is NaN where m' or v' is; for beta_1 > 0
        # a NaN in v' comes with a NaN in m' (both take it from the same gradient and keep
        # it), so m' carries u's NaNs in every state this optimizer produces. With
        # beta_1 = 0, m' = g forgets a NaN that v' keeps; with epsilon = 0, u = 0/0 is NaN where
        # m' = v' = 0. In both cases carry u's NaNs over explicitly.
        sign = m if (b1 > 0 and self.epsilon > 0) else tf.where(tf.math.is_nan(u), u, m)
        return u, alpha, assigns, sign

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsgrad": self.amsgrad,
                "eps_placement": self.eps_placement,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="cautious")
class AdamW(Adam):
    r"""Cautious AdamW: :class:`Adam` with Keras AdamW's defaults (``weight_decay=0.004``).

    ``caution=False`` equals ``keras.optimizers.AdamW`` within rounding. See
    :func:`cautious.spec.adamw` for the algorithm and :class:`Adam` for the arguments.
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        weight_decay: float = 0.004,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        *,
        caution: bool | Caution = True,
        eps_placement: str = "uncorrected",
        cautious_weight_decay: bool = False,
        maximize: bool = False,
        **kwargs: Any,
    ) -> None:
        validate({"weight_decay": weight_decay})  # AdamW has no "no decay" (None): the table's TypeError
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            weight_decay=weight_decay,
            caution=caution,
            eps_placement=eps_placement,
            cautious_weight_decay=cautious_weight_decay,
            maximize=maximize,
            **kwargs,
        )


@keras.saving.register_keras_serializable(package="cautious")
class Lion(CautiousOptimizer):
    r"""Cautious Lion (Chen et al. 2023), Keras names and defaults.

    .. math::

        u = \operatorname{sign}(\beta_1 m + (1-\beta_1) g), \qquad m' = \beta_2 m + (1-\beta_2) g

    See :func:`cautious.spec.lion`. ``caution=False`` equals ``keras.optimizers.Lion``
    within rounding (this class also accepts ``beta_1 = 0``, which Keras rejects).

    Args:
        learning_rate: float, ``LearningRateSchedule`` or callable. Defaults to 0.001.
        beta_1, beta_2: interpolation and momentum rates, in [0, 1).
        weight_decay: decoupled weight decay, or None.
        caution, cautious_weight_decay, maximize: as in :class:`Adam`.
        **kwargs: {base}
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        weight_decay: float | None = None,
        *,
        caution: bool | Caution = True,
        cautious_weight_decay: bool = False,
        maximize: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
            maximize=maximize,
            spec_values={"beta1": beta_1, "beta2": beta_2},
            **kwargs,
        )
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._momentums = self.add_optimizer_variables(var_list, "momentum")

    def _direction(self, g, variable, cdt):
        m_var = self._momentums[self._get_variable_index(variable)]
        m = tf.cast(m_var, cdt)
        b1, b2 = self.beta_1, self.beta_2
        u = tf.sign(_c(b1, cdt) * m + _c(1.0 - b1, cdt) * g)
        m_new = _c(b2, cdt) * m + _c(1.0 - b2, cdt) * g
        return u, None, [(m_var, m_new)], None

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2})
        return config


@keras.saving.register_keras_serializable(package="cautious")
class SGD(CautiousOptimizer):
    r"""Cautious SGD with (Nesterov) momentum, Keras names, defaults and buffer.

    ``momentum_form="keras"`` (default; :func:`cautious.spec.sgd_velocity`), Keras's velocity:

    .. math::

        m' = \mu m - \eta g, \qquad \delta = \mu m' - \eta g \text{ (nesterov) else } m',
        \qquad p' = p - \eta\lambda p + \text{mask}(\delta, -g)\cdot\text{scale}\cdot\delta

    (``delta = -lr * g`` when ``momentum == 0``; the mask then reads that sign off ``-g`` while
    ``lr > 0``, since ``lr * g`` can underflow). ``caution=False`` is ``keras.optimizers.SGD``
    bit for bit for float32 and float64 variables, learning-rate schedules and weight decay
    included (the same operations in the same order, and Keras's constants: for float64
    variables ``momentum`` and ``weight_decay`` are float32-rounded, as Keras rounds them), and
    the ``momentum`` slots hold Keras's velocity, so Keras SGD checkpoints load with their
    meaning. bfloat16/float16 variables compute in float32 and round once (Keras computes in
    the low precision).

    ``momentum_form="torch"`` (:func:`cautious.spec.sgd_direction`, ``dampening=0``): the
    slots hold torch's ``m' = \mu m + g``, ``u = g + \mu m'`` (nesterov) else ``m'``,
    ``p' = p - \eta\lambda p - \eta\,\text{mask}(u, g)\cdot\text{scale}\cdot u``. Same algorithm
    for a constant learning rate; under a schedule the learning rate multiplies the whole
    buffer at each step instead of each gradient as it enters.

    Args:
        learning_rate: float, ``LearningRateSchedule`` or callable. Defaults to 0.01.
        momentum: in [0, 1].
        nesterov: Nesterov momentum; requires ``momentum > 0``.
        weight_decay: decoupled weight decay, or None.
        caution, cautious_weight_decay, maximize: as in :class:`Adam`.
        momentum_form: ``"keras"`` (default) or ``"torch"``.
        **kwargs: {base}
    """

    def __init__(
        self,
        learning_rate: Any = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float | None = None,
        *,
        caution: bool | Caution = True,
        cautious_weight_decay: bool = False,
        maximize: bool = False,
        momentum_form: str = "keras",
        **kwargs: Any,
    ) -> None:
        validate({"momentum": momentum, "nesterov": nesterov, "momentum_form": momentum_form})
        check_nesterov(nesterov, momentum)
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
            maximize=maximize,
            spec_values={},
            **kwargs,
        )
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.momentum_form = momentum_form

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self.momentums = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(var_list, "momentum")

    def _direction(self, g, variable, cdt):
        if self.momentum == 0:
            return g, None, [], None
        m_var = self.momentums[self._get_variable_index(variable)]
        mu = _c(self.momentum, cdt)
        m = mu * tf.cast(m_var, cdt) + g
        u = g + mu * m if self.nesterov else m
        return u, None, [(m_var, m)], None

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One step; Keras's velocity form unless ``momentum_form="torch"`` (see the class docstring)."""
        if self.momentum_form == "torch":
            return super().update_step(gradient, variable, learning_rate)
        n = variable.shape.num_elements()
        if n == 0:
            return
        cdt = _ops.compute_dtype(variable.dtype)
        lr = tf.cast(learning_rate, cdt)
        g = tf.cast(tf.convert_to_tensor(gradient), cdt)
        if self.maximize:
            g = -g
        assigns = []
        # keras.optimizers.SGD's operations, in its order (bit for bit with caution off); its
        # constants too: keras.ops.cast makes a Python float a float32 first, even for float64.
        if self.momentum != 0:
            m_var = self.momentums[self._get_variable_index(variable)]
            mu = keras.ops.cast(self.momentum, cdt)
            m = tf.cast(m_var, cdt) * mu - g * lr
            delta = m * mu - g * lr if self.nesterov else m
            assigns.append((m_var, m))
            signs = delta
        else:
            delta = -(g * lr)
            # delta's sign while lr > 0 (g * lr can underflow to zero): for the mask and cautious weight decay
            signs = tf.where(lr > 0, -g, delta)
        mask = None
        if self.caution is not None:  # the whole update against the descent direction -g
            mask = _ops.cautious_mask(signs, -g)
            if self.caution.normalize != "none" or self._caution_counts:
                delta = delta * tf.cast(self._caution_scale(mask, g, n, variable), cdt)
            delta = tf.where(mask, delta, tf.zeros((), cdt))
        p = tf.cast(tf.convert_to_tensor(variable), cdt)
        if self.weight_decay and self._use_weight_decay(variable):
            # Keras decays first (variable - variable * wd * lr), then adds the velocity.
            decay = p * keras.ops.cast(self.weight_decay, cdt) * lr
            if self.cautious_weight_decay:
                decay = tf.where(_ops.decay_keep(-signs, p, mask), decay, tf.zeros((), cdt))
            p = p - decay
        for state_var, value in assigns:
            self.assign(state_var, value)
        self.assign(variable, p + delta)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"momentum": self.momentum, "nesterov": self.nesterov, "momentum_form": self.momentum_form})
        return config


@keras.saving.register_keras_serializable(package="cautious")
class Nadam(CautiousOptimizer):
    r"""Cautious Nadam, Keras names and defaults (decoupled weight decay, as every Keras optimizer).

    .. math::

        \mu_t = \beta_1 (1 - \tfrac12\,0.96^{t\psi}),\quad \Pi_t = \Pi_{t-1}\mu_t,\quad
        u = \frac{1-\mu_t}{1-\Pi_t}\frac{g}{d} + \frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\frac{m'}{d},\quad
        d = \sqrt{v'/(1-\beta_2^t)} + \epsilon

    (:func:`cautious.spec.nadam`). Keras 3's schedule is ``0.96**t``: ``momentum_decay=1.0`` here
    (torch's default is 0.004); ``momentum_schedule="constant"`` gives ``mu_t = beta_1`` (optax's
    NAdam). ``Pi_t`` is a float64 optimizer variable ``u_product`` updated once per step, as Keras's,
    and every scalar factor is float64 (Keras computes them in the variable's dtype), so
    ``caution=False`` equals ``keras.optimizers.Nadam`` within float32 rounding of those factors.
    ``u`` mixes ``g`` and ``m'``: the mask is decided on ``u``.

    Args:
        learning_rate: float, ``LearningRateSchedule`` or callable. Defaults to 0.001.
        beta_1, beta_2: decay rates of the moments, in [0, 1).
        epsilon: added to the denominator; >= 0. Defaults to 1e-7 (Keras).
        weight_decay: decoupled weight decay (``p -= lr * weight_decay * p``), or None.
        caution, cautious_weight_decay, maximize: as in :class:`Adam`.
        momentum_decay: ``psi`` of the schedule, >= 0 (1.0: Keras).
        momentum_schedule: ``"dozat"`` (default, Keras and torch) or ``"constant"``.
        **kwargs: {base}
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float | None = None,
        *,
        caution: bool | Caution = True,
        cautious_weight_decay: bool = False,
        maximize: bool = False,
        momentum_decay: float = 1.0,
        momentum_schedule: str = "dozat",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
            maximize=maximize,
            spec_values={
                "beta1": beta_1,
                "beta2": beta_2,
                "eps": epsilon,
                "momentum_decay": momentum_decay,
                "momentum_schedule": momentum_schedule,
            },
            **kwargs,
        )
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.momentum_decay = float(momentum_decay)
        self.momentum_schedule = momentum_schedule

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(var_list, ["momentum", "velocity"])
        self._u_product = self.add_variable((), "ones", "float64", name="u_product")

    def _mu(self, t: tf.Tensor) -> tf.Tensor:
        """The schedule's ``mu_t`` in float64 (:func:`cautious.spec.nadam_mu`)."""
        if self.momentum_schedule == "constant":
            return tf.constant(self.beta_1, tf.float64)
        return self.beta_1 * (1.0 - 0.5 * tf.pow(tf.constant(0.96, tf.float64), t * self.momentum_decay))

    def _backend_update_step(self, grads: Any, trainable_variables: Any, learning_rate: Any) -> None:
        # Pi_t = Pi_{t-1} * mu_t, once per step before the variables' updates (as Keras's Nadam)
        self._u_product.assign(self._u_product * self._mu(tf.cast(self.iterations + 1, tf.float64)))
        super()._backend_update_step(grads, trainable_variables, learning_rate)

    def _direction(self, g, variable, cdt):
        i = self._get_variable_index(variable)
        m_var, v_var = self._momentums[i], self._velocities[i]
        b1, b2 = self.beta_1, self.beta_2
        m = _c(b1, cdt) * tf.cast(m_var, cdt) + _c(1.0 - b1, cdt) * g
        v = _c(b2, cdt) * tf.cast(v_var, cdt) + _c(1.0 - b2, cdt) * (g * g)
        t = tf.cast(self.iterations + 1, tf.float64)
        prod = tf.convert_to_tensor(self._u_product)
        mu_t, mu_next = self._mu(t), self._mu(t + 1.0)
        a = (1.0 - mu_t) / (1.0 - prod)
        b = mu_next / (1.0 - prod * mu_next)
        bc2 = 1.0 - tf.pow(tf.constant(b2, tf.float64), t)
        d = tf.sqrt(v) * tf.cast(tf.math.rsqrt(bc2), cdt) + _c(self.epsilon, cdt)
        u = tf.cast(a, cdt) * (g / d) + tf.cast(b, cdt) * (m / d)  # the spec's order: 0 / 0 is NaN
        return u, None, [(m_var, m), (v_var, v)], None

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "momentum_decay": self.momentum_decay,
                "momentum_schedule": self.momentum_schedule,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="cautious")
class RMSprop(CautiousOptimizer):
    r"""Cautious RMSprop, Keras names, defaults and buffers (the spec's ``momentum_form="keras"``).

    .. math::

        v' = \rho v + (1-\rho) g^2,\quad \bar g' = \rho \bar g + (1-\rho) g \text{ (centered)},\quad
        r = \eta\, g / \sqrt{v' - \bar g'^2 \text{ (centered)} + \epsilon}, \\
        m' = \mu m + r,\quad \delta = -m' \text{ (momentum) else } -r,\quad
        p' = p - \eta\lambda p + \text{mask}(\delta, -g)\cdot\text{scale}\cdot\delta

    (:func:`cautious.spec.rmsprop_velocity`, ``eps_in_sqrt=True``): Keras's momentum slot carries the
    learning rate, so caution masks the whole update ``delta`` against ``-g``. Without momentum
    ``delta`` has the sign of ``-g``: caution only rescales (docs/spec.md); the mask then reads that
    sign off ``-g / sqrt(...)`` (while ``lr > 0``), never off ``lr * g``, which can underflow. ``caution=False`` is
    ``keras.optimizers.RMSprop``'s operations in its order.

    Args:
        learning_rate: float, ``LearningRateSchedule`` or callable. Defaults to 0.001.
        rho: decay of the mean square, in [0, 1].
        momentum: in [0, 1].
        epsilon: added under the square root; >= 0. Defaults to 1e-7 (Keras).
        centered: divide by the estimated standard deviation instead of the root mean square.
        weight_decay: decoupled weight decay, or None.
        caution, cautious_weight_decay, maximize: as in :class:`Adam`.
        **kwargs: {base}
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-7,
        centered: bool = False,
        weight_decay: float | None = None,
        *,
        caution: bool | Caution = True,
        cautious_weight_decay: bool = False,
        maximize: bool = False,
        **kwargs: Any,
    ) -> None:
        validate({"alpha": rho}, {"alpha": "rho"})
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
            maximize=maximize,
            spec_values={"momentum": momentum, "eps": epsilon, "centered": centered},
            **kwargs,
        )
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.centered = bool(centered)

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._velocities = self.add_optimizer_variables(var_list, "velocity")
        self._momentums = []
        if self.momentum > 0:
            self._momentums = self.add_optimizer_variables(var_list, "momentum")
        self._average_gradients = []
        if self.centered:
            self._average_gradients = self.add_optimizer_variables(var_list, "average_gradient")

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One step in Keras's form (see the class docstring)."""
        n = variable.shape.num_elements()
        if n == 0:
            return
        cdt = _ops.compute_dtype(variable.dtype)
        lr = tf.cast(learning_rate, cdt)
        g = tf.cast(tf.convert_to_tensor(gradient), cdt)
        if self.maximize:
            g = -g
        i = self._get_variable_index(variable)
        rho = self.rho
        # keras.optimizers.RMSprop's operations, in its order
        v_var = self._velocities[i]
        v = _c(rho, cdt) * tf.cast(v_var, cdt) + _c(1 - rho, cdt) * tf.square(g)
        assigns = [(v_var, v)]
        if self.centered:
            a_var = self._average_gradients[i]
            avg = _c(rho, cdt) * tf.cast(a_var, cdt) + _c(1 - rho, cdt) * g
            assigns.append((a_var, avg))
            denominator = v - tf.square(avg) + _c(self.epsilon, cdt)
        else:
            denominator = v + _c(self.epsilon, cdt)
        increment = (lr * g) / tf.sqrt(denominator)
        if self.momentum > 0:
            m_var = self._momentums[i]
            m = _c(self.momentum, cdt) * tf.cast(m_var, cdt) + increment
            assigns.append((m_var, m))
            delta = -m
            signs = delta
        else:
            delta = -increment
            # delta = -lr g / d: its sign (for the mask and cautious weight decay) is read off -g / d while lr > 0,
            # since lr * g can underflow to zero
            signs = tf.where(lr > 0, -(g / tf.sqrt(denominator)), delta)
        mask = None
        if self.caution is not None:  # the whole update against the descent direction -g
            mask = _ops.cautious_mask(signs, -g)
            if self.caution.normalize != "none" or self._caution_counts:
                delta = delta * tf.cast(self._caution_scale(mask, g, n, variable), cdt)
            delta = tf.where(mask, delta, tf.zeros((), cdt))
        p = tf.cast(tf.convert_to_tensor(variable), cdt)
        if self.weight_decay and self._use_weight_decay(variable):
            decay = p * _c(self.weight_decay, cdt) * lr
            if self.cautious_weight_decay:
                decay = tf.where(_ops.decay_keep(-signs, p, mask), decay, tf.zeros((), cdt))
            p = p - decay
        for state_var, value in assigns:
            self.assign(state_var, value)
        self.assign(variable, p + delta)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"rho": self.rho, "momentum": self.momentum, "epsilon": self.epsilon, "centered": self.centered})
        return config


class Adafactor(CautiousOptimizer):
    r"""Cautious Adafactor (Shazeer & Stern 2018), Keras names, defaults and state (``r``, ``c``, ``v``).

    .. math::

        \hat u = g / \sqrt{\hat v}, \quad u = \hat u / \max(1, \operatorname{rms}(\hat u)/d), \quad
        \alpha_t = \min(\eta, 1/\sqrt t)\,\max(\epsilon_2, \operatorname{rms}(p)), \quad
        p' = p - \alpha_t\,\text{mask}(u, g)\,\text{scale}\,u

    with Keras's forms (:func:`cautious.spec.adafactor` with ``eps_form="add"``: ``g^2 + epsilon_1``
    enters the statistics; the last two dims of every tensor with ``ndim >= 2`` are factored; weight
    decay ``p (1 - lr wd)`` comes first and the parameter scale is measured after it,
    ``weight_decay_form="lr_before_scale"``). ``relative_step`` is kept for Keras's signature: Keras
    applies ``min(lr, 1/sqrt(t))`` either way, so it changes nothing. ``u`` has the sign of ``g``:
    without momentum caution only rescales (by ``n / count``, where ``g`` has exact zeros).
    ``beta_1 > 0`` (keyword-only; Keras has no momentum) adds momentum over the scaled updates,
    ``m' = beta_1 m + (1 - beta_1) alpha_t u`` (slots ``momentum``), and caution masks ``m'``.
    ``caution=False, beta_1=0`` is ``keras.optimizers.Adafactor`` bit for bit for float32 and float64
    variables (its operations in its order); bfloat16/float16 compute in float32 and round once.

    Args:
        learning_rate: float, ``LearningRateSchedule`` or callable. Defaults to 0.001.
        beta_2_decay: the decay exponent (<= 0). epsilon_1: added to ``g^2``. epsilon_2: the smallest
            parameter scale. clip_threshold: the RMS clipping threshold (> 0).
        relative_step: as Keras (no effect on the step; see above).
        weight_decay: decoupled weight decay, or None.
        caution, maximize: as in :class:`Adam`. beta_1: momentum (0: none).
        **kwargs: {base}
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_2_decay: float = -0.8,
        epsilon_1: float = 1e-30,
        epsilon_2: float = 1e-3,
        clip_threshold: float = 1.0,
        relative_step: bool = True,
        weight_decay: float | None = None,
        *,
        caution: bool | Caution = True,
        maximize: bool = False,
        beta_1: float = 0.0,
        **kwargs: Any,
    ) -> None:
        validate({"eps": epsilon_1}, {"eps": "epsilon_1"})
        validate({"eps": epsilon_2}, {"eps": "epsilon_2"})
        kwargs.setdefault("name", "adafactor")
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            caution=caution,
            cautious_weight_decay=False,
            maximize=maximize,
            spec_values={
                "beta2_decay": beta_2_decay,
                "clip_threshold": clip_threshold,
                "relative_step": relative_step,
                "beta1": beta_1,
            },
            **kwargs,
        )
        self.beta_2_decay = float(beta_2_decay)
        self.epsilon_1 = float(epsilon_1)
        self.epsilon_2 = float(epsilon_2)
        self.clip_threshold = float(clip_threshold)
        self.relative_step = bool(relative_step)
        self.beta_1 = float(beta_1)

    def build(self, var_list: list[Any]) -> None:
        """Keras's slots: ``r`` and ``c`` (factored, ``ndim >= 2``; scalar placeholders otherwise), ``v``."""
        if self.built:
            return
        super().build(var_list)
        self._r, self._c, self._v = [], [], []
        for var in var_list:
            if len(var.shape) < 2:
                self._r.append(keras.Variable(0, name=var.name, trainable=False))
                self._c.append(keras.Variable(0, name=var.name, trainable=False))
            else:
                self._r.append(self.add_variable(shape=var.shape[:-1], dtype=var.dtype, name=var.name))
                self._c.append(
                    self.add_variable(shape=var.shape[:-2] + (var.shape[-1],), dtype=var.dtype, name=var.name)
                )
            self._v.append(self.add_variable_from_reference(reference_variable=var, name="velocity"))
        self.momentums = self.add_optimizer_variables(var_list, "momentum") if self.beta_1 > 0 else []

    @staticmethod
    def _rms(x: Any) -> Any:
        return keras.ops.sqrt(keras.ops.mean(keras.ops.square(x)))

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One step with ``keras.optimizers.Adafactor``'s operations, in its order; the mask on ``u`` (or ``m'``)."""
        n = variable.shape.num_elements()
        if n == 0:
            return
        ops = keras.ops
        cdt = _ops.compute_dtype(variable.dtype)
        i = self._get_variable_index(variable)
        lr = ops.cast(learning_rate, cdt)
        g = ops.cast(gradient, cdt)
        if self.maximize:
            g = -g
        p = tf.cast(tf.convert_to_tensor(variable), cdt)
        if self.weight_decay and self._use_weight_decay(variable):  # Keras decays first (_apply_weight_decay)
            p = p - p * ops.cast(self.weight_decay, cdt) * lr
        epsilon_2 = ops.cast(self.epsilon_2, cdt)
        one = ops.cast(1.0, cdt)
        local_step = ops.cast(self.iterations + 1, cdt)
        if not callable(self._learning_rate) and self.relative_step:
            lr = ops.minimum(lr, 1 / ops.sqrt(local_step))
        r, c, v = self._r[i], self._c[i], self._v[i]
        rho_t = ops.minimum(lr, 1 / ops.sqrt(local_step))
        alpha_t = ops.maximum(epsilon_2, self._rms(p)) * rho_t
        regulated_grad_square = ops.add(ops.square(g), self.epsilon_1)
        beta_2_t = ops.subtract(1, ops.power(local_step, self.beta_2_decay))
        assigns = []
        if len(variable.shape) >= 2:
            r_new = ops.add(
                ops.multiply(beta_2_t, ops.cast(r, cdt)),
                ops.multiply(ops.subtract(1, beta_2_t), ops.mean(regulated_grad_square, axis=-1)),
            )
            c_new = ops.add(
                ops.multiply(beta_2_t, ops.cast(c, cdt)),
                ops.multiply(ops.subtract(1, beta_2_t), ops.mean(regulated_grad_square, axis=-2)),
            )
            v_new = ops.multiply(
                ops.expand_dims(ops.divide(r_new, ops.mean(r_new, axis=-1, keepdims=True)), axis=-1),
                ops.expand_dims(c_new, -2),
            )
            assigns += [(r, r_new), (c, c_new)]
        else:
            v_new = ops.add(
                ops.multiply(beta_2_t, ops.cast(v, cdt)),
                ops.multiply(ops.subtract(1, beta_2_t), regulated_grad_square),
            )
        assigns.append((v, v_new))
        u_t = ops.divide(g, ops.sqrt(v_new))
        u_t_hat = ops.divide(u_t, ops.maximum(one, ops.divide(self._rms(u_t), self.clip_threshold)))
        if self.beta_1 > 0:  # momentum over the scaled updates; the mask compares m' with g
            m_var = self.momentums[i]
            step = _c(self.beta_1, cdt) * ops.cast(m_var, cdt) + _c(1.0 - self.beta_1, cdt) * (alpha_t * u_t_hat)
            assigns.append((m_var, step))
        else:
            step = ops.multiply(alpha_t, u_t_hat)
        if self.caution is not None:
            mask = _ops.cautious_mask(step, g)
            if self.caution.normalize != "none" or self._caution_counts:
                step = step * tf.cast(self._caution_scale(mask, g, n, variable), cdt)
            step = tf.where(mask, step, tf.zeros((), cdt))
        for state_var, value in assigns:
            self.assign(state_var, value)
        self.assign(variable, p - step)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("cautious_weight_decay", None)
        config.update(
            {
                "beta_2_decay": self.beta_2_decay,
                "epsilon_1": self.epsilon_1,
                "epsilon_2": self.epsilon_2,
                "clip_threshold": self.clip_threshold,
                "relative_step": self.relative_step,
                "beta_1": self.beta_1,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="cautious")
class Adopt(CautiousOptimizer):
    r"""Cautious ADOPT (Taniguchi et al. 2024), Keras-style names, timm's defaults (Keras has no ADOPT).

    .. math::

        t = 1:\ u = 0,\ v' = g^2; \qquad
        t > 1:\ n = \operatorname{clip}(g / \max(\sqrt v, \epsilon), \pm (t-1)^{e}),\
        m' = \beta_1 m + (1-\beta_1) n,\ u = m',\ v' = \beta_2 v + (1-\beta_2) g^2

    See :func:`cautious.spec.adopt`. ``clip_exp=None``: no clipping. Weight decay is decoupled, as in
    every Keras optimizer (timm's coupled default has no Keras form), and starts at step 2: the first
    step only sets ``v`` and moves nothing (count 0 with ``caution_stats``). Slots: ``momentum``,
    ``velocity``.

    Args:
        learning_rate: float, ``LearningRateSchedule`` or callable. Defaults to 0.001.
        beta_1, beta_2: decay rates of the moments, in [0, 1). Defaults 0.9, 0.9999.
        epsilon: floor of ``sqrt(v)``; >= 0. Defaults to 1e-6.
        clip_exp: clip ``n`` at ``(t-1)**clip_exp`` (>= 0), or None. Defaults to 0.333 (timm).
        weight_decay: decoupled weight decay, or None.
        nesterov: optax's Nesterov form ``u = beta_1 m' + (1-beta_1) n``.
        caution, cautious_weight_decay, maximize: as in :class:`Adam`.
        **kwargs: {base}
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.9999,
        epsilon: float = 1e-6,
        clip_exp: float | None = 0.333,
        weight_decay: float | None = None,
        *,
        nesterov: bool = False,
        caution: bool | Caution = True,
        cautious_weight_decay: bool = False,
        maximize: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
            maximize=maximize,
            spec_values={
                "beta1": beta_1,
                "beta2": beta_2,
                "eps": epsilon,
                "nesterov": nesterov,
                **({} if clip_exp is None else {"clip_exp": clip_exp}),
            },
            **kwargs,
        )
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.clip_exp = None if clip_exp is None else float(clip_exp)
        self.nesterov = bool(nesterov)

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(var_list, ["momentum", "velocity"])

    def _decay_on(self) -> tf.Tensor:
        return self.iterations > 0

    def _direction(self, g, variable, cdt):
        i = self._get_variable_index(variable)
        m_var, v_var = self._momentums[i], self._velocities[i]
        m, v = tf.cast(m_var, cdt), tf.cast(v_var, cdt)
        b1, b2 = self.beta_1, self.beta_2
        first = tf.equal(self.iterations, 0)
        n = g / tf.maximum(tf.sqrt(v), _c(self.epsilon, cdt))
        if self.clip_exp is not None:
            c = tf.cast(tf.pow(tf.cast(self.iterations, tf.float64), self.clip_exp), cdt)
            n = tf.clip_by_value(n, -c, c)
        m_new = _c(b1, cdt) * m + _c(1.0 - b1, cdt) * n
        u = _c(b1, cdt) * m_new + _c(1.0 - b1, cdt) * n if self.nesterov else m_new
        v_new = _c(b2, cdt) * v + _c(1.0 - b2, cdt) * (g * g)
        zero = tf.zeros((), cdt)
        assigns = [(m_var, tf.where(first, m, m_new)), (v_var, tf.where(first, g * g, v_new))]
        return tf.where(first, zero, u), None, assigns, None

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "clip_exp": self.clip_exp,
                "nesterov": self.nesterov,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="cautious")
class LaProp(CautiousOptimizer):
    r"""Cautious LaProp (Ziyin et al. 2020), Keras-style names, timm's defaults (Keras has no LaProp).

    .. math::

        v' = \beta_2 v + (1-\beta_2) g^2,\quad
        m' = \beta_1 m + (1-\beta_1)\,\eta_t \frac{g}{\sqrt{v'/(1-\beta_2^t)} + \epsilon},\quad
        \delta = -\frac{\eta_t}{\bar\eta'} m',\quad
        p' = \big(p + \text{mask}(\delta, -g)\cdot\text{scale}\cdot\delta\big)(1 - \eta\lambda)

    See :func:`cautious.spec.laprop`. The ``momentum`` slots carry the learning rate (each gradient
    enters with its own step's rate), ``lr_avg`` (one float64 scalar per variable) is ``\bar\eta``,
    their bias correction. Caution masks the update ``delta`` against ``-g`` (update form), before
    decay. ``decay_order="post_update"`` (default; timm, the reference code) decays the updated
    parameter, ``"pre_update"`` decays ``p`` (AdamW's order).

    Args:
        learning_rate: float, ``LearningRateSchedule`` or callable. Defaults to 4e-4.
        beta_1, beta_2: decay rates of the moments, in [0, 1). Defaults 0.9, 0.999.
        epsilon: added to the denominator; >= 0. Defaults to 1e-15.
        weight_decay: decoupled weight decay, or None.
        decay_order: ``"post_update"`` (default) or ``"pre_update"``.
        caution, cautious_weight_decay, maximize: as in :class:`Adam`.
        **kwargs: {base}
    """

    def __init__(
        self,
        learning_rate: Any = 4e-4,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-15,
        weight_decay: float | None = None,
        *,
        decay_order: str = "post_update",
        caution: bool | Caution = True,
        cautious_weight_decay: bool = False,
        maximize: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            caution=caution,
            cautious_weight_decay=cautious_weight_decay,
            maximize=maximize,
            spec_values={"beta1": beta_1, "beta2": beta_2, "eps": epsilon, "decay_order": decay_order},
            **kwargs,
        )
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.decay_order = decay_order

    def build(self, var_list: list[Any]) -> None:
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(var_list, ["momentum", "velocity"])
        self._lr_avgs = []
        for v in var_list:
            name = (getattr(v, "path", None) or v.name).replace("/", "_")
            self._lr_avgs.append(self.add_variable((), "zeros", "float64", name=f"{name}_lr_avg"))

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """One LaProp step in update form (see the class docstring)."""
        n = variable.shape.num_elements()
        i = self._get_variable_index(variable)
        m_var, v_var, a_var = self._momentums[i], self._velocities[i], self._lr_avgs[i]
        lr = tf.cast(learning_rate, tf.float64)
        lr_avg = self.beta_1 * a_var + (1.0 - self.beta_1) * lr
        if n == 0:  # no entries, but the learning-rate average moves on (as the spec's state)
            self.assign(a_var, lr_avg)
            return
        cdt = _ops.compute_dtype(variable.dtype)
        g = tf.cast(tf.convert_to_tensor(gradient), cdt)
        if self.maximize:
            g = -g
        b1, b2 = self.beta_1, self.beta_2
        t = tf.cast(self.iterations + 1, tf.float64)
        bc2 = 1.0 - tf.pow(tf.constant(b2, tf.float64), t)
        v = _c(b2, cdt) * tf.cast(v_var, cdt) + _c(1.0 - b2, cdt) * (g * g)
        normed = g / (tf.sqrt(v / tf.cast(bc2, cdt)) + _c(self.epsilon, cdt))
        m = _c(b1, cdt) * tf.cast(m_var, cdt) + tf.cast((1.0 - b1) * lr, cdt) * normed
        step_size = tf.where(lr_avg != 0, lr / tf.where(lr_avg != 0, lr_avg, 1.0), tf.zeros((), tf.float64))
        coef = step_size
        mask = None
        if self.caution is not None:  # delta = -step_size * m' against -g
            delta_sign = -tf.cast(step_size, cdt) * m
            mask = _ops.cautious_mask(delta_sign, -g)
            if self.caution.normalize != "none" or self._caution_counts:
                coef = coef * self._caution_scale(mask, g, n, variable)
        delta = -tf.cast(coef, cdt) * m
        if mask is not None:
            delta = tf.where(mask, delta, tf.zeros((), cdt))
        p = tf.cast(tf.convert_to_tensor(variable), cdt)
        p_new = p + delta
        if self.weight_decay and self._use_weight_decay(variable):
            decay = tf.cast(lr * self.weight_decay, cdt)
            base = p_new if self.decay_order == "post_update" else p
            d = base
            if self.cautious_weight_decay:
                d = tf.where(_ops.decay_keep(-delta, p, mask), base, tf.zeros((), cdt))
            p_new = p_new - decay * d
        self.assign(m_var, m)
        self.assign(v_var, v)
        self.assign(a_var, lr_avg)
        self.assign(variable, p_new)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon, "decay_order": self.decay_order}
        )
        return config


for _cls in (Adam, Lion, SGD, Nadam, RMSprop, Adafactor, Adopt, LaProp):
    if _cls.__doc__:
        _cls.__doc__ = _cls.__doc__.replace("{base}", _BASE_KWARGS_DOC)


@keras.saving.register_keras_serializable(package="cautious")
class Muon(keras.optimizers.Muon):
    r"""Cautious Muon, a subclass of ``keras.optimizers.Muon`` (same names, defaults, variables, config).

    Keras's Muon step for the 2-d variables it orthogonalizes (:func:`cautious.spec.muon` with
    ``muon_momentum="sum"``, ``ns_eps="add"`` and Keras's fixed ``1e-7``, ``shape_scale="rms"``
    with ``rms_rate``, or ``"none"`` for ``rms_rate=None``):

    .. math::

        m' = \mu m + g,\quad v = g + \mu m' \text{ (nesterov) else } m',\quad
        u_0 = s\,\mathrm{NS}(v),\quad
        p' = p - \eta\lambda p - \eta\,\text{mask}(u_0, g)\,\text{scale}\,u_0
        \text{ (mask\_position="after")}

    or ``u = s NS(mask(v, g) scale v)`` (``"before"``). The variables Keras gives to its AdamW
    branch (not 2-d, embeddings, ``exclude_layers``) take Keras's AdamW step, masked against
    ``g`` when caution is on (the cautious Adam direction). Extra keyword-only arguments:
    ``caution``, ``cautious_weight_decay`` (Muon variables: the decay, which Keras applies
    before the step, is skipped where the cautious step and the variable have strictly
    opposite signs) and ``mask_position``. The mask and scale are :mod:`._ops`'s.
    ``caution=False`` runs Keras's own methods: it is ``keras.optimizers.Muon`` bit for bit.
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        adam_beta_1: float = 0.9,
        adam_beta_2: float = 0.999,
        adam_weight_decay: float = 0.004,
        epsilon: float = 1e-7,
        weight_decay: float = 0.004,
        *,
        caution: bool | Caution = True,
        cautious_weight_decay: bool = False,
        mask_position: str = "after",
        **kwargs: Any,
    ) -> None:
        values = dict(
            beta1=adam_beta_1,
            beta2=adam_beta_2,
            eps=epsilon,
            momentum=kwargs.get("momentum", 0.95),
            ns_steps=kwargs.get("ns_steps", 5),
            mask_position=mask_position,
            nesterov=kwargs.get("nesterov", True),
            cautious_weight_decay=cautious_weight_decay,
        )
        if not callable(learning_rate):
            values["lr"] = learning_rate
        if weight_decay is not None:
            values["weight_decay"] = weight_decay
        if kwargs.get("rms_rate", 0.2) is not None:
            values["rms_rate"] = kwargs.get("rms_rate", 0.2)
        validate(values, {**NAMES, "beta1": "adam_beta_1", "beta2": "adam_beta_2"})
        if adam_weight_decay is not None:
            validate({"weight_decay": adam_weight_decay}, {"weight_decay": "adam_weight_decay"})
        split_ns_coefficients(
            (kwargs.get("muon_a", 3.4445), kwargs.get("muon_b", -4.7750), kwargs.get("muon_c", 2.0315))
        )
        super().__init__(
            learning_rate=learning_rate,
            adam_beta_1=adam_beta_1,
            adam_beta_2=adam_beta_2,
            adam_weight_decay=adam_weight_decay,
            epsilon=epsilon,
            weight_decay=weight_decay,
            **kwargs,
        )
        self.caution = caution_arg(caution)
        self.cautious_weight_decay = bool(cautious_weight_decay)
        self.mask_position = mask_position

    def build(self, var_list: list[Any]) -> None:
        """Refuse non-floating variables, then build as Keras does."""
        for v in var_list:
            check_param_dtype(f"variable {getattr(v, 'path', None) or v.name!r}", tf.as_dtype(v.dtype).name)
        super().build(var_list)

    def _masked(self, x: tf.Tensor, gradient: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(where(mask(x, g), scale * x, 0), mask)``: the shared mask, count and float64 scale."""
        g = tf.cast(gradient, x.dtype)
        mask = _ops.cautious_mask(x, g)
        n = x.shape.num_elements()
        scale = _ops.cautious_scale(
            _ops.kept_count(mask, n), _ops.caution_denominator(g, n, self.caution), self.caution
        )
        return tf.where(mask, x * tf.cast(scale, x.dtype), tf.zeros((), x.dtype)), mask

    def _apply_weight_decay(self, variables: Any) -> None:
        if not self.cautious_weight_decay:
            return super()._apply_weight_decay(variables)
        # the Muon variables decay inside their step (the decay mask needs the step's sign)
        return super()._apply_weight_decay([v for v in variables if self._should_use_adamw(v)])

    def _muon_update_step(self, gradient: Any, variable: Any, lr: Any, m: Any) -> None:
        if self.caution is None and not self.cautious_weight_decay:
            return super()._muon_update_step(gradient, variable, lr, m)
        self.assign_add(m, keras.ops.add(gradient, m * (self.momentum - 1)))
        v = keras.ops.add(gradient, self.momentum * m) if self.nesterov else m
        v = tf.convert_to_tensor(v)
        mask = None
        if self.caution is not None and self.mask_position == "before":
            v, _ = self._masked(v, gradient)
        step = tf.convert_to_tensor(self.lr_adjust(lr * self.zeropower_via_newtonschulz5(v, self.ns_steps)))
        if self.caution is not None and self.mask_position == "after":
            step, mask = self._masked(step, gradient)
        if self.cautious_weight_decay and self.weight_decay and self._use_weight_decay(variable):
            p = tf.convert_to_tensor(variable)
            wd = keras.ops.cast(self.weight_decay, variable.dtype)
            keep = _ops.decay_keep(step, p, mask)
            self.assign(variable, tf.where(keep, p - p * wd * keras.ops.cast(self.learning_rate, variable.dtype), p))
        self.assign_sub(variable, step)

    def _adamw_update_step(self, gradient: Any, variable: Any, learning_rate: Any, m: Any, v: Any) -> None:
        if self.caution is None:
            return super()._adamw_update_step(gradient, variable, learning_rate, m, v)
        # Keras's AdamW step, with the step masked against g (sign(step) = sign(m'): the denominator is positive)
        lr = keras.ops.cast(learning_rate, variable.dtype)
        gradient = keras.ops.cast(gradient, variable.dtype)
        t = keras.ops.cast(self.iterations + 1, variable.dtype)
        b1_t = keras.ops.power(keras.ops.cast(self.adam_beta_1, variable.dtype), t)
        b2_t = keras.ops.power(keras.ops.cast(self.adam_beta_2, variable.dtype), t)
        alpha = lr * keras.ops.sqrt(1 - b2_t) / (1 - b1_t)
        self.assign_add(m, keras.ops.multiply(keras.ops.subtract(gradient, m), 1 - self.adam_beta_1))
        self.assign_add(v, keras.ops.multiply(keras.ops.subtract(keras.ops.square(gradient), v), 1 - self.adam_beta_2))
        step = keras.ops.divide(keras.ops.multiply(m, alpha), keras.ops.add(keras.ops.sqrt(v), self.epsilon))
        step, _ = self._masked(tf.convert_to_tensor(step), gradient)
        self.assign_sub(variable, step)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "caution": _caution_to_config(self.caution),
                "cautious_weight_decay": self.cautious_weight_decay,
                "mask_position": self.mask_position,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Muon:
        config = dict(config)
        if "caution" in config:
            config["caution"] = _caution_from_config(config["caution"])
        return super().from_config(config, custom_objects=custom_objects)
