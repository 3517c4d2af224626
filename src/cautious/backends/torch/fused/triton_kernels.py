r"""Triton kernels for the fused cautious update: a count pass, then an update pass.

:func:`run` updates many tensors of one dtype group with two kernel launches, whatever the
number of tensors (the rules and slots are :mod:`.contract`'s):

1. **count pass** (skipped without caution, or with ``normalize="none"``): reads ``g`` and
   the first moment (plus ``p`` under coupled decay), recomputes the sign of the direction
   and adds the number of kept entries of every chunk to an ``int64`` per-tensor count with
   an integer atomic (deterministic). For Adam, ``sign(u) = sign(m_new)`` because the
   denominator ``sqrt(v_hat) + eps`` is positive, so ``v`` is not read (when ``eps == 0``
   the denominator can be 0 and the pass also reads ``v`` to find ``0/0 = NaN``).
2. **update pass**: computes the per-tensor scale on the device from the count (float64,
   :meth:`cautious.Caution.scale`), reads ``p, g`` and the state once, writes them once.

Tensors are addressed through pointer tables: ``meta[t] = (p, g, s1, s2, s3, numel)`` as
int64 addresses, cast in the kernel with ``tl.pointer_type``; the grid is a chunk table of
``(tensor index, chunk start)`` rows (int64 offsets, so tensors over 2**31 elements work;
zero-size tensors contribute no rows). Hyperparameters travel as a float64 device tensor
indexed by :class:`~.contract.Slot`, so float64 storage computes with float64 hyperparameters
(Triton passes Python floats as
float32). Storage codes: 0 float32, 1 float64, 2 bfloat16 (loaded and stored as uint16 bit
patterns, rounded to nearest even with integer operations, since the interpreter truncates
float casts to bfloat16), 3 float16. Compute is float64 if any storage is float64, else
float32. See :mod:`cautious.spec` for the algorithm.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from cautious.backends.torch.fused.contract import STORAGE, Launch, Norm, Rule, Slot

__all__ = ["run", "chunk_table"]

META_COLS = 8  # p, g, s1, s2, s3, numel, pad, pad

# The contract's numbers as compile-time constants (a jitted function reads only constexpr globals).
ADAM: tl.constexpr = tl.constexpr(int(Rule.ADAM))
LION: tl.constexpr = tl.constexpr(int(Rule.LION))
NADAM: tl.constexpr = tl.constexpr(int(Rule.NADAM))
ADOPT: tl.constexpr = tl.constexpr(int(Rule.ADOPT))
LAPROP: tl.constexpr = tl.constexpr(int(Rule.LAPROP))
MEAN_CLAMP: tl.constexpr = tl.constexpr(int(Norm.MEAN_CLAMP))
COUNT_PLUS_ONE: tl.constexpr = tl.constexpr(int(Norm.COUNT_PLUS_ONE))
EXACT: tl.constexpr = tl.constexpr(int(Norm.EXACT))
COUPLED_DECAY: tl.constexpr = tl.constexpr(int(Slot.COUPLED_DECAY))
MIX1_OLD: tl.constexpr = tl.constexpr(int(Slot.MIX1_OLD))
MIX1_NEW: tl.constexpr = tl.constexpr(int(Slot.MIX1_NEW))
MIX2_OLD: tl.constexpr = tl.constexpr(int(Slot.MIX2_OLD))
MIX2_NEW: tl.constexpr = tl.constexpr(int(Slot.MIX2_NEW))
EPS: tl.constexpr = tl.constexpr(int(Slot.EPS))
ADAM_A: tl.constexpr = tl.constexpr(int(Slot.ADAM_A))
ADAM_B: tl.constexpr = tl.constexpr(int(Slot.ADAM_B))
ADAM_C: tl.constexpr = tl.constexpr(int(Slot.ADAM_C))
DECOUPLED_DECAY: tl.constexpr = tl.constexpr(int(Slot.DECOUPLED_DECAY))
LR: tl.constexpr = tl.constexpr(int(Slot.LR))
FLOOR: tl.constexpr = tl.constexpr(int(Slot.FLOOR))
G_COEF: tl.constexpr = tl.constexpr(int(Slot.G_COEF))
M_COEF: tl.constexpr = tl.constexpr(int(Slot.M_COEF))
CLIP: tl.constexpr = tl.constexpr(int(Slot.CLIP))
STEP_LR: tl.constexpr = tl.constexpr(int(Slot.STEP_LR))


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _ld(addr, offs, mask, CODE: tl.constexpr, CT: tl.constexpr):
    """Load ``addr[offs]`` of storage ``CODE`` and widen (exactly) to the compute dtype."""
    if CODE == 0:
        x = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif CODE == 1:
        x = tl.load(addr.to(tl.pointer_type(tl.float64)) + offs, mask=mask, other=0.0)
    elif CODE == 2:
        raw = tl.load(addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        x = (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0)
    return x.to(CT)


@triton.jit
def _st(addr, offs, x, mask, CODE: tl.constexpr, SR: tl.constexpr, seed, rnd):
    """Round ``x`` once to storage ``CODE`` (nearest even, or stochastic for bfloat16) and store."""
    if CODE == 0:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, x.to(tl.float32), mask=mask)
    elif CODE == 1:
        tl.store(addr.to(tl.pointer_type(tl.float64)) + offs, x.to(tl.float64), mask=mask)
    elif CODE == 2:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        if SR:
            r = tl.randint(seed, rnd).to(tl.uint32) & 0xFFFF
            rounded = bits + r
            # never round a finite value up to inf by chance more than RNE would: clamp to max
            rounded = tl.where((rounded & 0x7F800000) == 0x7F800000, bits + 0x7FFF + ((bits >> 16) & 1), rounded)
        else:
            rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x32 != x32, bits | 0x400000, rounded)  # keep NaN a (quiet) NaN
        tl.store(addr.to(tl.pointer_type(tl.uint16)) + offs, (rounded >> 16).to(tl.uint16), mask=mask)
    else:
        tl.store(addr.to(tl.pointer_type(tl.float16)) + offs, x.to(tl.float16), mask=mask)


@triton.jit
def _keep(u, g):
    """The cautious mask, from signs; NaN in ``u`` or ``g`` is kept (NaN != NaN)."""
    return ((u > 0) & (g > 0)) | ((u < 0) & (g < 0)) | (u != u) | (g != g)


@triton.jit
def _hp(hp, i: tl.constexpr, CT: tl.constexpr):
    return tl.load(hp + i).to(CT)


@triton.jit
def _grad(
    meta_row,
    offs,
    mask,
    hp,
    PC: tl.constexpr,
    GC: tl.constexpr,
    CT: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    COUPLED: tl.constexpr,
):
    """The gradient the rule consumes: ``-g`` under maximize, plus ``wd * p`` under coupled decay."""
    g = _ld(tl.load(meta_row + 1), offs, mask, GC, CT)
    if MAXIMIZE:
        g = -g
    if COUPLED:
        p = _ld(tl.load(meta_row + 0), offs, mask, PC, CT)
        g = g + _hp(hp, COUPLED_DECAY, CT) * p
    return g


@triton.jit
def _adam_u(m_new, v_used, hp, CT: tl.constexpr):
    """``u = ADAM_C * ((m' * ADAM_A) / (sqrt(v) * ADAM_B + EPS))`` (the slots fold the bias corrections)."""
    num = m_new * _hp(hp, ADAM_A, CT)
    return _hp(hp, ADAM_C, CT) * (num / (tl.sqrt(v_used) * _hp(hp, ADAM_B, CT) + _hp(hp, EPS, CT)))


@triton.jit
def _nadam(g, m, v, hp, CT: tl.constexpr):
    """``(u, m', v')``: ``u = G_COEF (g / d) + M_COEF (m' / d)``, ``d = sqrt(v') ADAM_B + EPS``."""
    m_new = _hp(hp, MIX1_OLD, CT) * m + _hp(hp, MIX1_NEW, CT) * g
    v_new = _hp(hp, MIX2_OLD, CT) * v + _hp(hp, MIX2_NEW, CT) * (g * g)
    d = tl.sqrt(v_new) * _hp(hp, ADAM_B, CT) + _hp(hp, EPS, CT)
    u = _hp(hp, G_COEF, CT) * (g / d) + _hp(hp, M_COEF, CT) * (m_new / d)
    return u, m_new, v_new


@triton.jit
def _adopt(g, m, v, hp, CT: tl.constexpr, NESTEROV: tl.constexpr):
    """``(u, m', v')`` of a later ADOPT step: ``n = clip(g / max(sqrt(v), EPS), +-CLIP)`` (NaN kept)."""
    n = g / tl.maximum(tl.sqrt(v), _hp(hp, EPS, CT), propagate_nan=tl.PropagateNan.ALL)
    c = _hp(hp, CLIP, CT)
    n = tl.where(n > c, c, tl.where(n < -c, -c, n))
    m_new = _hp(hp, MIX1_OLD, CT) * m + _hp(hp, MIX1_NEW, CT) * n
    if NESTEROV:
        u = _hp(hp, MIX1_OLD, CT) * m_new + _hp(hp, MIX1_NEW, CT) * n
    else:
        u = m_new
    v_new = _hp(hp, MIX2_OLD, CT) * v + _hp(hp, MIX2_NEW, CT) * (g * g)
    return u, m_new, v_new


@triton.jit
def _laprop(g, m, v, hp, CT: tl.constexpr):
    """``(u, test, m', v')``: ``n = g / (sqrt(v') ADAM_B + EPS)``, ``u = m' = MIX1_OLD m + MIX1_NEW n``;
    the test is ``0 m'`` while the rate ``STEP_LR`` is 0 (the move ``-STEP_LR m'`` is then 0 or NaN)."""
    v_new = _hp(hp, MIX2_OLD, CT) * v + _hp(hp, MIX2_NEW, CT) * (g * g)
    n = g / (tl.sqrt(v_new) * _hp(hp, ADAM_B, CT) + _hp(hp, EPS, CT))
    m_new = _hp(hp, MIX1_OLD, CT) * m + _hp(hp, MIX1_NEW, CT) * n
    test_mul = tl.where(tl.load(hp + STEP_LR) > 0, 1.0, 0.0).to(CT)
    return m_new, m_new * test_mul, m_new, v_new


@triton.jit
def _sgd_u(g, buf, hp, CT: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr, HAS_MOMENTUM: tl.constexpr):
    if HAS_MOMENTUM:
        if FIRST:
            b = g
        else:
            b = _hp(hp, MIX1_OLD, CT) * buf + _hp(hp, MIX1_NEW, CT) * g
        if NESTEROV:
            u = g + _hp(hp, MIX1_OLD, CT) * b
        else:
            u = b
    else:
        b = g
        u = g
    return u, b


@triton.jit
def _scale(counts, t, n, hp, NORM: tl.constexpr):
    """The per-tensor scale of :meth:`cautious.Caution.scale`, in float64 from the integer count."""
    k = tl.load(counts + t).to(tl.float64)
    nf = n.to(tl.float64)
    if NORM == MEAN_CLAMP:
        s = 1.0 / tl.maximum(k / nf, tl.load(hp + FLOOR))
    elif NORM == COUNT_PLUS_ONE:
        s = nf / (k + 1.0)
    elif NORM == EXACT:
        s = nf / tl.maximum(k, 1.0)
    else:
        s = k * 0.0 + 1.0
    return s


@triton.jit
def _lr(hp, lr_ptr, LR_TENSOR: tl.constexpr):
    if LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = tl.load(hp + LR)
    return lr


# --------------------------------------------------------------------------- kernels


@triton.jit
def _count_kernel(
    meta,
    chunks,
    counts,
    nonzeros,
    hp,
    RULE: tl.constexpr,
    PC: tl.constexpr,
    GC: tl.constexpr,
    SC: tl.constexpr,
    CT: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    COUPLED: tl.constexpr,
    EXACT_U: tl.constexpr,
    AMSGRAD: tl.constexpr,
    FIRST: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NONZERO: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = meta + t * 8
    n = tl.load(row + 5)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    nz = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        g = _grad(row, offs, mask, hp, PC, GC, CT, MAXIMIZE, COUPLED)
        if RULE == ADAM:  # adam: sign(u) == sign(m_new) unless eps == 0
            m = _ld(tl.load(row + 2), offs, mask, SC, CT)
            d = _hp(hp, MIX1_OLD, CT) * m + _hp(hp, MIX1_NEW, CT) * g
            if EXACT_U:
                v = _ld(tl.load(row + 3), offs, mask, SC, CT)
                v_new = _hp(hp, MIX2_OLD, CT) * v + _hp(hp, MIX2_NEW, CT) * (g * g)
                if AMSGRAD:
                    v_new = tl.maximum(
                        _ld(tl.load(row + 4), offs, mask, SC, CT), v_new, propagate_nan=tl.PropagateNan.ALL
                    )
                d = _adam_u(d, v_new, hp, CT)
        elif RULE == LION:  # lion: sign(u) == sign(b1 * m + (1 - b1) * g)
            m = _ld(tl.load(row + 2), offs, mask, SC, CT)
            d = _hp(hp, MIX1_OLD, CT) * m + _hp(hp, MIX1_NEW, CT) * g
        elif RULE == NADAM:  # the sign of u itself
            m = _ld(tl.load(row + 2), offs, mask, SC, CT)
            v = _ld(tl.load(row + 3), offs, mask, SC, CT)
            d, _m, _v = _nadam(g, m, v, hp, CT)
        elif RULE == ADOPT:
            if FIRST:  # u = 0: only a NaN gradient is kept
                d = tl.zeros_like(g)
            else:
                m = _ld(tl.load(row + 2), offs, mask, SC, CT)
                v = _ld(tl.load(row + 3), offs, mask, SC, CT)
                d, _m, _v = _adopt(g, m, v, hp, CT, NESTEROV)
        elif RULE == LAPROP:
            m = _ld(tl.load(row + 2), offs, mask, SC, CT)
            v = _ld(tl.load(row + 3), offs, mask, SC, CT)
            _u, d, _m, _v = _laprop(g, m, v, hp, CT)
        else:  # sgd
            if HAS_MOMENTUM and not FIRST:
                buf = _ld(tl.load(row + 2), offs, mask, SC, CT)
            else:
                buf = g
            d, _b = _sgd_u(g, buf, hp, CT, FIRST, NESTEROV, HAS_MOMENTUM)
        acc += (_keep(d, g) & mask).to(tl.int32)
        if NONZERO:  # denominator="nonzero": the consumed gradient's entries that are not 0 (NaN counts)
            nz += ((g != 0) & mask).to(tl.int32)
    tl.atomic_add(counts + t, tl.sum(acc, axis=0).to(tl.int64))
    if NONZERO:
        tl.atomic_add(nonzeros + t, tl.sum(nz, axis=0).to(tl.int64))


@triton.jit
def _update_kernel(
    meta,
    chunks,
    counts,
    scales,
    hp,
    lr_ptr,
    seed,
    RULE: tl.constexpr,
    PC: tl.constexpr,
    GC: tl.constexpr,
    SC: tl.constexpr,
    CT: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    COUPLED: tl.constexpr,
    DECOUPLED: tl.constexpr,
    CWD: tl.constexpr,
    CAUTION: tl.constexpr,
    EXACT_U: tl.constexpr,
    NORM: tl.constexpr,
    GIVEN_SCALES: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    SR: tl.constexpr,
    AMSGRAD: tl.constexpr,
    FIRST: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    POST_DECAY: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = meta + t * 8
    n = tl.load(row + 5)
    p_addr = tl.load(row + 0)
    s1 = tl.load(row + 2)
    s2 = tl.load(row + 3)
    s3 = tl.load(row + 4)
    lr = _lr(hp, lr_ptr, LR_TENSOR)
    if RULE == LAPROP:  # the direction's rate: lr / lr_avg (its momentum carries the learning rate)
        rate = tl.load(hp + STEP_LR)
    else:
        rate = lr
    if CAUTION and GIVEN_SCALES:  # a sharded tensor: the scale of its global count
        step = (rate * tl.load(scales + t)).to(CT)
    elif CAUTION:
        step = (rate * _scale(counts, t, n, hp, NORM)).to(CT)  # rate * scale, one rounding
    else:
        step = rate.to(CT)
    lr_wd = (lr * tl.load(hp + DECOUPLED_DECAY)).to(CT)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        rnd = offs + t * (1 << 40)  # stochastic rounding stream: unique per element
        p = _ld(p_addr, offs, mask, PC, CT)
        g = _grad(row, offs, mask, hp, PC, GC, CT, MAXIMIZE, COUPLED)
        if RULE == ADAM:
            m = _ld(s1, offs, mask, SC, CT)
            v = _ld(s2, offs, mask, SC, CT)
            m_new = _hp(hp, MIX1_OLD, CT) * m + _hp(hp, MIX1_NEW, CT) * g
            v_new = _hp(hp, MIX2_OLD, CT) * v + _hp(hp, MIX2_NEW, CT) * (g * g)
            if AMSGRAD:
                v_used = tl.maximum(_ld(s3, offs, mask, SC, CT), v_new, propagate_nan=tl.PropagateNan.ALL)
                _st(s3, offs, v_used, mask, SC, SR, seed + 3, rnd)
            else:
                v_used = v_new
            u = _adam_u(m_new, v_used, hp, CT)
            _st(s1, offs, m_new, mask, SC, SR, seed + 1, rnd)
            _st(s2, offs, v_new, mask, SC, SR, seed + 2, rnd)
        elif RULE == LION:
            m = _ld(s1, offs, mask, SC, CT)
            c = _hp(hp, MIX1_OLD, CT) * m + _hp(hp, MIX1_NEW, CT) * g
            u = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, tl.where(c != c, c, 0.0))).to(CT)
            m_new = _hp(hp, MIX2_OLD, CT) * m + _hp(hp, MIX2_NEW, CT) * g
            _st(s1, offs, m_new, mask, SC, SR, seed + 1, rnd)
        elif RULE == NADAM:
            u, m_new, v_new = _nadam(g, _ld(s1, offs, mask, SC, CT), _ld(s2, offs, mask, SC, CT), hp, CT)
            test = u
            _st(s1, offs, m_new, mask, SC, SR, seed + 1, rnd)
            _st(s2, offs, v_new, mask, SC, SR, seed + 2, rnd)
        elif RULE == ADOPT:
            if FIRST:  # v = g^2; nothing moves
                u = tl.zeros_like(g)
                _st(s2, offs, g * g, mask, SC, SR, seed + 2, rnd)
            else:
                u, m_new, v_new = _adopt(g, _ld(s1, offs, mask, SC, CT), _ld(s2, offs, mask, SC, CT), hp, CT, NESTEROV)
                _st(s1, offs, m_new, mask, SC, SR, seed + 1, rnd)
                _st(s2, offs, v_new, mask, SC, SR, seed + 2, rnd)
            test = u
        elif RULE == LAPROP:
            u, test, m_new, v_new = _laprop(g, _ld(s1, offs, mask, SC, CT), _ld(s2, offs, mask, SC, CT), hp, CT)
            _st(s1, offs, m_new, mask, SC, SR, seed + 1, rnd)
            _st(s2, offs, v_new, mask, SC, SR, seed + 2, rnd)
        else:
            if HAS_MOMENTUM and not FIRST:
                buf = _ld(s1, offs, mask, SC, CT)
            else:
                buf = g
            u, b = _sgd_u(g, buf, hp, CT, FIRST, NESTEROV, HAS_MOMENTUM)
            if HAS_MOMENTUM:
                _st(s1, offs, b, mask, SC, SR, seed + 1, rnd)
        if CAUTION:
            if RULE == ADAM and not EXACT_U:
                keep = _keep(m_new, g)  # the count pass's test: sign(u) == sign(m_new)
            elif RULE == NADAM or RULE == ADOPT or RULE == LAPROP:
                keep = _keep(test, g)
            else:
                keep = _keep(u, g)
            u = tl.where(keep, u, 0.0)
        # p' = p - lr*wd*d - rate*scale*u  (d = p, or p where u_c and p do not strictly disagree);
        # POST_DECAY (LaProp's post_update): the decay shrinks the moved parameter p - rate*scale*u
        if DECOUPLED:
            if POST_DECAY:
                moved = p - step * u
                d = moved
            else:
                d = p
            if CWD:
                d = tl.where(((u > 0) & (p < 0)) | ((u < 0) & (p > 0)), 0.0, d).to(CT)
            if POST_DECAY:
                p_new = moved - lr_wd * d
            else:
                p_new = p - lr_wd * d - step * u
        else:
            p_new = p - step * u
        _st(p_addr, offs, p_new, mask, PC, SR, seed, rnd)


# --------------------------------------------------------------------------- host side

#: (BLOCK, ITERS) per kind of device: one program handles BLOCK * ITERS elements of one tensor.
CONFIG = {"cuda": (1024, 8), "interpreter": (1024, 2)}
_NUM_WARPS = 4
_CACHE: dict = {}
_CACHE_MAX = 16


def _cached(key, build):
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        hit = _CACHE[key] = build()
    return hit


def chunk_table(numels, chunk: int) -> np.ndarray:
    """``(C, 2)`` int64 rows ``(tensor index, chunk start)`` covering every entry; none for empty tensors."""
    n = np.asarray(numels, dtype=np.int64).reshape(-1)
    per = (n + chunk - 1) // chunk
    idx = np.repeat(np.arange(n.size, dtype=np.int64), per)
    first = np.cumsum(per) - per
    starts = (np.arange(idx.size, dtype=np.int64) - np.repeat(first, per)) * np.int64(chunk)
    return np.ascontiguousarray(np.stack([idx, starts], axis=1))


def _tables(device, lists, numels, chunk):
    """Device pointer table ``meta`` (T x 8 int64) and chunk table (C x 2 int64: tensor, start)."""
    addrs = tuple(tuple(0 if x is None else x.data_ptr() for x in col) for col in lists)
    key = ("tables", str(device), chunk, addrs, numels)

    def build():
        t = len(numels)
        meta = np.zeros((t, 8), dtype=np.int64)
        for j, col in enumerate(addrs):
            meta[:, j] = col
        meta[:, 5] = numels
        chunks = chunk_table(numels, chunk)
        return (
            torch.from_numpy(meta).to(device),
            torch.from_numpy(chunks).to(device),
            int(chunks.shape[0]),
        )

    return _cached(key, build)


def _hp_tensor(device, values):
    key = ("hp", str(device), tuple(values))
    return _cached(key, lambda: torch.tensor(values, dtype=torch.float64).to(device))


def run(
    launch: Launch, params, grads, s1, s2, s3, *, lr_tensor=None, counts_out=None, scales=None, nonzero_out=None
) -> None:
    """Launch the count pass (when needed) and the update pass over one dtype group.

    ``params``, ``grads``, ``s1``/``s2``/``s3`` (state; lists of None when absent) are
    parallel lists of contiguous tensors on one device with one storage dtype each.
    ``lr_tensor``: a 0-d device tensor read by the kernel instead of ``launch.hp[Slot.LR]``.
    Sharded tensors, telemetry and ``denominator="nonzero"`` take two calls: with ``counts_out``
    (int64 zeros, one per tensor) only the count pass runs (also adding the gradients' nonzero
    entries to ``nonzero_out`` when given); with ``scales`` (float64, one per tensor) the update
    pass uses them.
    """
    numels = tuple(int(p.numel()) for p in params)
    if sum(numels) == 0:
        return
    device = params[0].device
    block, iters = CONFIG["cuda" if device.type == "cuda" else "interpreter"]
    pc = STORAGE[params[0].dtype]
    gc = STORAGE[grads[0].dtype]
    state0 = next((x for x in (*s1, *s2, *s3) if x is not None), None)
    sc = STORAGE[state0.dtype] if state0 is not None else pc
    ct = tl.float64 if 1 in (pc, gc, sc) else tl.float32
    hp_t = _hp_tensor(device, launch.hp)
    meta, chunks, nchunks = _tables(device, (params, grads, s1, s2, s3), numels, block * iters)
    counts = counts_out if counts_out is not None else torch.zeros(len(numels), dtype=torch.int64, device=device)
    flags = dict(
        RULE=int(launch.rule),
        PC=pc,
        GC=gc,
        SC=sc,
        CT=ct,
        MAXIMIZE=launch.maximize,
        COUPLED=launch.coupled,
        AMSGRAD=launch.amsgrad,
        FIRST=launch.first,
        NESTEROV=launch.nesterov,
        HAS_MOMENTUM=launch.has_momentum,
        EXACT_U=launch.exact_u,
        BLOCK=block,
        ITERS=iters,
    )
    grid = (nchunks,)
    if counts_out is not None:  # the count pass alone, whatever the normalization
        nonzeros = nonzero_out if nonzero_out is not None else counts
        _count_kernel[grid](
            meta, chunks, counts, nonzeros, hp_t, NONZERO=nonzero_out is not None, num_warps=_NUM_WARPS, **flags
        )
        return
    if launch.caution is not None and launch.counts and scales is None:
        _count_kernel[grid](meta, chunks, counts, counts, hp_t, NONZERO=False, num_warps=_NUM_WARPS, **flags)
    lr_arg = lr_tensor if lr_tensor is not None else hp_t
    _update_kernel[grid](
        meta,
        chunks,
        counts,
        scales if scales is not None else hp_t,
        hp_t,
        lr_arg,
        int(launch.seed) & 0x7FFFFFFF,
        DECOUPLED=launch.decoupled,
        CWD=launch.cwd,
        CAUTION=launch.caution is not None,
        NORM=int(launch.norm),
        GIVEN_SCALES=scales is not None,
        LR_TENSOR=lr_tensor is not None,
        SR=launch.stochastic_rounding,
        POST_DECAY=launch.post_decay,
        num_warps=_NUM_WARPS,
        **flags,
    )
