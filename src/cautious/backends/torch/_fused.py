r"""Fused cautious Adam(W), Lion and SGD: two passes over many tensors per call.

The per-tensor kept count must be complete before any entry of that tensor is updated, so
every implementation here runs a **count pass** then an **update pass**:

.. math::

    \text{count} = \sum_i [\operatorname{sign}(u_i) \text{ agrees with } g_i \text{ or NaN}],\qquad
    p' = p - \eta\lambda\,d\odot p - \eta\,\text{scale}(\text{count}, n)\,\text{mask}\odot u

The count pass needs only the *sign* of ``u``: for Adam ``sign(u) = sign(m_new)`` with
``m_new = b1 m + (1 - b1) g`` (the denominator ``sqrt(v_hat) + eps`` is positive), for Lion
``sign(u) = sign(b1 m + (1 - b1) g)``, for SGD ``u`` is the (Nesterov) momentum. It reads
``g`` and ``m`` only (36 B per float32 Adam parameter instead of 28 for plain fused AdamW).
See :mod:`cautious.spec` for the full algorithm; every function here matches it.

Implementations, chosen per device:

* CUDA (and CPU under ``TRITON_INTERPRET=1``): Triton kernels, two launches per dtype group,
  pointer and chunk tables (:mod:`._fused_triton`).
* CPU: a native C++ loop compiled once on first use (:mod:`._fused_cpu`), or, without a
  C++ compiler, an exact eager-torch fallback.

All hyperparameters are Python floats (``lr`` may also be a 0-d tensor); lists are parallel
lists of tensors (zero-size tensors allowed anywhere). Storage dtypes: float32, float64,
bfloat16, float16 for parameters, gradients and state, independently (mixed precision:
bfloat16 params with float32 state); compute is float32 (float64 if anything is float64) and
every result is rounded once, to nearest even, or stochastically for bfloat16 results when
``stochastic_rounding=True`` (seeded by ``seed``; different streams on CUDA and on CPU).

Known deviation from :mod:`cautious.spec`: with a non-finite second moment ``v`` in the
state (an earlier gradient overflowed), Adam's ``u`` can be ``0`` or ``NaN`` while
``m_new`` is finite; the fused paths decide the mask from ``sign(m_new)`` (except when
``eps == 0``, where the exact ``u`` is used), so such an entry can be counted where the
spec masks it. Its contribution to ``p`` is the same; only the scale of the other entries
can differ by one count.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import torch

from cautious._caution import Caution, as_caution
from cautious.spec.errors import check_cautious_weight_decay, check_nesterov, validate

__all__ = ["is_available", "fused_adam_", "fused_lion_", "fused_sgd_"]

_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_TORCH_NAMES = {"beta1": "betas[0]", "beta2": "betas[1]"}
RULE_ADAM, RULE_LION, RULE_SGD = 0, 1, 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def is_available(device: Any) -> bool:
    """Whether the fused path runs on ``device``.

    True for CUDA devices when Triton imports, and always for the CPU (a native or eager fast
    path; Triton's interpreter when ``TRITON_INTERPRET=1``).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and _triton_importable()
    return False


def _backend_for(device: torch.device, backend: str | None) -> str:
    if backend is not None:
        if backend not in ("triton", "cpu", "eager"):
            raise ValueError(f"backend must be 'triton', 'cpu' or 'eager', got {backend!r}")
        return backend
    if device.type == "cuda":
        if not _triton_importable():
            raise RuntimeError("the fused CUDA path needs triton; install cautious[triton]")
        return "triton"
    if device.type == "cpu":
        return "triton" if _interpreting() and _triton_importable() else "cpu"
    raise RuntimeError(f"no fused cautious implementation for device {device}")


# --------------------------------------------------------------------------- validation


def _scalar(x: Any, name: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(x.shape)}")
        return float(x.item())
    return x


def _check_lr(lr: Any, device: torch.device) -> tuple[float | None, torch.Tensor | None]:
    """``(lr as float, None)`` or ``(None, lr tensor on device)`` (no host sync for a device lr)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a number or a 1-element tensor, got shape {tuple(lr.shape)}")
        if lr.device.type == "cpu" or lr.device != device:
            val = float(lr.item())
            validate({"lr": val})
            return val, None
        if not lr.is_floating_point():
            raise TypeError(f"lr must be a floating-point tensor, got {lr.dtype}")
        return None, lr.reshape(())
    validate({"lr": lr})
    return float(lr), None


def _check_lists(names: Sequence[str], lists: Sequence[Sequence[torch.Tensor | None] | None]) -> None:
    ref = lists[0]
    for name, lst in zip(names, lists, strict=False):
        if lst is None:
            continue
        if len(lst) != len(ref):
            raise ValueError(f"{name} has {len(lst)} tensors but params has {len(ref)}")
    device = ref[0].device if len(ref) else None
    for i, p in enumerate(ref):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        for name, lst in zip(names, lists, strict=False):
            if lst is None:
                continue
            x = lst[i]
            if x is None:
                raise ValueError(f"{name}[{i}] is None")
            if x.is_sparse:
                raise RuntimeError(f"{name}[{i}] is sparse; the fused path needs dense tensors")
            if x.shape != p.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)} but params[{i}] has {tuple(p.shape)}")
            if x.device != device:
                raise ValueError(f"all tensors must be on one device; {name}[{i}] is on {x.device}, not {device}")
            if x.dtype not in _SUPPORTED:
                raise TypeError(f"{name}[{i}] has dtype {x.dtype}; supported: float32, float64, bfloat16, float16")


def _caution(caution: Any) -> Caution | None:
    return as_caution(caution)


# --------------------------------------------------------------------------- driver


def _run(
    rule: int,
    backend: str | None,
    lists: list[list[torch.Tensor | None]],
    lr: Any,
    kwargs: dict[str, Any],
) -> None:
    """Group by dtypes, make contiguous, and hand each group to the chosen implementation."""
    params = lists[0]
    if len(params) == 0:
        return
    device = params[0].device
    impl = _backend_for(device, backend)
    lr_f, lr_t = _check_lr(lr, device)
    if impl != "triton" and lr_t is not None:
        lr_f, lr_t = float(lr_t.item()), None  # CPU: reading a CPU tensor is free
    kwargs["hp"][14] = 0.0 if lr_f is None else lr_f
    # group by (param, grad, state) dtypes, keeping list order inside a group
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        st = tuple(lst[i].dtype for lst in lists[2:] if lst[i] is not None)
        groups.setdefault((p.dtype, lists[1][i].dtype, st), []).append(i)
    for idx in groups.values():
        cols = [[lst[i] for i in idx] for lst in lists]
        writeback = []
        for c, col in enumerate(cols):
            for j, x in enumerate(col):
                if x is not None and not x.is_contiguous():
                    y = x.contiguous()
                    if c != 1:
                        writeback.append((x, y))
                    col[j] = y
        if impl == "triton":
            from cautious.backends.torch import _fused_triton as ft

            ft.run(rule, *cols, lr_tensor=lr_t, **kwargs)
        else:
            from cautious.backends.torch import _fused_cpu as fc

            fc.run(rule, *cols, native=impl == "cpu", **kwargs)
        for x, y in writeback:
            x.copy_(y)


def _nones(n: int) -> list[None]:
    return [None] * n


def _hp() -> list[float]:
    return [0.0] * 16


def fused_adam_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    *,
    step: int,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    caution: Caution | None,
    eps_placement: str,
    cautious_weight_decay: bool,
    stochastic_rounding: bool = False,
    seed: int = 0,
    _backend: str | None = None,
) -> None:
    """One in-place cautious Adam / AdamW step over parallel lists (see :func:`cautious.spec.adam`).

    ``step`` is the new 1-based step (already incremented). With ``decoupled=False`` the
    decay is coupled L2 (``g += wd * p`` before the moments; the mask uses that ``g``).
    ``max_exp_avg_sqs`` is required iff ``amsgrad``. Nothing is modified if validation fails.
    """
    beta1, beta2, eps, weight_decay = (
        _scalar(x, n)
        for x, n in ((beta1, "betas[0]"), (beta2, "betas[1]"), (eps, "eps"), (weight_decay, "weight_decay"))
    )
    validate(
        dict(
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            eps_placement=eps_placement,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled,
            cautious_weight_decay=cautious_weight_decay,
        ),
        _TORCH_NAMES,
    )
    caution = _caution(caution)
    check_cautious_weight_decay(cautious_weight_decay, decoupled)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the new 1-based step), got {step!r}")
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    n = len(params)
    vmax = list(max_exp_avg_sqs) if amsgrad else _nones(n)
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), vmax]
    _check_lists(
        ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
        [lists[0], lists[1], lists[2], lists[3], vmax if amsgrad else None],
    )
    b1, b2, wd = float(beta1), float(beta2), float(weight_decay)
    bc1 = 1.0 - b1 ** int(step)
    bc2 = 1.0 - b2 ** int(step)
    hp = _hp()
    hp[0] = wd if not decoupled else 0.0
    hp[1], hp[2], hp[3], hp[4], hp[5] = b1, 1.0 - b1, b2, 1.0 - b2, float(eps)
    hp[6], hp[7], hp[8] = 1.0 / bc1, 1.0 / math.sqrt(bc2), math.sqrt(bc2) / bc1
    hp[13] = wd if decoupled else 0.0
    kwargs = dict(
        hp=hp,
        caution=caution,
        maximize=bool(maximize),
        coupled=(not decoupled) and wd != 0.0,
        decoupled=bool(decoupled) and wd != 0.0,
        cwd=bool(cautious_weight_decay),
        exact_u=float(eps) == 0.0,
        amsgrad=bool(amsgrad),
        corrected=eps_placement == "corrected",
        stochastic_rounding=bool(stochastic_rounding),
        seed=int(seed),
    )
    _run(RULE_ADAM, _backend, lists, lr, kwargs)


def fused_lion_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    caution: Caution | None,
    cautious_weight_decay: bool,
    stochastic_rounding: bool = False,
    seed: int = 0,
    _backend: str | None = None,
) -> None:
    """One in-place cautious Lion step (decoupled decay; see :func:`cautious.spec.lion`)."""
    beta1, beta2, weight_decay = (
        _scalar(x, n) for x, n in ((beta1, "betas[0]"), (beta2, "betas[1]"), (weight_decay, "weight_decay"))
    )
    validate(
        dict(
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            maximize=maximize,
            cautious_weight_decay=cautious_weight_decay,
        ),
        _TORCH_NAMES,
    )
    caution = _caution(caution)
    n = len(params)
    lists = [list(params), list(grads), list(exp_avgs), _nones(n), _nones(n)]
    _check_lists(("params", "grads", "exp_avgs"), lists[:3])
    b1, b2, wd = float(beta1), float(beta2), float(weight_decay)
    hp = _hp()
    hp[1], hp[2], hp[3], hp[4] = b1, 1.0 - b1, b2, 1.0 - b2
    hp[13] = wd
    kwargs = dict(
        hp=hp,
        caution=caution,
        maximize=bool(maximize),
        coupled=False,
        decoupled=wd != 0.0,
        cwd=bool(cautious_weight_decay),
        stochastic_rounding=bool(stochastic_rounding),
        seed=int(seed),
    )
    _run(RULE_LION, _backend, lists, lr, kwargs)


def fused_sgd_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    *,
    first_step: bool,
    lr: float | torch.Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    caution: Caution | None,
    cautious_weight_decay: bool,
    stochastic_rounding: bool = False,
    seed: int = 0,
    _backend: str | None = None,
) -> None:
    """One in-place cautious SGD(-momentum) step (see :func:`cautious.spec.sgd`).

    ``momentum_buffers`` are preallocated when ``momentum != 0`` (else None); on
    ``first_step`` the buffer is set to ``g`` (as torch.optim.SGD).
    """
    momentum, dampening, weight_decay = (
        _scalar(x, n) for x, n in ((momentum, "momentum"), (dampening, "dampening"), (weight_decay, "weight_decay"))
    )
    validate(
        dict(
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            decoupled_weight_decay=decoupled,
            cautious_weight_decay=cautious_weight_decay,
        )
    )
    caution = _caution(caution)
    check_nesterov(nesterov, momentum, dampening)
    check_cautious_weight_decay(cautious_weight_decay, decoupled)
    mu, damp, wd = float(momentum), float(dampening), float(weight_decay)
    n = len(params)
    has_m = mu != 0.0
    if has_m and momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    bufs = list(momentum_buffers) if has_m else _nones(n)
    lists = [list(params), list(grads), bufs, _nones(n), _nones(n)]
    _check_lists(("params", "grads", "momentum_buffers"), [lists[0], lists[1], bufs if has_m else None])
    hp = _hp()
    hp[0] = wd if not decoupled else 0.0
    hp[1], hp[2] = mu, 1.0 - damp
    hp[13] = wd if decoupled else 0.0
    kwargs = dict(
        hp=hp,
        caution=caution,
        maximize=bool(maximize),
        coupled=(not decoupled) and wd != 0.0,
        decoupled=bool(decoupled) and wd != 0.0,
        cwd=bool(cautious_weight_decay),
        first=bool(first_step),
        nesterov=bool(nesterov),
        has_momentum=has_m,
        stochastic_rounding=bool(stochastic_rounding),
        seed=int(seed),
    )
    _run(RULE_SGD, _backend, lists, lr, kwargs)
