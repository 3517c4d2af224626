r"""Fused cautious Adam(W), Lion, SGD, NAdam(W), ADOPT and LaProp: two passes over many tensors per call.

Public functions: :func:`is_available`, :func:`fused_adam_`, :func:`fused_lion_`, :func:`fused_sgd_`,
:func:`fused_nadam_`, :func:`fused_adopt_`, :func:`fused_laprop_` (also reachable as
:func:`cautious.torch.fused_available` and the optimizers' ``fused=True``).

The per-tensor kept count must be complete before any entry of that tensor is updated, so
every implementation here runs a **count pass** then an **update pass**:

.. math::

    \text{count} = \sum_i [\operatorname{sign}(u_i) \text{ agrees with } g_i \text{ or NaN}],\qquad
    p' = p - \eta\lambda\,d\odot p - \eta\,\text{scale}(\text{count}, n)\,\text{mask}\odot u

The count pass needs only the *sign* of ``u``: for Adam ``sign(u) = sign(m_new)`` with
``m_new = b1 m + (1 - b1) g`` (the denominator ``sqrt(v_hat) + eps`` is positive), for Lion
``sign(u) = sign(b1 m + (1 - b1) g)``, for SGD ``u`` is the (Nesterov) momentum. It reads
``g`` and ``m`` only (36 B per float32 Adam parameter instead of 28 for plain fused AdamW).
NAdam's ``u`` mixes ``g / d`` and ``m' / d``, and ADOPT's and LaProp's normalize ``g`` before
the momentum, so their count pass computes ``u`` itself and also reads ``v`` (40 B per float32
parameter).
See :mod:`cautious.spec` for the full algorithm; every function here matches it.

Implementations, chosen per device:

* CUDA (and CPU under ``TRITON_INTERPRET=1``): Triton kernels, two launches per dtype group,
  pointer and chunk tables (:mod:`.triton_kernels`).
* CPU: a native C++ loop (``cpu_kernel.cpp``) compiled once on first use (:mod:`.cpu`), or,
  without a C++ compiler, the eager-torch statement of the contract (:mod:`.eager`).

What crosses into a kernel is written once, by name, in :mod:`.contract` (rules,
normalizations, hyperparameter slots); every implementation reads it the same way.

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

import functools
import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import torch

from cautious._caution import Caution, as_caution
from cautious.backends.torch.fused.contract import STORAGE, Launch, Rule, slots
from cautious.spec.errors import check_cautious_weight_decay, check_nesterov, validate

__all__ = [
    "is_available",
    "build_fused",
    "fused_adam_",
    "fused_lion_",
    "fused_sgd_",
    "fused_nadam_",
    "fused_adopt_",
    "fused_laprop_",
]

_BETA_NAMES = {"beta1": "betas[0]", "beta2": "betas[1]"}
_BACKENDS = ("triton", "cpu", "eager")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    """Whether ``triton`` (and ``triton.language``) import in this process."""
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
        return torch.cuda.is_available() and triton_importable()
    return False


def build_fused() -> dict[str, bool]:
    """Prebuild the native CPU kernel (cached in ``~/.cache/cautious``) for every supported dtype pair.

    The CPU default of a cautious optimizer is this kernel; without a prebuild its first step
    compiles it (once per dtype pair, a warning gives the seconds). Returns whether each pair has
    native code, e.g. ``{"float32": True, ...}``. Also ``cautious build`` on the command line.
    """
    from cautious.backends.torch.fused import cpu

    return cpu.build()


def backend_for(device: torch.device, backend: str | None = None) -> str:
    """The implementation a call on ``device`` runs: ``"triton"``, ``"cpu"`` (native) or ``"eager"``."""
    if backend is not None:
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be 'triton', 'cpu' or 'eager', got {backend!r}")
        return backend
    if device.type == "cuda":
        if not triton_importable():
            raise RuntimeError("the fused CUDA path needs triton; install cautious[triton]")
        return "triton"
    if device.type == "cpu":
        return "triton" if _interpreting() and triton_importable() else "cpu"
    raise RuntimeError(f"no fused cautious implementation for device {device}")


# --------------------------------------------------------------------------- validation


def _scalar(x: Any, name: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(x.shape)}")
        return float(x.item())
    return x


def _split_lr(lr: Any, device: torch.device, *, check: bool) -> tuple[float | None, torch.Tensor | None]:
    """``(lr as float, None)`` or ``(None, lr tensor on device)`` (no host sync for a device lr)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a number or a 1-element tensor, got shape {tuple(lr.shape)}")
        if lr.device.type == "cpu" or lr.device != device:
            val = float(lr.item())
            if check:
                validate({"lr": val})
            return val, None
        if not lr.is_floating_point():
            raise TypeError(f"lr must be a floating-point tensor, got {lr.dtype}")
        return None, lr.reshape(())
    if check:
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
            if x.dtype not in STORAGE:
                raise TypeError(f"{name}[{i}] has dtype {x.dtype}; supported: float32, float64, bfloat16, float16")


# --------------------------------------------------------------------------- driver


def increment_steps_(state_steps: list[torch.Tensor]) -> list[int] | None:
    """``step += 1`` for CPU step tensors in one native call (bitwise torch's ``step += 1``): the new steps.

    With many small tensors one torch op per parameter is most of a step's time. ``None``
    (nothing done) when no native kernel is loaded or the steps are not scalar CPU float32/float64
    tensors; the caller then increments them with torch ops.
    """
    if not state_steps or torch.compiler.is_compiling():
        return None
    from cautious.backends.torch.fused import cpu

    values = cpu.increment_steps_(state_steps)
    if values is None:
        return None
    if values.min() == values.max():
        return [int(values[0])] * len(state_steps)
    return [int(x) for x in values.tolist()]


def run(
    launch: Launch,
    lists: list[list[torch.Tensor | None]],
    lr: Any,
    *,
    backend: str | None = None,
    check_lr: bool = False,
    shardings: list | None = None,
    stats: dict | None = None,
) -> None:
    """Group by dtypes, make contiguous, and hand each group to the chosen implementation.

    ``lists`` is ``[params, grads, s1, s2, s3]`` (state lists of None where a rule has none),
    already checked. Tensors that had to be made contiguous are copied back.

    A group takes two kernel calls instead of one when the scales need more than the kernel's
    own count: with ``shardings`` (:mod:`cautious.backends.torch._distributed`) the tensors are
    local shards of DTensors; with ``denominator="nonzero"`` the scale's ``n`` is the number of
    nonzero gradient entries; with ``stats`` (the telemetry record, as in
    :func:`cautious.backends.torch._functional._mask_and_scales`) ``stats[p]`` is set to
    ``CautionStats(count, n, scale)`` (device tensors: no host synchronisation). The count pass
    runs alone and returns the kept counts (and the nonzero counts); the counts of shards are
    summed (one all-reduce); the scales come from the same function as the other paths'; the
    update pass runs with them.
    """
    params = lists[0]
    if len(params) == 0:
        return
    device = params[0].device
    impl = backend_for(device, backend)
    lr_f, lr_t = _split_lr(lr, device, check=check_lr)
    if impl != "triton" and lr_t is not None:
        lr_f, lr_t = float(lr_t.item()), None  # CPU: reading a CPU tensor is free
    launch = launch.with_lr(0.0 if lr_f is None else lr_f)
    # group by (param, grad, state) dtypes, keeping list order inside a group (usually one group)
    if all(len({None if x is None else x.dtype for x in lst}) == 1 for lst in lists):
        groups = {None: range(len(params))}
    else:
        groups = {}
        for i, p in enumerate(params):
            st = tuple(lst[i].dtype for lst in lists[2:] if lst[i] is not None)
            groups.setdefault((p.dtype, lists[1][i].dtype, st), []).append(i)
    for idx in groups.values():
        cols = [list(lst) for lst in lists] if len(idx) == len(params) else [[lst[i] for i in idx] for lst in lists]
        writeback = []
        for c, col in enumerate(cols):
            for j in [j for j, x in enumerate(col) if x is not None and not x.is_contiguous()]:
                x = col[j]
                y = x.contiguous()
                if c != 1:
                    writeback.append((x, y))
                col[j] = y
        if impl == "triton":
            from cautious.backends.torch.fused import triton_kernels

            kernel = functools.partial(triton_kernels.run, launch, *cols, lr_tensor=lr_t)
        else:
            from cautious.backends.torch.fused import cpu

            kernel = functools.partial(cpu.run, launch, *cols, native=impl == "cpu")
        if launch.caution is not None and (stats is not None or (launch.counts and (shardings or launch.nonzero))):
            _count_then_update(kernel, launch, [params[i] for i in idx], cols[0], shardings, idx, stats)
        else:
            kernel()
        for x, y in writeback:
            x.copy_(y)


def _count_then_update(kernel, launch: Launch, keys, tensors, shardings, idx, stats) -> None:
    """The two-call form of :func:`run` for one group (see there): count, reduce, scale, update."""
    from cautious.backends.torch import _distributed, _functional
    from cautious.spec.mask import CautionStats

    sharded = [shardings[i] for i in idx] if shardings else None
    t = len(tensors)
    counts = torch.zeros(t, dtype=torch.int64, device=tensors[0].device)
    nonzeros = torch.zeros_like(counts) if launch.nonzero else None
    kernel(counts_out=counts, nonzero_out=nonzeros)  # the count pass alone
    sizes = _distributed.global_sizes(tensors, sharded)
    if nonzeros is not None:  # counts and nonzero denominators of shards: one all-reduce
        both = _distributed.global_counts(torch.cat([counts, nonzeros]), sharded * 2 if sharded else None)
        counts, dens = both[:t], both[t:]
    else:
        counts, dens = _distributed.global_counts(counts, sharded), sizes
    scales = _functional._scales(counts, dens, launch.caution)
    kernel(scales=scales)
    if stats is not None:
        for i, p in enumerate(keys):
            stats[p] = CautionStats(counts[i], sizes[i], scales[i])


def _nones(n: int) -> list[None]:
    return [None] * n


# --------------------------------------------------------------------------- launches: a step's contract per rule
#
# Each ``*_launch`` takes the rule's hyperparameters and returns its :class:`~.contract.Launch`: the
# slots of ``hp`` by name and the rule's flags. The flags every rule shares (``maximize``,
# ``cautious_weight_decay``, ``stochastic_rounding``, ``seed``) pass through ``**common`` to
# :func:`_launch`.


def _launch(
    rule: Rule,
    caution: Caution | None,
    values: dict[str, float],
    *,
    maximize: bool,
    cautious_weight_decay: bool,
    stochastic_rounding: bool = False,
    seed: int = 0,
    **flags: bool,
) -> Launch:
    return Launch(
        rule=rule,
        hp=slots(caution, **values),
        caution=caution,
        maximize=bool(maximize),
        cwd=bool(cautious_weight_decay),
        stochastic_rounding=bool(stochastic_rounding),
        seed=int(seed),
        **flags,
    )


def _decay(weight_decay: float, decoupled: bool) -> tuple[dict[str, float], dict[str, bool]]:
    """The decay slots and flags: coupled L2 (``g += wd p``) or decoupled (``p -= lr wd p``)."""
    wd = float(weight_decay)
    values = {"COUPLED_DECAY": 0.0 if decoupled else wd, "DECOUPLED_DECAY": wd if decoupled else 0.0}
    return values, {"coupled": (not decoupled) and wd != 0.0, "decoupled": bool(decoupled) and wd != 0.0}


def adam_launch(
    *, step, beta1, beta2, eps, weight_decay, decoupled, amsgrad, eps_placement, caution, **common
) -> Launch:
    """One Adam step (``step`` is the new 1-based step); the bias corrections fold into ``ADAM_A/B/C``."""
    b1, b2 = float(beta1), float(beta2)
    bc1 = 1.0 - b1 ** int(step)
    bc2 = 1.0 - b2 ** int(step)
    if eps_placement == "corrected":  # u = (m / bc1) / (sqrt(v / bc2) + eps)
        a, b, c = 1.0 / bc1, 1.0 / math.sqrt(bc2), 1.0
    else:  # u = sqrt(bc2) / bc1 * m / (sqrt(v) + eps)
        a, b, c = 1.0, 1.0, math.sqrt(bc2) / bc1
    decay, flags = _decay(weight_decay, decoupled)
    values = dict(MIX1_OLD=b1, MIX1_NEW=1.0 - b1, MIX2_OLD=b2, MIX2_NEW=1.0 - b2, EPS=eps, ADAM_A=a, ADAM_B=b, ADAM_C=c)
    return _launch(
        Rule.ADAM, caution, {**values, **decay}, exact_u=float(eps) == 0.0, amsgrad=bool(amsgrad), **flags, **common
    )


def lion_launch(*, beta1, beta2, weight_decay, caution, **common) -> Launch:
    """One Lion step (decoupled decay)."""
    b1, b2 = float(beta1), float(beta2)
    decay, flags = _decay(weight_decay, True)
    values = dict(MIX1_OLD=b1, MIX1_NEW=1.0 - b1, MIX2_OLD=b2, MIX2_NEW=1.0 - b2)
    return _launch(Rule.LION, caution, {**values, **decay}, **flags, **common)


def sgd_launch(*, first_step, momentum, dampening, nesterov, weight_decay, decoupled, caution, **common) -> Launch:
    """One SGD step (``first_step``: the buffer is set to ``g``)."""
    decay, flags = _decay(weight_decay, decoupled)
    values = dict(MIX1_OLD=float(momentum), MIX1_NEW=1.0 - float(dampening))
    return _launch(
        Rule.SGD,
        caution,
        {**values, **decay},
        first=bool(first_step),
        nesterov=bool(nesterov),
        has_momentum=float(momentum) != 0.0,
        **flags,
        **common,
    )


def nadam_launch(*, step, mu, mu_next, mu_product, beta1, beta2, eps, weight_decay, decoupled, caution, **common):
    """One NAdam step: ``mu``, ``mu_next`` from :func:`cautious.spec.nadam_mu`; ``mu_product`` is ``prod_t``
    (through this step)."""
    b1, b2 = float(beta1), float(beta2)
    decay, flags = _decay(weight_decay, decoupled)
    values = dict(
        MIX1_OLD=b1,
        MIX1_NEW=1.0 - b1,
        MIX2_OLD=b2,
        MIX2_NEW=1.0 - b2,
        EPS=eps,
        ADAM_B=1.0 / math.sqrt(1.0 - b2 ** int(step)),
        G_COEF=(1.0 - mu) / (1.0 - mu_product),
        M_COEF=mu_next / (1.0 - mu_product * mu_next),
    )
    return _launch(Rule.NADAM, caution, {**values, **decay}, **flags, **common)


def adopt_launch(*, step, beta1, beta2, eps, clip_exp, weight_decay, decoupled, nesterov, caution, **common):
    """One ADOPT step: step 1 sets ``v = g^2`` and moves nothing (no decoupled decay); ``clip_exp=None``: no clip."""
    b1, b2 = float(beta1), float(beta2)
    decay, flags = _decay(weight_decay, decoupled)
    flags["decoupled"] = flags["decoupled"] and int(step) > 1
    values = dict(
        MIX1_OLD=b1,
        MIX1_NEW=1.0 - b1,
        MIX2_OLD=b2,
        MIX2_NEW=1.0 - b2,
        EPS=eps,
        CLIP=math.inf if clip_exp is None else (float(step) - 1.0) ** float(clip_exp),
    )
    return _launch(
        Rule.ADOPT, caution, {**values, **decay}, first=int(step) == 1, nesterov=bool(nesterov), **flags, **common
    )


def laprop_launch(*, lr, step_lr, bias_correction2, beta1, beta2, eps, weight_decay, decay_order, caution, **common):
    """One LaProp step: ``step_lr = lr / lr_avg`` (0 while ``lr_avg`` is 0), ``bias_correction2 = 1 - beta2^t``;
    decoupled decay before or after the move (``decay_order``)."""
    b1, b2 = float(beta1), float(beta2)
    decay, flags = _decay(weight_decay, True)
    values = dict(
        MIX1_OLD=b1,
        MIX1_NEW=float(lr) * (1.0 - b1),
        MIX2_OLD=b2,
        MIX2_NEW=1.0 - b2,
        EPS=eps,
        ADAM_B=1.0 / math.sqrt(float(bias_correction2)),
        STEP_LR=step_lr,
    )
    return _launch(
        Rule.LAPROP, caution, {**values, **decay}, post_decay=decay_order == "post_update", **flags, **common
    )


# --------------------------------------------------------------------------- public functions
#
# Each validates its arguments (nothing is modified when validation fails), builds the rule's launch
# and runs it. ``hyper`` holds the hyperparameters once: validated, then handed to the launch.


def _check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the new 1-based step), got {step!r}")


def _numbers(**values: Any) -> dict[str, Any]:
    """Scalar hyperparameters (numbers or 1-element tensors) as numbers, named as the error table names them."""
    return {k: _scalar(v, _BETA_NAMES.get(k, k)) for k, v in values.items()}


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
    caution: bool | Caution,
    eps_placement: str,
    cautious_weight_decay: bool,
    stochastic_rounding: bool = False,
    seed: int = 0,
    _backend: str | None = None,
) -> None:
    """One in-place cautious Adam / AdamW step over parallel lists (see :func:`cautious.spec.adam`).

    ``step`` is the new 1-based step (already incremented). With ``decoupled=False`` the
    decay is coupled L2 (``g += wd * p`` before the moments; the mask uses that ``g``).
    ``max_exp_avg_sqs`` is required iff ``amsgrad``. ``caution``: ``True``, ``False`` or a
    :class:`cautious.Caution`. ``stochastic_rounding`` rounds bfloat16 results stochastically
    (seeded by ``seed``). Nothing is modified if validation fails.
    """
    hyper = dict(
        **_numbers(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay),
        eps_placement=eps_placement,
        amsgrad=amsgrad,
        maximize=maximize,
        cautious_weight_decay=cautious_weight_decay,
    )
    validate({**hyper, "decoupled_weight_decay": decoupled}, _BETA_NAMES)
    caution = as_caution(caution)
    check_cautious_weight_decay(cautious_weight_decay, decoupled)
    _check_step(step)
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    n = len(params)
    vmax = list(max_exp_avg_sqs) if amsgrad else _nones(n)
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), vmax]
    _check_lists(
        ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
        [lists[0], lists[1], lists[2], lists[3], vmax if amsgrad else None],
    )
    launch = adam_launch(
        step=step, decoupled=decoupled, caution=caution, stochastic_rounding=stochastic_rounding, seed=seed, **hyper
    )
    run(launch, lists, lr, backend=_backend, check_lr=True)


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
    caution: bool | Caution,
    cautious_weight_decay: bool,
    stochastic_rounding: bool = False,
    seed: int = 0,
    _backend: str | None = None,
) -> None:
    """One in-place cautious Lion step (decoupled decay; see :func:`cautious.spec.lion`)."""
    hyper = dict(
        **_numbers(beta1=beta1, beta2=beta2, weight_decay=weight_decay),
        maximize=maximize,
        cautious_weight_decay=cautious_weight_decay,
    )
    validate(hyper, _BETA_NAMES)
    caution = as_caution(caution)
    n = len(params)
    lists = [list(params), list(grads), list(exp_avgs), _nones(n), _nones(n)]
    _check_lists(("params", "grads", "exp_avgs"), lists[:3])
    launch = lion_launch(caution=caution, stochastic_rounding=stochastic_rounding, seed=seed, **hyper)
    run(launch, lists, lr, backend=_backend, check_lr=True)


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
    caution: bool | Caution,
    cautious_weight_decay: bool,
    stochastic_rounding: bool = False,
    seed: int = 0,
    _backend: str | None = None,
) -> None:
    """One in-place cautious SGD(-momentum) step (see :func:`cautious.spec.sgd`).

    ``momentum_buffers`` are preallocated when ``momentum != 0`` (else None); on
    ``first_step`` the buffer is set to ``g`` (as torch.optim.SGD).
    """
    hyper = dict(
        **_numbers(momentum=momentum, dampening=dampening, weight_decay=weight_decay),
        nesterov=nesterov,
        maximize=maximize,
        cautious_weight_decay=cautious_weight_decay,
    )
    validate({**hyper, "decoupled_weight_decay": decoupled})
    caution = as_caution(caution)
    check_nesterov(nesterov, hyper["momentum"], hyper["dampening"])
    check_cautious_weight_decay(cautious_weight_decay, decoupled)
    n = len(params)
    has_m = float(hyper["momentum"]) != 0.0
    if has_m and momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    bufs = list(momentum_buffers) if has_m else _nones(n)
    lists = [list(params), list(grads), bufs, _nones(n), _nones(n)]
    _check_lists(("params", "grads", "momentum_buffers"), [lists[0], lists[1], bufs if has_m else None])
    launch = sgd_launch(
        first_step=first_step,
        decoupled=decoupled,
        caution=caution,
        stochastic_rounding=stochastic_rounding,
        seed=seed,
        **hyper,
    )
    run(launch, lists, lr, backend=_backend, check_lr=True)


def fused_nadam_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    step: int,
    mu_product: float,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    momentum_schedule: str,
    decoupled: bool,
    maximize: bool,
    caution: bool | Caution,
    cautious_weight_decay: bool,
    stochastic_rounding: bool = False,
    seed: int = 0,
    _backend: str | None = None,
) -> None:
    """One in-place cautious NAdam / NAdamW step (see :func:`cautious.spec.nadam`).

    ``step`` is the new 1-based step; ``mu_product`` is ``prod_t``, the product of the momentum
    schedule through this step (:func:`cautious.spec.nadam_mu`), which the caller keeps.
    """
    from cautious.spec.rules import nadam_mu

    hyper = dict(
        **_numbers(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay),
        maximize=maximize,
        cautious_weight_decay=cautious_weight_decay,
    )
    schedule = dict(momentum_decay=momentum_decay, momentum_schedule=momentum_schedule)
    validate({**hyper, **schedule, "decoupled_weight_decay": decoupled}, _BETA_NAMES)
    caution = as_caution(caution)
    check_cautious_weight_decay(cautious_weight_decay, decoupled)
    _check_step(step)
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), _nones(len(params))]
    _check_lists(("params", "grads", "exp_avgs", "exp_avg_sqs"), lists[:4])
    launch = nadam_launch(
        step=step,
        mu=nadam_mu(step, beta1=hyper["beta1"], **schedule),
        mu_next=nadam_mu(step + 1, beta1=hyper["beta1"], **schedule),
        mu_product=float(mu_product),
        decoupled=decoupled,
        caution=caution,
        stochastic_rounding=stochastic_rounding,
        seed=seed,
        **hyper,
    )
    run(launch, lists, lr, backend=_backend, check_lr=True)


def fused_adopt_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    step: int,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    clip_exp: float | None,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    caution: bool | Caution,
    cautious_weight_decay: bool,
    nesterov: bool = False,
    stochastic_rounding: bool = False,
    seed: int = 0,
    _backend: str | None = None,
) -> None:
    """One in-place cautious ADOPT step (see :func:`cautious.spec.adopt`); ``step`` is the new 1-based step.

    Step 1 sets ``v = g^2`` and moves nothing; decoupled decay starts at step 2. ``clip_exp=None``:
    no clipping.
    """
    hyper = dict(
        **_numbers(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay),
        nesterov=nesterov,
        maximize=maximize,
        cautious_weight_decay=cautious_weight_decay,
    )
    checked = {**hyper, "decoupled_weight_decay": decoupled}
    if clip_exp is not None:
        checked["clip_exp"] = clip_exp
    validate(checked, {**_BETA_NAMES, "decoupled_weight_decay": "decoupled"})
    caution = as_caution(caution)
    check_cautious_weight_decay(cautious_weight_decay, decoupled)
    _check_step(step)
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), _nones(len(params))]
    _check_lists(("params", "grads", "exp_avgs", "exp_avg_sqs"), lists[:4])
    launch = adopt_launch(
        step=step,
        clip_exp=clip_exp,
        decoupled=decoupled,
        caution=caution,
        stochastic_rounding=stochastic_rounding,
        seed=seed,
        **hyper,
    )
    run(launch, lists, lr, backend=_backend, check_lr=True)


def fused_laprop_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    lr: float,
    step_lr: float,
    bias_correction2: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay_order: str,
    maximize: bool,
    caution: bool | Caution,
    cautious_weight_decay: bool,
    stochastic_rounding: bool = False,
    seed: int = 0,
    _backend: str | None = None,
) -> None:
    """One in-place cautious LaProp step (see :func:`cautious.spec.laprop`).

    The caller keeps LaProp's scalars: ``step_lr = lr / lr_avg`` (0 while ``lr_avg`` is 0) and
    ``bias_correction2 = 1 - beta2^t``. ``lr`` is a number here (the momentum carries it).
    """
    hyper = dict(
        **_numbers(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay),
        decay_order=decay_order,
        maximize=maximize,
        cautious_weight_decay=cautious_weight_decay,
    )
    validate(hyper, _BETA_NAMES)
    caution = as_caution(caution)
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), _nones(len(params))]
    _check_lists(("params", "grads", "exp_avgs", "exp_avg_sqs"), lists[:4])
    launch = laprop_launch(
        step_lr=float(step_lr),
        bias_correction2=float(bias_correction2),
        caution=caution,
        stochastic_rounding=stochastic_rounding,
        seed=seed,
        **hyper,
    )
    run(launch, lists, hyper["lr"], backend=_backend)
