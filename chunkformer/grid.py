"""The token grid: rank-1, -2 and -3 latents (sequences, images, video) as tokens.

A grid of shape ``(s_1, ..., s_n)`` flattens to ``L = prod(s_i)`` tokens in raster
(C) order. Everything in chunkformer that needs geometry (routers, chunk plans,
smoothing, nearest plug-back, position embeddings) reads it from here.
"""

import math

import torch
from einops import rearrange
from torch import nn

from ._typing import Float, Int, Tensor, typechecked

__all__ = [
    "GridShape",
    "check_grid",
    "grid_coords",
    "to_tokens",
    "to_grid",
    "conv_nd",
    "norm_groups",
    "sincos_embed",
    "sincos_table",
]

GridShape = tuple[int, ...] | list[int]

_AXES = ("g1", "g2", "g3")  # einops names for up to three grid axes


def check_grid(grid: GridShape, *, name: str = "grid") -> GridShape:
    """Validate a grid shape (rank 1, 2 or 3, positive sizes) and return it as a tuple."""
    grid = tuple(int(s) for s in grid)
    if not 1 <= len(grid) <= 3:
        raise ValueError(
            f"{name} must have rank 1, 2 or 3 (sequence, image or video latent), got "
            f"{len(grid)} axes {grid}"
        )
    if any(s < 1 for s in grid):
        raise ValueError(f"{name} sizes must all be >= 1, got {grid}")
    return grid


def grid_coords(
    grid: GridShape, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "tokens ndim"]:
    """Integer coordinates of every grid position in raster order, shape ``(L, ndim)``."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def _pattern(ndim: int) -> str:
    return " ".join(_AXES[:ndim])


@typechecked
def to_tokens(x: Float[Tensor, "batch channels *grid"]) -> Float[Tensor, "batch tokens channels"]:
    """``(B, C, *grid)`` -> ``(B, L, C)`` in raster order."""
    axes = _pattern(x.ndim - 2)
    return rearrange(x, f"b c {axes} -> b ({axes}) c")


@typechecked
def to_grid(
    x: Float[Tensor, "batch tokens channels"], grid: GridShape
) -> Float[Tensor, "batch channels *grid"]:
    """``(B, L, C)`` -> ``(B, C, *grid)``; inverse of :func:`to_tokens`."""
    if x.shape[1] != math.prod(grid):
        raise ValueError(
            f"x has {x.shape[1]} tokens but grid {tuple(grid)} holds {math.prod(grid)}"
        )
    axes = _pattern(len(grid))
    sizes = dict(zip(_AXES, grid))
    return rearrange(x, f"b ({axes}) c -> b c {axes}", **sizes)


def norm_groups(channels: int, preferred: int) -> int:
    """GroupNorm group count: ``gcd(channels, preferred)``, with >= 2 channels per group when possible.

    At the paper's widths (scaffold ``d/4`` = 96 to 288 channels) this is exactly ``preferred``
    (DC-DiT's 32 in ResBlocks, 8 in the router). Two channels per group keep GroupNorm defined on
    a single-token grid in training; the release's own 32-group norm differs only below 64 channels.
    """
    g = math.gcd(channels, preferred)
    while g > 1 and channels // g < 2:
        g = math.gcd(channels, g // 2)
    return g


def conv_nd(ndim: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` for a grid of rank ``ndim``."""
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1](*args, **kwargs)


@typechecked
def sincos_embed(
    coords: Float[Tensor, "*batch ndim"], dim: int, *, base: float = 10000.0
) -> Float[Tensor, "*batch embed"]:
    """Frozen sin-cos embedding of (possibly fractional) N-D grid coordinates.

    Each axis gets ``2 * (dim // (2 * ndim))`` channels, ``[sin(w x), cos(w x)]`` with
    ``w_k = base ** (-k / half)``; leftover channels (when ``dim`` is not a multiple of
    ``2 * ndim``) are zero. Axes come in reverse grid order (for 2D: the column, then the
    row), so integer coordinates give exactly the 2D tables of DiT and diffusers.
    """
    ndim = coords.shape[-1]
    half = dim // (2 * ndim)
    if half == 0:
        raise ValueError(f"dim must be >= 2 * ndim = {2 * ndim} for sin-cos embeddings, got {dim}")
    omega = base ** (-torch.arange(half, device=coords.device, dtype=torch.float32) / half)
    angles = coords.float().flip(-1).unsqueeze(-1) * omega  # (*batch, ndim, half), last axis first
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (*batch, ndim * 2 half)
    pad = dim - emb.shape[-1]
    if pad:
        emb = torch.nn.functional.pad(emb, (0, pad))
    return emb


def sincos_table(grid: GridShape, dim: int, *, device: torch.device | None = None) -> Float[Tensor, "tokens embed"]:
    """``(L, dim)`` sin-cos embedding of every position of ``grid`` in raster order (DiT's table)."""
    return sincos_embed(grid_coords(grid, device=device), dim)


def raster_index(coords: Int[Tensor, "*batch ndim"], grid: GridShape) -> Int[Tensor, "*batch"]:
    """Raster index of integer coordinates (inverse of :func:`grid_coords`)."""
    strides = [math.prod(grid[i + 1 :]) for i in range(len(grid))]
    return (coords * torch.tensor(strides, device=coords.device, dtype=coords.dtype)).sum(-1)
