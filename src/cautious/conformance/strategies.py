"""Hypothesis strategies: cases, shapes, values, states, and invalid hyperparameters.

Values cover what breaks real implementations: +0 and -0, subnormals, tiny and
huge magnitudes, NaN (opt-in), all-agree and all-disagree tensors, a single kept
entry. Hyperparameters are drawn exactly representable in float32 so that an
implementation that stores them in float32 (Keras variables, tensor lr) is not
penalised for it, while float32 *arithmetic* on them (a float32 bias correction)
still shows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cautious import spec
from cautious.conformance.case import Case
from cautious.spec.dtypes import numpy_dtype, round_to

__all__ = [
    "shapes",
    "tensor_lists",
    "cases",
    "step_inputs",
    "invalid_hparams",
    "f32",
]

# Largest magnitude drawn per storage dtype: squares (Adam's v) must not overflow the compute dtype.
_HUGE = {"float64": 1e30, "float32": 1e12, "bfloat16": 1e12, "float16": 6e4}
_SMALL = {"float64": 1e-300, "float32": 1e-30, "bfloat16": 1e-30, "float16": 1e-6}
_SUBNORMAL = {"float64": 5e-310, "float32": 1e-40, "bfloat16": 1e-40, "float16": 3e-7}


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float."""
    return float(np.float32(x))


def shapes(max_tensors: int = 3) -> st.SearchStrategy[list[tuple[int, ...]]]:
    """Lists of shapes: 0-d, empty, 1-element, up to 4-d (at most ~64 entries each)."""
    one = st.one_of(
        st.just(()),
        st.just((0,)),
        st.just((1,)),
        hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4),
        hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=24),
    )
    return st.lists(one, min_size=1, max_size=max_tensors)


def _elements(dtype: str, allow_nan: bool) -> st.SearchStrategy[float]:
    huge, small, sub = _HUGE[dtype], _SMALL[dtype], _SUBNORMAL[dtype]
    parts = [
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -2.0, sub, -sub, small, -small, huge, -huge]),
        st.floats(-1e3, 1e3, allow_subnormal=False),
        st.floats(-1e-3, 1e-3, allow_subnormal=False),
        st.floats(-huge, huge, allow_subnormal=True),
    ]
    if allow_nan:
        parts.append(st.just(float("nan")))
    return st.one_of(*parts)


def _array(shape: tuple[int, ...], dtype: str, allow_nan: bool = False) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float64, shape, elements=_elements(dtype, allow_nan)).map(lambda a: round_to(a, dtype))


def tensor_lists(shape_list: Sequence[tuple[int, ...]], dtype: str, allow_nan: bool = False):
    return st.tuples(*(_array(s, dtype, allow_nan) for s in shape_list)).map(list)


_LRS = [f32(x) for x in (1e-4, 1e-3, 1e-2, 0.1, 1.0)]
_B1 = [f32(x) for x in (0.0, 0.5, 0.9, 0.95)]
_B2 = [f32(x) for x in (0.0, 0.9, 0.99, 0.999, 0.9999)]
_EPS = [0.0] + [f32(x) for x in (1e-8, 1e-6, 1e-3)]
_WD = [f32(x) for x in (0.0, 1e-4, 1e-2, 0.1)]


@st.composite
def cautions(draw, denominators: Sequence[str] = ("size",)) -> bool | spec.Caution:
    """``False`` or a :class:`cautious.Caution`; the denominator is drawn only when more than one is offered."""
    if draw(st.integers(0, 4)) == 0:
        return False
    normalize = draw(st.sampled_from(["mean_clamp", "count_plus_one", "exact", "none"]))
    floor = draw(st.sampled_from([1e-3, 0.1, 0.5, 1.0])) if normalize == "mean_clamp" else 1e-3
    denominator = draw(st.sampled_from(list(denominators))) if len(denominators) > 1 else denominators[0]
    return spec.Caution(normalize, floor, denominator)


@st.composite
def hparams(draw, rule: str, denominators: Sequence[str] = ("size",)) -> dict:
    hp: dict = {"lr": draw(st.sampled_from(_LRS)), "caution": draw(cautions(denominators))}
    if rule in ("adam", "adamw"):
        hp["betas"] = (draw(st.sampled_from(_B1)), draw(st.sampled_from(_B2)))
        hp["eps"] = draw(st.sampled_from(_EPS))
        hp["weight_decay"] = draw(st.sampled_from(_WD))
        hp["amsgrad"] = draw(st.booleans())
        hp["maximize"] = draw(st.booleans())
        hp["eps_placement"] = draw(st.sampled_from(["corrected", "uncorrected"]))
        dec = rule == "adamw" or draw(st.booleans())
        if rule == "adam":
            hp["decoupled_weight_decay"] = dec
        hp["cautious_weight_decay"] = dec and draw(st.booleans())
    elif rule == "lion":
        hp["betas"] = (draw(st.sampled_from(_B1)), draw(st.sampled_from([f32(0.9), f32(0.99), 0.0])))
        hp["weight_decay"] = draw(st.sampled_from(_WD))
        hp["maximize"] = draw(st.booleans())
        hp["cautious_weight_decay"] = draw(st.booleans())
    else:
        mom = draw(st.sampled_from([0.0, f32(0.5), f32(0.9)]))
        nesterov = mom > 0 and draw(st.booleans())
        hp["momentum"] = mom
        hp["dampening"] = 0.0 if nesterov else draw(st.sampled_from([0.0, f32(0.1), 0.5]))
        hp["nesterov"] = nesterov
        hp["weight_decay"] = draw(st.sampled_from(_WD))
        hp["maximize"] = draw(st.booleans())
        dec = draw(st.booleans())
        hp["decoupled_weight_decay"] = dec
        hp["cautious_weight_decay"] = dec and draw(st.booleans())
    return hp


@st.composite
def cases(
    draw,
    rules: Sequence[str] = spec.RULES,
    dtypes: Sequence[str] = ("float32", "float64"),
    fixed: Callable[[str], Mapping[str, Any] | None] | None = None,
    denominators: Sequence[str] = ("size",),
) -> Case:
    """A :class:`Case`. ``fixed(rule)`` may pin hyperparameters (an implementation's fixed options);
    ``denominators``: the :class:`cautious.Caution` denominators to draw."""
    rule = draw(st.sampled_from(list(rules)))
    dtype = draw(st.sampled_from(list(dtypes)))
    state_dtype = "float32" if dtype in ("bfloat16", "float16") else None
    hp = draw(hparams(rule, denominators))
    pinned = dict(fixed(rule) or {}) if fixed is not None else {}
    hp.update(pinned)
    if not _decoupled(rule, hp) and "cautious_weight_decay" in hp:
        hp["cautious_weight_decay"] = False
    if hp.get("nesterov") and (not hp.get("momentum") or hp.get("dampening")):
        hp["nesterov"] = False
    hp = {k: v for k, v in hp.items() if v is not None}
    return Case(rule, hp, dtype, state_dtype)


def _decoupled(rule: str, hp: Mapping[str, Any]) -> bool:
    return rule in ("adamw", "lion") or bool(hp.get("decoupled_weight_decay", False))


def _state_leaf(case: Case, p: np.ndarray, g: np.ndarray, pattern: str, draw) -> tuple:
    sd = case.state_storage
    shape = p.shape
    any_arr = lambda: draw(_array(shape, sd))  # noqa: E731
    sign_g = np.sign(np.nan_to_num(g))
    if pattern == "agree":
        m = np.abs(any_arr()) * sign_g
    elif pattern == "disagree":
        m = -np.maximum(np.abs(any_arr()), 1e3) * sign_g
    elif pattern == "single":
        m = -np.maximum(np.abs(any_arr()), 1e3) * sign_g
        if m.size:
            flat = m.reshape(-1)
            flat[draw(st.integers(0, m.size - 1))] = 0.0
    elif pattern == "cancel":
        # m = -g: with beta1 = 0.5 the new momentum is exactly zero (decided: masked) on these entries
        m = np.where(draw(hnp.arrays(bool, shape)), -np.nan_to_num(g), any_arr())
    else:
        m = any_arr()
    m = round_to(m, sd).reshape(shape)
    rule = "adam" if case.rule == "adamw" else case.rule
    if rule == "adam":
        v = round_to(np.abs(any_arr()), sd)
        v_max = round_to(np.maximum(v, np.abs(any_arr())), sd) if case.hparams.get("amsgrad") else None
        return spec.AdamState(m, v, v_max)
    if rule == "lion":
        return spec.LionState(m)
    if float(case.hparams.get("momentum", 0.0)) == 0:
        return spec.SGDState(None)
    return spec.SGDState(m)


@st.composite
def step_inputs(
    draw,
    case: Case,
    max_tensors: int = 3,
    max_steps: int = 3,
    allow_nan: bool = True,
    fresh_only: bool = False,
):
    """``(params, grad_sequence, state)``: a starting point and 1..max_steps gradients.

    The starting state is either the optimizer's fresh state (step 0) or an
    arbitrary injected one (m, v, step), with m's signs drawn against g's to make
    all-agree, all-disagree and single-kept tensors common.
    """
    shape_list = draw(shapes(max_tensors))
    params = draw(tensor_lists(shape_list, case.dtype))
    n_steps = 1 if fresh_only else draw(st.integers(1, max_steps))
    nan = allow_nan and draw(st.integers(0, 3)) == 0
    grad_seq = [draw(tensor_lists(shape_list, case.dtype, allow_nan=nan)) for _ in range(n_steps)]
    fresh = fresh_only or draw(st.booleans())
    if fresh:
        sd = numpy_dtype(case.state_storage)
        opt = _spec_opt(case)
        state = opt.init([np.zeros(s, sd) for s in shape_list])
    else:
        pattern = draw(st.sampled_from(["random", "agree", "disagree", "single", "cancel"]))
        step = draw(st.sampled_from([1, 2, 3, 10, 100, 1000]))
        leaves = tuple(_state_leaf(case, p, g, pattern, draw) for p, g in zip(params, grad_seq[0]))
        state = spec.State(step, leaves)
    return params, grad_seq, state


def _spec_opt(case: Case) -> spec.Optimizer:
    from cautious.conformance.case import spec_optimizer

    return spec_optimizer(case)


@st.composite
def invalid_hparams(draw, rule: str):
    """``(hparams, exception type, message)``: one invalid value in otherwise valid hyperparameters."""
    from cautious.spec.errors import ERROR_TABLE, message

    keys = {
        "adam": ("lr", "beta1", "beta2", "eps", "weight_decay"),
        "lion": ("lr", "beta1", "beta2", "weight_decay"),
        "sgd": ("lr", "momentum", "dampening", "weight_decay"),
    }[("adam" if rule == "adamw" else rule)]
    keys = keys + (("eps_placement",) if rule in ("adam", "adamw") else ())
    key = draw(st.sampled_from(keys))
    check = next(c for c in ERROR_TABLE if c.key == key)
    value = draw(st.sampled_from(check.invalid))
    hp: dict = {}
    if key in ("beta1", "beta2"):
        betas = [0.9, 0.999 if rule != "lion" else 0.99]
        betas[0 if key == "beta1" else 1] = value
        hp["betas"] = tuple(betas)
        name = "betas[0]" if key == "beta1" else "betas[1]"
    else:
        hp[key] = value
        name = key
    return hp, ValueError, message(key, value, name)
