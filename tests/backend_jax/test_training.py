"""A small pure-JAX MLP trains with every alias, cautious or not."""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

import cautious.jax as cj


def _data():
    x = jax.random.normal(jax.random.key(0), (256, 8), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (8, 1), jnp.float32)
    y = jnp.tanh(x @ w) + 0.1 * jnp.sin(3 * x[:, :1])
    return x, y


def _init():
    k1, k2 = jax.random.split(jax.random.key(2))
    return {
        "w1": jax.random.normal(k1, (8, 32), jnp.float32) / jnp.sqrt(8.0),
        "b1": jnp.zeros(32, jnp.float32),
        "w2": jax.random.normal(k2, (32, 1), jnp.float32) / jnp.sqrt(32.0),
        "b2": jnp.zeros(1, jnp.float32),
    }


def _loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


OPTS = {
    "adamw": lambda c: cj.adamw(1e-2, caution=c),
    "adam": lambda c: cj.adam(1e-2, caution=c),
    "adam-uncorrected-amsgrad": lambda c: cj.adam(1e-2, caution=c, eps_placement="uncorrected", amsgrad=True),
    "adamw-cwd": lambda c: cj.adamw(1e-2, weight_decay=0.1, caution=c, cautious_weight_decay=True),
    "lion": lambda c: cj.lion(1e-3, caution=c),
    "sgd": lambda c: cj.sgd(0.1, caution=c),
    "sgd-momentum": lambda c: cj.sgd(0.05, momentum=0.9, caution=c),
    "sgd-nesterov": lambda c: cj.sgd(0.05, momentum=0.9, nesterov=True, caution=c),
}


@pytest.mark.parametrize("caution", [True, False], ids=["cautious", "plain"])
@pytest.mark.parametrize("name", list(OPTS))
def test_mlp_loss_decreases(name, caution):
    x, y = _data()
    opt = OPTS[name](caution)
    params = _init()
    state = opt.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state):
        loss, g = jax.value_and_grad(_loss)(params, x, y)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    first = float(_loss(params, x, y))
    for _ in range(150):
        params, state, _ = step(params, state)
    last = float(_loss(params, x, y))
    assert last < 0.5 * first, (first, last)
