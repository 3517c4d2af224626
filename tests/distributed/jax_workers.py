"""The JAX processes of test_jax_multiprocess.py: ``python jax_workers.py --world N --out FILE``.

Starts ``N`` processes (``jax.distributed`` on CPU, coordinator on 127.0.0.1, gloo collectives),
each with 2 local CPU devices, so one mesh spans ``2 N`` devices on ``N`` processes. Every
process runs every scenario; process 0 appends one JSON record per scenario to ``FILE``.

* ``steps-rule``: 5 jitted steps of the cautious optax optimizer, with every normalization, on
  a tree of parameters sharded over the whole mesh by rows, by columns, or replicated, small
  (exact integer count) and large (the fast floating-point count), vs the same steps on
  unsharded arrays.
* ``count-placement``: ``apply_caution`` under jit where every kept entry lies on process 0's
  first device: the scale must be the global ``n / k``, not a shard's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios as S  # noqa: E402

LOCAL_DEVICES = 2
STEPS = 5
RULES = ("adam", "adamw", "lion", "sgd")
HPARAMS = {
    "adam": dict(learning_rate=1e-2, weight_decay=1e-2),
    "adamw": dict(learning_rate=1e-2, weight_decay=0.1, cautious_weight_decay=True),
    "lion": dict(learning_rate=1e-3, weight_decay=0.1),
    "sgd": dict(learning_rate=0.05, momentum=0.9, nesterov=True),
}
SHAPES = {"small": (8, 12), "large": (256, 256)}  # large >= the fast-count threshold (2**15 entries)
PLACEMENTS = ("rows", "cols", "replicated")


def ids() -> list[str]:
    return [f"steps-{r}" for r in RULES] + [f"count-{p}" for p in ("rows", "cols")]


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=world, process_id=rank)
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import cautious.jax as cj
    from cautious import Caution

    assert jax.process_count() == world and jax.device_count() == world * LOCAL_DEVICES
    mesh = Mesh(np.array(jax.devices()), ("x",))
    specs = {"rows": P("x", None), "cols": P(None, "x"), "replicated": P()}

    def shard(x: np.ndarray, placement: str, stacked: bool = False) -> jax.Array:
        """``x`` sharded over the mesh (``stacked``: a leading axis of steps stays whole)."""
        sharding = NamedSharding(mesh, P(None, *specs[placement]) if stacked else specs[placement])
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def gathered(tree):
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

    def trajectory(rule: str) -> dict:
        """Every normalization of ``rule`` in one jitted step (one compilation per rule and layout)."""
        rng = np.random.default_rng(0)
        names = [f"{p}_{s}" for p in PLACEMENTS for s in SHAPES]
        init = {n: rng.standard_normal(SHAPES[n.split("_")[1]]).astype(np.float32) for n in names}
        grads = []
        for i in range(STEPS):
            g = {n: rng.standard_normal(x.shape).astype(np.float32) for n, x in init.items()}
            for x in g.values():
                x[: x.shape[0] // 4] = np.abs(x[: x.shape[0] // 4]) * (-1) ** i  # kept fractions differ by shard
            grads.append(g)
        opts = {n: getattr(cj, rule)(**HPARAMS[rule], caution=Caution(n)) for n in S.NORMALIZATIONS}

        def run(place):
            """All steps in one jitted scan (one compilation), from ``opt.init``."""

            @jax.jit
            def train(tree, gs):
                def step(carry, g):
                    params, states = carry
                    for n, opt in opts.items():
                        u, states[n] = opt.update(g, states[n], params[n])
                        params[n] = optax.apply_updates(params[n], u)
                    return (params, states), None

                carry = ({n: tree for n in opts}, {n: opt.init(tree) for n, opt in opts.items()})
                return jax.lax.scan(step, carry, gs)[0][0]

            tree = {n: place(x, n.split("_")[0]) for n, x in init.items()}
            stacked = {n: place(np.stack([g[n] for g in grads]), n.split("_")[0], stacked=True) for n in names}
            return train(tree, stacked)

        sharded = run(shard)
        leaves = jax.tree.leaves(sharded)
        assert all(len(x.sharding.device_set) == jax.device_count() for x in leaves)
        assert not sharded["exact"]["rows_small"].is_fully_addressable  # really spread over processes
        got = gathered(sharded)
        want = jax.tree.map(np.asarray, run(lambda x, *_, **__: jax.numpy.asarray(x)))
        diff = {}
        for norm in opts:
            for n in names:
                np.testing.assert_allclose(got[norm][n], want[norm][n], rtol=1e-6, atol=1e-7, err_msg=f"{norm} {n}")
            diff[norm] = max(float(np.max(np.abs(got[norm][n] - want[norm][n]))) for n in names)
        return {"max_diff": diff}

    def global_count(placement: str) -> dict:
        shape = SHAPES["large"]
        u = np.ones(shape, np.float32)
        g = -np.ones(shape, np.float32)
        sel = (slice(0, 10), slice(None)) if placement == "rows" else (slice(None), slice(0, 10))
        g[sel] = 1.0  # every kept entry on the first device (of process 0)
        out = jax.jit(lambda a, b: cj.apply_caution(a, b, Caution("exact")))(shard(u, placement), shard(g, placement))
        out = gathered(out)
        n, k = u.size, 10 * shape[0]
        np.testing.assert_allclose(out[sel], n / k, rtol=1e-6)
        assert np.count_nonzero(out) == k
        per_shard = (n / (world * LOCAL_DEVICES)) / k  # what the first device's own count would give
        assert abs(per_shard - n / k) > 1e-3 * (n / k)
        return {"scale": float(out[sel].flat[0]), "global_scale": n / k}

    for sid in ids():
        try:
            kind, arg = sid.split("-")
            start = time.perf_counter()
            res = global_count(arg) if kind == "count" else trajectory(arg)
            res["seconds"] = round(time.perf_counter() - start, 2)
            rec = {"id": sid, "ok": True, **res}
        except Exception as e:
            rec = {"id": sid, "ok": False, "error": f"process {rank}: {type(e).__name__}: {e}"[:1500]}
            rec["traceback"] = traceback.format_exc()[-3000:]
        if rank == 0:
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    jax.distributed.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args()
    if args.rank is not None:
        rank_main(args.rank, args.world, args.port, args.out)
        return
    Path(args.out).unlink(missing_ok=True)
    (port,) = S.free_ports(1)
    cmd = [sys.executable, __file__, "--world", str(args.world), "--out", args.out, "--port", str(port)]
    procs = [subprocess.Popen([*cmd, "--rank", str(r)]) for r in range(args.world)]
    codes = [p.wait() for p in procs]
    sys.exit(max(codes, key=abs))


if __name__ == "__main__":
    main()
