"""Sampling fast paths of the scaffold's norms: GroupNorm statistics in one coalesced pass over a
channels-last grid and its normalising pass (with the SiLU) in another, and a residual add + RMSNorm in one
pass over rows wider than inductor keeps in registers.

    import torch, torch.nn.functional as F
    from chunkformer.kernels.norms import GroupNorm

    norm = GroupNorm(32, 288).cuda()
    x = torch.randn(64, 288, 32, 32, device="cuda").to(torch.bfloat16, memory_format=torch.channels_last)
    shift = torch.randn(64, 288, device="cuda")          # e.g. a ResBlock's conditioning, added before the norm
    with torch.no_grad():
        y = torch.compile(norm)(x, shift, silu=True)     # SiLU(nn.GroupNorm(32, 288)(x + shift[:, :, None, None]))
    ref = F.silu(F.group_norm(x.float() + shift[:, :, None, None], 32, norm.weight, norm.bias))
    assert torch.allclose(y.float(), ref, atol=2e-2)

Compiled, inductor reduces each ``(sample, group)`` of a GroupNorm over the grid a few contiguous channels
at a time (9 at DC-DiT-XL's width 288), a slow read of the grid. :func:`channel_moments`
reads the grid instead as rows of whole channel blocks, which a channels-last layout keeps contiguous,
and sums every channel over the grid; :func:`group_stats` folds those sums into group means and
variances (a few hundred numbers per sample), and :func:`scale_shift` normalises in one read and one write
(inductor's own normalising pass re-read the conv output and its bias and skip in the compiled scaffold). The
shift is folded in from the sums, so a caller's ``conv(x) + cond`` is never materialised.

The sums are of ``y = x - x[:, :, 0, ..., 0]`` (each channel's first value as its pivot) and their
squares, and each group's moments are taken of ``y + z`` (``z``: the channel's pivot less the group's
first), whose mean and spread are of the order of the group's standard deviation: a channel offset
of many standard deviations does not cancel as ``E[x^2] - E[x]^2`` would. One reduction over the
partial sums gives both moments.

:func:`add_rms_norm` is ``rms_norm(a + b)`` with both addends read once: the encoder's last ResBlock
hands it its conv branch and its skip (``d = 1152`` at XL). Compiled, inductor loops over a row of more
than 1024 elements twice (once for the mean square, once to normalise), reading both addends twice.

On CUDA all three are Triton kernels wrapped as ``torch.library.triton_op`` (``torch.compile`` traces into
them and inductor launches the kernels from its own code, with the strides the trace saw), elsewhere torch.
Forward only: :class:`GroupNorm` and :class:`RMSNorm` take them only without grad, so training keeps torch's
norms. :class:`GroupNorm` takes its path only under ``torch.compile`` (eager, the small ops between its kernels
would run one by one) and for a channels-last input (the fast encoder lays its input out so).
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .._typing import Float, Tensor
from ..precision import RMSNorm as PlainRMSNorm
from ._triton import kernel_op, launcher, tl, triton
from .inductor import compiling, written_once

__all__ = ["GroupNorm", "RMSNorm", "add_rms_norm", "channel_moments", "group_norm", "group_stats", "scale_shift"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def moment_tiles(
    batch: int, positions: int, channels: int, block_c: int | None = None, elements: int = 2048, programs: int = 528
) -> tuple[int, int, int, int]:
    """``(BLOCK_P, BLOCK_C, splits, positions per split)`` of :func:`channel_moments`' kernel.

    By default tiles of 2048 elements, 64 channels wide (128 from 1024 channels), and the grid split so
    that about 528 programs run: the best of the tilings ``benchmarks/group_norm.py --kernels`` sweeps at
    DC-DiT-XL's shapes (docs/performance.md)."""
    if block_c is None:
        block_c = 128 if channels >= 1024 else min(64, 1 << max(channels - 1, 0).bit_length())
    block_p = min(max(1, elements // block_c), 1 << max(positions - 1, 0).bit_length())
    splits = max(1, min(_cdiv(programs, batch * _cdiv(channels, block_c)), _cdiv(positions, block_p)))
    per_split = _cdiv(_cdiv(positions, splits), block_p) * block_p  # a whole number of tiles
    return block_p, block_c, _cdiv(positions, per_split), per_split


def channel_moments_reference(x: Tensor) -> Tensor:
    """:func:`channel_moments` in plain torch: one split, ``(B, 1, 2, C)``."""
    flat = x.flatten(2).to(torch.promote_types(x.dtype, torch.float32))  # (B, C, P)
    y = flat - flat[:, :, :1]
    return torch.stack([y.sum(-1), (y * y).sum(-1)], dim=1)[:, None]  # (B, 1, 2, C)


def channel_moments(x: Float[Tensor, "batch channels *grid"]) -> Float[Tensor, "batch splits 2 channels"]:
    """Per-channel sums of ``y = x - x[:, :, 0, ..., 0]`` and of ``y^2`` over the grid, in fp32 partials.

    Returns ``(B, S, 2, C)``: split ``s`` summed a contiguous share of the grid's positions; sum over
    dim 1 for the totals. A Triton kernel on CUDA (coalesced for a channels-last ``x``, correct for
    any strides), torch elsewhere (one split)."""
    if x.ndim < 3:
        raise ValueError(f"x must be (batch, channels, *grid) with a grid of rank >= 1, got shape {tuple(x.shape)}")
    if x.is_cuda and triton is not None:
        return _channel_moments_op(x)
    return channel_moments_reference(x)


def group_stats(
    x: Float[Tensor, "batch channels *grid"], groups: int, shift: Float[Tensor, "batch channels"] | None = None
) -> tuple[Float[Tensor, "batch groups"], Float[Tensor, "batch groups"]]:
    """Mean and (biased) variance of each ``(sample, group)`` of ``x + shift[:, :, None, ...]``, fp32.

    From :func:`channel_moments`; the shift only enters the pivots, so ``x + shift`` is never formed."""
    B, C = x.shape[:2]
    if C % groups:
        raise ValueError(f"{C} channels do not split into {groups} groups")
    if shift is not None and shift.shape != (B, C):
        raise ValueError(f"shift must be (batch, channels) = {(B, C)}, got {tuple(shift.shape)}")
    positions = math.prod(x.shape[2:])
    sums = channel_moments(x)  # (B, S, 2, C): partial sums of y = x - x[:, :, 0..] and of y^2
    pivot = x[(slice(None), slice(None)) + (0,) * (x.ndim - 2)].float()  # (B, C): the kernel's x[:, :, 0, ..., 0]
    if shift is not None:
        pivot = pivot + shift.float()
    pivot = rearrange(pivot, "b (g k) -> b g 1 k", g=groups)
    z = pivot - pivot[..., :1]  # each channel's pivot from its group's first: x + shift - pivot[0] = y + z
    s1, s2 = (rearrange(t, "b s (g k) -> b g s k", g=groups) for t in sums.unbind(2))
    n, share = positions * (C // groups), positions / sums.shape[1]  # z's terms spread over the S partials
    m1 = (s1 + share * z).sum((-2, -1)) / n  # (B, G): mean of y + z over the group
    m2 = (s2 + 2 * z * s1 + share * z * z).sum((-2, -1)) / n  # mean of (y + z)^2, both O(group variance)
    return pivot[..., 0, 0] + m1, (m2 - m1 * m1).clamp_min(0)


def group_norm(
    x: Float[Tensor, "batch channels *grid"],
    groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    shift: Float[Tensor, "batch channels"] | None = None,
    silu: bool = False,
) -> Float[Tensor, "batch channels *grid"]:
    """``F.group_norm(x + shift, groups, weight, bias, eps)`` (then SiLU if ``silu``) from :func:`group_stats`,
    normalised in fp32 by :func:`scale_shift` and rounded once to ``x``'s dtype; channels-last.

    Forward only on CUDA (the Triton kernels have no backward)."""
    centre, scale = group_norm_terms(x, groups, weight, eps, shift)
    return scale_shift(x, centre, scale, bias, silu)  # (x + centre) * scale + bias


def group_norm_terms(
    x: Float[Tensor, "batch channels *grid"],
    groups: int,
    weight: Tensor | None = None,
    eps: float = 1e-5,
    shift: Float[Tensor, "batch channels"] | None = None,
) -> tuple[Float[Tensor, "batch channels"], Float[Tensor, "batch channels"]]:
    """``(centre, scale)`` per ``(sample, channel)``, fp32, with ``group_norm(x) = (x + centre) * scale + bias``:
    ``centre = shift - mean``, ``scale = weight / sqrt(var + eps)`` from :func:`group_stats`."""
    C = x.shape[1]
    mean, var = group_stats(x, groups, shift)  # (B, G) each
    scale = repeat(torch.rsqrt(var + eps), "b g -> b (g k)", k=C // groups)  # (B, C)
    centre = -repeat(mean, "b g -> b (g k)", k=C // groups)
    if shift is not None:
        centre = centre + shift.float()
    if weight is not None:
        scale = scale * weight.float()
    return centre, scale


def channels_last_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty tensor of ``x``'s shape with the channels (dim 1) innermost: ``(B, C, *grid)`` over a
    ``(B, *grid, C)`` buffer, whatever ``x``'s strides."""
    return x.new_empty(x.shape[0], *x.shape[2:], x.shape[1], dtype=dtype).movedim(-1, 1)


def scale_shift_reference(
    x: Tensor, centre: Tensor, scale: Tensor, bias: Tensor | None = None, silu: bool = False
) -> Tensor:
    """:func:`scale_shift` in plain torch (fp32, one rounding; channels-last out)."""
    tail = (1,) * (x.ndim - 2)
    out = (x.float() + centre.float().view(*centre.shape, *tail)) * scale.float().view(*scale.shape, *tail)
    if bias is not None:
        out = out + bias.float().view(-1, *tail)
    if silu:
        out = out * torch.sigmoid(out)
    result = channels_last_like(x)
    result.copy_(out)
    return result


def scale_shift(
    x: Float[Tensor, "batch channels *grid"],
    centre: Float[Tensor, "batch channels"],
    scale: Float[Tensor, "batch channels"],
    bias: Float[Tensor, "channels"] | None = None,
    silu: bool = False,
) -> Float[Tensor, "batch channels *grid"]:
    """``(x + centre) * scale + bias`` per ``(sample, channel)``, then SiLU if ``silu``: a norm's normalising pass.

    In fp32, rounded once to ``x``'s dtype, returned channels-last (what a conv reads). A Triton kernel on CUDA
    (one read of ``x`` through its strides, one write), torch elsewhere."""
    B, C = x.shape[:2]
    for name, t in (("centre", centre), ("scale", scale)):
        if t.shape != (B, C):
            raise ValueError(f"{name} must be (batch, channels) = {(B, C)}, got {tuple(t.shape)}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias must be ({C},), got {tuple(bias.shape)}")
    if x.is_cuda and triton is not None:
        return _scale_shift_op(x, centre.float().contiguous(), scale.float().contiguous(), bias, silu)
    return scale_shift_reference(x, centre, scale, bias, silu)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` of ``x + shift`` (``shift`` ``(B, C)``, optional), then SiLU if ``silu`` (default: the
    module's ``fused_silu``), with :func:`group_norm`'s kernels when sampling compiled on a GPU (CUDA, no grad,
    under ``torch.compile``, channels-last ``x``, ``use_kernel``), ``nn.GroupNorm`` otherwise.

    Made from an ``nn.GroupNorm`` by :func:`chunkformer.kernels.apply` (a class swap: same parameters and
    state dict). Returns what ``nn.GroupNorm`` would (fp32 under autocast, else ``x``'s dtype), except that the
    kernel path returns ``x``'s dtype: its one rounding is the one the next conv's autocast would make."""

    plain_class = nn.GroupNorm
    use_kernel = True
    fused_silu = False

    def takes_kernel(self, x: Tensor) -> bool:
        """Whether ``forward(x)`` takes :func:`group_norm`'s kernels (else ``nn.GroupNorm``)."""
        return self.wants_channels_last(x) and x.stride(1) == 1

    def wants_channels_last(self, x: Tensor) -> bool:
        """Whether the kernels would run for ``x`` laid out channels-last (then a caller should lay it out so)."""
        return self.use_kernel and sampling_kernel(x) and compiling() and x.ndim >= 3

    def forward(self, x: Tensor, shift: Tensor | None = None, silu: bool | None = None) -> Tensor:
        silu = self.fused_silu if silu is None else silu
        if self.takes_kernel(x):  # x read by two kernels and the pivot: written once
            return group_norm(written_once(x), self.num_groups, self.weight, self.bias, self.eps, shift, silu)
        if shift is not None:
            x = x + shift.reshape(*shift.shape, *([1] * (x.ndim - 2)))
        out = super().forward(x)
        return F.silu(out) if silu else out


class RMSNorm(PlainRMSNorm):
    """:class:`chunkformer.precision.RMSNorm` whose ``forward(x, residual, bias)`` normalises
    ``x + residual + bias``: summed inside :func:`add_rms_norm`'s kernel (each addend read once) when sampling
    on a GPU (CUDA, no grad, ``use_kernel``), added first otherwise. Made by :func:`chunkformer.kernels.apply`
    (a class swap: same parameters and state dict)."""

    plain_class = PlainRMSNorm
    use_kernel = True

    def takes_kernel(self, x: Tensor) -> bool:
        """Whether ``forward(x, residual)`` runs :func:`add_rms_norm`'s kernel."""
        return self.use_kernel and len(self.normalized_shape) == 1 and sampling_kernel(x)

    def forward(self, x: Tensor, residual: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        if (residual is not None or bias is not None) and self.takes_kernel(x):
            weight = self.weight
            if weight is not None and weight.dtype != x.dtype:
                weight = weight.to(x.dtype)
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            return add_rms_norm(x, residual, weight, eps, bias)
        if residual is not None:
            x = x + residual
        if bias is not None:
            x = x + bias
        return super().forward(x)


def sampling_kernel(x: Tensor) -> bool:
    """Whether a norm may take its Triton path for ``x``: CUDA, Triton, no grad."""
    return x.is_cuda and triton is not None and not torch.is_grad_enabled()


def add_rms_norm_reference(
    a: Tensor, b: Tensor | None, weight: Tensor | None, eps: float, bias: Tensor | None = None
) -> Tensor:
    """:func:`add_rms_norm` in plain torch (the sum and the norm in fp32, one rounding)."""
    x = a.float() if b is None else a.float() + b.float()
    if bias is not None:
        x = x + bias.float()
    out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.float()
    return out.to(a.dtype if b is None else torch.promote_types(a.dtype, b.dtype))


def add_rms_norm(
    a: Float[Tensor, "*rows dim"],
    b: Float[Tensor, "*rows dim"] | None,
    weight: Tensor | None,
    eps: float,
    bias: Float[Tensor, "dim"] | None = None,
) -> Float[Tensor, "*rows dim"]:
    """``rms_norm(a + b + bias) * weight`` over the last dim, summed and normalised in fp32, rounded once to
    the addends' dtype. A Triton kernel on CUDA (whole rows per program, each addend read once), torch elsewhere."""
    if b is not None and b.shape != a.shape:
        raise ValueError(f"the addends must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != a.shape[-1:]:
            raise ValueError(f"{name} must be ({a.shape[-1]},), got {tuple(t.shape)}")
    if a.is_cuda and triton is not None:
        return _add_rms_norm_op(a, b, weight, eps, bias)
    return add_rms_norm_reference(a, b, weight, eps, bias)


if triton is not None:

    @triton.jit
    def _channel_moments_kernel(
        X,
        OUT,
        P,
        C,
        s_b,
        s_c,
        s_p,
        per_split,
        SPLITS,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Program (sample, split, channel block): fp32 sums of ``x - pivot`` and its square over the
        split's positions, one per channel. ``X`` ``(B, C, P)`` is read through its strides; ``OUT`` is
        a contiguous ``(B, SPLITS, 2, C)``."""
        b = tl.program_id(0)
        split = tl.program_id(1)
        cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        base = X + b.to(tl.int64) * s_b + cs.to(tl.int64)[None, :] * s_c  # (1, BLOCK_C)
        pivot = tl.load(base, mask=c_ok[None, :], other=0.0).to(tl.float32)  # position 0 of each channel
        start = split * per_split
        end = tl.minimum(start + per_split, P)
        acc1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for p0 in range(start, end, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            ok = (ps < end)[:, None] & c_ok[None, :]
            x = tl.load(base + ps.to(tl.int64)[:, None] * s_p, mask=ok, other=0.0).to(tl.float32)
            y = tl.where(ok, x - pivot, 0.0)
            acc1 += y
            acc2 += y * y
        out = OUT + ((b * SPLITS + split) * 2).to(tl.int64) * C + cs
        tl.store(out, tl.sum(acc1, 0), mask=c_ok)
        tl.store(out + C, tl.sum(acc2, 0), mask=c_ok)

    def launch_channel_moments(
        x: Tensor, tiles: tuple[int, int, int, int] | None = None, num_warps: int = 8
    ) -> Tensor:
        """Run the kernel on ``x`` ``(B, C, *grid)`` (any strides) with :func:`moment_tiles`' tiles or
        ``tiles``; returns ``(B, splits, 2, C)`` fp32."""
        flat = x.flatten(2)  # (B, C, P): a view for channels-last and contiguous grids
        B, C, P = flat.shape
        block_p, block_c, splits, per_split = tiles or moment_tiles(B, P, C)
        out = torch.empty(B, splits, 2, C, device=x.device, dtype=torch.float32)
        grid = (B, splits, triton.cdiv(C, block_c))
        launcher(_channel_moments_kernel, x)[grid](
            flat, out, P, C, *flat.stride(), per_split, splits, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=num_warps
        )
        return out

    @kernel_op("chunkformer::channel_moments")  # traced into by torch.compile: inductor launches the kernel
    def _channel_moments_op(x: Tensor) -> Tensor:
        return launch_channel_moments(x)

    @triton.jit
    def _add_rms_norm_kernel(A, B, BIAS, W, OUT, N, L, D, sa_n, sa_l, sa_d, sb_n, sb_l, sb_d, eps,
                             HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_W: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (row block): ``OUT = rms_norm(A + B + BIAS) * W`` on ``BLOCK_R`` rows, each held whole in registers.
        ``A`` / ``B`` are ``(N, L, D)`` read through their strides (row ``r`` is ``(r // L, r % L)``); ``OUT`` is a
        contiguous ``(N * L, D)``."""
        eps = tl.full([], eps, tl.float32)  # inductor passes a Python float as fp64, which would make the rows fp64
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        n, l = rows // L, rows % L
        cols = tl.arange(0, BLOCK_D)
        ok = (rows < N * L)[:, None] & (cols < D)[None, :]
        x = tl.load(A + (n * sa_n + l * sa_l)[:, None] + cols[None, :] * sa_d, mask=ok, other=0.0).to(tl.float32)
        if HAS_B:
            x += tl.load(B + (n * sb_n + l * sb_l)[:, None] + cols[None, :] * sb_d, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(BIAS + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
            x = tl.where(ok, x, 0.0)  # padding columns out of the mean square
        rstd = tl.rsqrt(tl.sum(x * x, 1) / D + eps)  # (BLOCK_R,)
        y = x * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rows[:, None] * D + cols[None, :], y.to(OUT.dtype.element_ty), mask=ok)

    def rms_tiles(dim: int) -> tuple[int, int, int]:
        """``(BLOCK_R, BLOCK_D, num_warps)``: whole rows, about 4096 elements per program."""
        block_d = triton.next_power_of_2(dim)
        return max(1, 4096 // block_d), block_d, 8 if block_d >= 1024 else 4

    def launch_add_rms_norm(
        a: Tensor, b: Tensor | None, weight: Tensor | None, eps: float, bias: Tensor | None = None, tiles=None
    ) -> Tensor:
        """Run the kernel on ``a`` (and ``b``) of shape ``(*rows, D)``, any strides; returns a contiguous ``(*rows, D)``."""
        D = a.shape[-1]
        a3 = a.reshape(-1, *a.shape[-2:]) if a.ndim > 1 else a[None, None]  # (N, L, D): a view for token grids
        b3 = (b.reshape(-1, *b.shape[-2:]) if b.ndim > 1 else b[None, None]) if b is not None else a3
        dtype = a.dtype if b is None else torch.promote_types(a.dtype, b.dtype)
        out = torch.empty(a.shape, device=a.device, dtype=dtype)
        block_r, block_d, warps = tiles or rms_tiles(D)
        N, L = a3.shape[:2]
        launcher(_add_rms_norm_kernel, a)[(triton.cdiv(N * L, block_r),)](
            a3, b3, bias if bias is not None else a3, weight if weight is not None else a3, out, N, L, D,
            *a3.stride(), *b3.stride(), eps, HAS_B=b is not None, HAS_BIAS=bias is not None,
            HAS_W=weight is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
        return out

    @kernel_op("chunkformer::add_rms_norm")  # the addends with the strides traced (the scaffold's: channels-last)
    def _add_rms_norm_op(
        a: Tensor, b: Tensor | None, weight: Tensor | None, eps: float, bias: Tensor | None
    ) -> Tensor:
        return launch_add_rms_norm(a, b, weight, eps, bias)

    @triton.jit
    def _scale_shift_kernel(X, CENTRE, SCALE, BIAS, OUT, P, C, s_b, s_c, s_p,
                            HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program (sample, position block, channel block): ``OUT = (X + CENTRE) * SCALE + BIAS`` (then SiLU) in
        fp32. ``X`` ``(B, C, P)`` read through its strides; ``CENTRE`` / ``SCALE`` contiguous ``(B, C)`` fp32;
        ``OUT`` a contiguous ``(B, P, C)`` (channels-last)."""
        b = tl.program_id(0)
        ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        ok = (ps < P)[:, None] & c_ok[None, :]
        x = tl.load(X + b.to(tl.int64) * s_b + cs.to(tl.int64)[None, :] * s_c + ps.to(tl.int64)[:, None] * s_p,
                    mask=ok, other=0.0).to(tl.float32)
        centre = tl.load(CENTRE + b * C + cs, mask=c_ok, other=0.0)
        scale = tl.load(SCALE + b * C + cs, mask=c_ok, other=0.0)
        y = (x + centre[None, :]) * scale[None, :]
        if HAS_BIAS:
            y += tl.load(BIAS + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        out = OUT + (b.to(tl.int64) * P + ps.to(tl.int64)[:, None]) * C + cs[None, :]
        tl.store(out, y.to(OUT.dtype.element_ty), mask=ok)

    def scale_shift_tiles(channels: int, elements: int = 2048, block_c: int | None = None) -> tuple[int, int, int]:
        """``(BLOCK_P, BLOCK_C, num_warps)`` of :func:`scale_shift`'s kernel: ``elements`` per program, 64 channels
        wide (128 from 1024 channels), 4 warps; the best of the tilings ``benchmarks/group_norm.py --kernels``
        sweeps at DC-DiT-XL's shapes."""
        block_c = block_c or (128 if channels >= 1024 else min(64, triton.next_power_of_2(channels)))
        return max(1, elements // block_c), block_c, 4

    def launch_scale_shift(x: Tensor, centre: Tensor, scale: Tensor, bias: Tensor | None, silu: bool,
                           tiles: tuple[int, int, int] | None = None) -> Tensor:
        """Run the kernel on ``x`` ``(B, C, *grid)`` (any strides); returns a channels-last tensor of ``x``'s dtype."""
        out = channels_last_like(x)
        flat = x.flatten(2)  # (B, C, P): a view for channels-last and contiguous grids
        B, C, P = flat.shape
        block_p, block_c, warps = tiles or scale_shift_tiles(C)
        grid = (B, triton.cdiv(P, block_p), triton.cdiv(C, block_c))
        launcher(_scale_shift_kernel, x)[grid](
            flat, centre, scale, bias if bias is not None else centre, out, P, C, *flat.stride(),
            HAS_BIAS=bias is not None, SILU=silu, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps,
        )
        return out

    @kernel_op("chunkformer::scale_shift")  # the output channels-last whatever x's layout
    def _scale_shift_op(x: Tensor, centre: Tensor, scale: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
        return launch_scale_shift(x, centre, scale, bias, silu)
