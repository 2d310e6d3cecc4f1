"""Token budgets: the ratio loss, tail drop, multi-budget training, Lite-CFG.

DC-DiT does not fix how many tokens a sample keeps. The router decides per sample;
training pulls the *average* kept fraction towards ``1 / N`` with the ratio loss,
and the tail-drop fraction ``rho`` removes the ``floor(rho * |B|)`` least confident
kept tokens of a sample on top of that (elastic inference, multi-budget training).

    budget = TimestepAdaptiveBudget(target_ratio=4)
    rho = budget.training_rho(step)                   # one draw per step, same on every rank
    out = router(tokens, grid, rho=rho)
    loss = diffusion_loss + budget.ratio_weight * budget.ratio_loss(out)
"""

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._typing import Bool, Float, Tensor, check_finite, typechecked, value_checks_enabled

__all__ = ["TimestepAdaptiveBudget", "ratio_loss", "tail_drop", "check_rho"]

Rho = float | int | Float[Tensor, "batch"] | Float[Tensor, ""]


def check_rho(rho: "float | Tensor", *, name: str = "rho", batch: int | None = None, ranges: bool = True) -> None:
    """Raise ``ValueError`` unless every tail-drop fraction lies in ``[0, 1)``.

    A tensor must be floating point and of shape ``()`` or ``(batch,)`` (any 1-D length when ``batch`` is
    ``None``), checked always (no device read). Its range costs a device read: skipped inside
    ``value_checks(False)`` and with ``ranges=False``.
    """
    if isinstance(rho, bool) or not (torch.is_tensor(rho) or isinstance(rho, (int, float))):
        raise ValueError(f"{name} must be a number in [0, 1) or a float tensor of them, got {type(rho).__name__}")
    if torch.is_tensor(rho):
        shape_ok = rho.ndim == 0 or (rho.ndim == 1 and batch in (None, rho.shape[0]))
        if not rho.dtype.is_floating_point or not shape_ok:
            shapes = "() or (batch,)" if batch is None else f"() or ({batch},)"
            raise ValueError(f"{name} must be a float tensor of shape {shapes} (one tail-drop fraction per sample), "
                             f"got shape {tuple(rho.shape)} {rho.dtype}")
        if not ranges or not value_checks_enabled():  # reading a tensor's range costs a device round trip
            return
        check_finite(name, rho)
        lo, hi = (float(rho.min()), float(rho.max())) if rho.numel() else (0.0, 0.0)
    else:
        lo = hi = float(rho)
    if not (0.0 <= lo and hi < 1.0):
        raise ValueError(
            f"{name} must lie in [0, 1) (the fraction of kept tokens to drop), got values in "
            f"[{lo}, {hi}]; use 0 to keep the router's natural choice."
        )


@typechecked
def tail_drop(
    probs: Float[Tensor, "batch tokens"],
    mask: Bool[Tensor, "batch tokens"],
    rho: Rho,
    *,
    protected: Bool[Tensor, "batch tokens"] | None = None,
    check: bool = True,
) -> Bool[Tensor, "batch tokens"]:
    """Drop the ``floor(rho * |B|)`` lowest-probability kept tokens of each sample.

    ``rho`` is a float or a per-sample tensor in ``[0, 1)``. Tokens in ``protected``
    (the first and last grid position, by default) are never dropped; if a sample
    keeps fewer unprotected tokens than the drop count, all of them go.
    Ties in probability drop the earlier raster position first.
    Validates ``probs`` and ``rho`` (one host sync each when they are tensors) unless
    ``check=False`` (a caller that has validated both, as the router does); the drop itself is
    computed on the device.
    """
    if check:
        check_finite("probs", probs)
        check_rho(rho, batch=probs.shape[0])
    B, L = probs.shape
    if protected is None:
        protected = torch.zeros_like(mask)
        protected[:, 0] = True
        protected[:, -1] = True
    droppable = mask & ~protected
    kept = mask.sum(-1, keepdim=True)  # (B, 1)
    rho_t = torch.as_tensor(rho, device=probs.device, dtype=torch.float64).reshape(-1, 1)
    n_drop = torch.floor(kept.double() * rho_t).long()  # (B, 1)
    # Rank droppable tokens by ascending probability (stable: ties drop the earlier position).
    key = torch.where(droppable, probs.float(), torch.inf)
    order = torch.argsort(key, dim=-1, stable=True)  # (B, L)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=probs.device).expand(B, L))
    return mask & ~(droppable & (ranks < n_drop))


@typechecked
def ratio_loss(
    probs: Float[Tensor, "batch tokens"],
    natural_mask: Bool[Tensor, "batch tokens"],
    target_ratio: float,
    *,
    group_size: int = 16,
) -> Float[Tensor, ""]:
    """DC-DiT's ratio loss, averaged over groups of ``group_size`` samples.

    Per group: ``F`` = fraction of tokens the natural mask keeps (no gradient),
    ``G`` = mean probability; ``L = N/(N-1) * ((N-1) F G + (1-F)(1-G))``, which is 1
    when ``F = G = 1/N`` and larger elsewhere on ``F = G``.
    """
    _check_target_ratio(target_ratio)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    N = float(target_ratio)
    B, L = probs.shape
    groups = -(-B // group_size)
    pad = groups * group_size - B  # the last group may be short: zero rows, left out of its count

    def group_means(v: Tensor) -> Tensor:  # (B, L) -> (groups,): one reduction for every group at once
        sums = torch.nn.functional.pad(v.float().sum(1), (0, pad)).reshape(groups, group_size).sum(1)
        counts = (B - group_size * torch.arange(groups, device=v.device)).clamp(max=group_size) * L
        return sums / counts

    F = group_means(natural_mask).detach()
    G = group_means(probs)
    return (N / (N - 1) * ((N - 1) * F * G + (1 - F) * (1 - G))).mean()


def _check_target_ratio(target_ratio: float) -> None:
    if not target_ratio > 1:
        raise ValueError(
            f"target_ratio N must be > 1 (keep about 1/N of the tokens; the paper uses 4), "
            f"got {target_ratio}"
        )


@dataclass
class TimestepAdaptiveBudget:
    """How many tokens to spend, per sample and per step.

    Args:
        target_ratio: ``N``; the ratio loss pulls the kept fraction towards ``1/N``.
        ratio_weight: weight of the ratio loss in the total loss (paper: 0.03).
        group_size: samples per ratio-loss group (paper: 16).
        fractions: tail-drop fractions that multi-budget training draws from.
        warmup_steps: steps trained at ``rho = 0`` before multi-budget starts.
        seed: seeds the per-step draw; every rank draws the same ``rho`` for a step.
        cfg_rho: ``(conditional, unconditional)`` tail drop for Lite-CFG.
        schedule: optional ``[(t, rho), ...]`` knots; ``rho(t)`` is their piecewise-linear
            interpolation over timesteps (constant beyond the ends). Beyond the paper:
            spend fewer tokens at noisy steps on purpose.
    """

    target_ratio: float = 4.0
    ratio_weight: float = 0.03
    group_size: int = 16
    fractions: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    warmup_steps: int = 0
    seed: int = 0
    cfg_rho: tuple[float, float] = (0.0, 0.9)
    schedule: Sequence[tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        _check_target_ratio(self.target_ratio)
        if not (isinstance(self.ratio_weight, (int, float)) and math.isfinite(self.ratio_weight)
                and self.ratio_weight >= 0):
            raise ValueError(f"ratio_weight must be a finite number >= 0 (the paper uses 0.03), got {self.ratio_weight}")
        for name in ("group_size", "warmup_steps"):
            value, lo = getattr(self, name), 1 if name == "group_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}"
                                 + (" (samples per ratio-loss group; the paper uses 16)" if lo else " (steps)")
                                 + f", got {value!r}")
        if not self.fractions:
            raise ValueError("fractions must hold at least one tail-drop fraction, e.g. (0.0,)")
        for f in self.fractions:
            check_rho(f, name="fractions")
        for r in self.cfg_rho:
            check_rho(r, name="cfg_rho")
        if self.schedule is not None:
            knots = sorted((float(t), float(r)) for t, r in self.schedule)
            if not knots:
                raise ValueError("schedule must hold at least one (t, rho) knot")
            for _, r in knots:
                check_rho(r, name="schedule")
            self.schedule = knots

    # ------------------------------------------------------------------ training
    def ratio_loss(self, router_out) -> Tensor:
        """Ratio loss of a :class:`~chunkformer.routing.RouterOutput` (natural mask)."""
        return ratio_loss(
            router_out.probs, router_out.natural_mask, self.target_ratio, group_size=self.group_size
        )

    def training_rho(self, step: int) -> float:
        """Tail-drop fraction for ``step``: 0 during warm-up, then one draw per step.

        The draw depends only on ``(seed, step)``, so every rank of a distributed run
        agrees without communication and a resumed run repeats the same sequence.
        """
        if step < self.warmup_steps:
            return 0.0
        return float(random.Random(self.seed * 1_000_003 + step).choice(list(self.fractions)))

    # ------------------------------------------------------------------ sampling
    def rho_at(self, t: Tensor, rho: Rho | None = None) -> Tensor:
        """Per-sample tail drop for timesteps ``t`` (B,): ``rho`` if given, else the schedule."""
        B = t.shape[0]
        if rho is not None:
            check_rho(rho, batch=B)
            return torch.as_tensor(rho, device=t.device, dtype=torch.float32).expand(B).clone()
        if self.schedule is None:
            return torch.zeros(B, device=t.device)
        ts = torch.tensor([k[0] for k in self.schedule], device=t.device)
        rs = torch.tensor([k[1] for k in self.schedule], device=t.device)
        tf = t.float().clamp(ts[0], ts[-1])
        hi = torch.searchsorted(ts, tf, right=True).clamp(1, len(ts) - 1) if len(ts) > 1 else None
        if hi is None:
            return rs.expand(B).clone()
        lo = hi - 1
        w = ((tf - ts[lo]) / (ts[hi] - ts[lo]).clamp_min(1e-12)).clamp(0, 1)
        return rs[lo] + w * (rs[hi] - rs[lo])

    def lite_cfg_rho(self, batch: int, device: torch.device | None = None) -> Tensor:
        """Per-sample rho for a CFG batch ``[cond (batch); uncond (batch)]``, shape ``(2 batch,)``."""
        cond, uncond = self.cfg_rho
        return torch.tensor([cond] * batch + [uncond] * batch, device=device)
