r"""The character-level transformer of ``cautious research``, and its NumPy reference (forward + backward).

A pre-norm decoder-only transformer, written out the same way in every framework so that the
same weights give the same function up to rounding. With tokens ``x`` (``B x T`` ids), ``E`` the
token embedding, ``P`` the position embedding, ``L`` blocks of ``H`` heads of width ``d / H``:

.. math::

    h &= E[x] + P_{0..T-1} \\
    h &\mathrel{+}= \operatorname{attn}(\operatorname{LN}_1(h))\, W_o, \qquad
        \operatorname{attn}(a) = \operatorname{softmax}\!\Big(\frac{q k^\top}{\sqrt{d/H}} + M\Big) v,\
        [q, k, v] = a W_{qkv} \\
    h &\mathrel{+}= \operatorname{gelu}(\operatorname{LN}_2(h) W_1 + b_1) W_2 + b_2
        \quad\text{(per block)} \\
    \text{loss} &= \operatorname{mean}_{b,t}\big(\operatorname{logsumexp}(z_{bt}) - z_{bt, y_{bt}}\big),
    \qquad z = \operatorname{LN}_f(h)\, W_{\text{head}}

``M`` is the causal mask (0 on and below the diagonal, ``-1e9`` above), ``LN(h) = g * (h - mean) /
sqrt(var + 1e-5) + b`` over the last axis (population variance), gelu is the tanh form
``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``. The head is not tied to ``E``: the token
embedding's gradient is then exactly zero on the rows of tokens absent from the batch, the sparse
case the ``nonzero`` caution denominator is about. No dropout.

Parameters, in this order (``param_specs``), each with a group used by the kept-fraction report:
``tok, pos`` (embedding); per block ``ln1.g, ln1.b`` (norms), ``qkv, proj`` (attention), ``ln2.g,
ln2.b`` (norms), ``fc, fc.b, out, out.b`` (mlp); ``lnf.g, lnf.b`` (norms); ``head`` (head).
Matrices are ``(fan_in, fan_out)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["ModelConfig", "ParamSpec", "param_specs", "GROUPS", "loss_and_grads", "loss_only", "longest_sum"]

#: Tensor groups of the kept-fraction report, in report order.
GROUPS = ("embedding", "attention", "mlp", "norms", "head")

LN_EPS = 1e-5
MASK_VALUE = -1e9
GELU_C = math.sqrt(2.0 / math.pi)


class ModelConfig(NamedTuple):
    vocab: int
    d_model: int = 48
    heads: int = 4
    layers: int = 2
    context: int = 48


class ParamSpec(NamedTuple):
    name: str
    shape: tuple[int, ...]
    group: str
    init: str  # "normal" | "residual" | "one" | "zero"


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Every parameter's name, shape, report group and initialisation, in the order every framework uses."""
    if cfg.d_model % cfg.heads:
        raise ValueError(f"d_model ({cfg.d_model}) must be a multiple of heads ({cfg.heads})")
    d, f = cfg.d_model, 4 * cfg.d_model
    specs = [
        ParamSpec("tok", (cfg.vocab, d), "embedding", "normal"),
        ParamSpec("pos", (cfg.context, d), "embedding", "normal"),
    ]
    for i in range(cfg.layers):
        specs += [
            ParamSpec(f"h{i}.ln1.g", (d,), "norms", "one"),
            ParamSpec(f"h{i}.ln1.b", (d,), "norms", "zero"),
            ParamSpec(f"h{i}.qkv", (d, 3 * d), "attention", "normal"),
            ParamSpec(f"h{i}.proj", (d, d), "attention", "residual"),
            ParamSpec(f"h{i}.ln2.g", (d,), "norms", "one"),
            ParamSpec(f"h{i}.ln2.b", (d,), "norms", "zero"),
            ParamSpec(f"h{i}.fc", (d, f), "mlp", "normal"),
            ParamSpec(f"h{i}.fc.b", (f,), "mlp", "zero"),
            ParamSpec(f"h{i}.out", (f, d), "mlp", "residual"),
            ParamSpec(f"h{i}.out.b", (d,), "mlp", "zero"),
        ]
    specs += [
        ParamSpec("lnf.g", (d,), "norms", "one"),
        ParamSpec("lnf.b", (d,), "norms", "zero"),
        ParamSpec("head", (d, cfg.vocab), "head", "normal"),
    ]
    return specs


def longest_sum(cfg: ModelConfig, batch: int) -> int:
    """The longest sum in one training step (for the rounding bound): the weight gradients' ``B * T``."""
    return max(batch * cfg.context, 4 * cfg.d_model, cfg.vocab)


def causal_mask(T: int, dtype: np.dtype) -> np.ndarray:
    """``(T, T)``: 0 on and below the diagonal, ``MASK_VALUE`` above."""
    return np.triu(np.full((T, T), MASK_VALUE), 1).astype(dtype)


# -- NumPy reference: forward and hand-written backward ------------------------------------------------------


def _ln(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, tuple]:
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + LN_EPS)
    xhat = xc * rstd
    return xhat * g + b, (xhat, rstd, g)


def _ln_back(dy: np.ndarray, cache: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xhat, rstd, g = cache
    n = xhat.shape[-1]
    dg = (dy * xhat).reshape(-1, n).sum(0)
    db = dy.reshape(-1, n).sum(0)
    dxhat = dy * g
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return dx, dg, db


def _gelu(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.tanh(GELU_C * (x + 0.044715 * x**3))
    y = 0.5 * x * (1.0 + t)
    dy_dx = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return y, dy_dx


def _forward(params: list[np.ndarray], x: np.ndarray, y: np.ndarray, cfg: ModelConfig, keep: bool) -> tuple:
    B, T = x.shape
    d, H = cfg.d_model, cfg.heads
    dh = d // H
    it = iter(params)
    tok, pos = next(it), next(it)
    dt = tok.dtype
    h = tok[x] + pos[:T]
    mask = causal_mask(T, dt)
    caches = []
    for _ in range(cfg.layers):
        g1, b1, Wqkv, Wo, g2, b2, W1, c1, W2, c2 = (next(it) for _ in range(10))
        a, ln1 = _ln(h, g1, b1)
        qkv = a @ Wqkv
        q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(B, T, H, dh).transpose(0, 2, 1, 3) for i in range(3))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(np.asarray(dh, dt)) + mask
        s = s - s.max(-1, keepdims=True)
        e = np.exp(s)
        p = e / e.sum(-1, keepdims=True)
        o = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, d)
        h = h + o @ Wo
        bb, ln2 = _ln(h, g2, b2)
        z1 = bb @ W1 + c1
        m, dm = _gelu(z1)
        h = h + m @ W2 + c2
        caches.append((a, ln1, q, k, v, p, o, bb, ln2, m, dm))
    gf, bf, Wh = next(it), next(it), next(it)
    hf, lnf = _ln(h, gf, bf)
    z = hf @ Wh
    zmax = z.max(-1, keepdims=True)
    ez = np.exp(z - zmax)
    se = ez.sum(-1, keepdims=True)
    logp_y = np.take_along_axis(z - zmax, y[..., None], -1)[..., 0] - np.log(se[..., 0])
    loss = -logp_y.mean()
    return loss, (caches, hf, lnf, ez / se) if keep else None


def loss_only(params: list[np.ndarray], tokens: np.ndarray, cfg: ModelConfig) -> float:
    """The mean next-token cross-entropy of windows ``tokens`` (``B x (T+1)``)."""
    loss, _ = _forward(params, tokens[:, :-1], tokens[:, 1:], cfg, keep=False)
    return float(loss)


def loss_and_grads(params: list[np.ndarray], tokens: np.ndarray, cfg: ModelConfig) -> tuple[float, list[np.ndarray]]:
    """The loss of windows ``tokens`` (``B x (T+1)``) and its gradient for every parameter, by hand."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    B, T = x.shape
    d, H = cfg.d_model, cfg.heads
    dh = d // H
    loss, (caches, hf, lnf, prob) = _forward(params, x, y, cfg, keep=True)
    dt = params[0].dtype
    grads: list[np.ndarray] = [np.zeros(0)] * len(params)
    dz = prob.copy()
    np.put_along_axis(dz, y[..., None], np.take_along_axis(dz, y[..., None], -1) - 1.0, -1)
    dz /= B * T
    Wh = params[-1]
    grads[-1] = hf.reshape(-1, d).T @ dz.reshape(-1, cfg.vocab)
    dh_ = dz @ Wh.T
    dh_, grads[-3], grads[-2] = _ln_back(dh_, lnf)
    scale = np.sqrt(np.asarray(dh, dt))
    for layer in reversed(range(cfg.layers)):
        base = 2 + 10 * layer
        _, _, Wqkv, Wo, _, _, W1, _, W2, _ = params[base : base + 10]
        a, ln1, q, k, v, p, o, bb, ln2, m, dm = caches[layer]
        # MLP: h += gelu(bb @ W1 + c1) @ W2 + c2
        grads[base + 8] = m.reshape(-1, 4 * d).T @ dh_.reshape(-1, d)
        grads[base + 9] = dh_.reshape(-1, d).sum(0)
        dz1 = (dh_ @ W2.T) * dm
        grads[base + 6] = bb.reshape(-1, d).T @ dz1.reshape(-1, 4 * d)
        grads[base + 7] = dz1.reshape(-1, 4 * d).sum(0)
        dbb = dz1 @ W1.T
        dx2, grads[base + 4], grads[base + 5] = _ln_back(dbb, ln2)
        dh_ = dh_ + dx2
        # attention: h += o @ Wo
        grads[base + 3] = o.reshape(-1, d).T @ dh_.reshape(-1, d)
        do = (dh_ @ Wo.T).reshape(B, T, H, dh).transpose(0, 2, 1, 3)
        dp = do @ v.transpose(0, 1, 3, 2)
        dv = p.transpose(0, 1, 3, 2) @ do
        ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / scale
        dq = ds @ k
        dk = ds.transpose(0, 1, 3, 2) @ q
        dqkv = np.concatenate([t.transpose(0, 2, 1, 3).reshape(B, T, d) for t in (dq, dk, dv)], -1)
        grads[base + 2] = a.reshape(-1, d).T @ dqkv.reshape(-1, 3 * d)
        da = dqkv @ Wqkv.T
        dx1, grads[base + 0], grads[base + 1] = _ln_back(da, ln1)
        dh_ = dh_ + dx1
    dtok = np.zeros_like(params[0])
    np.add.at(dtok, x.reshape(-1), dh_.reshape(-1, d))
    grads[0] = dtok
    dpos = np.zeros_like(params[1])
    dpos[:T] = dh_.sum(0)
    grads[1] = dpos
    return float(loss), [np.asarray(gr, dtype=pp.dtype) for gr, pp in zip(grads, params)]
