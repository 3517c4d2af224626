"""Workers for ``cautious research``: train the transformer in ONE framework, in this process.

Run as ``python -m cautious.research._workers --worker job.json out.json`` (the protocol of
:mod:`cautious._worker_process`). The job names the framework, the dtype, the data file (``.npz``
with ``val`` and, per seed ``s``, ``batches{s}`` and the initial weights ``init{s}_{i}``), the model
configuration, the number of steps, how often to evaluate, and the runs (one optimizer, learning
rate and seed each). For each run the worker writes the training loss of every step (the loss of
the batch the step differentiated, before the step), the validation loss every ``eval_every`` steps
(``val[j] = [t, loss after t steps]``) and, where the backend reports it, the caution telemetry
(``stats[j] = [t, [[k, n, scale] per tensor]]``). A run whose loss stops being finite stops early
(``diverged_at``). Progress goes to stdout as ``@progress <run id> <steps done>`` lines, which the
parent turns into a progress bar. Only NumPy is imported at module level.

The model is :mod:`cautious.research.model`, written once per framework below with the same
operations in the same order (manual layer norm, tanh-gelu, additive causal mask, untied head).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from cautious._compare_workers import keras_optimizer, optax_optimizer, spec_optimizer, torch_optimizer
from cautious._worker_process import framework_version, serve
from cautious.research import model as M


class Session(NamedTuple):
    """One training run in one framework: what the framework-independent loop needs."""

    step: Callable[[np.ndarray], float]  # one optimizer step on a batch of windows; returns its loss
    val_loss: Callable[[], float]  # the validation loss of the current parameters
    stats: Callable[[], list[list[float]] | None] = lambda: None  # per tensor [k, n, scale] of the last step


# -- NumPy: the hand-written reference model, cautious.spec optimizers ----------------------------------------


def _numpy(cfg: M.ModelConfig, dtype: str, init: list[np.ndarray], val: np.ndarray, run: dict) -> Session:
    dt = np.dtype(dtype)
    opt = spec_optimizer(run)
    box: dict[str, Any] = {"params": [p.astype(dt) for p in init]}
    box["state"] = opt.init(box["params"])

    def step(tokens: np.ndarray) -> float:
        loss, grads = M.loss_and_grads(box["params"], tokens, cfg)
        box["last"] = (box["params"], grads, box["state"])  # immutable: kept for stats()
        box["params"], box["state"] = opt.step(box["params"], grads, box["state"])
        return loss

    def stats() -> list | None:
        out = opt.stats(*box["last"])
        return None if out[0] is None else [[s.count, s.n, s.scale] for s in out]

    return Session(step, lambda: M.loss_only(box["params"], val, cfg), stats)


# -- PyTorch ---------------------------------------------------------------------------------------------------


def _torch_loss(P: list, tokens: Any, cfg: M.ModelConfig, mask: Any) -> Any:
    import torch
    import torch.nn.functional as F

    def ln(x: Any, g: Any, b: Any) -> Any:
        xc = x - x.mean(-1, keepdim=True)
        return xc / torch.sqrt((xc * xc).mean(-1, keepdim=True) + M.LN_EPS) * g + b

    x, y = tokens[:, :-1], tokens[:, 1:]
    B, T = x.shape
    d, H = cfg.d_model, cfg.heads
    dh = d // H
    it = iter(P)
    tok, pos = next(it), next(it)
    h = tok[x] + pos[:T]
    for _ in range(cfg.layers):
        g1, b1, Wqkv, Wo, g2, b2, W1, c1, W2, c2 = (next(it) for _ in range(10))
        qkv = ln(h, g1, b1) @ Wqkv
        q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(B, T, H, dh).transpose(1, 2) for i in range(3))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + mask, -1)
        h = h + (p @ v).transpose(1, 2).reshape(B, T, d) @ Wo
        z1 = ln(h, g2, b2) @ W1 + c1
        m = 0.5 * z1 * (1.0 + torch.tanh(M.GELU_C * (z1 + 0.044715 * z1**3)))
        h = h + m @ W2 + c2
    gf, bf, Wh = next(it), next(it), next(it)
    z = ln(h, gf, bf) @ Wh
    return F.cross_entropy(z.reshape(B * T, -1), y.reshape(-1))


def _torch(cfg: M.ModelConfig, dtype: str, init: list[np.ndarray], val: np.ndarray, run: dict) -> Session:
    import torch

    torch.set_num_threads(1)
    dt = getattr(torch, dtype)
    params = [torch.tensor(p, dtype=dt, requires_grad=True) for p in init]
    opt = torch_optimizer(params, run)
    mask = torch.tensor(M.causal_mask(cfg.context, np.dtype(dtype)))
    val_t = torch.tensor(val, dtype=torch.int64)

    def step(tokens: np.ndarray) -> float:
        opt.zero_grad(set_to_none=True)
        loss = _torch_loss(params, torch.from_numpy(tokens.astype(np.int64)), cfg, mask)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def val_loss() -> float:
        with torch.no_grad():
            return float(_torch_loss(params, val_t, cfg, mask))

    def stats() -> list | None:
        if not run.get("caution_stats") or not run["caution"]:
            return None
        return [[int(s.count), int(s.n), float(s.scale)] for s in opt.caution_stats()]

    return Session(step, val_loss, stats)


# -- JAX / optax -----------------------------------------------------------------------------------------------


def _jax_loss(P: list, tokens: Any, cfg: M.ModelConfig, mask: Any) -> Any:
    import jax
    import jax.numpy as jnp

    def ln(x: Any, g: Any, b: Any) -> Any:
        xc = x - x.mean(-1, keepdims=True)
        return xc / jnp.sqrt((xc * xc).mean(-1, keepdims=True) + M.LN_EPS) * g + b

    x, y = tokens[:, :-1], tokens[:, 1:]
    B, T = x.shape
    d, H = cfg.d_model, cfg.heads
    dh = d // H
    it = iter(P)
    tok, pos = next(it), next(it)
    h = tok[x] + pos[:T]
    for _ in range(cfg.layers):
        g1, b1, Wqkv, Wo, g2, b2, W1, c1, W2, c2 = (next(it) for _ in range(10))
        qkv = ln(h, g1, b1) @ Wqkv
        q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(B, T, H, dh).transpose(0, 2, 1, 3) for i in range(3))
        p = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh) + mask, -1)
        h = h + (p @ v).transpose(0, 2, 1, 3).reshape(B, T, d) @ Wo
        z1 = ln(h, g2, b2) @ W1 + c1
        m = 0.5 * z1 * (1.0 + jnp.tanh(M.GELU_C * (z1 + 0.044715 * z1**3)))
        h = h + m @ W2 + c2
    gf, bf, Wh = next(it), next(it), next(it)
    z = ln(h, gf, bf) @ Wh
    logp = jax.nn.log_softmax(z, -1)
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))


_JAX_STEPS: dict[str, Any] = {}


def _jax(cfg: M.ModelConfig, dtype: str, init: list[np.ndarray], val: np.ndarray, run: dict) -> Session:
    import jax
    import jax.numpy as jnp
    import optax

    import cautious.jax as cj

    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise RuntimeError("float64 in JAX needs JAX_ENABLE_X64=1 (cautious research sets it for its worker)")
    dt = jnp.dtype(dtype)
    mask = jnp.asarray(M.causal_mask(cfg.context, np.dtype(dtype)))

    def with_lr(lr: Any) -> Any:  # the learning rate as an optax schedule, so it is an argument of the step
        return optax_optimizer({**run, "hparams": {**run["hparams"], "lr": lambda count: lr}})

    key = json.dumps([run["rule"], {**run["hparams"], "lr": None}, run["caution"], cfg, dtype])
    if key not in _JAX_STEPS:  # one compilation per optimizer, shared by learning rates and seeds

        @jax.jit
        def jstep(p: list, s: Any, tokens: Any, lr: Any) -> tuple:
            loss, grads = jax.value_and_grad(_jax_loss)(p, tokens, cfg, mask)
            updates, s = with_lr(lr).update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

        _JAX_STEPS[key] = jstep
    if ("loss", dtype) not in _JAX_STEPS:
        _JAX_STEPS[("loss", dtype)] = jax.jit(lambda p, tokens: _jax_loss(p, tokens, cfg, mask))
    jstep, jloss = _JAX_STEPS[key], _JAX_STEPS[("loss", dtype)]
    lr = jnp.asarray(run["hparams"]["lr"], dt)
    params = [jnp.asarray(p, dt) for p in init]
    box = {"params": params, "state": with_lr(lr).init(params)}
    val_j = jnp.asarray(val)

    def step(tokens: np.ndarray) -> float:
        box["params"], box["state"], loss = jstep(box["params"], box["state"], jnp.asarray(tokens), lr)
        return float(loss)

    def stats() -> list | None:
        if not run.get("caution_stats") or not run["caution"]:
            return None
        return [[int(s.count), int(s.n), float(s.scale)] for s in cj.caution_stats(box["state"])]

    return Session(step, lambda: float(jloss(box["params"], val_j)), stats)


# -- TensorFlow / Keras 3 --------------------------------------------------------------------------------------


def _tf_loss(P: list, tokens: Any, cfg: M.ModelConfig, mask: Any) -> Any:
    import tensorflow as tf

    def ln(x: Any, g: Any, b: Any) -> Any:
        xc = x - tf.reduce_mean(x, -1, keepdims=True)
        return xc / tf.sqrt(tf.reduce_mean(xc * xc, -1, keepdims=True) + M.LN_EPS) * g + b

    x, y = tokens[:, :-1], tokens[:, 1:]
    B, T = x.shape
    d, H = cfg.d_model, cfg.heads
    dh = d // H
    it = iter(P)
    tok, pos = next(it), next(it)
    h = tf.gather(tok, x) + pos[:T]
    for _ in range(cfg.layers):
        g1, b1, Wqkv, Wo, g2, b2, W1, c1, W2, c2 = (next(it) for _ in range(10))
        qkv = ln(h, g1, b1) @ Wqkv
        q, k, v = (
            tf.transpose(tf.reshape(qkv[..., i * d : (i + 1) * d], (B, T, H, dh)), (0, 2, 1, 3)) for i in range(3)
        )
        p = tf.nn.softmax(q @ tf.transpose(k, (0, 1, 3, 2)) / math.sqrt(dh) + mask, -1)
        h = h + tf.reshape(tf.transpose(p @ v, (0, 2, 1, 3)), (B, T, d)) @ Wo
        z1 = ln(h, g2, b2) @ W1 + c1
        m = 0.5 * z1 * (1.0 + tf.tanh(M.GELU_C * (z1 + 0.044715 * z1**3)))
        h = h + m @ W2 + c2
    gf, bf, Wh = next(it), next(it), next(it)
    z = ln(h, gf, bf) @ Wh
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z))


_TF_STEPS: dict[str, Any] = {}


def _tensorflow(cfg: M.ModelConfig, dtype: str, init: list[np.ndarray], val: np.ndarray, run: dict) -> Session:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    key = json.dumps([run["rule"], {**run["hparams"], "lr": None}, run["caution"], cfg, dtype])
    if key not in _TF_STEPS:  # one trace per optimizer; learning rates and seeds reset its variables
        keras.config.set_floatx(dtype)  # the optimizer's learning-rate variable uses floatx
        variables = [keras.Variable(p.astype(dtype), dtype=dtype) for p in init]
        opt = keras_optimizer(run)
        opt.build(variables)
        fresh = [v.numpy() for v in opt.variables]
        mask = tf.constant(M.causal_mask(cfg.context, np.dtype(dtype)))

        def loss_fn(tokens: Any) -> Any:
            return _tf_loss([v.value for v in variables], tokens, cfg, mask)

        @tf.function
        def tstep(tokens: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = loss_fn(tokens)
            grads = tape.gradient(loss, [v.value for v in variables])
            opt.apply_gradients(zip(grads, variables))
            return loss

        _TF_STEPS[key] = (variables, opt, fresh, tstep, tf.function(loss_fn))
    variables, opt, fresh, tstep, tloss = _TF_STEPS[key]
    for v, p in zip(variables, init):
        v.assign(p.astype(dtype))
    for v, f in zip(opt.variables, fresh):
        v.assign(f)
    opt.learning_rate = run["hparams"]["lr"]  # assigns Keras's learning-rate variable: no retrace
    val_t = tf.constant(val)

    def stats() -> list | None:
        if not run.get("caution_stats") or not run["caution"]:
            return None
        return [[int(s.count.numpy()), int(s.n), float(s.scale.numpy())] for s in opt.caution_stats()]

    return Session(lambda tokens: float(tstep(tf.constant(tokens))), lambda: float(tloss(val_t)), stats)


SESSIONS = {"numpy": _numpy, "torch": _torch, "jax": _jax, "tensorflow": _tensorflow}


def train(job: dict[str, Any], session: Session, batches: np.ndarray, run_id: str) -> dict[str, Any]:
    """The framework-independent loop: steps, evaluation, telemetry, progress, divergence."""
    steps, eval_every = int(job["steps"]), int(job["eval_every"])
    stats_every = int(job.get("stats_every") or 0)
    report_every = max(1, steps // 20)
    out: dict[str, Any] = {"train": [], "val": [[0, session.val_loss()]], "stats": [], "diverged_at": None}
    t0 = time.perf_counter()
    for t in range(steps):
        loss = session.step(batches[t])
        out["train"].append(loss)
        done = t + 1
        if not math.isfinite(loss):
            out["diverged_at"] = done
            print(f"@progress {run_id} {steps}", flush=True)
            break
        if stats_every and done % stats_every == 0:
            stats = session.stats()
            if stats is not None:
                out["stats"].append([done, stats])
        if done % eval_every == 0 or done == steps:
            out["val"].append([done, session.val_loss()])
        if done % report_every == 0 or done == steps:
            print(f"@progress {run_id} {done}", flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Every run of ``job`` in this process's framework."""
    framework = job["framework"]
    cfg = M.ModelConfig(**job["model"])
    make = SESSIONS[framework]
    with np.load(job["data"]) as f:
        data = {k: f[k] for k in f.files}
    n_params = len(M.param_specs(cfg))
    runs = {}
    for run in job["runs"]:
        seed = run["seed"]
        init = [data[f"init{seed}_{i}"] for i in range(n_params)]
        session = make(cfg, job["dtype"], init, data["val"], run)
        runs[run["id"]] = train(job, session, data[f"batches{seed}"], run["id"])
    return {"framework": framework, "dtype": job["dtype"], "version": framework_version(framework), "runs": runs}


if __name__ == "__main__":
    sys.exit(serve(worker, traceback=True))
