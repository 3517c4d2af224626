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
    "matrix_shapes",
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


def matrix_shapes(max_tensors: int = 3) -> st.SearchStrategy[list[tuple[int, ...]]]:
    """Lists of matrix shapes (Muon orthogonalizes 2-d parameters only): wide, tall and square, 1 to 6 a side."""
    return st.lists(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6), min_size=1, max_size=max_tensors)


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
    elif rule == "nadam":
        hp["betas"] = (draw(st.sampled_from(_B1)), draw(st.sampled_from(_B2)))
        hp["eps"] = draw(st.sampled_from(_EPS))
        hp["weight_decay"] = draw(st.sampled_from(_WD))
        hp["momentum_decay"] = draw(st.sampled_from([f32(4e-3), 1.0, 0.0]))
        hp["momentum_schedule"] = draw(st.sampled_from(["dozat", "constant"]))
        hp["maximize"] = draw(st.booleans())
        dec = draw(st.booleans())
        hp["decoupled_weight_decay"] = dec
        hp["cautious_weight_decay"] = dec and draw(st.booleans())
    elif rule == "rmsprop":
        mom = draw(st.sampled_from([0.0, f32(0.5), f32(0.9)]))
        hp["alpha"] = draw(st.sampled_from([f32(0.5), f32(0.9), f32(0.99)]))
        hp["eps"] = draw(st.sampled_from(_EPS))
        hp["momentum"] = mom
        hp["centered"] = draw(st.booleans())
        hp["nesterov"] = mom > 0 and draw(st.booleans())
        hp["eps_in_sqrt"] = draw(st.booleans())
        hp["weight_decay"] = draw(st.sampled_from(_WD))
        hp["maximize"] = draw(st.booleans())
        dec = draw(st.booleans())
        hp["decoupled_weight_decay"] = dec
        hp["cautious_weight_decay"] = dec and draw(st.booleans())
    elif rule == "adafactor":
        hp.update(_adafactor_hparams(draw))
    elif rule == "adopt":
        hp["betas"] = (draw(st.sampled_from(_B1)), draw(st.sampled_from(_B2)))
        hp["eps"] = draw(st.sampled_from(_EPS))
        hp["clip_exp"] = draw(st.sampled_from([None, 0.25, 0.5, f32(0.333)]))
        hp["weight_decay"] = draw(st.sampled_from(_WD))
        hp["nesterov"] = draw(st.booleans())
        hp["maximize"] = draw(st.booleans())
        dec = draw(st.booleans())
        hp["decoupled_weight_decay"] = dec
        hp["cautious_weight_decay"] = dec and draw(st.booleans())
    elif rule == "laprop":
        hp["betas"] = (draw(st.sampled_from(_B1)), draw(st.sampled_from(_B2)))
        hp["eps"] = draw(st.sampled_from(_EPS + [f32(1e-15)]))
        hp["weight_decay"] = draw(st.sampled_from(_WD))
        hp["decay_order"] = draw(st.sampled_from(["post_update", "pre_update"]))
        hp["maximize"] = draw(st.booleans())
        hp["cautious_weight_decay"] = draw(st.booleans())
    elif rule == "muon":
        hp["momentum"] = draw(st.sampled_from([0.0, f32(0.5), f32(0.9), f32(0.95)]))
        hp["nesterov"] = draw(st.booleans())
        hp["weight_decay"] = draw(st.sampled_from(_WD))
        hp["eps"] = draw(st.sampled_from([f32(1e-7), f32(1e-8)]))
        hp["ns_steps"] = draw(st.sampled_from([0, 1, 2, 5]))
        hp["mask_position"] = draw(st.sampled_from(["after", "before"]))
        hp["cautious_weight_decay"] = draw(st.booleans())
        hp["muon_momentum"] = draw(st.sampled_from(["ema", "debiased", "sum"]))
        hp["ns_eps"] = draw(st.sampled_from(["clamp", "add"]))
        hp["shape_scale"] = draw(st.sampled_from(["rows_over_cols", "cols_over_rows", "rms", "none"]))
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
    if rule == "muon":  # Muon cases: float32/float64 only (docs/conformance.md, "Muon")
        dtypes = [d for d in dtypes if d in ("float32", "float64")] or ["float32"]
    dtype = draw(st.sampled_from(list(dtypes)))
    state_dtype = "float32" if dtype in ("bfloat16", "float16") else None
    hp = draw(hparams(rule, denominators))
    pinned = dict(fixed(rule) or {}) if fixed is not None else {}
    hp.update(pinned)
    if not _decoupled(rule, hp) and "cautious_weight_decay" in hp:
        hp["cautious_weight_decay"] = False
    if hp.get("nesterov") and (not hp.get("momentum") or hp.get("dampening")):
        hp["nesterov"] = False
    if rule == "adafactor":
        _fit_adafactor(hp, draw)
    hp = {k: v for k, v in hp.items() if v is not None or k == "clip_exp"}  # ADOPT's clip_exp=None: no clipping
    return Case(rule, hp, dtype, state_dtype)


def _decoupled(rule: str, hp: Mapping[str, Any]) -> bool:
    return rule in ("adamw", "lion", "adafactor", "laprop") or bool(hp.get("decoupled_weight_decay", False))


#: Adafactor's named options, drawn unless an adapter pins its framework's form (``fixed_hparams``).
_ADAFACTOR_FORMS = {
    "eps_form": ["clamp", "add"],
    "factor_dims": ["last_two", "largest_two"],
    "min_dim_size_to_factor": [0, 2, 3],
    "relative_step": [True, False],
    "multiply_by_parameter_scale": [True, False],
    "weight_decay_form": ["lr", "lr_before_scale", "rate"],
}


def _adafactor_hparams(draw) -> dict:
    hp: dict = {k: draw(st.sampled_from(v)) for k, v in _ADAFACTOR_FORMS.items()}
    hp["beta2_decay"] = draw(st.sampled_from([f32(-0.8), -0.5, -1.0]))
    hp["d"] = draw(st.sampled_from([1.0, 0.5, 2.0, float("inf")]))
    hp["weight_decay"] = draw(st.sampled_from(_WD))
    hp["beta1"] = draw(st.sampled_from([0.0, 0.0, f32(0.5), f32(0.9)]))
    hp["maximize"] = draw(st.booleans())
    hp["eps"] = (None, f32(1e-3))  # eps[0]: drawn to fit eps_form in _fit_adafactor
    return hp


def _fit_adafactor(hp: dict, draw) -> None:
    """``eps[0]`` that fits the (possibly pinned) ``eps_form``: "clamp" takes the dtype epsilon or 1e-3
    (its square must stay a normal number of float32), "add" a positive number (optax's 1e-30)."""
    eps2 = hp["eps"][1]
    if hp.get("eps_form") == "add":
        eps1 = hp["eps"][0] if hp["eps"][0] is not None else draw(st.sampled_from([f32(1e-30), f32(1e-3)]))
    else:
        eps1 = draw(st.sampled_from([None, f32(1e-3)])) if hp["eps"][0] is None else hp["eps"][0]
    hp["eps"] = (eps1, eps2)


def _nadam_mu_product(case: Case, step: int) -> float:
    """``prod_{i <= step} mu_i`` of the case's NAdam schedule, in float64."""
    b1 = float(case.hparams.get("betas", (0.9, 0.999))[0])
    kw = dict(
        beta1=b1,
        momentum_decay=float(case.hparams.get("momentum_decay", 4e-3)),
        momentum_schedule=case.hparams.get("momentum_schedule", "dozat"),
    )
    out = 1.0
    for i in range(1, step + 1):
        out *= spec.nadam_mu(i, **kw)
    return out


def _state_leaf(case: Case, p: np.ndarray, g: np.ndarray, pattern: str, draw, step: int = 1) -> tuple:
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
    if rule == "adafactor":
        return _adafactor_leaf(case, p, m, any_arr)
    if rule == "adam":
        v = round_to(np.abs(any_arr()), sd)
        v_max = round_to(np.maximum(v, np.abs(any_arr())), sd) if case.hparams.get("amsgrad") else None
        return spec.AdamState(m, v, v_max)
    if rule == "lion":
        return spec.LionState(m)
    if rule == "nadam":
        # mu_product: the schedule's product up to the injected step (the value a run would hold)
        mu_product = _nadam_mu_product(case, int(step))
        return spec.NAdamState(m, round_to(np.abs(any_arr()), sd), np.asarray(round_to(mu_product, sd)))
    if rule == "rmsprop":
        v = round_to(np.abs(any_arr()), sd)
        # a mean gradient with |g_avg| <= sqrt(v) (a variance >= 0, as a run keeps it)
        g_avg = round_to(np.clip(m, -0.5 * np.sqrt(v), 0.5 * np.sqrt(v)), sd) if case.hparams.get("centered") else None
        return spec.RMSpropState(v, g_avg, m if float(case.hparams.get("momentum", 0.0)) != 0 else None)
    if rule == "adopt":
        return spec.AdoptState(m, round_to(np.abs(any_arr()), sd))
    if rule == "laprop":
        # lr_avg as a constant learning rate leaves it after `step` steps: lr (1 - b1^step) (float64)
        b1 = float(case.hparams.get("betas", (0.9, 0.999))[0])
        lr_avg = float(case.hparams.get("lr", 4e-4)) * (1.0 - b1**step)
        return spec.LaPropState(m, round_to(np.abs(any_arr()), sd), np.asarray(lr_avg, np.float64))
    if rule == "muon":
        return spec.MuonState(m)
    if float(case.hparams.get("momentum", 0.0)) == 0:
        return spec.SGDState(None)
    return spec.SGDState(m)


def _adafactor_leaf(case: Case, p: np.ndarray, m: np.ndarray, any_arr) -> tuple:
    """An injected Adafactor state: nonnegative statistics of the factored (or full) shape."""
    hp, sd = case.hparams, case.state_storage
    axes = spec.factored_axes(p.shape, hp.get("factor_dims", "last_two"), int(hp.get("min_dim_size_to_factor", 0)))
    eps1 = np.asarray(np.finfo(numpy_dtype(sd)).eps) if hp.get("eps", (None,))[0] is None else None
    mom = m if float(hp.get("beta1", 0.0)) > 0 else None
    if axes is None:
        return spec.AdafactorState(None, None, round_to(np.abs(any_arr()), sd), mom, eps1)
    r, c = axes
    v_row = round_to(np.mean(np.abs(any_arr()), axis=c, keepdims=True), sd)
    v_col = round_to(np.mean(np.abs(any_arr()), axis=r, keepdims=True), sd)
    return spec.AdafactorState(v_row, v_col, None, mom, eps1)


#: Adafactor's largest gradient per storage dtype: torch and Keras form ``R * C``, of order ``g**4``,
#: which must not overflow the compute dtype (the reference, in float64, would not overflow).
_ADAFACTOR_G_MAX = {"float64": 1e30, "float32": 1e6, "bfloat16": 1e6, "float16": 1e2}


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
    shape_list = draw(matrix_shapes(max_tensors) if case.rule == "muon" else shapes(max_tensors))
    params = draw(tensor_lists(shape_list, case.dtype))
    n_steps = 1 if fresh_only else draw(st.integers(1, max_steps))
    # Adafactor: no NaN (frameworks differ on a NaN in the clipping RMS: torch's Python max ignores it,
    # optax and Keras spread it over the tensor; the spec follows torch) and no g**4 overflow
    adafactor = case.rule == "adafactor"
    nan = allow_nan and not adafactor and draw(st.integers(0, 3)) == 0
    grad_seq = [draw(tensor_lists(shape_list, case.dtype, allow_nan=nan)) for _ in range(n_steps)]
    if adafactor:
        cap = _ADAFACTOR_G_MAX[case.dtype]
        grad_seq = [[np.clip(g, -cap, cap) for g in gs] for gs in grad_seq]
    fresh = fresh_only or draw(st.booleans())
    if fresh:
        sd = numpy_dtype(case.state_storage)
        opt = _spec_opt(case)
        state = opt.init([np.zeros(s, sd) for s in shape_list])
    else:
        pattern = draw(st.sampled_from(["random", "agree", "disagree", "single", "cancel"]))
        step = draw(st.sampled_from([1, 2, 3, 10, 100, 1000]))
        leaves = tuple(_state_leaf(case, p, g, pattern, draw, step) for p, g in zip(params, grad_seq[0]))
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
        "nadam": ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay"),
        "rmsprop": ("lr", "alpha", "eps", "weight_decay", "momentum"),
        "adafactor": ("lr", "beta2_decay", "weight_decay", "eps_form"),
        "adopt": ("lr", "beta1", "beta2", "eps", "weight_decay", "clip_exp"),
        "laprop": ("lr", "beta1", "beta2", "eps", "weight_decay", "decay_order"),
        "muon": ("lr", "momentum", "eps", "weight_decay", "ns_steps", "mask_position"),
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
