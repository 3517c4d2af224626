"""A third-party-style cautious AdamW / Lion / SGD for PyTorch: what `cautious verify` checks.

This is how many ports look in the wild: one class per optimizer, the caution flag
kept in the param groups, a single-tensor loop. It is correct (it passes the suite);
`BUGS` lists small variations of it that real ports have shipped, and the mutation
tests plant each one and require the suite to catch it.
"""

from __future__ import annotations

import math

import torch

BUGS = (
    "ge_boundary",  # keeps u*g == 0 entries: `>=` instead of `>`
    "product_mask",  # u * g > 0: underflows in low precision, and masks NaN
    "m_times_m",  # mask built from m * m (always true)
    "old_momentum",  # mask from the momentum before this step's update
    "global_scale",  # one scale over all tensors instead of per tensor
    "bf16_mean",  # scale from a bfloat16 mean of the mask
    "wrong_normalization",  # n / (k + 1) where 1 / max(k/n, floor) is claimed
    "eps_moved",  # eps added to sqrt(v) before bias correction
    "masked_decay",  # decoupled weight decay multiplied by the mask
    "state_masked",  # the momentum masked in place
    "empty_last_skipped",  # a trailing empty tensor skips the whole step
    "nan_masked",  # NaN entries masked (training silently freezes)
    "signbit",  # sign-bit comparison: +0 and -0 treated differently
    "flag_lost_on_load",  # load_state_dict of a plain checkpoint turns caution off
    "f32_bias_correction",  # bias correction computed in float32
    "off_by_one_step",  # bias correction uses step + 1
    "cancelled_zero_kept",  # an update that is exactly zero by cancellation is counted as kept
    "wrong_floor",  # mean_clamp floor 1e-2 where 1e-3 is claimed (shows only with < 1 % kept)
    "unmapped_state",  # mask from a gradient kept in an extra state key (`last_grad`) nobody maps
    "group_keys_required",  # a plain checkpoint's param groups lose `floor`: the step raises KeyError
)

#: the clause of cautious.conformance.profile that must report each bug (docs/mutation.md)
CLAUSE = {
    "ge_boundary": "mask_boundary",
    "product_mask": "sign_vs_underflow",
    "m_times_m": "mask_boundary",
    "old_momentum": "mask_boundary",
    "global_scale": "trajectory",
    "bf16_mean": "normalization",
    "wrong_normalization": "normalization",
    "eps_moved": "eps_placement",
    "masked_decay": "weight_decay",
    "state_masked": "state_untouched",
    "empty_last_skipped": "trajectory",
    "nan_masked": "nan",
    "signbit": "mask_boundary",
    "flag_lost_on_load": "resume_plain_checkpoint",
    "f32_bias_correction": "bias_correction",
    "off_by_one_step": "step_counting",
    "cancelled_zero_kept": "mask_boundary",
    "wrong_floor": "normalization",
    "unmapped_state": "trajectory",
    "group_keys_required": "resume_plain_checkpoint",
}


class _Cautious(torch.optim.Optimizer):
    bug: str | None = None

    def __init__(self, params, defaults, caution: bool, floor: float = 1e-3):
        for key in ("lr", "eps", "weight_decay", "momentum"):
            if key in defaults and not defaults[key] >= 0:
                raise ValueError(f"{key} must be >= 0, got {defaults[key]!r}")
        for i, beta in enumerate(defaults.get("betas", ())):
            if not 0 <= beta < 1:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
        super().__init__(params, {**defaults, "caution": caution, "floor": floor})
        self._extra = {"caution": caution, "floor": floor}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # The constructor's caution settings stay authoritative over the checkpoint's groups.
        for group in self.param_groups:
            for key, value in self._extra.items():
                if self.bug == "flag_lost_on_load" and key == "caution":
                    group.setdefault(key, False)  # timm-style: a plain checkpoint turns caution off
                elif self.bug == "group_keys_required":
                    continue  # the checkpoint's groups are trusted as they are
                else:
                    group[key] = value

    def _mask(self, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.bug == "ge_boundary":
            keep = ((u >= 0) & (g >= 0)) | ((u <= 0) & (g <= 0))
        elif self.bug == "product_mask":
            return u * g > 0
        elif self.bug == "signbit":
            keep = torch.signbit(u) == torch.signbit(g)
        elif self.bug == "cancelled_zero_kept":
            keep = (((u >= 0) & (g > 0)) | ((u <= 0) & (g < 0))) & (g != 0)
        else:
            keep = ((u > 0) & (g > 0)) | ((u < 0) & (g < 0))
        if self.bug == "nan_masked":
            return keep
        return keep | torch.isnan(u) | torch.isnan(g)

    def _scale(self, mask: torch.Tensor, floor: float, total: tuple[int, int] | None) -> torch.Tensor:
        n = mask.numel()
        if self.bug == "global_scale" and total is not None:
            k, n = total
            return torch.tensor(1.0 / max(k / n, floor), dtype=torch.float64)
        if self.bug == "bf16_mean":
            return 1.0 / torch.clamp(mask.to(torch.bfloat16).mean().double(), min=floor)
        k = mask.sum(dtype=torch.int64).double()
        if self.bug == "wrong_normalization":
            return n / (k + 1)
        if self.bug == "wrong_floor":
            floor = 1e-2
        return 1.0 / torch.clamp(k / n, min=floor)

    def _apply(self, p, u, g, group, total=None, u_sign=None):
        """p <- p - lr*wd*p - lr * mask * scale * u (decay unmasked); returns the mask."""
        lr, wd = group["lr"], group["weight_decay"]
        mask = None
        if group["caution"]:
            mask = self._mask(u if u_sign is None else u_sign, g)
            u = torch.where(mask, u * self._scale(mask, group["floor"], total).to(u.dtype), torch.zeros_like(u))
        if wd != 0:
            if self.bug == "masked_decay" and mask is not None:
                p.sub_(lr * wd * p * mask)
            else:
                p.mul_(1 - lr * wd)
        p.add_(u, alpha=-lr)
        return mask

    def _skip(self, group) -> bool:
        return self.bug == "empty_last_skipped" and group["params"][-1].numel() == 0

    def _total(self, pairs) -> tuple[int, int] | None:
        if self.bug != "global_scale":
            return None
        k = sum(int(self._mask(u, g).sum()) for u, g in pairs)
        n = sum(u.numel() for u, _ in pairs)
        return (k, max(n, 1))


class CautiousAdamW(_Cautious):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, caution=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), caution)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if self._skip(group):
                continue
            b1, b2 = group["betas"]
            work = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m_old = m.clone()
                st["step"] += 1
                t = int(st["step"].item())
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                tb = t + 1 if self.bug == "off_by_one_step" else t
                if self.bug == "f32_bias_correction":
                    f = torch.float32
                    bc1 = float(1 - torch.tensor(b1, dtype=f) ** tb)
                    bc2 = float(1 - torch.tensor(b2, dtype=f) ** tb)
                else:
                    bc1, bc2 = 1 - b1**tb, 1 - b2**tb
                if self.bug == "eps_moved":
                    u = (m / bc1) / ((v.sqrt() + group["eps"]) / math.sqrt(bc2))
                else:
                    u = (m / bc1) / ((v / bc2).sqrt() + group["eps"])
                if self.bug == "unmapped_state":
                    # the mask compares u with the gradient remembered from the previous step
                    prev = st.get("last_grad", g)
                    st["last_grad"] = g.clone()
                    g = prev
                if self.bug == "m_times_m":
                    u_sign = m * m
                elif self.bug == "old_momentum":
                    u_sign = m_old
                else:
                    u_sign = u
                work.append((p, u, g, u_sign, m))
            total = self._total([(s, g) for _, _, g, s, _ in work])
            for p, u, g, u_sign, m in work:
                mask = self._apply(p, u, g, group, total, u_sign)
                if self.bug == "state_masked" and mask is not None:
                    m.mul_(mask)
        return loss


class CautiousLion(_Cautious):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, caution=True):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay), caution)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if self._skip(group):
                continue
            b1, b2 = group["betas"]
            pairs = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p)
                m = st["exp_avg"]
                u = torch.sign(m * b1 + p.grad * (1 - b1))
                u = torch.where(torch.isnan(p.grad) | torch.isnan(m), p.grad + m, u)  # sign(NaN) is 0 in torch
                pairs.append((p, u, p.grad, m))
            total = self._total([(u, g) for _, u, g, _ in pairs])
            for p, u, g, m in pairs:
                self._apply(p, u, g, group, total)
                m.lerp_(g, 1 - b2)
        return loss


class CautiousSGD(_Cautious):
    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, caution=True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay), caution)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if self._skip(group):
                continue
            pairs = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] != 0:  # coupled, as torch.optim.SGD
                    g = g + group["weight_decay"] * p
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = g.clone()
                else:
                    st["momentum_buffer"].mul_(group["momentum"]).add_(g)
                pairs.append((p, st["momentum_buffer"].clone(), g))
            total = self._total([(u, g) for _, u, g in pairs])
            for p, u, g in pairs:
                self._apply(p, u, g, {**group, "weight_decay": 0.0}, total)
        return loss


def mutant(bug: str, base: type = CautiousAdamW) -> type:
    """``base`` with one planted bug from :data:`BUGS`."""
    if bug not in BUGS:
        raise ValueError(f"bug must be one of {', '.join(BUGS)}, got {bug!r}")
    return type(f"{base.__name__}_{bug}", (base,), {"bug": bug, "__module__": __name__})


# Importable by path for `cautious verify --target my_port:CautiousAdamW_<bug>`.
for _bug in BUGS:
    globals()[f"CautiousAdamW_{_bug}"] = mutant(_bug)
