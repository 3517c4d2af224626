r"""Cautious optimizers for JAX, as optax ``GradientTransformation``\ s (public API: :mod:`cautious.jax`).

* :func:`cautious` wraps a direction transformation (``form="direction"``:
  ``optax.scale_by_adam()``, ``optax.scale_by_lion()``, ``optax.trace(...)``) or a whole
  optimizer (``form="update"``: ``optax.adamw(1e-3)``, any chain ending in a learning rate)
  with the cautious mask; its state is exactly the inner state.
* :func:`adamw`, :func:`adam`, :func:`lion`, :func:`sgd`, :func:`adafactor` have optax's signatures and defaults
  plus the spec's keyword-only options (``caution=True``, ``cautious_weight_decay=False``,
  ``eps_placement="corrected"``, ...); ``caution=False`` reproduces optax.
* ``caution_stats=True`` (opt-in: it changes the state's structure) records each tensor's kept
  count, size and scale of the last step in the state; :func:`caution_stats` reads them.

Everything composes with optax: schedules, :func:`optax.inject_hyperparams`,
:func:`optax.chain` (e.g. with :func:`optax.clip_by_global_norm`), :class:`optax.MultiSteps`,
:func:`optax.masked`, :func:`optax.multi_transform`, ``None`` leaves, ``mu_dtype``, ``jit``
(one compilation), buffer donation and sharded arrays (the count is per tensor and global
over its shards).

Notes:
  * The kept count is an integer: int32 (tensors up to ``2**31 - 1`` entries) unless
    ``jax_enable_x64`` is on, then int64.
  * For Adam with a concrete ``eps > 0`` (and Lion) the mask is decided from the new moment
    (Adam: ``m'``; Lion: ``c``), whose signs equal the direction's because Adam's denominator is
    positive. This matches the spec except when a *stored* second moment is already ``inf``
    (after a gradient beyond ~1.8e19 in float32), where the spec's ``u`` is 0; it avoids a spurious
    mask change when ``m'/d`` underflows in float32. Otherwise, and always for ``eps == 0`` or traced
    ``eps``, the mask is decided from the direction itself.
  * Validation covers Python/NumPy numbers and concrete arrays at construction; schedules and
    traced hyperparameters are not validated.
  * bfloat16/float16 tensors compute in float32 and round once into the state and into the
    updates, which have the parameters' dtype as optax's do (optax itself computes some moment
    updates in the low precision). Integer (and other non-floating) parameters are refused.
  * The state of :func:`adamw`, :func:`adam`, :func:`lion`, :func:`sgd` is exactly the pytree
    of the optax optimizer with the same base rule (``optax.adamw`` ...), caution on or off:
    checkpoints restore both ways.

See :mod:`cautious.spec` for the algorithm.
"""

from cautious._caution import Caution
from cautious.backends.jax._alias import adafactor, adam, adamw, adopt, laprop, lion, muon, nadam, nadamw, rmsprop, sgd
from cautious.backends.jax._core import (
    FORMS,
    CautionStatsState,
    apply_caution,
    caution_scale,
    caution_stats,
    cautious,
    cautious_mask,
    kept_count,
    whole_update,
)
from cautious.backends.jax._transforms import (
    LaPropState,
    ScaleByAdamState,
    ScaleByAmsgradState,
    ScaleByNadamState,
    add_decayed_weights,
    decoupled_decay,
    negate,
    scale_by_adam,
    scale_by_adopt,
    scale_by_laprop,
    scale_by_lion,
    scale_by_nadam,
    scale_by_rms,
    scale_by_stddev,
    trace,
)

__all__ = [
    "Caution",
    "FORMS",
    "cautious",
    "caution_stats",
    "CautionStatsState",
    "adamw",
    "adam",
    "lion",
    "sgd",
    "adafactor",
    "muon",
    "scale_by_adam",
    "scale_by_lion",
    "trace",
    "negate",
    "add_decayed_weights",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "cautious_mask",
    "kept_count",
    "caution_scale",
    "apply_caution",
    "whole_update",
    "nadam",
    "nadamw",
    "rmsprop",
    "scale_by_nadam",
    "scale_by_rms",
    "scale_by_stddev",
    "ScaleByNadamState",
    "adopt",
    "laprop",
    "scale_by_adopt",
    "scale_by_laprop",
    "decoupled_decay",
    "LaPropState",
]
