"""Properties that pin the cautious algebra, for every base rule (Hypothesis)."""

import dataclasses

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

import cautious
from cautious import spec
from cautious.conformance import Case, spec_optimizer
from cautious.conformance.strategies import cases, step_inputs


def _with(case: Case, **hp) -> Case:
    return dataclasses.replace(case, hparams={**case.hparams, **hp})


def _step(case, params, grads, state):
    return spec_optimizer(case).step(params, grads, state)


#: The entrywise rules. Muon's Newton-Schulz and Adafactor's factored statistics mix entries (no permutation
#: equivariance; a fresh Muon direction need not have the sign of g): their properties are in test_muon.py
#: and test_adafactor.py.
ENTRYWISE = tuple(r for r in spec.RULES if r not in ("muon", "adafactor"))


def _f64_case(rules=ENTRYWISE):
    return cases(rules, dtypes=("float64",))


def _base_direction(case, g, s, t):
    """The base rule's direction for one tensor, straight from the rule functions."""
    with np.errstate(all="ignore"):
        return _direction(case, g, s, t)


def _direction(case, g, s, t):
    hp = case.hparams
    if case.rule in ("adam", "adamw"):
        b1, b2 = hp["betas"]
        return spec.adam_direction(
            g,
            s,
            t,
            beta1=b1,
            beta2=b2,
            eps=hp["eps"],
            amsgrad=hp["amsgrad"],
            eps_placement=hp["eps_placement"],
        )
    if case.rule == "lion":
        b1, b2 = hp["betas"]
        return spec.lion_direction(g, s, t, beta1=b1, beta2=b2)
    if case.rule == "adopt":
        b1, b2 = hp["betas"]
        clip_exp = hp.get("clip_exp", 0.333)
        return spec.adopt_direction(
            g, s, t, beta1=b1, beta2=b2, eps=hp["eps"], clip_exp=clip_exp, nesterov=hp["nesterov"]
        )
    if case.rule == "nadam":
        b1, b2 = hp["betas"]
        return spec.nadam_direction(
            g,
            s,
            t,
            beta1=b1,
            beta2=b2,
            eps=hp["eps"],
            momentum_decay=hp["momentum_decay"],
            momentum_schedule=hp["momentum_schedule"],
        )
    if case.rule == "rmsprop":
        return spec.rmsprop_direction(
            g,
            s,
            t,
            alpha=hp["alpha"],
            eps=hp["eps"],
            momentum=hp["momentum"],
            centered=hp["centered"],
            nesterov=hp["nesterov"],
            eps_in_sqrt=hp["eps_in_sqrt"],
        )
    if case.rule == "laprop":  # update form: the direction is -delta / lr
        b1, b2 = hp["betas"]
        delta, s_new = spec.laprop_update(g, s, t, lr=hp["lr"], beta1=b1, beta2=b2, eps=hp["eps"])
        return -delta / hp["lr"], s_new
    return spec.sgd_direction(g, s, t, momentum=hp["momentum"], dampening=hp["dampening"], nesterov=hp["nesterov"])


@given(st.data())
def test_caution_never_changes_state(data):
    case = data.draw(_f64_case())
    params, grad_seq, state = data.draw(step_inputs(case, max_steps=1))
    _, s_on = _step(_with(case, caution=cautious.Caution()), params, grad_seq[0], state)
    _, s_off = _step(_with(case, caution=False), params, grad_seq[0], state)
    for a, b in zip(s_on.leaves, s_off.leaves):
        for x, y in zip(a, b):
            assert (x is None and y is None) or np.array_equal(x, y, equal_nan=True)


@given(st.data())
def test_masked_entries_do_not_move_and_kept_keep_sign(data):
    case = data.draw(_f64_case())
    normalize = data.draw(st.sampled_from(["mean_clamp", "count_plus_one", "exact", "none"]))
    case = _with(
        case,
        weight_decay=0.0,
        cautious_weight_decay=False,
        maximize=False,
        caution=cautious.Caution(normalize),
    )
    params, grad_seq, state = data.draw(step_inputs(case, max_steps=1, allow_nan=False))
    new, _ = _step(case, params, grad_seq[0], state)
    lr = case.hparams["lr"]
    for p, g, s, pn in zip(params, grad_seq[0], state.leaves, new):
        u, _ = _base_direction(case, np.asarray(g, np.float64), s, state.step + 1)
        mask = spec.cautious_mask(u, g)
        assert np.array_equal(pn[~mask], p[~mask])  # exactly zero movement
        step = (p.astype(np.float64) - pn.astype(np.float64)) / lr
        kept = mask & (step != 0) & ~np.isnan(u)  # a NaN direction (eps = 0, 0/0) has no sign
        assert np.all(np.sign(step[kept]) == np.sign(u[kept]))


@given(st.data())
def test_apply_caution_scale_and_inner_product(data):
    n = data.draw(st.integers(0, 40))
    elems = st.one_of(st.sampled_from([0.0, -0.0]), st.floats(-1e6, 1e6, allow_nan=False))
    u = np.array(data.draw(st.lists(elems, min_size=n, max_size=n)), dtype=np.float64)
    g = np.array(data.draw(st.lists(elems, min_size=n, max_size=n)), dtype=np.float64)
    normalize = data.draw(st.sampled_from(["mean_clamp", "count_plus_one", "exact", "none"]))
    floor = data.draw(st.sampled_from([1e-3, 0.25, 1.0]))
    floor = floor if normalize == "mean_clamp" else 1e-3
    c = cautious.Caution(normalize, floor)
    u_c, mask, count, scale = spec.apply_caution(u, g, c)
    k = int(np.sum((u * g) > 0))  # the product is exact enough in float64 for these magnitudes
    assume(np.all((np.abs(u * g) > 0) | (u == 0) | (g == 0)))
    assert count == k
    expected = {
        "mean_clamp": (1.0 / max(k / n, floor)) if n else 1.0,
        "count_plus_one": n / (k + 1) if n else 1.0,
        "exact": n / max(k, 1) if n else 1.0,
        "none": 1.0,
    }[normalize]
    assert scale == expected
    assert np.array_equal(u_c[mask], u[mask] * scale)
    assert np.all(u_c[~mask] == 0)
    assert float(np.dot(u_c, g)) >= 0


@given(st.data())
def test_all_agree_exact_and_mean_clamp_equal_base(data):
    case = data.draw(_f64_case(tuple(r for r in ENTRYWISE if r != "adopt")))  # ADOPT's first u is 0
    # no coupled decay and no maximize, so the gradient the rule consumes is the drawn one.
    case = _with(case, maximize=False, **({} if _decoupled(case) else {"weight_decay": 0.0}))
    params, grad_seq, _ = data.draw(step_inputs(case, max_steps=1, allow_nan=False))
    # From a fresh state every rule's first direction has the sign of g: with no zero in g,
    # every entry agrees (checked below, so the premise cannot silently fail).
    grads = [np.where(g == 0, 1.0, g).astype(g.dtype) for g in grad_seq[0]]
    state = spec_optimizer(case).init(params)
    for g, s in zip(grads, state.leaves):
        u, _ = _base_direction(case, np.asarray(g, np.float64), s, 1)
        assert np.all(spec.cautious_mask(u, g))
    off, _ = _step(_with(case, caution=False), params, grads, state)
    for norm in ("exact", "mean_clamp"):
        on, _ = _step(_with(case, caution=cautious.Caution(norm)), params, grads, state)
        for a, b in zip(on, off):
            assert np.array_equal(a, b)


def _decoupled(case):
    return case.rule in ("adamw", "lion", "laprop") or case.hparams.get("decoupled_weight_decay", False)


@given(st.data())
def test_permutation_equivariance(data):
    case = data.draw(_f64_case())
    params, grad_seq, state = data.draw(step_inputs(case, max_steps=1, max_tensors=1))
    p, g, s = params[0], grad_seq[0][0], state.leaves[0]
    assume(p.size > 1)
    perm = np.array(data.draw(st.permutations(range(p.size))))
    # per-tensor scalar state (LaProp's lr_avg) is not permuted
    flat = lambda x: None if x is None else x if np.size(x) != p.size else x.reshape(-1)[perm].reshape(x.shape)  # noqa: E731
    new, ns = _step(case, [p], [g], state)
    newp, nsp = _step(case, [flat(p)], [flat(g)], spec.State(state.step, (type(s)(*(flat(x) for x in s)),)))
    assert np.array_equal(flat(new[0]), newp[0], equal_nan=True)
    for x, y in zip(ns.leaves[0], nsp.leaves[0]):
        assert (x is None and y is None) or np.array_equal(flat(x), y, equal_nan=True)


@given(st.data())
def test_inputs_are_not_modified(data):
    case = data.draw(cases())
    params, grad_seq, state = data.draw(step_inputs(case, max_steps=1))
    before = [x.copy() for x in params] + [x.copy() for x in grad_seq[0]]
    _step(case, params, grad_seq[0], state)
    after = list(params) + list(grad_seq[0])
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after))


def test_nan_is_kept_and_reaches_parameters():
    p = [np.ones(3)]
    g = [np.array([np.nan, 1.0, -1.0])]
    for rule in ("adamw", "lion", "sgd"):
        opt = getattr(spec, rule)(lr=0.1)
        new, _ = opt.step(p, g, opt.init(p))
        assert np.isnan(new[0][0]) and np.all(np.isfinite(new[0][1:]))


def test_signed_zero_gradients_masked_alike():
    opt = spec.adamw(lr=0.1, weight_decay=0.0)
    st0 = spec.State(5, (spec.AdamState(np.array([1.0, -1.0, 1.0, -1.0]), np.ones(4)),))
    new, _ = opt.step([np.zeros(4)], [np.array([0.0, 0.0, -0.0, -0.0])], st0)
    assert np.all(new[0] == 0)


def test_empty_and_zero_dim_tensors():
    for rule in ENTRYWISE:  # Muon takes matrices only (test_muon.py)
        opt = getattr(spec, rule)(lr=0.1, **({"momentum": 0.9} if rule == "sgd" else {}))
        params = [
            np.zeros((0, 3), np.float32),
            np.float32(2.0) * np.ones((), np.float32),
            np.zeros(0, np.float32),
        ]
        grads = [np.zeros((0, 3), np.float32), np.ones((), np.float32), np.zeros(0, np.float32)]
        new, st1 = opt.step(params, grads, opt.init(params))
        if rule == "adopt":  # its first step only sets v: take a second one
            new, st1 = opt.step(params, grads, st1)
        assert new[0].shape == (0, 3) and new[2].shape == (0,)
        assert new[1].shape == () and new[1] < 2.0 and new[1].dtype == np.float32
        assert st1.step == (2 if rule == "adopt" else 1)


def test_product_underflow_does_not_mask():
    # In float16 the product 1e-4 * 1e-4 underflows to 0; the sign rule keeps it.
    u = np.array([1e-4], np.float16)
    g = np.array([1e-4], np.float16)
    assert (u * g)[0] == 0
    assert spec.cautious_mask(u, g).tolist() == [True]
