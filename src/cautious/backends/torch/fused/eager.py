r"""The fused contract in plain torch ops: the readable statement of what every kernel computes.

:func:`step` updates one tensor (and its state) in place exactly as the C++ and Triton kernels
do (same slots, same order of operations, compute float32 or float64, one rounding per result),
only not fused. :mod:`.cpu` falls back to it without a C++ compiler, for dtype pairs the
native kernel does not cover, or under ``CAUTIOUS_FUSED_CPU=eager``. See :mod:`.contract` for
the table of rules and slots.
"""

from __future__ import annotations

import torch

from cautious.backends.torch.fused.contract import Launch, Rule, Slot

__all__ = ["step", "count", "nonzero", "keep", "round_store"]


def round_store(dst: torch.Tensor, x: torch.Tensor, sr: bool, gen: torch.Generator | None) -> None:
    """Round the compute-dtype ``x`` once into ``dst`` (torch casts round to nearest even).

    With ``sr`` and a bfloat16 ``dst``: stochastic rounding (16 random bits added below the
    kept mantissa, never overflowing to inf, NaN kept).
    """
    if sr and dst.dtype == torch.bfloat16:
        x32 = x.to(torch.float32)
        bits = x32.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        r = torch.randint(0, 1 << 16, bits.shape, generator=gen, dtype=torch.int64)
        rne = bits + 0x7FFF + ((bits >> 16) & 1)
        out = bits + r
        out = torch.where((out & 0x7F800000) == 0x7F800000, rne, out)
        out = torch.where(torch.isnan(x32), bits | 0x400000, out)
        hi = ((out >> 16) & 0xFFFF).to(torch.int32)
        hi = torch.where(hi >= 1 << 15, hi - (1 << 16), hi).to(torch.int16)
        dst.copy_(hi.view(torch.bfloat16))
    else:
        dst.copy_(x)


def keep(u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The cautious mask from signs: ``u`` and ``g`` agree strictly, or either is NaN."""
    return ((u > 0) & (g > 0)) | ((u < 0) & (g < 0)) | torch.isnan(u) | torch.isnan(g)


def _direction(launch: Launch, g, s1, s2, s3, ct):
    """``(u, test, [(state tensor, new value), ...])`` for one entry-wise base rule step."""
    hp = launch.hp
    if launch.rule == Rule.ADAM:
        m_new = hp[Slot.MIX1_OLD] * s1.to(ct) + hp[Slot.MIX1_NEW] * g
        v_new = hp[Slot.MIX2_OLD] * s2.to(ct) + hp[Slot.MIX2_NEW] * (g * g)
        v_used = torch.maximum(s3.to(ct), v_new) if launch.amsgrad else v_new
        u = hp[Slot.ADAM_C] * ((m_new * hp[Slot.ADAM_A]) / (torch.sqrt(v_used) * hp[Slot.ADAM_B] + hp[Slot.EPS]))
        news = [(s1, m_new), (s2, v_new)] + ([(s3, v_used)] if launch.amsgrad else [])
        return u, (u if launch.exact_u else m_new), news
    if launch.rule == Rule.NADAM:
        m_new = hp[Slot.MIX1_OLD] * s1.to(ct) + hp[Slot.MIX1_NEW] * g
        v_new = hp[Slot.MIX2_OLD] * s2.to(ct) + hp[Slot.MIX2_NEW] * (g * g)
        d = torch.sqrt(v_new) * hp[Slot.ADAM_B] + hp[Slot.EPS]
        u = hp[Slot.G_COEF] * (g / d) + hp[Slot.M_COEF] * (m_new / d)
        return u, u, [(s1, m_new), (s2, v_new)]
    if launch.rule == Rule.ADOPT:
        if launch.first:  # v = g^2, nothing moves
            u = torch.zeros_like(g)
            return u, u, [(s2, g * g)]
        v = s2.to(ct)
        n = g / torch.clamp(torch.sqrt(v), min=hp[Slot.EPS])  # clamp keeps NaN
        n = torch.clamp(n, -hp[Slot.CLIP], hp[Slot.CLIP])
        m_new = hp[Slot.MIX1_OLD] * s1.to(ct) + hp[Slot.MIX1_NEW] * n
        u = hp[Slot.MIX1_OLD] * m_new + hp[Slot.MIX1_NEW] * n if launch.nesterov else m_new
        return u, u, [(s1, m_new), (s2, hp[Slot.MIX2_OLD] * v + hp[Slot.MIX2_NEW] * (g * g))]
    if launch.rule == Rule.LAPROP:
        v_new = hp[Slot.MIX2_OLD] * s2.to(ct) + hp[Slot.MIX2_NEW] * (g * g)
        n = g / (torch.sqrt(v_new) * hp[Slot.ADAM_B] + hp[Slot.EPS])
        m_new = hp[Slot.MIX1_OLD] * s1.to(ct) + hp[Slot.MIX1_NEW] * n
        test = m_new if hp[Slot.STEP_LR] > 0 else m_new * 0.0  # delta = -STEP_LR m': 0 (or NaN) at rate 0
        return m_new, test, [(s1, m_new), (s2, v_new)]
    if launch.rule == Rule.LION:
        m = s1.to(ct)
        c = hp[Slot.MIX1_OLD] * m + hp[Slot.MIX1_NEW] * g
        u = torch.where(torch.isnan(c), c, torch.sign(c))
        return u, c, [(s1, hp[Slot.MIX2_OLD] * m + hp[Slot.MIX2_NEW] * g)]
    if not launch.has_momentum:
        return g, g, []
    b = g.clone() if launch.first else hp[Slot.MIX1_OLD] * s1.to(ct) + hp[Slot.MIX1_NEW] * g
    u = g + hp[Slot.MIX1_OLD] * b if launch.nesterov else b
    return u, u, [(s1, b)]


def _inputs(launch: Launch, p, g, s1, s2, s3):
    """``(compute dtype, p, g)``: ``p`` and ``g`` in the compute dtype, ``g`` after maximize and coupled decay."""
    dts = [x.dtype for x in (p, g, s1, s2, s3) if x is not None]
    ct = torch.float64 if torch.float64 in dts else torch.float32
    pp = p.to(ct)
    gg = g.to(ct)
    if launch.maximize:
        gg = -gg
    if launch.coupled:
        gg = gg + launch.hp[Slot.COUPLED_DECAY] * pp
    return ct, pp, gg


def count(launch: Launch, p, g, s1, s2, s3) -> int:
    """The count pass alone: the kept entries of one tensor (nothing is stored)."""
    ct, _, gg = _inputs(launch, p, g, s1, s2, s3)
    _, test, _ = _direction(launch, gg, s1, s2, s3, ct)
    return int(keep(test, gg).sum())


def nonzero(launch: Launch, p, g, s1, s2, s3) -> int:
    """The entries of the consumed gradient that are not 0 (NaN counts): ``denominator="nonzero"``'s ``n``."""
    _, _, gg = _inputs(launch, p, g, s1, s2, s3)
    return int(torch.count_nonzero(gg))


def step(launch: Launch, p, g, s1, s2, s3, *, index: int, scale: float | None = None) -> None:
    """One step on one tensor (compute float32, or float64 if any storage is float64).

    ``scale``: given instead of counted (a sharded tensor's, from its global count).
    """
    ct, pp, gg = _inputs(launch, p, g, s1, s2, s3)
    gen = None
    if launch.stochastic_rounding:
        gen = torch.Generator().manual_seed((int(launch.seed) * 1000003 + index) & 0x7FFFFFFFFFFFFFFF)
    hp = launch.hp
    u, test, news = _direction(launch, gg, s1, s2, s3, ct)
    lr = hp[Slot.LR]
    rate = hp[Slot.STEP_LR] if launch.rule == Rule.LAPROP else lr
    step_size = rate
    if launch.caution is not None:
        kept = keep(test, gg)
        if scale is not None:
            step_size = rate * scale
        elif launch.counts:
            step_size = rate * launch.caution.scale(int(kept.sum()), int(p.numel()))
        u = torch.where(kept, u, torch.zeros((), dtype=ct))
    if launch.decoupled:
        skip = ((u > 0) & (pp < 0)) | ((u < 0) & (pp > 0)) if launch.cwd else None
        lr_wd = lr * hp[Slot.DECOUPLED_DECAY]
        if launch.post_decay:
            moved = pp - step_size * u
            d = moved if skip is None else torch.where(skip, torch.zeros((), dtype=ct), moved)
            pn = moved - lr_wd * d
        else:
            d = pp if skip is None else torch.where(skip, torch.zeros((), dtype=ct), pp)
            pn = (pp - lr_wd * d) - step_size * u
    else:
        pn = pp - step_size * u
    for dst, val in news:
        round_store(dst, val, launch.stochastic_rounding, gen)
    round_store(p, pn, launch.stochastic_rounding, gen)
