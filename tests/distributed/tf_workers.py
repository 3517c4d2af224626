"""The TensorFlow processes of test_tf_multiworker.py: ``python tf_workers.py --world N --out FILE``.

Starts ``N`` workers of a ``tf.distribute.MultiWorkerMirroredStrategy`` cluster on localhost
(``TF_CONFIG`` per process, one replica each). Each worker trains a small Keras model with a
custom loop (``strategy.run``: each replica takes its slice of every batch; the cautious
optimizer all-reduces the gradients), then trains the same model in one process on whole
batches. Worker 0 appends one JSON record per scenario to ``FILE``.

Keras ``Model.fit`` under this strategy fails here before any optimizer runs, with Keras's own
optimizers too ("Attempt to convert a value (PerReplica...) with an unsupported type": Keras
3.15, TensorFlow 2.21), so the custom loop is what is tested.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios as S  # noqa: E402

STEPS = 8
BATCH = 32
HPARAMS = {
    "Adam": dict(learning_rate=0.02, weight_decay=1e-2),
    "AdamW": dict(learning_rate=0.02, weight_decay=0.1, cautious_weight_decay=True),
    "Lion": dict(learning_rate=2e-3, weight_decay=0.1),
    "SGD": dict(learning_rate=0.05, momentum=0.9, nesterov=True),
}


def ids() -> list[str]:
    """AdamW with every normalization, the other rules with the default one."""
    return [f"AdamW-{n}" for n in S.NORMALIZATIONS] + [f"{r}-mean_clamp" for r in ("Adam", "Lion", "SGD")]


def worker_main(index: int, ports: list[int], out: str) -> None:
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": [f"localhost:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
    )
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras
    import numpy as np

    import cautious.tensorflow as ctf
    from cautious import Caution

    world = strategy.num_replicas_in_sync
    assert world == len(ports), world
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS * BATCH, 6)).astype(np.float32)
    y = (np.tanh(x @ rng.standard_normal((6, 1))) + 0.1).astype(np.float32)

    def build(rule: str, normalize: str):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
        opt = getattr(ctf, rule)(**HPARAMS[rule], caution=Caution(normalize))
        opt.build(model.trainable_variables)
        return model, opt

    def loss_of(model, xs, ys):  # the sum over this slice / the global batch: replicas' gradients add up
        return tf.reduce_sum((model(xs) - ys) ** 2) / BATCH

    def train_distributed(rule: str, normalize: str) -> list:
        with strategy.scope():
            model, opt = build(rule, normalize)

        @tf.function
        def train(xs, ys):
            def step(xs, ys):
                with tf.GradientTape() as tape:
                    loss = loss_of(model, xs, ys)
                grads = tape.gradient(loss, model.trainable_variables)
                opt.apply_gradients(zip(grads, model.trainable_variables))

            strategy.run(step, args=(xs, ys))

        h = BATCH // world
        for b in range(STEPS):
            xb, yb = x[b * BATCH : (b + 1) * BATCH], y[b * BATCH : (b + 1) * BATCH]

            def mine(ctx, a):
                r = ctx.replica_id_in_sync_group
                return a[r * h : (r + 1) * h]

            train(
                strategy.experimental_distribute_values_from_function(lambda ctx, xb=xb: mine(ctx, xb)),
                strategy.experimental_distribute_values_from_function(lambda ctx, yb=yb: mine(ctx, yb)),
            )
        return model.get_weights()

    def train_one_process(rule: str, normalize: str) -> list:
        model, opt = build(rule, normalize)

        @tf.function
        def train(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_of(model, xb, yb)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        for b in range(STEPS):
            train(x[b * BATCH : (b + 1) * BATCH], y[b * BATCH : (b + 1) * BATCH])
        return model.get_weights()

    for sid in ids():
        rule, normalize = sid.split("-")
        try:
            got = train_distributed(rule, normalize)
            want = train_one_process(rule, normalize)
            init, _ = build(rule, normalize)
            moved = max(float(np.max(np.abs(a - b))) for a, b in zip(want, init.get_weights()))
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            rec = {"id": sid, "ok": True, "max_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(got, want))}
            rec["moved"] = moved
            rec["checksum"] = float(sum(np.sum(np.abs(a)) for a in got))
        except Exception as e:
            rec = {"id": sid, "ok": False, "error": f"worker {index}: {type(e).__name__}: {e}"[:1500]}
            rec["traceback"] = traceback.format_exc()[-3000:]
        with open(f"{out}.{index}", "a") as f:
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--index", type=int, default=None)
    ap.add_argument("--ports", default=None)
    args = ap.parse_args()
    if args.index is not None:
        worker_main(args.index, [int(p) for p in args.ports.split(",")], args.out)
        return
    ports = ",".join(map(str, S.free_ports(args.world)))
    for i in range(args.world):
        Path(f"{args.out}.{i}").unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--world", str(args.world), "--out", args.out, "--ports", ports]
    procs = [subprocess.Popen([*cmd, "--index", str(i)]) for i in range(args.world)]
    codes = [p.wait() for p in procs]
    # worker 0's records, with the other workers' checksums: every worker must hold the same weights
    lines = [
        Path(f"{args.out}.{i}").read_text().splitlines() if Path(f"{args.out}.{i}").exists() else []
        for i in range(args.world)
    ]
    with open(args.out, "w") as f:
        for j, line in enumerate(lines[0]):
            rec = json.loads(line)
            others = [json.loads(ls[j]) for ls in lines[1:] if j < len(ls)]
            rec["worker_checksums"] = [rec.get("checksum")] + [o.get("checksum") for o in others]
            f.write(json.dumps(rec) + "\n")
    sys.exit(max(codes, key=abs))


if __name__ == "__main__":
    main()
