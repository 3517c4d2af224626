"""The one table of invalid hyperparameters, shared by the reference and every backend.

Every backend validates through :func:`validate`, so a bad value gets the same
exception type and the same message everywhere. Only the *parameter name* in
the message follows the framework's own spelling (``lr`` in PyTorch,
``learning_rate`` in optax and Keras, ``betas[0]`` / ``b1`` / ``beta_1``),
passed in through ``names``; the rest of the message is fixed here.

Each row of :data:`ERROR_TABLE` is a :class:`Check`: the spec's key, the valid
range in words, and the predicate. Messages read::

    lr must be a finite number >= 0, got -1.0
    betas[0] must be a finite number in [0, 1), got 1.0
    normalize must be one of 'mean_clamp', 'count_plus_one', 'exact', 'none', got 'mean'
    lr must be a real number, got 'fast'

``ValueError`` is raised for a value of the right type outside its range (NaN
and infinities included); ``TypeError`` for a value of the wrong type (a string
learning rate, a non-bool flag). The conformance suite draws invalid values
from this table and checks type and message on every backend.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "Check",
    "ERROR_TABLE",
    "FLAGS",
    "validate",
    "message",
    "invalid_examples",
    "split_betas",
    "check_nesterov",
    "check_cautious_weight_decay",
    "NESTEROV_MESSAGE",
    "CAUTIOUS_WEIGHT_DECAY_MESSAGE",
]


def _real(x: Any) -> float | None:
    """``float(x)`` for real scalars (Python, NumPy, 0-d or 1-element arrays of any framework)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    shape = getattr(x, "shape", None)
    if shape is not None and math.prod(tuple(shape)) == 1 and hasattr(x, "item"):
        v = x.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            return None
        return float(v)
    return None


@dataclasses.dataclass(frozen=True)
class Check:
    """One row of the table: ``key`` is valid iff ``ok(value)``; ``valid`` says so in words."""

    key: str
    valid: str
    ok: Callable[[float], bool]
    invalid: tuple[Any, ...]  # representative invalid values, for tests and docs
    choices: tuple[str, ...] = ()


def _nonneg(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def _unit_open(x: float) -> bool:
    return math.isfinite(x) and 0 <= x < 1


def _unit_closed(x: float) -> bool:
    return math.isfinite(x) and 0 <= x <= 1


def _floor(x: float) -> bool:
    return math.isfinite(x) and 0 < x <= 1


_NAN, _INF = float("nan"), float("inf")

ERROR_TABLE: tuple[Check, ...] = (
    Check("lr", "a finite number >= 0", _nonneg, (-1e-3, _NAN, _INF)),
    Check("beta1", "a finite number in [0, 1)", _unit_open, (-0.1, 1.0, 1.5, _NAN)),
    Check("beta2", "a finite number in [0, 1)", _unit_open, (-0.1, 1.0, _NAN, _INF)),
    Check("eps", "a finite number >= 0", _nonneg, (-1e-8, _NAN, _INF)),
    Check("weight_decay", "a finite number >= 0", _nonneg, (-0.01, _NAN, _INF)),
    Check("momentum", "a finite number in [0, 1]", _unit_closed, (-0.5, 1.5, _NAN)),
    Check("dampening", "a finite number in [0, 1]", _unit_closed, (-0.5, 2.0, _NAN)),
    Check("floor", "a finite number in (0, 1]", _floor, (0.0, -1e-3, 1.5, _NAN)),
    Check(
        "normalize",
        "one of 'mean_clamp', 'count_plus_one', 'exact', 'none'",
        lambda x: False,
        ("mean", "MEAN_CLAMP", ""),
        choices=("mean_clamp", "count_plus_one", "exact", "none"),
    ),
    Check(
        "eps_placement",
        "one of 'corrected', 'uncorrected'",
        lambda x: False,
        ("keras", "", "after"),
        choices=("corrected", "uncorrected"),
    ),
)

#: Boolean options: anything but a real ``bool`` (or NumPy bool) is a ``TypeError``.
FLAGS: tuple[str, ...] = (
    "amsgrad",
    "maximize",
    "nesterov",
    "cautious_weight_decay",
    "decoupled_weight_decay",
)

_BY_KEY: dict[str, Check] = {c.key: c for c in ERROR_TABLE}


def message(key: str, value: Any, name: str | None = None) -> str:
    """The exact ``ValueError`` message for an out-of-range ``value`` of ``key``."""
    return f"{name or key} must be {_BY_KEY[key].valid}, got {value!r}"


def validate(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> None:
    """Check hyperparameters against :data:`ERROR_TABLE`; raise on the first bad one.

    Args:
      values: spec key -> value. Keys not in the table or :data:`FLAGS` are
        rejected with ``TypeError`` (nothing is silently ignored). ``None``
        values are skipped (an option that does not apply).
      names: spec key -> the name the user wrote (``{"lr": "learning_rate"}``).

    Raises:
      TypeError: wrong type (non-real number, non-bool flag, non-str choice).
      ValueError: a value outside its valid range, NaN and infinities included.
    """
    names = names or {}
    for key, value in values.items():
        if value is None:
            continue
        name = names.get(key, key)
        if key in FLAGS:
            if not (isinstance(value, bool) or type(value).__name__ == "bool_"):
                raise TypeError(f"{name} must be a bool, got {value!r}")
            continue
        check = _BY_KEY.get(key)
        if check is None:
            raise TypeError(f"unknown hyperparameter {name!r}")
        if check.choices:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {value!r}")
            if value not in check.choices:
                raise ValueError(message(key, value, name))
            continue
        x = _real(value)
        if x is None:
            raise TypeError(f"{name} must be a real number, got {value!r}")
        if not check.ok(x):
            raise ValueError(message(key, value if isinstance(value, (int, float)) else x, name))


#: The structural errors: combinations of valid values that do not make an optimizer.
NESTEROV_MESSAGE = "nesterov=True requires momentum > 0 and dampening == 0"
CAUTIOUS_WEIGHT_DECAY_MESSAGE = "cautious_weight_decay=True requires decoupled weight decay"


def check_nesterov(nesterov: bool, momentum: float, dampening: float = 0.0) -> None:
    """``ValueError`` unless Nesterov momentum has ``momentum > 0`` and no dampening."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(NESTEROV_MESSAGE)


def check_cautious_weight_decay(cautious_weight_decay: bool, decoupled: bool) -> None:
    """``ValueError`` if cautious weight decay is asked for with coupled (L2) decay."""
    if cautious_weight_decay and not decoupled:
        raise ValueError(CAUTIOUS_WEIGHT_DECAY_MESSAGE)


def split_betas(betas: Any) -> tuple[Any, Any]:
    """``(beta1, beta2)`` from torch-style ``betas``; ``TypeError`` unless it is a pair."""
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair of numbers, got {betas!r}") from None
    return b1, b2


def invalid_examples() -> list[tuple[str, Any, type, str]]:
    """``(key, value, exception type, message)`` for every representative invalid value."""
    out: list[tuple[str, Any, type, str]] = []
    for check in ERROR_TABLE:
        for value in check.invalid:
            out.append((check.key, value, ValueError, message(check.key, value)))
    for key in ("lr", "eps", "weight_decay"):
        out.append((key, "fast", TypeError, f"{key} must be a real number, got 'fast'"))
    for key in FLAGS:
        out.append((key, "yes", TypeError, f"{key} must be a bool, got 'yes'"))
    return out
