"""Under jit with a parameter sharded over several devices, the count is the global per-tensor count.

conftest.py asks XLA for 4 CPU devices before JAX starts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cautious.backends.jax._core as core
import cautious.jax as cj
from cautious import Caution

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (XLA_FLAGS set too late)")


@pytest.mark.parametrize("shape", [(8, 16), (256, 256)], ids=["exact-count", "fast-count"])
@pytest.mark.parametrize("spec", [P("x", None), P(None, "x"), P("x")], ids=["rows", "cols", "rows2"])
@pytest.mark.parametrize(
    "make",
    [lambda: cj.adamw(1e-2), lambda: cj.lion(1e-3), lambda: cj.sgd(0.1, momentum=0.9)],
    ids=["adamw", "lion", "sgd"],
)
def test_sharded_equals_unsharded(shape, spec, make):
    assert shape[0] * shape[1] >= core.FAST_COUNT_MIN_SIZE or shape == (8, 16)
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    sharding = NamedSharding(mesh, spec)
    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
    g_np = rng.standard_normal(shape).astype(np.float32)
    g_np[: shape[0] // 4] = np.abs(g_np[: shape[0] // 4])  # uneven kept fractions across shards
    opt = make()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, g):
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    def run(place):
        params = jax.tree.map(place, p)
        state = opt.init(params)
        for i in range(3):
            g = {"w": place(jnp.asarray(g_np * (1.0 if i % 2 == 0 else -0.5) + i, jnp.float32))}
            params, state = step(params, state, g)
        return params

    unsharded = run(lambda x: jnp.array(x, copy=True))  # copies: the step donates its inputs
    sharded = run(lambda x: jax.device_put(jnp.array(x, copy=True), sharding))
    assert len(sharded["w"].sharding.device_set) == 4
    np.testing.assert_allclose(np.asarray(sharded["w"]), np.asarray(unsharded["w"]), rtol=1e-6, atol=1e-7)


def test_sharded_count_is_global():
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    sharding = NamedSharding(mesh, P("x", None))
    u = np.ones((256, 256), np.float32)
    g = -np.ones((256, 256), np.float32)
    g[:10] = 1.0  # all kept entries live on the first shard
    out = jax.jit(lambda a, b: core.apply_caution(a, b, Caution("exact")))(
        jax.device_put(jnp.asarray(u), sharding), jax.device_put(jnp.asarray(g), sharding)
    )
    np.testing.assert_allclose(np.asarray(out)[:10], 256 * 256 / (10 * 256))
    np.testing.assert_array_equal(np.asarray(out)[10:], 0.0)
