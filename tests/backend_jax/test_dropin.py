"""Drop-in fidelity with optax (issue 12): whole optimizers, state pytrees, update dtypes, validation."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cautious.jax as cj
from cautious import Caution, spec
from cautious.spec.errors import ERROR_TABLE, message, type_message


def _tree(seed, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "w": jax.random.normal(k[0], (6, 5), dtype),
        "b": jax.random.normal(k[1], (5,), dtype),
        "s": jax.random.normal(k[2], (), dtype),
    }


# -- whole optimizers: the whole-update form ---------------------------------------------------------

WHOLE = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "sgd": lambda: optax.sgd(1e-1, momentum=0.9),
    "sgd-nesterov": lambda: optax.sgd(1e-1, momentum=0.9, nesterov=True),
    "lion": lambda: optax.lion(1e-3, weight_decay=0.1),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2), optax.add_decayed_weights(1e-3)),
    "schedule": lambda: optax.adamw(optax.linear_schedule(0.0, 1e-2, 3), weight_decay=0.1),
}


@pytest.mark.parametrize("caution", [Caution(), Caution("count_plus_one"), Caution("exact")], ids=repr)
@pytest.mark.parametrize("name", list(WHOLE))
def test_whole_optimizer_update_is_the_spec_whole_update_form(name, caution):
    inner = WHOLE[name]()
    wrapped = cj.cautious(inner, caution, form="update")
    params = _tree(0)
    s_in = inner.init(params)
    s_w = wrapped.init(params)
    moved = 0
    for i in range(4):
        g = _tree(100 + i)
        o, s_in = jax.jit(inner.update)(g, s_in, params)
        o_c, s_w = jax.jit(wrapped.update)(g, s_w, params)
        # state: caution never changes it
        for a, b in zip(jax.tree.leaves(s_in), jax.tree.leaves(s_w)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for key in params:
            want, _, count, _ = spec.whole_update(np.asarray(o[key], np.float64), np.asarray(g[key]), caution)
            np.testing.assert_allclose(np.asarray(o_c[key], np.float64), want, rtol=1e-6, atol=0)
            moved += count
        params = optax.apply_updates(params, o_c)
    assert moved > 0  # never frozen: the bug masked every entry


@pytest.mark.parametrize("name", list(WHOLE))
def test_whole_optimizer_trains(name):
    """A least-squares fit goes down with caution on the whole update (before the fix every update was 0)."""
    x = jax.random.normal(jax.random.key(1), (32, 5))
    y = x @ jnp.arange(5.0)
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)  # noqa: E731
    opt = cj.cautious(WHOLE[name](), form="update")
    params = {"w": jnp.zeros(5), "b": jnp.zeros(())}
    state = opt.init(params)
    first = float(loss(params))
    for _ in range(30):
        u, state = opt.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, u)
    assert float(loss(params)) < first


def test_whole_update_without_decay_equals_the_direction_form():
    params = _tree(0)
    a, b = (
        cj.cautious(optax.adam(1e-2), form="update"),
        optax.chain(cj.cautious(optax.scale_by_adam(), form="direction"), optax.scale_by_learning_rate(1e-2)),
    )
    sa, sb = a.init(params), b.init(params)
    for i in range(3):
        g = _tree(100 + i)
        ua, sa = a.update(g, sa, params)
        ub, sb = b.update(g, sb, params)
        for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def test_form_is_required_and_validated():
    with pytest.raises(TypeError, match=r"form='update' \(inner is a whole optimizer, such as optax.adamw"):
        cj.cautious(optax.adamw(1e-3))
    with pytest.raises(ValueError, match=r"^form must be one of 'direction', 'update', got 'optimizer'$"):
        cj.cautious(optax.adamw(1e-3), form="optimizer")


# -- the state is optax's pytree ---------------------------------------------------------------------

STATE_PAIRS = {
    "adamw": (lambda **k: optax.adamw(1e-2, **k), lambda **k: cj.adamw(1e-2, **k)),
    "adamw-mask": (
        lambda **k: optax.adamw(1e-2, mask=lambda p: {"w": True, "b": False, "s": False}, **k),
        lambda **k: cj.adamw(1e-2, mask=lambda p: {"w": True, "b": False, "s": False}, **k),
    ),
    "adamw-schedules": (
        lambda **k: optax.adamw(optax.cosine_decay_schedule(1e-2, 10), weight_decay=lambda c: 1e-3, **k),
        lambda **k: cj.adamw(optax.cosine_decay_schedule(1e-2, 10), weight_decay=lambda c: 1e-3, **k),
    ),
    "adam": (lambda **k: optax.adam(1e-2, **k), lambda **k: cj.adam(1e-2, **k)),
    "lion": (lambda **k: optax.lion(1e-3, **k), lambda **k: cj.lion(1e-3, **k)),
    "sgd": (lambda **k: optax.sgd(1e-1, **k), lambda **k: cj.sgd(1e-1, **k)),
    "sgd-momentum": (lambda **k: optax.sgd(1e-1, 0.9, **k), lambda **k: cj.sgd(1e-1, 0.9, **k)),
    "inject": (
        lambda **k: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, **k),
        lambda **k: optax.inject_hyperparams(cj.adamw)(learning_rate=1e-2, **k),
    ),
}


def _steps(opt, state, params, seeds):
    for i in seeds:
        u, state = opt.update(_tree(100 + i), state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("caution", [True, False])
@pytest.mark.parametrize("name", list(STATE_PAIRS))
def test_state_pytree_is_optax_and_restores_both_ways(name, caution):
    make_native, make_ours = STATE_PAIRS[name]
    native, ours = make_native(), make_ours(caution=caution)
    params = _tree(0)
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(native.init(params))

    # optax -> cautious: train natively, save, restore into ours, continue; and the reverse.
    _, s_native = _steps(native, native.init(params), params, range(3))
    blob = flax.serialization.to_bytes(s_native)
    restored = flax.serialization.from_bytes(ours.init(params), blob)
    assert jax.tree.structure(restored) == jax.tree.structure(s_native)
    _, s_ours = _steps(ours, ours.init(params), params, range(3))
    back = flax.serialization.from_bytes(native.init(params), flax.serialization.to_bytes(s_ours))
    assert jax.tree.structure(back) == jax.tree.structure(s_ours)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(s_ours)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if not caution:
        # the restored state keeps its meaning: the next step is optax's next step
        p1, _ = _steps(ours, restored, params, [3])
        p2, _ = _steps(native, s_native, params, [3])
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7)


def test_wrapper_state_is_the_inner_state():
    params = _tree(0)
    for form, inner in (("update", optax.adamw(1e-3)), ("direction", optax.scale_by_adam())):
        assert jax.tree.structure(cj.cautious(inner, form=form).init(params)) == jax.tree.structure(inner.init(params))


# -- update dtypes -------------------------------------------------------------------------------------

LOW = [jnp.bfloat16, jnp.float16]
MAKERS = {
    "adamw": lambda: cj.adamw(1e-2, weight_decay=0.1),
    "adam": lambda: cj.adam(1e-2),
    "lion": lambda: cj.lion(1e-3),
    "sgd": lambda: cj.sgd(1e-1, 0.9),
    "sgd-plain": lambda: cj.sgd(1e-1),
    "direction": lambda: optax.chain(cj.cautious(optax.scale_by_adam(), form="direction"), optax.scale(-1e-2)),
    "update": lambda: cj.cautious(optax.adamw(1e-2), form="update"),
}


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", list(MAKERS))
def test_updates_have_the_parameter_dtype(name, dtype):
    opt = MAKERS[name]()
    params = _tree(0, dtype)
    state = opt.init(params)
    for i in range(2):
        u, state = jax.jit(opt.update)(_tree(100 + i, dtype), state, params)
        for key in params:
            assert u[key].dtype == params[key].dtype, (key, u[key].dtype)
        params = optax.apply_updates(params, u)
        assert all(params[k].dtype == jnp.dtype(dtype) for k in params)


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: jnp.dtype(d).name)
def test_low_precision_update_is_the_float32_update_rounded_once(dtype):
    """The bfloat16 update is the float32-computed update rounded once (not a low-precision computation)."""
    opt = cj.adamw(1e-2, weight_decay=0.1)
    p_low = _tree(0, dtype)
    p_wide = jax.tree.map(lambda x: x.astype(jnp.float32), p_low)  # same values, float32 carrier
    g = _tree(100, dtype)
    state = opt.init(p_low)
    u_low, _ = opt.update(g, state, p_low)
    u_wide, _ = opt.update(g, state, p_wide)
    for key in p_low:
        assert u_wide[key].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(u_low[key]), np.asarray(u_wide[key].astype(dtype)))


@pytest.mark.parametrize("dtype", ["int32", "int8", "uint8", "bool"])
@pytest.mark.parametrize("name", ["adamw", "adam", "lion", "sgd"])
def test_integer_parameters_are_refused(name, dtype):
    opt = getattr(cj, name)(1e-2)
    params = {"w": jnp.zeros(3), "n": jnp.array([5, -3, 7]).astype(dtype)}
    want = f"parameter ['n'] must have a floating-point dtype (float64, float32, bfloat16 or float16), got {dtype}"
    with pytest.raises(ValueError) as info:
        opt.init(params)
    assert str(info.value) == want


# -- validation: the spec's table, drawn -----------------------------------------------------------------

NAMES = {"lr": "learning_rate", "beta1": "b1", "beta2": "b2", "alpha": "decay"}
ARGS = {
    "adamw": ("lr", "beta1", "beta2", "eps", "weight_decay", "eps_placement"),
    "lion": ("lr", "beta1", "beta2", "weight_decay"),
    "sgd": ("lr", "momentum", "weight_decay"),
    "nadamw": ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay", "momentum_schedule"),
    "rmsprop": ("lr", "alpha", "eps", "initial_scale", "weight_decay"),
}
JAX_FLAGS = {
    "adamw": ("amsgrad", "maximize", "nesterov", "cautious_weight_decay"),
    "lion": ("maximize", "cautious_weight_decay"),
    "sgd": ("nesterov", "maximize", "decoupled_weight_decay", "cautious_weight_decay"),
    "nadamw": ("maximize", "nesterov", "cautious_weight_decay"),
    "rmsprop": ("eps_in_sqrt", "centered", "maximize"),
}
_BY_KEY = {c.key: c for c in ERROR_TABLE}


def _kwargs(key, value):
    return {NAMES.get(key, key): value}


@st.composite
def _invalid(draw):
    rule = draw(st.sampled_from(sorted(ARGS)))
    if draw(st.booleans()):
        key = draw(st.sampled_from(ARGS[rule]))
        check = _BY_KEY[key]
        wrong = st.none() if key != "momentum" else st.just("fast")  # momentum=None: optax's "no momentum"
        value = draw(st.one_of(st.sampled_from(check.invalid), wrong, st.just("fast") if not check.choices else wrong))
    else:
        key = draw(st.sampled_from(JAX_FLAGS[rule]))
        value = draw(st.one_of(st.none(), st.integers(-2, 2), st.text(max_size=2)))
    return rule, key, value


@settings(max_examples=60)
@given(_invalid())
def test_drawn_invalid_values_raise_the_table_message(drawn):
    rule, key, value = drawn
    kw = {"learning_rate": 1e-3} if key != "lr" else {}
    if key == "momentum" or rule == "sgd" and key == "nesterov":
        kw["momentum"] = 0.9 if key != "momentum" else value
    kw.update(_kwargs(key, value))
    name = NAMES.get(key, key)
    with pytest.raises((TypeError, ValueError)) as info:
        getattr(cj, rule)(**kw)
    wrong_type = value is None or isinstance(value, str) != bool(key in _BY_KEY and _BY_KEY[key].choices)
    if key not in _BY_KEY or wrong_type:
        assert info.type is TypeError
        assert str(info.value) == type_message(key, value, name)
    else:
        assert info.type is ValueError
        assert str(info.value) == message(key, value, name)


def test_none_and_caution_none_are_errors():
    with pytest.raises(TypeError, match=r"^learning_rate must be a real number \(a finite number >= 0\), got None$"):
        cj.adamw(None)
    with pytest.raises(TypeError, match=r"^caution must be a bool or a cautious.Caution, got None$"):
        cj.adamw(1e-3, caution=None)
    with pytest.raises(TypeError, match=r"^eps_placement must be a str"):
        cj.adamw(1e-3, eps_placement=None)
    cj.sgd(1e-3, momentum=None)  # optax's own spelling of "no momentum" stays valid
