r"""Caution for any Keras 3 optimizer: :class:`Cautious` masks the step the optimizer takes (TensorFlow backend).

The spec is :func:`cautious.spec.cautious_optimizer` (per variable :func:`cautious.spec.whole_step`):

.. math::

    \delta = p_{next} - p, \qquad
    p' = p + \text{mask}(\delta, -g)\cdot\text{scale}\cdot\delta

where ``p_next`` is what the wrapped optimizer made of ``p`` and ``g`` the gradient handed to
``apply`` (Keras optimizers have no ``maximize``). Numerics, bounded in docs/conformance.md:
``delta`` is computed in the compute dtype (float64 for float64 variables, float32 otherwise)
from the variable and its value read before the inner step; the scale is float64 from the integer
count (:mod:`cautious.backends.tensorflow._ops`), cast once; ``p + delta^c`` is computed in the
compute dtype and rounded once into the variable.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from cautious._caution import Caution, caution_arg  # noqa: E402
from cautious.backends.tensorflow import _ops  # noqa: E402
from cautious.backends.tensorflow.optimizers import (  # noqa: E402
    CautiousOptimizer,
    _caution_from_config,
    _caution_to_config,
)
from cautious.spec.mask import CautionStats  # noqa: E402

__all__ = ["Cautious"]

#: ``keras.optimizers.Optimizer`` keywords that belong to the inner optimizer.
_INNER_KWARGS = (
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)


@keras.saving.register_keras_serializable(package="cautious")
class Cautious(keras.optimizers.Optimizer):
    r"""Caution for any Keras optimizer: its whole update, weight decay included, masked against the gradient.

    ``Cautious(inner_optimizer)`` goes wherever a Keras optimizer goes (``model.compile``,
    ``apply_gradients`` in a ``tf.GradientTape`` loop, ``tf.function``, ``jit_compile``), like
    ``keras.optimizers.LossScaleOptimizer``: the inner optimizer keeps its own variables,
    learning rate (``learning_rate`` and ``iterations`` are the inner optimizer's), gradient
    clipping, EMA and accumulation. Each step reads every variable that has a gradient, runs the
    inner step, and keeps ``delta = p_next - p`` only where it has the sign of ``-g``, rescaled
    per variable by ``caution.scale(count, n)``; masked entries keep their old value.

    Memory: no persistent buffer. The value read before the inner step lives until the mask is
    applied; TensorFlow copies a variable's buffer when the inner step writes it while that read
    is alive, so the step holds at most one extra copy of each variable, transiently.

    Args:
      inner_optimizer: any ``keras.optimizers.Optimizer`` (a ``cautious.tensorflow`` optimizer
        needs ``caution=False``).
      caution: ``True`` (``Caution()``), ``False`` (the inner step, bit for bit) or a :class:`cautious.Caution`.
      caution_stats: keep each variable's kept count and scale of the last step (:meth:`caution_stats`).
      name: the optimizer's name.

    ``tf.distribute`` strategies are refused (the count would be per replica). Sparse gradients
    (``tf.IndexedSlices``) are densified for the mask.

    Example:
      >>> import keras
      >>> from cautious.tensorflow import Cautious
      >>> opt = Cautious(keras.optimizers.Adafactor(learning_rate=0.01))
      >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
      >>> model.compile(optimizer=opt, loss="mse")
    """

    def __init__(
        self,
        inner_optimizer: keras.optimizers.Optimizer,
        caution: bool | Caution = True,
        *,
        caution_stats: bool = False,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"inner_optimizer must be a keras.optimizers.Optimizer, got {type(inner_optimizer)!r}")
        if isinstance(inner_optimizer, Cautious):
            raise ValueError("the optimizer is already wrapped in Cautious: the mask would apply twice")
        if isinstance(inner_optimizer, CautiousOptimizer) and inner_optimizer.caution is not None:
            raise ValueError(
                f"Cautious wraps an optimizer with caution off: {type(inner_optimizer).__name__} has caution on "
                "(build it with caution=False), else the mask would apply twice"
            )
        for key in _INNER_KWARGS:
            if key in kwargs:
                raise ValueError(f"Cautious does not take {key!r}: set it on the inner optimizer")
        if kwargs:
            raise ValueError(f"Cautious does not take {sorted(kwargs)}")
        if not isinstance(caution_stats, bool):
            raise TypeError(f"caution_stats must be a bool, got {caution_stats!r}")
        c = caution_arg(caution)
        if caution_stats and c is None:
            raise ValueError("caution_stats=True needs caution on (caution=False has no mask to report)")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.caution = c
        self.caution_stats_enabled = caution_stats
        self._caution_counts: list[Any] = []
        self._caution_scales: list[Any] = []

    # -- shared with the inner optimizer -------------------------------------------------------------

    def build(self, var_list: list[Any]) -> None:
        if not self.inner_optimizer.built:
            self.inner_optimizer.build(var_list)
        super().build(var_list)
        if self.caution_stats_enabled:
            for v in var_list:
                name = (getattr(v, "path", None) or v.name).replace("/", "_")
                self._caution_counts.append(self.add_variable((), "zeros", "int64", name=f"{name}_caution_count"))
                self._caution_scales.append(self.add_variable((), "ones", "float64", name=f"{name}_caution_scale"))

    @property
    def variables(self) -> list[Any]:
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self) -> Any:
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list: list[Any]) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    def caution_stats(self) -> list[CautionStats]:
        """Per built variable: ``CautionStats(count, n, scale)`` of its last step (Keras variables)."""
        if not self.caution_stats_enabled:
            raise ValueError("caution_stats() needs Cautious built with caution_stats=True")
        return [
            CautionStats(c, v.shape.num_elements(), s)
            for v, c, s in zip(self._trainable_variables, self._caution_counts, self._caution_scales, strict=True)
        ]

    # -- the step ---------------------------------------------------------------------------------------

    def apply(self, grads: list[Any], trainable_variables: list[Any] | None = None) -> None:
        """The inner optimizer's ``apply``, then the mask (see the class docstring)."""
        grads = list(grads)
        if not self.built:
            self.build(trainable_variables)
            self.built = True
        if self.caution is None:
            return self.inner_optimizer.apply(grads, trainable_variables)
        if tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1:
            raise ValueError("cautious.tensorflow.Cautious does not support tf.distribute strategies with replicas yet")
        variables = list(trainable_variables) if trainable_variables is not None else list(self._trainable_variables)
        if len(grads) != len(variables):
            raise ValueError(f"got {len(grads)} gradients for {len(variables)} variables")
        stepping = [(v, g) for v, g in zip(variables, grads, strict=True) if g is not None]
        before = [tf.identity(tf.convert_to_tensor(v)) for v, _ in stepping]
        self.inner_optimizer.apply(grads, trainable_variables)
        for (v, g), p in zip(stepping, before, strict=True):
            self._mask(v, tf.convert_to_tensor(g), p)

    def _mask(self, variable: Any, g: tf.Tensor, p: tf.Tensor) -> None:
        """``variable <- p + mask(delta, -g) * scale * delta`` with ``delta = variable - p``."""
        n = variable.shape.num_elements()
        if n == 0:
            return
        cdt = _ops.compute_dtype(variable.dtype)
        p = tf.cast(p, cdt)
        g = tf.cast(g, cdt)
        delta = tf.cast(tf.convert_to_tensor(variable), cdt) - p
        mask = _ops.cautious_mask(delta, -g)
        count = _ops.kept_count(mask, n)
        scale = _ops.cautious_scale(count, _ops.caution_denominator(g, n, self.caution), self.caution)
        if self._caution_counts:
            i = self._get_variable_index(variable)
            self._caution_counts[i].assign(tf.cast(count, tf.int64))
            self._caution_scales[i].assign(scale)
        delta_c = tf.where(mask, delta * tf.cast(scale, cdt), tf.zeros((), cdt))
        variable.assign(tf.cast(p + delta_c, variable.dtype))

    def stateless_apply(self, optimizer_variables: Any, grads: Any, trainable_variables: Any) -> Any:
        raise NotImplementedError("cautious.tensorflow.Cautious runs on the TensorFlow backend (stateful apply)")

    # -- config -----------------------------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "caution": _caution_to_config(self.caution),
            "caution_stats": self.caution_stats_enabled,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Cautious:
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        config["caution"] = _caution_from_config(config.get("caution", True))
        return cls(inner, **config)
