"""Sampling fast paths of the conv scaffold: a :class:`~chunkformer.scaffold.ResBlock` and a
:class:`~chunkformer.scaffold.ChunkEncoder` that hand their norms what the fused kernels need.

:func:`chunkformer.kernels.apply` swaps the class of each block and encoder for these (same parameters, same
state dict). Where their norms are :mod:`~chunkformer.kernels.norms`' and take their kernels (compiled
sampling on a GPU), a block adds its conditioning and conv1's bias inside ``norm2`` from the raw conv output,
writes its input once for the norm's two kernels and the skip, and the encoder sums its last block's conv
branch, skip and biases inside its RMSNorm; elsewhere they compute exactly what the plain classes do.
"""


import torch.nn.functional as F
from torch import nn

from .._typing import Float, Tensor, typechecked
from ..grid import to_tokens
from ..scaffold import ChunkEncoder as PlainChunkEncoder
from ..scaffold import ResBlock as PlainResBlock
from ..scaffold import _require_cond
from .inductor import written_once
from .norms import GroupNorm, RMSNorm
from .tapconv import TapConv2d

__all__ = ["ResBlock", "ChunkEncoder"]


def _takes_kernel(norm: nn.Module, x: Tensor) -> bool:
    return isinstance(norm, GroupNorm) and norm.takes_kernel(x)


class ResBlock(PlainResBlock):
    """:class:`chunkformer.scaffold.ResBlock` with the fused-norm sampling paths (see the module docstring)."""

    plain_class = PlainResBlock

    @typechecked
    def forward(
        self, x: Float[Tensor, "batch cin *grid"], c: Float[Tensor, "batch cond"] | None = None
    ) -> Float[Tensor, "batch cout *grid"]:
        x = self._shared_input(x)
        return self.conv2(self._inner(x, c)) + self.skip(x)  # (B, cout, *grid)

    def _shared_input(self, x: Tensor) -> Tensor:
        """``x``, on the norm's kernel path written once for norm1's two kernels and the skip
        (:func:`~chunkformer.kernels.inductor.written_once`): else inductor copies it for each."""
        return written_once(x) if _takes_kernel(self.norm1, x) else x

    def _inner(self, x: Tensor, c: Tensor | None) -> Tensor:
        """``SiLU(norm2(conv1(SiLU(norm1(x))) + cond))``: ``(B, inner, *grid)``, ready for ``conv2``.

        On the norm's kernel path the conditioning, and conv1's bias, are added inside ``norm2`` from
        the raw conv output: compiled, a bias added before a kernel of our own is one more pass over the grid."""
        if not isinstance(self.norm2, GroupNorm):
            return super()._inner(x, c)
        a = self.norm1(x, silu=True) if isinstance(self.norm1, GroupNorm) else F.silu(self.norm1(x))
        shift = None
        if self.cond is not None:
            _require_cond(c, self.cond.in_features)
            shift = self.cond(F.silu(c))  # (B, inner)
        conv = self.conv1
        taps = isinstance(conv, TapConv2d) and conv.takes_taps(a)  # the taps op adds its bias itself
        if conv.bias is not None and not taps and self.norm2.takes_kernel(a):
            h = conv._conv_forward(a, conv.weight, None)  # (B, inner, *grid), no bias: it joins the shift
            bias = conv.bias.float().expand(a.shape[0], -1)
            shift = bias if shift is None else shift.float() + bias
        else:
            h = conv(a)  # (B, inner, *grid)
        return self.norm2(h, shift, silu=True)

    def raw_terms(
        self, x: Float[Tensor, "batch cin *grid"], c: Float[Tensor, "batch cond"] | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(h, skip, bias)`` with ``forward(x, c) == h + skip + bias`` (bias over channels): the two convs'
        outputs without their biases, which are summed into ``bias``, for a norm that adds all three itself."""
        x = self._shared_input(x)
        inner = self._inner(x, c)
        h = self.conv2._conv_forward(inner, self.conv2.weight, None)  # (B, cout, *grid)
        bias = self.conv2.bias
        if isinstance(self.skip, nn.Identity):
            return h, x, bias
        skip = self.skip._conv_forward(x, self.skip.weight, None)  # (B, cout, *grid)
        if self.skip.bias is not None:
            bias = self.skip.bias if bias is None else bias + self.skip.bias
        return h, skip, bias


class ChunkEncoder(PlainChunkEncoder):
    """:class:`chunkformer.scaffold.ChunkEncoder` with the fused-norm sampling paths (see the module docstring)."""

    plain_class = PlainChunkEncoder

    @typechecked
    def forward(
        self, x: Float[Tensor, "batch channels *grid"], c: Float[Tensor, "batch cond"] | None = None
    ) -> Float[Tensor, "batch tokens dim"]:
        self.check_input(x)
        h = self.embed(self._sampling_layout(x))  # (B, width, *grid)
        for block in self.blocks[:-1]:
            h = block(h, c)  # (B, width, *grid)
        last = self.blocks[-1]
        if isinstance(self.norm, RMSNorm) and isinstance(last, ResBlock) and self.norm.takes_kernel(h):
            h, skip, bias = last.raw_terms(h, c)  # (B, dim, *grid) each, bias (dim,): summed inside the norm
            return self.norm(to_tokens(h), to_tokens(skip), bias)  # (B, L, dim)
        return self.norm(to_tokens(last(h, c)))  # (B, L, dim)

    def _sampling_layout(self, x: Tensor) -> Tensor:
        """``x`` channels-last where the norms take their kernels (compiled sampling on a GPU), else ``x``.

        The kernel paths are chosen while ``torch.compile`` traces, from the strides the trace sees: an NCHW
        input would keep every encoder GroupNorm on inductor's own path, though inductor later runs the convs
        channels-last anyway."""
        norm = self.blocks[0].norm1
        if isinstance(norm, GroupNorm) and norm.wants_channels_last(x) and x.stride(1) != 1:
            return x.movedim(1, -1).contiguous().movedim(-1, 1)  # (B, C, *grid) over a (B, *grid, C) buffer
        return x


