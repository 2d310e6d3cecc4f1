"""A 3x3 convolution as one GEMM of its nine taps plus their shifted sum, and a 1x1 convolution as a GEMM.

    conv = nn.Conv2d(1152, 288, 3, padding=1).cuda()
    x = torch.randn(64, 1152, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = conv3x3_taps(x, conv.weight, conv.bias)     # (64, 288, 32, 32), channels-last
    assert torch.allclose(y.float(), conv(x).float(), rtol=0.05, atol=0.05)

For each cell the GEMM maps its ``cin`` channels to the ``9 * cout`` values the cell contributes
to its nine neighbours; output cell ``(i, j)`` then sums tap ``(a, b)`` of cell ``(i + a - 1,
j + b - 1)`` over the nine offsets, in fp32, with zeros outside the grid. The same sum as the
convolution in another order; it pays for shapes where cuDNN's own kernel is slow (``TAPS_FASTER``).
The shifted sum is a Triton kernel on CUDA, wrapped as a custom op that ``torch.compile`` treats as
opaque (it neither fuses it into its neighbours nor copies the tap tensor around it), and plain torch
elsewhere. Forward only: :class:`TapConv2d` takes this path only without grad, so training keeps cuDNN.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .._typing import Float, Tensor
from ._triton import launcher, strided_custom_op, tl, triton

__all__ = ["TAPS_FASTER", "PointwiseConv2d", "TapConv2d", "conv3x3_taps", "tap_sum", "tap_weights"]

# (cin, cout) where the taps form beat cuDNN inside a compiled DC-DiT step (docs/performance.md):
# apply() turns it on for these only (DC-DiT-XL's narrowing conv).
TAPS_FASTER: frozenset[tuple[int, int]] = frozenset({(1152, 288)})


def tap_weights(weight: Float[Tensor, "cout cin 3 3"]) -> Float[Tensor, "taps_cout cin"]:
    """Conv weights ``(cout, cin, 3, 3)`` -> GEMM weights ``(9 * cout, cin)``, taps in raster order."""
    if weight.ndim != 4 or weight.shape[2:] != (3, 3):
        raise ValueError(f"expected 3x3 conv weights (cout, cin, 3, 3), got shape {tuple(weight.shape)}")
    return rearrange(weight, "o i a b -> (a b o) i")


def tap_sum_reference(taps: Tensor, bias: Tensor | None = None) -> Tensor:
    """:func:`tap_sum` in plain torch: pad the grid by one cell, add the nine shifted slices in fp32."""
    B, H, W, _, C = taps.shape
    padded = F.pad(taps, (0, 0, 0, 0, 1, 1, 1, 1))  # (B, H + 2, W + 2, 9, C), zeros around the grid
    acc = torch.promote_types(taps.dtype, torch.float32)  # fp32, or fp64 for fp64 taps
    out = taps.new_zeros(B, H, W, C, dtype=acc)
    for k in range(9):
        a, b = divmod(k, 3)
        out += padded[:, a : a + H, b : b + W, k].to(acc)
    if bias is not None:
        out += bias.to(acc)
    return rearrange(out.to(taps.dtype), "b h w c -> b c h w")  # channels-last


def tap_sum(
    taps: Float[Tensor, "batch h w 9 c"], bias: Float[Tensor, "c"] | None = None
) -> Float[Tensor, "batch c h w"]:
    """Shifted sum of per-cell taps: ``out[b, i, j] = sum_k taps[b, i + a_k - 1, j + b_k - 1, k] (+ bias)``.

    ``taps`` ``(B, H, W, 9, C)`` as :func:`conv3x3_taps`'s GEMM writes it; the sum is fp32 (fp64
    for fp64 taps), the output a channels-last ``(B, C, H, W)`` in ``taps``' dtype. A Triton
    kernel on CUDA, torch elsewhere.
    """
    if taps.ndim != 5 or taps.shape[3] != 9:
        raise ValueError(f"expected taps of shape (batch, h, w, 9, channels), got {tuple(taps.shape)}")
    if bias is not None and bias.shape != (taps.shape[-1],):
        raise ValueError(f"bias must have shape ({taps.shape[-1]},), got {tuple(bias.shape)}")
    if taps.is_cuda and triton is not None:
        return _tap_sum_op(taps, bias)
    return tap_sum_reference(taps, bias)


def conv3x3_taps(
    x: Float[Tensor, "batch cin h w"],
    weight: Float[Tensor, "cout cin 3 3"],
    bias: Float[Tensor, "cout"] | None = None,
) -> Float[Tensor, "batch cout h w"]:
    """``F.conv2d(x, weight, bias, padding=1)`` as one GEMM of its taps plus :func:`tap_sum`.

    Returns a channels-last ``(B, cout, H, W)`` in the GEMM's dtype (bf16 under bf16 autocast).
    Feed ``x`` channels-last, so the GEMM reads it in place.
    """
    if x.ndim != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"x must be (batch, {weight.shape[1]}, h, w) for these weights, got {tuple(x.shape)}"
        )
    # cells as rows, channels contiguous: free for a channels-last x, and under torch.compile it makes the
    # producer write that layout (left to itself, inductor wrote NCHW and cuBLAS ran the transposed GEMM)
    rows = rearrange(x, "b c h w -> b h w c").contiguous()  # (B, H, W, cin)
    taps = F.linear(rows, tap_weights(weight))  # (B, H, W, 9 * cout)
    return tap_sum(rearrange(taps, "b h w (k c) -> b h w k c", k=9), bias)  # (B, cout, H, W), channels-last


class TapConv2d(nn.Conv2d):
    """A 3x3 ``nn.Conv2d`` (padding 1) that runs as :func:`conv3x3_taps` when sampling on a GPU in
    bf16/fp16 (CUDA, no grad, a half-precision input or autocast) and ``use_kernel``, as cuDNN otherwise.

    Made from an ``nn.Conv2d`` by :func:`chunkformer.kernels.apply` (a class swap: same parameters and state dict).
    """

    plain_class = nn.Conv2d
    use_kernel = True

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1, **kwargs)

    def takes_taps(self, x: Tensor) -> bool:
        """Whether ``forward(x)`` runs the taps path (else cuDNN)."""
        half = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(x.device.type)
        return self.use_kernel and x.is_cuda and half and not torch.is_grad_enabled()

    def forward(self, x: Tensor) -> Tensor:
        if self.takes_taps(x):
            return conv3x3_taps(x, self.weight, self.bias)  # (B, cout, H, W), channels-last
        return super().forward(x)

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        """Whether ``conv`` is a plain 2-D 3x3 conv with padding 1 (what the taps path computes)."""
        return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
                and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros")


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` that runs as one GEMM over the cells of a channels-last grid when sampling on a GPU
    in bf16/fp16 (CUDA, no grad, a half-precision input or autocast, channels-last ``x``), as cuDNN otherwise.

    A channels-last grid is already a ``(cells, channels)`` matrix, and cuBLAS runs these shapes ahead of
    cuDNN's 1x1 kernels (docs/performance.md). Made from an ``nn.Conv2d`` by :func:`chunkformer.kernels.apply`
    (a class swap: same parameters and state dict); ``use_kernel = False`` keeps cuDNN.
    """

    plain_class = nn.Conv2d
    use_kernel = True

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__(in_channels, out_channels, 1, **kwargs)

    def takes_gemm(self, x: Tensor) -> bool:
        """Whether the conv runs as a GEMM for ``x`` (else cuDNN)."""
        half = x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(x.device.type)
        return self.use_kernel and x.is_cuda and half and not torch.is_grad_enabled() and x.stride(1) == 1

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # forward's path, and the one the scaffold's kernels take to run the conv without its bias
        if self.takes_gemm(x):
            cells = rearrange(x, "b c h w -> b h w c")  # (B, H, W, cin): a view of a channels-last x
            return rearrange(F.linear(cells, weight.flatten(1), bias), "b h w c -> b c h w")  # channels-last
        return super()._conv_forward(x, weight, bias)

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        """Whether ``conv`` is a plain 2-D 1x1 conv (stride 1, no padding, one group)."""
        return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.padding in ((0, 0), "valid")
                and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1)


if triton is not None:

    @triton.jit
    def _tap_sum_kernel(
        T,
        BIAS,
        OUT,
        H,
        W,
        C,
        s_b,
        s_h,
        s_w,
        s_k,
        s_c,
        HAS_BIAS: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Program (sample * row, column block, channel block): fp32 sum of the nine shifted taps.

        ``T`` is read through its strides (any layout inductor hands over); ``OUT`` is a contiguous
        ``(B, H, W, C)`` (the memory of a channels-last ``(B, C, H, W)``)."""
        row = tl.program_id(0)  # b * H + i
        n = (row // H).to(tl.int64)
        i = row % H
        js = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        acc = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
        for a in tl.static_range(3):
            ii = i + a - 1
            i_ok = (ii >= 0) & (ii < H)
            base = T + n * s_b + ii.to(tl.int64) * s_h + (3 * a) * s_k
            for b in tl.static_range(3):
                jj = js + b - 1
                ok = i_ok & (jj >= 0) & (jj < W)
                ptr = base + b * s_k + jj.to(tl.int64)[:, None] * s_w + cs[None, :] * s_c
                acc += tl.load(ptr, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(BIAS + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        out = OUT + (row.to(tl.int64) * W + js)[:, None] * C + cs[None, :]
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=(js < W)[:, None] & c_ok[None, :])

    def tap_sum_tiles(width: int, channels: int) -> tuple[int, int, int]:
        """``(BLOCK_W, BLOCK_C, num_warps)`` for a grid width and channel count."""
        # 16 cells x 64 channels: the best of the tilings benchmarks/tap_conv.py sweeps (docs/performance.md)
        return min(16, triton.next_power_of_2(width)), 64, 4

    def launch_tap_sum(taps: Tensor, bias: Tensor | None, out: Tensor, tiles=None) -> Tensor:
        """Launch the kernel on ``taps`` ``(B, H, W, 9, C)`` (any strides) into a contiguous
        ``out`` ``(B, H, W, C)``."""
        B, H, W, _, C = taps.shape
        block_w, block_c, warps = tiles or tap_sum_tiles(W, C)
        grid = (B * H, triton.cdiv(W, block_w), triton.cdiv(C, block_c))
        launcher(_tap_sum_kernel, taps)[grid](
            taps,
            bias if bias is not None else taps,
            out,
            H,
            W,
            C,
            *taps.stride(),
            HAS_BIAS=bias is not None,
            BLOCK_W=block_w,
            BLOCK_C=block_c,
            num_warps=warps,
        )
        return out

    @strided_custom_op("chunkformer::tap_sum")  # the taps in the layout inductor chose: no copy
    def _tap_sum_op(taps: Tensor, bias: Tensor | None) -> Tensor:
        """Opaque to ``torch.compile``: inductor calls it as it is. Returns the channels-last grid itself."""
        out = _grid_like(taps)
        launch_tap_sum(taps, bias, rearrange(out, "b c h w -> b h w c"))
        return out

    @_tap_sum_op.register_fake
    def _(taps: Tensor, bias: Tensor | None) -> Tensor:
        return _grid_like(taps)

    def _grid_like(taps: Tensor) -> Tensor:
        """An empty channels-last ``(B, C, H, W)`` for taps ``(B, H, W, 9, C)``."""
        B, H, W, _, C = taps.shape
        return taps.new_empty(B, H, W, C).permute(0, 3, 1, 2)  # channels-last; no copy
