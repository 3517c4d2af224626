"""Every fused backend against cautious.spec, option by option (float32 and float64 storage)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fused_testlib import BACKENDS, compare, fused_step, robust_inputs

from cautious import Caution

# a multi-chunk tensor (interpreter chunks are 2048), empties in the middle and last, a 0-d tensor
SHAPES = [(3, 5), (0,), (4100,), (), (7,), (0, 3)]
SHAPES_BIG = [(300, 257), (0,), (70_000,), (5,), (0,)]  # native path: >= 65536 entries split across threads

ADAM_CASES = [
    ("adamw", {}),
    ("adamw", dict(caution=Caution("count_plus_one"))),
    ("adamw", dict(caution=Caution("exact"))),
    ("adamw", dict(caution=Caution("none"))),
    ("adamw", dict(caution=Caution("mean_clamp", floor=0.7))),
    ("adamw", dict(caution=False)),
    ("adamw", dict(cautious_weight_decay=True, weight_decay=0.3)),
    ("adamw", dict(amsgrad=True, maximize=True)),
    ("adamw", dict(eps_placement="uncorrected", eps=1e-3)),
    ("adam", dict(weight_decay=0.05)),
    ("adam", dict(weight_decay=0.05, amsgrad=True, eps_placement="uncorrected")),
    ("adam", dict(weight_decay=0.0, betas=(0.0, 0.5))),
    ("adam", dict(decoupled_weight_decay=True, weight_decay=0.1, cautious_weight_decay=True, maximize=True)),
]
LION_CASES = [
    ("lion", {}),
    ("lion", dict(weight_decay=0.1, cautious_weight_decay=True, caution=Caution("exact"))),
    ("lion", dict(maximize=True, betas=(0.5, 0.9), caution=Caution("count_plus_one"))),
    ("lion", dict(caution=False, weight_decay=0.2)),
]
SGD_CASES = [
    ("sgd", {}),
    ("sgd", dict(momentum=0.9)),
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd", dict(momentum=0.8, dampening=0.3, maximize=True, caution=Caution("exact"))),
    ("sgd", dict(momentum=0.9, decoupled_weight_decay=True, weight_decay=0.1, cautious_weight_decay=True)),
    ("sgd", dict(momentum=0.0, weight_decay=0.1, caution=Caution("count_plus_one"))),
    ("sgd", dict(momentum=0.9, caution=False)),
]
ALL = ADAM_CASES + LION_CASES + SGD_CASES


def _ids(cases):
    return [f"{r}-" + ",".join(f"{k}={v}" for k, v in hp.items()) for r, hp in cases]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule,extra", ALL, ids=_ids(ALL))
def test_float32_matches_spec(backend, rule, extra):
    hp = dict(lr=0.05, **extra)
    if rule == "adamw" and "weight_decay" not in hp:
        hp["weight_decay"] = 0.1
    rng = np.random.default_rng(abs(hash((rule, tuple(sorted(map(str, extra.items())))))) % 2**32)
    step = 0 if rule == "sgd" and hp.get("momentum") and "nesterov" in hp else 4
    params, grads, state = robust_inputs(rule, SHAPES, hp, rng, step=step, dtype=np.float32)
    got_p, got_s = fused_step(rule, hp, params, grads, state, backend)
    compare(rule, hp, params, grads, state, got_p, got_s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "rule,extra",
    [ADAM_CASES[0], ADAM_CASES[10], LION_CASES[1], SGD_CASES[3]],
    ids=_ids([ADAM_CASES[0], ADAM_CASES[10], LION_CASES[1], SGD_CASES[3]]),
)
def test_float64_matches_spec(backend, rule, extra):
    hp = dict(lr=0.05, **extra)
    rng = np.random.default_rng(7)
    params, grads, state = robust_inputs(rule, SHAPES, hp, rng, step=2, dtype=np.float64)
    got_p, got_s = fused_step(rule, hp, params, grads, state, backend, pdtype=torch.float64)
    compare(rule, hp, params, grads, state, got_p, got_s, unit=2.0**-53)


@pytest.mark.parametrize("backend", ["cpu", "eager"])
@pytest.mark.parametrize(
    "rule,extra",
    [ADAM_CASES[0], ADAM_CASES[7], LION_CASES[1], SGD_CASES[2]],
    ids=_ids([ADAM_CASES[0], ADAM_CASES[7], LION_CASES[1], SGD_CASES[2]]),
)
def test_large_tensors_threads_match_spec(backend, rule, extra):
    """Tensors big enough for the native path's cooperative (multi-thread, barrier) count."""
    hp = dict(lr=0.01, **extra)
    rng = np.random.default_rng(11)
    params, grads, state = robust_inputs(rule, SHAPES_BIG, hp, rng, step=5, dtype=np.float32)
    got_p, got_s = fused_step(rule, hp, params, grads, state, backend)
    compare(rule, hp, params, grads, state, got_p, got_s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_first_step_sets_buffer_to_g(backend):
    hp = dict(lr=0.1, momentum=0.9, dampening=0.5)
    rng = np.random.default_rng(3)
    params, grads, state = robust_inputs("sgd", SHAPES, hp, rng, step=0, dtype=np.float32)
    got_p, got_s = fused_step("sgd", hp, params, grads, state, backend)
    for g, (b,) in zip(grads, got_s, strict=False):
        np.testing.assert_array_equal(b, g)  # dampening does not apply at the first step
    compare("sgd", hp, params, grads, state, got_p, got_s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_and_noncontiguous(backend):
    hp = dict(lr=0.02, weight_decay=0.1)
    rng = np.random.default_rng(5)
    shapes = [(6, 9), (0,), (33, 4)]
    params, grads, state = robust_inputs("adamw", shapes, hp, rng, step=1, dtype=np.float32)
    got_p, got_s = fused_step("adamw", hp, params, grads, state, backend, lr_tensor=True, noncontiguous=True)
    compare("adamw", hp, params, grads, state, got_p, got_s)
