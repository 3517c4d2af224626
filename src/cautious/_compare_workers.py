"""Workers for ``cautious compare``: train the MLP in ONE framework, in this process.

Run as ``python -m cautious._compare_workers --worker job.json out.json`` (one process per
framework; :mod:`cautious.compare` spawns them). The job names the framework, the data file
(``.npz`` with ``X``, ``y``, the initial weights ``w0..w5`` and, for mini-batches, ``batches``),
the dtype, the number of steps and the optimizers. The worker writes the loss curves and
timings as JSON to ``out.json`` and the final parameters to ``job["params_out"]`` (``.npz``).

The model is the same everywhere::

    h1 = tanh(X @ W1 + b1);  h2 = tanh(h1 @ W2 + b2);  f = h2 @ W3 + b3;  loss = mean((f - y)**2)

with parameters in the order ``W1, b1, W2, b2, W3, b3`` (Keras ``Dense`` layout: kernels are
``(fan_in, fan_out)``). ``losses[t]`` is the full-data loss of the parameters after ``t`` steps,
``t = 0..steps``. Only NumPy is imported at module level; each ``_train_*`` imports its framework.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cautious._worker_process import caution_from, framework_version, serve

N_PARAMS = 6


class _Progress:
    """Plain text progress lines (readable in CI logs): about ten per optimizer."""

    def __init__(self, framework: str, name: str, steps: int) -> None:
        self.framework, self.name, self.steps = framework, name, steps
        self.every = max(1, steps // 10)
        self.t0 = time.perf_counter()

    def __call__(self, t: int, loss: float) -> None:
        if t % self.every == 0 or t == self.steps:
            done = int(20 * t / max(self.steps, 1))
            bar = "#" * done + "." * (20 - done)
            print(
                f"[{self.framework}] {self.name:<14} [{bar}] {t:>5}/{self.steps}  loss {loss:.6g}  "
                f"({time.perf_counter() - self.t0:.1f}s)",
                flush=True,
            )


def _loop(
    job: dict[str, Any],
    data: dict[str, np.ndarray],
    name: str,
    step: Callable[[int], float],
    full_loss: Callable[[], float],
) -> list[float]:
    """Drive ``steps`` optimizer steps; ``step(t)`` returns the loss of the batch it differentiated.

    With full-batch training that loss is the full-data loss of the parameters before the step;
    with mini-batches the full-data loss is evaluated separately before each step.
    """
    steps = int(job["steps"])
    full = "batches" not in data
    progress = _Progress(job["framework"], name, steps)
    losses: list[float] = []
    for t in range(steps):
        if not full:
            losses.append(full_loss())
        batch_loss = step(t)
        if full:
            losses.append(batch_loss)
        progress(t, losses[-1])
    losses.append(full_loss())
    progress(steps, losses[-1])
    return losses


# -- The optimizers of a job entry ({"rule": "adamw" | "lion", "hparams": {...}, "caution": {...} | None}) --------
# An entry with "caution_stats": True also turns on the opt-in caution telemetry where a backend has one;
# "torch_options" (e.g. {"foreach": False}) are extra keywords of the torch optimizer.


def _telemetry(opt_cfg: dict[str, Any]) -> dict[str, bool]:
    return {"caution_stats": True} if opt_cfg.get("caution_stats") and opt_cfg["caution"] else {}


def spec_optimizer(opt_cfg: dict[str, Any]) -> Any:
    """The :mod:`cautious.spec` reference optimizer of a job entry."""
    from cautious import spec

    return getattr(spec, opt_cfg["rule"])(**opt_cfg["hparams"], caution=caution_from(opt_cfg["caution"]))


def torch_optimizer(params: list, opt_cfg: dict[str, Any]) -> Any:
    """The :mod:`cautious.torch` optimizer of a job entry over ``params``."""
    import cautious.torch as ct

    hp = opt_cfg["hparams"]
    caution = caution_from(opt_cfg["caution"])
    if opt_cfg["rule"] == "adamw":
        return ct.AdamW(
            params,
            lr=hp["lr"],
            betas=tuple(hp["betas"]),
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
            eps_placement=hp["eps_placement"],
            caution=caution,
            **_telemetry(opt_cfg),
            **opt_cfg.get("torch_options", {}),
        )
    return ct.Lion(
        params,
        lr=hp["lr"],
        betas=tuple(hp["betas"]),
        weight_decay=hp["weight_decay"],
        caution=caution,
        **_telemetry(opt_cfg),
        **opt_cfg.get("torch_options", {}),
    )


def optax_optimizer(opt_cfg: dict[str, Any]) -> Any:
    """The :mod:`cautious.jax` gradient transformation of a job entry."""
    import cautious.jax as cj

    hp = opt_cfg["hparams"]
    caution = caution_from(opt_cfg["caution"])
    b1, b2 = hp["betas"]
    if opt_cfg["rule"] == "adamw":
        return cj.adamw(
            learning_rate=hp["lr"],
            b1=b1,
            b2=b2,
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
            eps_placement=hp["eps_placement"],
            caution=caution,
            **_telemetry(opt_cfg),
        )
    return cj.lion(
        learning_rate=hp["lr"], b1=b1, b2=b2, weight_decay=hp["weight_decay"], caution=caution, **_telemetry(opt_cfg)
    )


def keras_optimizer(opt_cfg: dict[str, Any]) -> Any:
    """The :mod:`cautious.tensorflow` Keras optimizer of a job entry."""
    import cautious.tensorflow as ctf

    hp = opt_cfg["hparams"]
    caution = caution_from(opt_cfg["caution"])
    b1, b2 = hp["betas"]
    if opt_cfg["rule"] == "adamw":
        return ctf.AdamW(
            learning_rate=hp["lr"],
            weight_decay=hp["weight_decay"],
            beta_1=b1,
            beta_2=b2,
            epsilon=hp["eps"],
            eps_placement=hp["eps_placement"],
            caution=caution,
            **_telemetry(opt_cfg),
        )
    return ctf.Lion(
        learning_rate=hp["lr"],
        beta_1=b1,
        beta_2=b2,
        weight_decay=hp["weight_decay"],
        caution=caution,
        **_telemetry(opt_cfg),
    )


# -- NumPy (the reference: hand-written forward/backward, cautious.spec optimizers) -------------------------


def numpy_loss_and_grads(params: list[np.ndarray], X: np.ndarray, y: np.ndarray) -> tuple[float, list]:
    """MSE loss of the MLP and its gradients, by hand (the reference backward pass)."""
    W1, b1, W2, b2, W3, b3 = params
    h1 = np.tanh(X @ W1 + b1)
    h2 = np.tanh(h1 @ W2 + b2)
    r = h2 @ W3 + b3 - y
    loss = np.mean(r * r)
    d = (2.0 / r.size) * r  # d loss / d f
    gW3, gb3 = h2.T @ d, d.sum(0)
    d2 = (d @ W3.T) * (1 - h2 * h2)
    gW2, gb2 = h1.T @ d2, d2.sum(0)
    d1 = (d2 @ W2.T) * (1 - h1 * h1)
    gW1, gb1 = X.T @ d1, d1.sum(0)
    grads = [gW1, gb1, gW2, gb2, gW3, gb3]
    return float(loss), [g.astype(p.dtype, copy=False) for g, p in zip(grads, params)]


def _train_numpy(job: dict[str, Any], data: dict[str, np.ndarray], name: str, opt_cfg: dict) -> tuple:
    dt = np.dtype(job["dtype"])
    X, y = data["X"].astype(dt), data["y"].astype(dt)
    params = [data[f"w{i}"].astype(dt) for i in range(N_PARAMS)]
    opt = spec_optimizer(opt_cfg)
    state = opt.init(params)
    batches = data.get("batches")
    box = {"params": params, "state": state}

    def step(t: int) -> float:
        Xb, yb = (X, y) if batches is None else (X[batches[t]], y[batches[t]])
        loss, grads = numpy_loss_and_grads(box["params"], Xb, yb)
        box["params"], box["state"] = opt.step(box["params"], grads, box["state"])
        return loss

    def full_loss() -> float:
        return numpy_loss_and_grads(box["params"], X, y)[0]

    losses = _loop(job, data, name, step, full_loss)
    return losses, [np.asarray(p) for p in box["params"]]


# -- PyTorch ------------------------------------------------------------------------------------------------


def _train_torch(job: dict[str, Any], data: dict[str, np.ndarray], name: str, opt_cfg: dict) -> tuple:
    import torch

    dt = getattr(torch, job["dtype"])
    X = torch.tensor(data["X"], dtype=dt)
    y = torch.tensor(data["y"], dtype=dt)
    params = [torch.tensor(data[f"w{i}"], dtype=dt, requires_grad=True) for i in range(N_PARAMS)]
    opt = torch_optimizer(params, opt_cfg)
    batches = data.get("batches")

    def loss_fn(Xb: Any, yb: Any) -> Any:
        W1, b1, W2, b2, W3, b3 = params
        h1 = torch.tanh(Xb @ W1 + b1)
        h2 = torch.tanh(h1 @ W2 + b2)
        return torch.mean((h2 @ W3 + b3 - yb) ** 2)

    def step(t: int) -> float:
        Xb, yb = (X, y) if batches is None else (X[batches[t]], y[batches[t]])
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(Xb, yb)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def full_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(X, y))

    losses = _loop(job, data, name, step, full_loss)
    return losses, [p.detach().numpy() for p in params]


# -- JAX / optax --------------------------------------------------------------------------------------------


def _train_jax(job: dict[str, Any], data: dict[str, np.ndarray], name: str, opt_cfg: dict) -> tuple:
    import jax
    import jax.numpy as jnp
    import optax

    if job["dtype"] == "float64" and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 in JAX needs JAX_ENABLE_X64=1 (cautious compare sets it for its worker)")
    dt = jnp.dtype(job["dtype"])
    X, y = jnp.asarray(data["X"], dt), jnp.asarray(data["y"], dt)
    params = [jnp.asarray(data[f"w{i}"], dt) for i in range(N_PARAMS)]
    opt = optax_optimizer(opt_cfg)

    def loss_fn(p: list, Xb: Any, yb: Any) -> Any:
        W1, bb1, W2, bb2, W3, bb3 = p
        h1 = jnp.tanh(Xb @ W1 + bb1)
        h2 = jnp.tanh(h1 @ W2 + bb2)
        return jnp.mean((h2 @ W3 + bb3 - yb) ** 2)

    @jax.jit
    def jstep(p: list, s: Any, Xb: Any, yb: Any) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(p, Xb, yb)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    jloss = jax.jit(loss_fn)
    batches = data.get("batches")
    box = {"params": params, "state": opt.init(params)}

    def step(t: int) -> float:
        Xb, yb = (X, y) if batches is None else (X[batches[t]], y[batches[t]])
        box["params"], box["state"], loss = jstep(box["params"], box["state"], Xb, yb)
        return float(loss)

    def full_loss() -> float:
        return float(jloss(box["params"], X, y))

    losses = _loop(job, data, name, step, full_loss)
    return losses, [np.asarray(p) for p in box["params"]]


# -- TensorFlow / Keras 3 -----------------------------------------------------------------------------------


def _train_tensorflow(job: dict[str, Any], data: dict[str, np.ndarray], name: str, opt_cfg: dict) -> tuple:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    dt = job["dtype"]
    keras.config.set_floatx(dt)  # the optimizer's learning-rate variable uses floatx
    X, y = tf.constant(data["X"], dt), tf.constant(data["y"], dt)
    d_in = data["X"].shape[1]
    widths = [data["w0"].shape[1], data["w2"].shape[1], data["w4"].shape[1]]
    model = keras.Sequential(
        [keras.Input(shape=(d_in,), dtype=dt)]
        + [keras.layers.Dense(w, activation="tanh", dtype=dt) for w in widths[:-1]]
        + [keras.layers.Dense(widths[-1], dtype=dt)]
    )
    model.set_weights([data[f"w{i}"].astype(dt) for i in range(N_PARAMS)])
    opt = keras_optimizer(opt_cfg)
    variables = model.trainable_variables
    opt.build(variables)

    def loss_fn(Xb: Any, yb: Any) -> Any:
        return tf.reduce_mean(tf.square(model(Xb) - yb))

    @tf.function
    def tstep(Xb: Any, yb: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(Xb, yb)
        grads = tape.gradient(loss, variables)
        opt.apply_gradients(zip(grads, variables))
        return loss

    tloss = tf.function(loss_fn)
    batches = data.get("batches")

    def step(t: int) -> float:
        if batches is None:
            return float(tstep(X, y))
        idx = tf.constant(batches[t])
        return float(tstep(tf.gather(X, idx), tf.gather(y, idx)))

    def full_loss() -> float:
        return float(tloss(X, y))

    losses = _loop(job, data, name, step, full_loss)
    return losses, [np.asarray(v.numpy()) for v in variables]


TRAINERS = {"numpy": _train_numpy, "torch": _train_torch, "jax": _train_jax, "tensorflow": _train_tensorflow}


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Train every optimizer of ``job`` in this process's framework; return the results."""
    framework = job["framework"]
    with np.load(job["data"]) as f:
        data = {k: f[k] for k in f.files}
    train = TRAINERS[framework]
    out: dict[str, Any] = {"framework": framework, "optimizers": {}}
    final: dict[str, np.ndarray] = {}
    for name, cfg in job["optimizers"].items():
        t0 = time.perf_counter()
        losses, params = train(job, data, name, cfg)
        seconds = time.perf_counter() - t0
        out["optimizers"][name] = {"losses": [float(v) for v in losses], "seconds": seconds}
        for i, p in enumerate(params):
            final[f"{name}/{i}"] = np.asarray(p, dtype=np.float64)
    out["version"] = framework_version(framework)
    np.savez(job["params_out"], **final)
    return out


if __name__ == "__main__":
    sys.exit(serve(worker))
