"""``cautious.spec``: the pure-NumPy reference definition of cautious optimizers.

Everything every backend must reproduce is defined here, once:

* :mod:`cautious.spec.mask`: the mask, the integer count, the scale, and the
  whole-update form :func:`whole_update` for a whole optimizer's update;
* :mod:`cautious.spec.rules`: base rules (Adam, Lion, SGD-momentum) as pure
  direction functions, and :func:`cautious`, the one wrapper that applies caution;
* :mod:`cautious.spec.optim`: the optimizers ``adam``, ``adamw``, ``lion``,
  ``sgd`` with ``init`` / ``step`` over immutable state, and :func:`cautious_optimizer`,
  caution for any whole optimizer (:func:`whole_step`);
* :mod:`cautious.spec.errors`: the table of invalid hyperparameters;
* :mod:`cautious.spec.dtypes`: storage dtypes and the round-once rule.

See ``docs/spec.md`` for the math and every decision.
"""

from cautious._caution import Caution, as_caution, caution_arg
from cautious.spec.dtypes import STORAGE_DTYPES, compute_dtype, round_to
from cautious.spec.errors import ERROR_TABLE, validate
from cautious.spec.mask import (
    CautionStats,
    apply_caution,
    caution_denominator,
    cautious_mask,
    cautious_scale,
    decay_mask,
    kept_count,
    whole_step,
    whole_update,
)
from cautious.spec.optim import Optimizer, State, adam, adamw, cautious_optimizer, lion, make_optimizer, sgd
from cautious.spec.rules import (
    AdamState,
    LionState,
    Rule,
    SGDState,
    UpdateRule,
    adam_direction,
    adam_rule,
    cautious,
    cautious_update,
    lion_direction,
    lion_rule,
    sgd_direction,
    sgd_rule,
    sgd_velocity,
    sgd_velocity_rule,
)

RULES = ("adam", "adamw", "lion", "sgd")

__all__ = [
    "Caution",
    "as_caution",
    "caution_arg",
    "STORAGE_DTYPES",
    "compute_dtype",
    "round_to",
    "ERROR_TABLE",
    "validate",
    "apply_caution",
    "CautionStats",
    "caution_denominator",
    "cautious_mask",
    "cautious_scale",
    "decay_mask",
    "kept_count",
    "whole_update",
    "whole_step",
    "Optimizer",
    "State",
    "adam",
    "adamw",
    "lion",
    "sgd",
    "make_optimizer",
    "cautious_optimizer",
    "AdamState",
    "LionState",
    "SGDState",
    "Rule",
    "adam_direction",
    "adam_rule",
    "cautious",
    "lion_direction",
    "lion_rule",
    "sgd_direction",
    "sgd_rule",
    "UpdateRule",
    "sgd_velocity",
    "sgd_velocity_rule",
    "cautious_update",
    "RULES",
]
