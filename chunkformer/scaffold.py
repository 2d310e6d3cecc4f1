"""The conv scaffold around a backbone: ``ChunkEncoder`` in front, ``DeChunkDecoder`` behind.

    enc = ChunkEncoder(in_channels=4, dim=384)            # 3x3 embed + 2 ResBlocks at d/4 -> d
    dec = DeChunkDecoder(dim=384, out_channels=8)         # de-chunk + 2 ResBlocks d -> d/4 + final layer
    tokens = enc(x, c)                                    # (B, L, 384)
    chunked = Chunked.from_router(router(tokens, grid), tokens)  # the plan, p, c_sel and tokens
    out = dec(backbone(chunked.plan.chunk(tokens)), chunked, c)  # (B, 8, H, W)

Both work on grids of rank 1, 2 or 3 (``Conv1d/2d/3d``). Conditioning ``c`` is the
``(B, cond_dim)`` vector a DiT feeds its adaLN (timestep + label embedding).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._typing import Float, Tensor, typechecked
from .dechunk import SMOOTHINGS, Chunked, Smoothing, dechunk, ste_ones
from .grid import conv_nd, norm_groups, to_grid, to_tokens
from .precision import FP32Module, RMSNorm

__all__ = ["ResBlock", "ChunkEncoder", "DeChunkDecoder", "FinalLayer"]


def _require_cond(c: Tensor | None, cond_dim: int) -> None:
    if c is None:
        raise ValueError(
            f"this block is conditioned: pass c of shape (batch, {cond_dim}) (timestep + label embedding), "
            "or build it with cond_dim=0 for an unconditioned scaffold"
        )


class ResBlock(nn.Module):
    """Stable-Diffusion-style conv ResBlock on an N-D grid with additive conditioning.

    ``GroupNorm -> SiLU -> Conv3 -> + Linear(SiLU(c)) -> GroupNorm -> SiLU -> Conv3``,
    plus the input (through a 1x1 conv when widths differ). The inner width is
    ``min(in_channels, out_channels)``, so a widening block widens in its second conv
    and a narrowing block narrows in its first.

    GPU fast paths for sampling (fused norms, taps and GEMM convs) are applied by
    :func:`chunkformer.kernels.apply`, which swaps this block for one with the same parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int | None,
        ndim: int = 2,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        inner = min(in_channels, out_channels)
        self.norm1 = nn.GroupNorm(norm_groups(in_channels, 32), in_channels, **fk)
        self.conv1 = conv_nd(ndim, in_channels, inner, 3, padding=1, **fk)
        self.cond = nn.Linear(cond_dim, inner, **fk) if cond_dim else None
        self.norm2 = nn.GroupNorm(norm_groups(inner, 32), inner, **fk)
        self.conv2 = conv_nd(ndim, inner, out_channels, 3, padding=1, **fk)
        self.skip = (
            conv_nd(ndim, in_channels, out_channels, 1, **fk)
            if in_channels != out_channels
            else nn.Identity()
        )

    @typechecked
    def forward(
        self, x: Float[Tensor, "batch cin *grid"], c: Float[Tensor, "batch cond"] | None = None
    ) -> Float[Tensor, "batch cout *grid"]:
        return self.conv2(self._inner(x, c)) + self.skip(x)  # (B, cout, *grid)

    def _inner(self, x: Tensor, c: Tensor | None) -> Tensor:
        """``SiLU(norm2(conv1(SiLU(norm1(x))) + cond))``: ``(B, inner, *grid)``, ready for ``conv2``."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, inner, *grid)
        if self.cond is not None:
            _require_cond(c, self.cond.in_features)
            shift = self.cond(F.silu(c))  # (B, inner)
            h = h + shift.reshape(*shift.shape, *([1] * (h.ndim - 2)))
        return F.silu(self.norm2(h))


class ChunkEncoder(nn.Module):
    """Embed a latent grid and encode it into ``(B, L, dim)`` tokens for the router.

    3x3 conv embed ``in_channels -> width`` (default ``dim // 4``), ``depth`` ResBlocks at
    ``width`` with the last one lifting to ``dim``, then RMSNorm.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        *,
        ndim: int = 2,
        depth: int = 2,
        width: int | None = None,
        cond_dim: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1 ResBlock, got {depth}")
        fk = {"device": device, "dtype": dtype}
        width = width or max(dim // 4, 1)
        cond_dim = dim if cond_dim is None else cond_dim
        self.in_channels, self.dim, self.ndim, self.width = in_channels, dim, ndim, width
        self.embed = conv_nd(ndim, in_channels, width, 3, padding=1, **fk)
        self.blocks = nn.ModuleList(
            ResBlock(width, dim if i == depth - 1 else width, cond_dim, ndim, **fk) for i in range(depth)
        )
        self.norm = RMSNorm(dim, eps=1e-5, **fk)

    @typechecked
    def forward(
        self, x: Float[Tensor, "batch channels *grid"], c: Float[Tensor, "batch cond"] | None = None
    ) -> Float[Tensor, "batch tokens dim"]:
        self.check_input(x)
        h = self.embed(x)  # (B, width, *grid)
        for block in self.blocks:
            h = block(h, c)  # (B, width, *grid), the last (B, dim, *grid)
        return self.norm(to_tokens(h))  # (B, L, dim)

    def check_input(self, x: Tensor) -> None:
        """Raise unless ``x`` is ``(B, in_channels, *grid)`` with a grid of this encoder's rank."""
        if x.ndim != self.ndim + 2:
            raise ValueError(
                f"x must be (batch, channels, *grid) with a rank-{self.ndim} grid, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, expected in_channels={self.in_channels}")


class FinalLayer(nn.Module):
    """DiT's output layer: ``LayerNorm`` modulated by ``c`` (adaLN), then a linear map (zero init)."""

    def __init__(
        self,
        dim: int,
        out_channels: int,
        cond_dim: int | None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim, elementwise_affine=cond_dim is None, eps=1e-6, **fk)
        self.modulation = nn.Linear(cond_dim, 2 * dim, **fk) if cond_dim else None
        self.linear = nn.Linear(dim, out_channels, **fk)
        for layer in (self.modulation, self.linear):
            if layer is not None:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @typechecked
    def forward(
        self, x: Float[Tensor, "batch tokens dim"], c: Float[Tensor, "batch cond"] | None = None
    ) -> Float[Tensor, "batch tokens out"]:
        h = self.norm(x)
        if self.modulation is not None:
            _require_cond(c, self.modulation.in_features)
            shift, scale = self.modulation(F.silu(c))[:, None].chunk(2, dim=-1)  # (B, 1, dim) each
            h = h * (1 + scale) + shift
        return self.linear(h)


class _FP32Linear(nn.Linear, FP32Module):
    """A linear layer that stays fp32 when its model is cast to half precision."""


class DeChunkDecoder(nn.Module):
    """De-chunk the backbone's output and decode it to the model's output channels.

    ``z = dechunk(y) * STE(c_sel) + W_res enc_tokens`` (fp32; ``W_res`` zero-init, so a
    new model starts as a gated identity around the backbone; the gate, exactly 1 forward, is applied only
    where a gradient can reach the router), then ``depth`` ResBlocks
    narrowing ``dim -> width`` in the first, RMSNorm, and :class:`FinalLayer` at ``width``.

    Args:
        dim: backbone / encoder token width ``d``.
        out_channels: output channels (``2 * in_channels`` for a learned-sigma DiT).
        sigma: smoothing bandwidth in grid cells (DC-DiT: 1 at 32x32, 2 at 64x64).
        smoothing: ``"auto"`` (default: dense for a few hundred kept tokens, else windowed),
            ``"windowed"`` (linear in L), ``"dense"`` (reference) or ``"none"``.
        fp32: de-chunk, gate and residual sum in fp32 (default, DC-DiT's policy). ``False`` keeps
            the backbone's precision (bf16 under autocast): half the memory traffic of the
            ``(B, L, d)`` merge and a bf16 smoothing product, at bf16 rounding.
    """

    def __init__(
        self,
        dim: int,
        out_channels: int,
        *,
        ndim: int = 2,
        depth: int = 2,
        width: int | None = None,
        cond_dim: int | None = None,
        sigma: float = 1.0,
        smoothing: Smoothing = "auto",
        truncate: float = 4.0,
        fp32: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1 ResBlock, got {depth}")
        if smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0 grid cells (0 turns smoothing off), got {sigma}")
        if truncate <= 0:
            raise ValueError(f"truncate must be > 0 (window radius in units of sigma), got {truncate}")
        fk = {"device": device, "dtype": dtype}
        width = width or max(dim // 4, 1)
        cond_dim = dim if cond_dim is None else cond_dim
        self.dim, self.ndim, self.width, self.out_channels = dim, ndim, width, out_channels
        self.sigma, self.smoothing, self.truncate, self.fp32 = sigma, smoothing, truncate, fp32
        self.residual = _FP32Linear(dim, dim, device=device, dtype=torch.float32)  # stays fp32
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)
        self.blocks = nn.ModuleList(
            ResBlock(dim if i == 0 else width, width, cond_dim, ndim, **fk) for i in range(depth)
        )
        self.norm = RMSNorm(width, eps=1e-5, **fk)
        self.final = FinalLayer(width, out_channels, cond_dim, **fk)

    def merge(self, y: Tensor, chunked: Chunked) -> Float[Tensor, "batch tokens dim"]:
        """Backbone output (``plan.chunk`` layout) -> gated, residual-added ``(B, L, d)`` in fp32
        (``fp32=False``: in the backbone output's dtype).

        De-chunking runs with autocast off; the residual projection keeps fp32 weights but runs
        under the caller's autocast, as in the authors' release (a bf16 GEMM when sampling in
        bf16: ``L d^2`` multiply-adds are too many for fp32)."""
        plan, enc_tokens = chunked.plan, chunked.tokens
        B, L = plan.order.shape
        if (tuple(chunked.probs.shape) != (B, L) or tuple(chunked.confidence.shape) != (B, L)
                or tuple(enc_tokens.shape[:2]) != (B, L) or math.prod(plan.grid) != L):
            raise ValueError(
                f"the plan covers {B} samples of grid {tuple(plan.grid)} but the probabilities are "
                f"{tuple(chunked.probs.shape)}, the confidence {tuple(chunked.confidence.shape)} and the encoder "
                f"tokens {tuple(enc_tokens.shape)}: build them together with Chunked.from_router(router_out, tokens)")
        dtype = torch.float32 if self.fp32 else y.dtype
        autocast = torch.is_autocast_enabled(enc_tokens.device.type)  # then the GEMM is bf16 anyway: no fp32 copy
        res = self.residual(enc_tokens if autocast else enc_tokens.float())  # (B, L, d)
        with torch.autocast(device_type=enc_tokens.device.type, enabled=False):
            full = dechunk(
                plan.unchunk(y), chunked.probs, plan,
                sigma=self.sigma, smoothing=self.smoothing, truncate=self.truncate, dtype=dtype,
            )  # (B, L, d)
            full = full.float()
            confidence = chunked.confidence
            if torch.is_grad_enabled() and confidence.requires_grad:  # else the gate, exactly 1, is left out
                full = full * ste_ones(confidence.float())[..., None]  # (B, L, d) * (B, L, 1)
            # summed in fp32 and rounded once (the same bf16 values as a bf16 sum, since the gate is 1); it also
            # keeps inductor from folding the sum into the residual GEMM as an addmm, which copies its C operand
            return (full + res.float()).to(dtype)

    @typechecked
    def forward(
        self,
        y: Tensor,
        chunked: Chunked,
        c: Float[Tensor, "batch cond"] | None = None,
    ) -> Float[Tensor, "batch out *grid"]:
        """``y``: backbone output in ``chunked.plan.chunk`` layout; returns ``(B, out_channels, *grid)``."""
        z = self.merge(y, chunked).to(chunked.tokens.dtype)  # (B, L, d)
        h = to_grid(z, chunked.plan.grid)  # (B, d, *grid)
        for block in self.blocks:
            h = block(h, c)  # (B, width, *grid)
        out = self.final(self.norm(to_tokens(h)), c)  # (B, L, out)
        return to_grid(out, chunked.plan.grid)  # (B, out, *grid)
