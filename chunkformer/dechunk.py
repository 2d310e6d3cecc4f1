"""De-chunking: from the backbone's kept tokens back to every grid position.

Three steps, in fp32 with autocast off (DC-DiT's de-chunk; ``dtype=`` runs them in another
precision, the weights and probabilities still computed in fp32):

1. **Smoothing** among kept tokens, weighted by a Gaussian of their grid distance and
   the neighbour's confidence ``p_j``::

       W_ij = exp(-|u_i - u_j|^2 / (2 sigma^2)) p_j / sum_k (...)
       h_i <- p_i h_i + (1 - p_i) sum_j W_ij h_j

   :func:`smooth_dense` builds the ``(B, M, M)`` kernel (the reference form);
   :func:`smooth_windowed` evaluates the same sums as a normalised convolution on the
   grid with a separable kernel truncated at ``truncate * sigma`` cells: linear in
   ``L`` for a given axis length, exact up to that truncation (and exactly the dense
   form when the window covers the grid). ``smoothing="auto"`` (the default) takes the
   dense form on CUDA while ``M^2 <= DENSE_SMOOTHING_MAX_RATIO * L`` (a few hundred kept
   tokens: one small ``bmm`` beats blurring the whole grid) and the windowed one beyond
   and on the CPU, so its memory stays ``O(L)`` either way.
2. **Plug-back**: every grid position takes its nearest kept token (:meth:`ChunkPlan.plug_back`).
3. **Gate**: multiply by ``STE(c_sel)`` (:func:`ste_ones`), which is exactly 1 in the
   forward pass and passes the gradient to the router's confidence unchanged.

:class:`Chunked` carries what these steps need from the stages before the backbone (the
plan, the probabilities, the confidence and the encoder's tokens) to the decoder in one object::

    chunked = Chunked.from_router(routed, tokens, mode="packed")    # routing -> plan
    out = decoder(backbone(chunked.plan.chunk(tokens)), chunked, c)  # (B, out, *grid)
"""

import math
from typing import Literal, get_args

import torch
from tensordict import tensorclass

from ._typing import Bool, Float, Tensor, typechecked
from .plan import ChunkPlan, PlanMode

__all__ = ["Chunked", "smooth_dense", "smooth_windowed", "smoothing_weights", "ste_ones", "dechunk", "Smoothing",
           "resolve_smoothing"]

Smoothing = Literal["auto", "windowed", "dense", "none"]


@tensorclass
class Chunked:
    """What de-chunking needs from routing, batch dimension first: routing's one hand-off to the decoder.

    Attributes:
        plan: the :class:`~chunkformer.plan.ChunkPlan` the backbone's tokens are laid out by.
        probs: ``(B, L)`` fp32 keep probabilities ``p`` (the smoothing weights).
        confidence: ``(B, L)`` fp32 ``c_sel`` (the gate's ``STE(c_sel)``).
        tokens: ``(B, L, d)`` the encoder's tokens, before the backbone (the residual path).

    A tensorclass: ``torch.cat`` joins two along the batch (classifier-free guidance's halves), plans included.
    """

    plan: ChunkPlan
    probs: torch.Tensor
    confidence: torch.Tensor
    tokens: torch.Tensor

    @classmethod
    def from_router(cls, routed, tokens: Tensor, *, mode: PlanMode = "packed", capacity: int | None = None,
                    fill: bool = False) -> "Chunked":
        """Plan the kept tokens of a :class:`~chunkformer.routing.RouterOutput` (:meth:`ChunkPlan.from_router`)
        and bundle the plan with what the decoder needs; ``tokens``: ``(B, L, d)`` the router scored."""
        plan = ChunkPlan.from_router(routed, mode=mode, capacity=capacity, fill=fill)
        return cls(plan=plan, probs=routed.probs, confidence=routed.confidence, tokens=tokens,
                   batch_size=[tokens.shape[0]])
SMOOTHINGS: tuple[str, ...] = get_args(Smoothing)
# "auto" smooths densely (on CUDA) while M^2 <= this * L: where DC-DiT-XL's compiled scaffold measured the
# dense form ahead of the windowed one (benchmarks/scaffold_profile.py; docs/performance.md)
DENSE_SMOOTHING_MAX_RATIO = 128
# the same in half precision, where the dense form's batched GEMM runs in bf16 / fp16 instead of fp32
# (benchmarks/scaffold_compile.py --variants 'dense smoothing')
DENSE_SMOOTHING_MAX_RATIO_HALF = 256

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
    w = smoothing_weights(plan.coords, p, plan.valid, sigma).to(h.dtype)  # (B, M, M)
    p_ = p[..., None].to(h.dtype)
    return p_ * h + (1 - p_) * torch.bmm(w, h)


def _band_matrix(size: int, sigma: float, radius: int, device, dtype) -> Tensor:
    """``(size, size)`` truncated Gaussian band: ``K_ij = exp(-(i - j)^2 / 2 sigma^2)`` for ``|i - j| <= radius``."""
    k = torch.arange(size, device=device, dtype=dtype)
    d = k[:, None] - k[None, :]
    return torch.where(d.abs() <= radius, torch.exp(-(d**2) / (2 * sigma**2)), torch.zeros((), device=device, dtype=dtype))


BLUR_TILE = 32  # long axes are filtered in tiles of this many cells (see _blur_axis)


def window_radius(sigma: float, truncate: float) -> int:
    """Cells per axis the windowed smoothing reaches: ``ceil(truncate * sigma)``, at least 1."""
    return max(1, math.ceil(truncate * sigma))


def _tiled(size: int, radius: int, device: torch.device | str) -> bool:
    """Whether to blur in tiles: on the CPU only, where they pay; on a GPU one compiled band matmul
    is the better form (``benchmarks/smoothing.py``, docs/performance.md)."""
    cpu = torch.device(device).type == "cpu"
    return cpu and size > BLUR_TILE and size % BLUR_TILE == 0 and radius < BLUR_TILE


def blur_macs(size: int, radius: int, device: torch.device | str = "cpu") -> float:
    """Multiply-adds per element that :func:`_blur_axis` executes along an axis of ``size`` cells."""
    if not _tiled(size, radius, device):
        return float(size)
    n = size // BLUR_TILE
    return BLUR_TILE + 2 * radius * radius * (n - 1) / (n * BLUR_TILE)


def _blur_axis(x: Tensor, size: int, sigma: float, radius: int) -> Tensor:
    """Filter axis 1 of ``x`` ``(outer, S, inner)`` with the truncated Gaussian; same shape out.

    Short axes (or ones the tile does not divide), and every axis off the CPU: one matmul with the
    banded ``(S, S)`` matrix,
    ``2 S`` multiply-adds per element. Longer ones are cut into tiles of ``T = BLUR_TILE`` cells
    (a free view ``(outer, S / T, T, inner)``): one ``(T, T)`` matmul per tile plus two
    ``(r, r)`` corrections for the ``r`` cells each tile takes from its neighbours, about
    ``2 (T + 2 r^2 / T)`` multiply-adds per element whatever ``S`` is.
    """
    T = BLUR_TILE
    if not _tiled(size, radius, x.device):
        return torch.matmul(_band_matrix(size, sigma, radius, x.device, x.dtype), x)
    outer, _, inner = x.shape
    tiles = x.reshape(outer, size // T, T, inner)  # a view: no copy
    band = _band_matrix(T + radius, sigma, radius, x.device, x.dtype)  # (T + r, T + r) Toeplitz band
    out = torch.matmul(band[:T, :T], tiles)  # (outer, S / T, T, inner): within each tile
    # cell i of a tile and cell j of the previous tile sit i + r - j' apart (j' = j - (T - r)): band[r + i, j']
    halo = band[radius:2 * radius, :radius]  # (r, r): first r cells <- previous tile's last r cells
    out[:, 1:, :radius] += torch.matmul(halo, tiles[:, :-1, T - radius:])
    out[:, :-1, T - radius:] += torch.matmul(halo.T, tiles[:, 1:, :radius])  # last r <- next tile's first r
    return out.reshape(outer, size, inner)


def _gaussian_blur(x: Tensor, grid: tuple[int, ...], sigma: float, radius: int) -> Tensor:
    """Separable, unnormalised Gaussian ``exp(-k^2 / 2 sigma^2)``, ``|k| <= radius``, zero padding.

    ``x``: ``(B, L, C)`` tokens in raster order, returned in the same layout. Each grid axis
    of length ``S`` is filtered in turn (:func:`_blur_axis`) on a view of ``x`` as
    ``(outer, S, inner)``: no transposes, so nothing is copied but the matmuls' outputs.
    """
    B, L, C = x.shape
    for axis, size in enumerate(grid):
        if size == 1:
            continue
        outer, inner = B * math.prod(grid[:axis]), math.prod(grid[axis + 1:]) * C
        x = _blur_axis(x.reshape(outer, size, inner), size, sigma, radius).reshape(B, L, C)
    return x


def resolve_smoothing(
    smoothing: str, width: int, tokens: int, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> str:
    """The smoothing form that runs for ``width`` slots on a grid of ``tokens`` positions, in ``dtype``.

    ``"auto"`` is ``"dense"`` on CUDA while ``width^2 <= DENSE_SMOOTHING_MAX_RATIO * tokens`` (``_HALF`` for a
    bf16 / fp16 de-chunk), else ``"windowed"`` (on the CPU the dense kernel's ``exp`` over ``B M^2`` pairs loses
    at every size: ``benchmarks/smoothing.py``)."""
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
    if smoothing != "auto":
        return smoothing
    half = dtype in (torch.bfloat16, torch.float16)
    small = width * width <= (DENSE_SMOOTHING_MAX_RATIO_HALF if half else DENSE_SMOOTHING_MAX_RATIO) * tokens
    return "dense" if small and torch.device(device).type == "cuda" else "windowed"


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
    grid = tuple(plan.grid)
    radius = window_radius(sigma, truncate)
    w = (p * plan.valid)[..., None].to(h.dtype)  # (B, M, 1): padding slots weigh nothing
    num, den = plan.place(w * h), plan.place(w)  # (B, L, d), (B, L, 1): each slot at its (distinct) position
    num, den = _gaussian_blur(num, grid, sigma, radius), _gaussian_blur(den, grid, sigma, radius)
    neighbours = plan.gather(num) / plan.gather(den).clamp_min(1e-30)
    p_ = p[..., None].to(h.dtype)
    return p_ * h + (1 - p_) * neighbours


@typechecked
def dechunk(
    y: Float[Tensor, "batch width dim"],
    probs: Float[Tensor, "batch tokens"],
    plan: ChunkPlan,
    *,
    sigma: float = 1.0,
    smoothing: Smoothing = "auto",
    truncate: float = 4.0,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "batch tokens dim"]:
    """Backbone slots ``(B, M, d)`` -> full grid ``(B, L, d)`` in ``dtype`` (smooth, then plug back).

    ``probs`` are the router's ``(B, L)`` keep probabilities; ``smoothing="none"`` (or
    ``sigma=0``) skips step 1, and the result is then exactly the kept tokens' values;
    ``"auto"`` picks ``"dense"`` or ``"windowed"`` by :func:`resolve_smoothing`. ``dtype``: the
    precision of the values (fp32, DC-DiT's choice, by default; the Gaussian weights are fp32 either way).
    """
    smoothing = resolve_smoothing(smoothing, y.shape[1], plan.num_tokens, y.device, dtype)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0 (grid cells), got {sigma}")
    with torch.autocast(device_type=y.device.type, enabled=False):
        y = y.to(dtype)
        if smoothing != "none" and sigma > 0:
            p = torch.take_along_dim(probs.float(), plan.positions, dim=1)
            p = p.clamp(PROB_CLAMP, 1 - PROB_CLAMP)  # (B, M)
            if smoothing == "dense":
                y = smooth_dense(y, p, plan, sigma)
            else:
                y = smooth_windowed(y, p, plan, sigma, truncate=truncate)
        return plan.plug_back(y)  # (B, L, d)
