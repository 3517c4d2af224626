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
    lr must be a real number (a finite number >= 0), got 'fast'
    amsgrad must be a bool (True or False), got None
    parameter 0 must have a floating-point dtype (float64, float32, bfloat16 or float16), got int64

``ValueError`` is raised for a value of the right type outside its range (NaN
and infinities included) and for parameters of a non-floating dtype (an optimizer
step would truncate them); ``TypeError`` for a value of the wrong type (a string
learning rate, a non-bool flag, ``None`` anywhere: there is no "unset" value, an
option that does not apply is simply not passed). The conformance suite draws invalid
values from this table and checks type and message on every backend.
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
    "type_message",
    "invalid_examples",
    "split_betas",
    "check_nesterov",
    "check_cautious_weight_decay",
    "check_momentum_form",
    "KERAS_DAMPENING_MESSAGE",
    "NESTEROV_MESSAGE",
    "CAUTIOUS_WEIGHT_DECAY_MESSAGE",
    "FLOAT_DTYPES",
    "param_dtype_message",
    "check_param_dtype",
    "MUON_NDIM_MESSAGE",
    "check_muon_shape",
    "split_ns_coefficients",
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


def _nonpos(x: float) -> bool:
    return math.isfinite(x) and x <= 0


def _positive(x: float) -> bool:
    return x > 0  # NaN fails; +inf passes (no clipping)


def _count(x: float) -> bool:
    return math.isfinite(x) and x >= 0 and x == int(x)


def _ns_steps(x: float) -> bool:
    return math.isfinite(x) and x.is_integer() and 0 <= x < 100


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
        "denominator",
        "one of 'size', 'nonzero'",
        lambda x: False,
        ("nnz", "SIZE", ""),
        choices=("size", "nonzero"),
    ),
    Check(
        "eps_placement",
        "one of 'corrected', 'uncorrected'",
        lambda x: False,
        ("keras", "", "after"),
        choices=("corrected", "uncorrected"),
    ),
    Check(
        "form",
        "one of 'direction', 'update'",
        lambda x: False,
        ("optimizer", "", "Update"),
        choices=("direction", "update"),
    ),
    Check(
        "momentum_form",
        "one of 'torch', 'keras'",
        lambda x: False,
        ("tf", "", "velocity"),
        choices=("torch", "keras"),
    ),
    Check("momentum_decay", "a finite number >= 0", _nonneg, (-4e-3, _NAN, _INF)),
    Check(
        "momentum_schedule",
        "one of 'dozat', 'constant'",
        lambda x: False,
        ("torch", "", "none"),
        choices=("dozat", "constant"),
    ),
    Check("alpha", "a finite number in [0, 1]", _unit_closed, (-0.1, 1.5, _NAN)),
    Check("initial_scale", "a finite number >= 0", _nonneg, (-1.0, _NAN, _INF)),
    # -- Adafactor (spec.adafactor) ----------------------------------------------------------------
    Check("beta2_decay", "a finite number <= 0", _nonpos, (0.5, _NAN, -_INF)),
    Check("clip_threshold", "a number > 0 (inf: no clipping)", _positive, (0.0, -1.0, _NAN)),
    Check("decay_offset", "an integer >= 0", _count, (-1, 0.5, _INF)),
    Check("min_dim_size_to_factor", "an integer >= 0", _count, (-1, 2.5, _NAN)),
    Check(
        "eps_form",
        "one of 'clamp', 'add'",
        lambda x: False,
        ("torch", "", "Clamp"),
        choices=("clamp", "add"),
    ),
    Check(
        "factor_dims",
        "one of 'last_two', 'largest_two'",
        lambda x: False,
        ("last", "", "largest"),
        choices=("last_two", "largest_two"),
    ),
    Check(
        "weight_decay_form",
        "one of 'lr', 'lr_before_scale', 'rate'",
        lambda x: False,
        ("torch", "", "decoupled"),
        choices=("lr", "lr_before_scale", "rate"),
    ),
    Check("clip_exp", "a finite number >= 0", _nonneg, (-0.25, _NAN, _INF)),
    Check(
        "decay_order",
        "one of 'pre_update', 'post_update'",
        lambda x: False,
        ("before", "", "after"),
        choices=("pre_update", "post_update"),
    ),
    Check("ns_steps", "an integer in [0, 100)", _ns_steps, (-1, 100, 2.5, _NAN)),
    Check("rms_rate", "a finite number >= 0", _nonneg, (-0.2, _NAN, _INF)),
    Check(
        "mask_position",
        "one of 'after', 'before'",
        lambda x: False,
        ("post", "", "After"),
        choices=("after", "before"),
    ),
    Check(
        "muon_momentum",
        "one of 'ema', 'debiased', 'sum'",
        lambda x: False,
        ("torch", "", "nesterov"),
        choices=("ema", "debiased", "sum"),
    ),
    Check(
        "ns_eps",
        "one of 'clamp', 'add'",
        lambda x: False,
        ("max", "", "plus"),
        choices=("clamp", "add"),
    ),
    Check(
        "shape_scale",
        "one of 'rows_over_cols', 'cols_over_rows', 'rms', 'none'",
        lambda x: False,
        ("original", "", "match_rms_adamw"),
        choices=("rows_over_cols", "cols_over_rows", "rms", "none"),
    ),
    Check(
        "adjust_lr_fn",
        "one of 'original', 'match_rms_adamw'",
        lambda x: False,
        ("rms", "", "Original"),
        choices=("original", "match_rms_adamw"),
    ),
    Check(
        "ns_dtype",
        "one of 'bfloat16', 'float32', 'float64'",
        lambda x: False,
        ("half", "", "float16"),
        choices=("bfloat16", "float32", "float64"),
    ),
)

#: Boolean options: anything but a real ``bool`` (or NumPy bool) is a ``TypeError``.
FLAGS: tuple[str, ...] = (
    "amsgrad",
    "maximize",
    "nesterov",
    "cautious_weight_decay",
    "decoupled_weight_decay",
    "centered",
    "eps_in_sqrt",
    "relative_step",
    "multiply_by_parameter_scale",
)

_BY_KEY: dict[str, Check] = {c.key: c for c in ERROR_TABLE}


def message(key: str, value: Any, name: str | None = None) -> str:
    """The exact ``ValueError`` message for an out-of-range ``value`` of ``key``."""
    return f"{name or key} must be {_BY_KEY[key].valid}, got {value!r}"


def type_message(key: str, value: Any, name: str | None = None) -> str:
    """The exact ``TypeError`` message for a ``value`` of the wrong type (``None`` included) for ``key``."""
    name = name or key
    if key in FLAGS:
        return f"{name} must be a bool (True or False), got {value!r}"
    check = _BY_KEY[key]
    kind = "a str" if check.choices else "a real number"
    return f"{name} must be {kind} ({check.valid}), got {value!r}"


def validate(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> None:
    """Check hyperparameters against :data:`ERROR_TABLE`; raise on the first bad one.

    Args:
      values: spec key -> value. Keys not in the table or :data:`FLAGS` are
        rejected with ``TypeError`` (nothing is silently ignored). ``None`` is
        never valid: a caller whose framework has an "unset" value (Keras's
        ``weight_decay=None``, a learning-rate schedule) leaves the key out.
      names: spec key -> the name the user wrote (``{"lr": "learning_rate"}``).

    Raises:
      TypeError: wrong type (``None``, non-real number, non-bool flag, non-str choice).
      ValueError: a value outside its valid range, NaN and infinities included.
    """
    names = names or {}
    for key, value in values.items():
        name = names.get(key, key)
        if key in FLAGS:
            if not (isinstance(value, bool) or type(value).__name__ == "bool_"):
                raise TypeError(type_message(key, value, name))
            continue
        check = _BY_KEY.get(key)
        if check is None:
            raise TypeError(f"unknown hyperparameter {name!r}")
        if check.choices:
            if not isinstance(value, str):
                raise TypeError(type_message(key, value, name))
            if value not in check.choices:
                raise ValueError(message(key, value, name))
            continue
        x = _real(value)
        if x is None:
            raise TypeError(type_message(key, value, name))
        if not check.ok(x):
            raise ValueError(message(key, value if isinstance(value, (int, float)) else x, name))


#: The storage dtypes a parameter may have (see :mod:`cautious.spec.dtypes`).
FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")


def param_dtype_message(where: str, dtype: Any) -> str:
    """The exact ``ValueError`` message for a parameter ``where`` (``"parameter 0"``, ``"'w'"``) of ``dtype``."""
    return (
        f"{where} must have a floating-point dtype ({', '.join(FLOAT_DTYPES[:-1])} or {FLOAT_DTYPES[-1]}), got {dtype}"
    )


def check_param_dtype(where: str, dtype: Any) -> None:
    """``ValueError`` unless ``dtype`` (any framework's dtype, or its name) is a floating-point storage dtype.

    Integer (and bool, complex) parameters are refused: a step would truncate
    ``p - lr * u`` to an integer (``1 -> 0``), silently.
    """
    name = getattr(dtype, "name", None) or str(dtype)
    name = name.rsplit(".", 1)[-1]  # "torch.float32" -> "float32"
    if name not in FLOAT_DTYPES:
        raise ValueError(param_dtype_message(where, name))


#: The structural errors: combinations of valid values that do not make an optimizer.
NESTEROV_MESSAGE = "nesterov=True requires momentum > 0 and dampening == 0"
CAUTIOUS_WEIGHT_DECAY_MESSAGE = "cautious_weight_decay=True requires decoupled weight decay"


def check_nesterov(nesterov: bool, momentum: float, dampening: float = 0.0) -> None:
    """``ValueError`` unless Nesterov momentum has ``momentum > 0`` and no dampening."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(NESTEROV_MESSAGE)


KERAS_DAMPENING_MESSAGE = "momentum_form='keras' requires dampening == 0"


def check_momentum_form(momentum_form: str, dampening: float = 0.0) -> None:
    """``ValueError`` if Keras's velocity form is asked for with dampening (Keras has none)."""
    if momentum_form == "keras" and dampening != 0:
        raise ValueError(KERAS_DAMPENING_MESSAGE)


def check_cautious_weight_decay(cautious_weight_decay: bool, decoupled: bool) -> None:
    """``ValueError`` if cautious weight decay is asked for with coupled (L2) decay."""
    if cautious_weight_decay and not decoupled:
        raise ValueError(CAUTIOUS_WEIGHT_DECAY_MESSAGE)


MUON_NDIM_MESSAGE = "Muon only orthogonalizes 2-d parameters, got {where} with shape {shape}"


def check_muon_shape(where: str, shape: tuple[int, ...]) -> None:
    """``ValueError`` unless a Muon parameter is a matrix (torch.optim.Muon refuses the others too)."""
    if len(tuple(shape)) != 2:
        raise ValueError(MUON_NDIM_MESSAGE.format(where=where, shape=tuple(shape)))


def split_ns_coefficients(ns_coefficients: Any) -> tuple[Any, Any, Any]:
    """``(a, b, c)`` of Newton-Schulz; ``TypeError`` unless a triple of real numbers, ``ValueError`` if not finite."""
    try:
        a, b, c = ns_coefficients
    except (TypeError, ValueError):
        raise TypeError(f"ns_coefficients must be three numbers (a, b, c), got {ns_coefficients!r}") from None
    for k in (a, b, c):
        x = _real(k)
        if x is None:
            raise TypeError(f"ns_coefficients must be three numbers (a, b, c), got {ns_coefficients!r}")
        if not math.isfinite(x):
            raise ValueError(f"ns_coefficients must be finite numbers, got {ns_coefficients!r}")
    return a, b, c


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
        out.append((key, "fast", TypeError, type_message(key, "fast")))
    for check in ERROR_TABLE:
        out.append((check.key, None, TypeError, type_message(check.key, None)))
    for key in FLAGS:
        out.append((key, "yes", TypeError, type_message(key, "yes")))
        out.append((key, None, TypeError, type_message(key, None)))
        out.append((key, 1, TypeError, type_message(key, 1)))
    return out
