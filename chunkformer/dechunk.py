"""De-chunking: from the backbone's kept tokens back to every grid position.

Three steps, in fp32 with autocast off (DC-DiT's de-chunk):

1. **Smoothing** among kept tokens, weighted by a Gaussian of their grid distance and
   the neighbour's confidence ``p_j``::

       W_ij = exp(-|u_i - u_j|^2 / (2 sigma^2)) p_j / sum_k (...)
       h_i <- p_i h_i + (1 - p_i) sum_j W_ij h_j

   :func:`smooth_dense` builds the ``(B, M, M)`` kernel (the reference form);
   :func:`smooth_windowed` evaluates the same sums as a normalised convolution on the
   grid with a separable kernel truncated at ``truncate * sigma`` cells: linear in
   ``L``, exact up to that truncation (and exactly the dense form when the window
   covers the grid).
2. **Plug-back**: every grid position takes its nearest kept token (:meth:`ChunkPlan.plug_back`).
3. **Gate**: multiply by ``STE(c_sel)`` (:func:`ste_ones`), which is exactly 1 in the
   forward pass and passes the gradient to the router's confidence unchanged.
"""

import math
from typing import Literal

import torch

from ._typing import Bool, Float, Tensor, typechecked
from .grid import to_grid, to_tokens
from .plan import ChunkPlan

__all__ = ["smooth_dense", "smooth_windowed", "smoothing_weights", "ste_ones", "dechunk", "Smoothing"]

Smoothing = Literal["windowed", "dense", "none"]

PROB_CLAMP = 1e-4  # p is clamped to [1e-4, 1 - 1e-4] before smoothing, as in DC-DiT


def ste_ones(c: Tensor) -> Tensor:
    """Straight-through estimator: exactly ``1`` forward, identity gradient to ``c``."""
    return 1.0 + (c - c.detach())


@typechecked
def smoothing_weights(
    coords: Float[Tensor, "batch width ndim"],
    p: Float[Tensor, "batch width"],
    valid: Bool[Tensor, "batch width"],
    sigma: float,
) -> Float[Tensor, "batch width width"]:
    """Dense row-normalised weights ``W_ij`` among the valid slots of each sample."""
    coords = coords.to(p.dtype)
    d2 = ((coords[:, :, None, :] - coords[:, None, :, :]) ** 2).sum(-1)  # (B, M, M)
    w = torch.exp(-d2 / (2 * sigma**2)) * (p * valid)[:, None, :]  # (B, M, M)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-30)


@typechecked
def smooth_dense(
    h: Float[Tensor, "batch width dim"],
    p: Float[Tensor, "batch width"],
    plan: ChunkPlan,
    sigma: float,
) -> Float[Tensor, "batch width dim"]:
    """Reference smoothing with the dense ``(B, M, M)`` kernel (quadratic in ``M``)."""
    w = smoothing_weights(plan.coords, p, plan.valid, sigma)  # (B, M, M)
    p_ = p[..., None]
    return p_ * h + (1 - p_) * torch.bmm(w, h)


def _band_matrix(size: int, sigma: float, radius: int, device, dtype) -> Tensor:
    """``(size, size)`` truncated Gaussian band: ``K_ij = exp(-(i - j)^2 / 2 sigma^2)`` for ``|i - j| <= radius``."""
    k = torch.arange(size, device=device, dtype=dtype)
    d = k[:, None] - k[None, :]
    return torch.where(d.abs() <= radius, torch.exp(-(d**2) / (2 * sigma**2)), torch.zeros((), device=device, dtype=dtype))


def _gaussian_blur(x: Tensor, sigma: float, radius: int) -> Tensor:
    """Separable, unnormalised Gaussian ``exp(-k^2 / 2 sigma^2)``, ``|k| <= radius``, zero padding.

    ``x``: ``(B, C, *grid)``; each grid axis is filtered in turn as one matmul with a banded
    ``(S, S)`` matrix (BLAS-friendly on CPU and GPU alike; ``O(L S)`` per axis, ``S`` the axis length).
    """
    for axis in range(2, x.ndim):
        band = _band_matrix(x.shape[axis], sigma, radius, x.device, x.dtype)  # symmetric
        x = (x.movedim(axis, -1) @ band).movedim(-1, axis)
    return x


@typechecked
def smooth_windowed(
    h: Float[Tensor, "batch width dim"],
    p: Float[Tensor, "batch width"],
    plan: ChunkPlan,
    sigma: float,
    *,
    truncate: float = 4.0,
) -> Float[Tensor, "batch width dim"]:
    """Smoothing as a normalised convolution on the grid, ``r = ceil(truncate sigma)`` cells per axis.

    Scatters ``p_j h_j`` and ``p_j`` of the kept tokens onto the grid, blurs both with
    the truncated Gaussian, and reads numerator / denominator back at the kept
    positions. Weights beyond ``r`` cells per axis (relative size ``exp(-truncate^2 / 2)``)
    are dropped; with ``r >= max(grid) - 1`` the result equals :func:`smooth_dense`.
    """
    B, M, d = h.shape
    L, grid = plan.num_tokens, plan.grid
    radius = max(1, math.ceil(truncate * sigma))
    w = (p * plan.valid)[..., None]  # (B, M, 1): padding slots weigh nothing
    pos = plan.positions[..., None]  # (B, M, 1)
    src = torch.cat([w * h, w], dim=-1)  # (B, M, d + 1)
    canvas = h.new_zeros(B, L, d + 1).scatter(1, pos.expand(-1, -1, d + 1), src)  # (B, L, d + 1)
    blurred = to_tokens(_gaussian_blur(to_grid(canvas, grid), sigma, radius))  # (B, L, d + 1)
    at_kept = torch.take_along_dim(blurred, pos, dim=1)  # (B, M, d + 1)
    neighbours = at_kept[..., :d] / at_kept[..., d:].clamp_min(1e-30)  # (B, M, d)
    p_ = p[..., None]
    return p_ * h + (1 - p_) * neighbours


@typechecked
def dechunk(
    y: Float[Tensor, "batch width dim"],
    probs: Float[Tensor, "batch tokens"],
    plan: ChunkPlan,
    *,
    sigma: float = 1.0,
    smoothing: Smoothing = "windowed",
    truncate: float = 4.0,
) -> Float[Tensor, "batch tokens dim"]:
    """Backbone slots ``(B, M, d)`` -> full grid ``(B, L, d)`` in fp32 (smooth, then plug back).

    ``probs`` are the router's ``(B, L)`` keep probabilities; ``smoothing="none"`` (or
    ``sigma=0``) skips step 1, and the result is then exactly the kept tokens' values.
    """
    if smoothing not in ("windowed", "dense", "none"):
        raise ValueError(f"smoothing must be 'windowed', 'dense' or 'none', got {smoothing!r}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0 (grid cells), got {sigma}")
    with torch.autocast(device_type=y.device.type, enabled=False):
        y = y.float()
        if smoothing != "none" and sigma > 0:
            p = torch.take_along_dim(probs.float(), plan.positions, dim=1)
            p = p.clamp(PROB_CLAMP, 1 - PROB_CLAMP)  # (B, M)
            if smoothing == "dense":
                y = smooth_dense(y, p, plan, sigma)
            else:
                y = smooth_windowed(y, p, plan, sigma, truncate=truncate)
        return plan.plug_back(y)  # (B, L, d)
