"""DC-DiT-XL's scaffold alone under inductor's compile settings and other compute paths: which runs fastest.

    python benchmarks/scaffold_compile.py --out benchmarks/results/scaffold_compile_256_h100.json
    python benchmarks/scaffold_compile.py --size 512 --variants default,coordinate-descent
    python benchmarks/scaffold_compile.py --variants '1x1 as GEMMs,widening conv split,residual in its GEMM,all three paths'

The scaffold (embed, encoder, router, chunk, de-chunk, decoder, final layer: DC-DiT-XL with no
blocks) in the serving configuration (bf16 weights and routing, filled fixed-capacity plan of a
quarter of the grid), compiled once per variant of ``VARIANTS``:

* ``default``: ``torch.compile(model)``, what ``step_speed.py`` and the sampling recipe run;
* ``coordinate-descent``: inductor tunes each Triton kernel's block sizes and warps by local search;
* ``combo-kernels``: independent small kernels launched as one;
* ``pointwise-autotune``: more configurations timed for each pointwise and reduction kernel;
* ``max-autotune``: ``mode="max-autotune-no-cudagraphs"``, GEMM and conv templates timed against
  cuBLAS and cuDNN (more than 9 minutes of compiling on an H100);
* ``multi-kernel``: every reduction compiled both persistent (one read of each row) and looped,
  the faster picked when it first runs; by default a reduction over more than 1024 elements, such
  as a norm over ``d = 1152`` channels, is looped and reads its input twice.

Compute-path variants run the same weights through other kernels (``gemm_1x1``, ``split_widening``;
here only, to be measured before the library adopts either):

* ``1x1 as GEMMs``: the 1x1 convs (ResBlock skips, router projections) as cuBLAS GEMMs over the
  channels-last cells instead of cuDNN convs (``scaffold_ops.py``: 0.077 against 0.109 ms for
  ``1152 -> 288`` alone on an H100); the library's default since session 16, where the input is channels-last;
* ``widening conv split``: the encoder's ``288 -> 1152`` 3x3 conv as four ``288 -> 288`` convs,
  concatenated (0.75 ms alone against four times 0.164);
* both;
* ``residual in its GEMM``: the decoder's merge ``dechunk(y) * gate + W_res e + b`` with the
  de-chunked grid added by the residual GEMM's epilogue (``addmm``) instead of a pass of its own
  (0.11 ms in the H100 profile), in the half-precision merge of bf16 routing only;
* all three;
* ``merge summed in bf16 (before)``: the decoder's half-precision merge as it was before it summed in
  fp32 (which inductor may fold into the residual GEMM as an ``addmm`` whose C operand aten copies);
* ``GroupNorm by inductor (before)``: the scaffold's GroupNorms as inductor compiles ``nn.GroupNorm(x + shift)``
  (a reduction per ``(sample, group)``) instead of :func:`~chunkformer.norms.channel_moments`' coalesced
  per-channel sums; ``RMSNorm by inductor (before)``: the encoder's output norm as ``rms_norm(h + skip)``
  for inductor, which loops over each 1152-wide row twice, instead of :func:`~chunkformer.norms.add_rms_norm`
  (one read of each addend); ``both norms by inductor (before)``: both (``chunkformer.set_norm_kernels(model, False)``);
* ``normalising pass by inductor (before)``: every GroupNorm's normalisation + SiLU as torch ops inductor fuses
  into a pass of its own, instead of :func:`~chunkformer.norms.scale_shift`'s kernel; ``encoder fed NCHW (before)``:
  the encoder traced with the NCHW input it is called with, which kept its four GroupNorms on inductor's path
  (their kernels need channels-last strides); ``router GroupNorm by inductor (before)``: the router's
  ``nn.GroupNorm``; ``session 15 GroupNorms (before)``: all three; ``1x1 convs by cuDNN (before)``: the 1x1
  convs through cuDNN instead of :class:`~chunkformer.tapconv.PointwiseConv2d`'s GEMM; ``session 15 library
  (before)``: all four. Since the norm kernels are traced (``torch.library.triton_op``), a kernel reads the
  strides the trace saw, so the twins with an NCHW encoder hand ``add_rms_norm`` NCHW token rows (0.54 against
  0.20 ms on an H200): they time session 15's choices, not session 15's library;
* ``conv weights channels-last``: the weights stored channels-last, so no call converts them (session 17, H100:
  no change at 256px, 1.4% at 512px);
* ``dense smoothing``: the de-chunk's smoothing dense at every size. Measured against ``"auto"``'s windowed form at
  512px (5.323 against 5.433 ms, H100), then adopted: ``"auto"`` now smooths a bf16 de-chunk densely there, so in
  the serving scaffold this variant equals the default at both sizes;
* ``inputs copied per kernel (before)``: the GroupNorms' and ResBlocks' inputs not marked
  :func:`~chunkformer.inductor.written_once`, so inductor copies an input it has not written for each Triton op
  (the de-chunk merge output three times, 151 MB each at 256px); ``gate multiplied (before)``: the de-chunk
  merge multiplying by the STE gate (exactly 1) when sampling too, as in session 16; ``session 16 library
  (before)``: both; ``de-chunk slots written once``: the smoothed slots written before the plug-back gathers them
  (inlined, the gather re-derives each slot's smoothing per channel of every cell; not adopted: 5.145 against
  5.133 ms at 256px, H100);
* ``position table per call (before)``: DiT and DC-DiT computing their sin-cos table in every call (inlined
  by inductor into the add: a sine per element) instead of keeping it as a buffer.

Context variants compile inside a context of their own, with compile settings of their own (dynamo would
otherwise hand them a graph compiled for an equal model):

* ``wide persistent reductions`` (also with the split, and with the 1x1 GEMMs): every row reduction of up to
  2048 elements compiled persistent (inductor's limit is 1024), e.g. the encoder's RMSNorm over ``d = 1152``;
* ``position table per call (before)`` (above).

``default with the FX graph cache off`` has their compile settings without a context: what the settings alone change.

Every variant is compiled and warmed, then all are timed in interleaved rounds (median round).
Columns: compile seconds (first call), GPU ms per call, ratio to ``default`` and the largest
difference of its output from ``default``'s (the zero-initialised layers get random weights, so
the output depends on every op). The scaffold is the part of the step whose time
exceeds its FLOP share (``step_speed.py``), and most of that excess is memory-bound Triton
kernels (``tap_conv.py --profile``), which is what these settings tune.
"""

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import chunkformer as cf  # noqa: E402
from chunkformer.dechunk import PROB_CLAMP, dechunk, resolve_smoothing, smooth_dense, smooth_windowed, ste_ones  # noqa: E402
from chunkformer.inductor import written_once  # noqa: E402
from chunkformer.norms import GroupNorm  # noqa: E402
from chunkformer.precision import RMSNorm  # noqa: E402
from chunkformer.scaffold import ChunkEncoder, DeChunkDecoder, ResBlock  # noqa: E402
from chunkformer.tapconv import PointwiseConv2d  # noqa: E402
from step_speed import cuda_ms, save_result  # noqa: E402

class _Conv1x1AsLinear(nn.Conv2d):
    """A 1x1 conv as one GEMM over the grid's cells (same weights): ``(B, H, W, cin) @ (cin, cout)``."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # forward's and the kernel paths' entry (ResBlock.raw_terms calls the skip's _conv_forward without its bias)
        cells = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, cin); free when x is channels-last
        return F.linear(cells, weight.flatten(1), bias).permute(0, 3, 1, 2)  # (B, cout, H, W)


class _SplitWideConv2d(nn.Conv2d):
    """A widening 3x3 conv as ``cout / cin`` convs of ``cin -> cin`` channels, concatenated (same weights):
    cuDNN runs XL's ``288 -> 288`` at about 600 TFLOP/s and its ``288 -> 1152`` at about 520."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.in_channels
        parts = [
            F.conv2d(x, self.weight[i : i + n], None if self.bias is None else self.bias[i : i + n],
                     self.stride, self.padding)
            for i in range(0, self.out_channels, n)
        ]
        return torch.cat(parts, dim=1)  # (B, cout, H, W); inductor can fuse the cat into the reader


def gemm_1x1(model: nn.Module) -> nn.Module:
    """Run every 1x1 conv of ``model`` (skips, router projections) as a GEMM whatever its input; in place.
    Since session 16 the library's :class:`~chunkformer.tapconv.PointwiseConv2d` does so when sampling."""
    for m in model.modules():
        if type(m) in (nn.Conv2d, PointwiseConv2d) and m.kernel_size == (1, 1) and m.groups == 1:
            m.__class__ = _Conv1x1AsLinear
    return model


class _CudnnPointwiseConv2d(PointwiseConv2d):
    """:class:`~chunkformer.tapconv.PointwiseConv2d` kept on cuDNN (a class of its own: dynamo guards on it)."""


def cudnn_1x1(model: nn.Module) -> nn.Module:
    """The 1x1 convs through cuDNN, as before session 16; in place."""
    for m in model.modules():
        if type(m) is PointwiseConv2d:
            m.__class__, m.use_gemm = _CudnnPointwiseConv2d, False
    return model


def split_widening(model: nn.Module) -> nn.Module:
    """Run every widening 3x3 conv whose width is a multiple of its input's (>= 64 channels: not the
    embed) as convs at the input's width; in place."""
    for m in model.modules():
        if (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.groups == 1 and m.in_channels >= 64
                and m.out_channels > m.in_channels and m.out_channels % m.in_channels == 0):
            m.__class__ = _SplitWideConv2d
    return model


def _gated_grid(decoder, y, plan, router_out):
    """The half-precision merge's first term, ``dechunk(y) * STE(confidence)``, in ``y``'s dtype: ``(B, L, d)``."""
    full = dechunk(plan.unchunk(y), router_out.probs, plan, sigma=decoder.sigma, smoothing=decoder.smoothing,
                   truncate=decoder.truncate, dtype=y.dtype)  # (B, L, d)
    return full * ste_ones(router_out.confidence.to(y.dtype))[..., None]


def _merge_in_gemm(self, y, plan, router_out, enc_tokens):
    """``DeChunkDecoder.merge`` with the residual projection's GEMM adding the de-chunked grid in its
    epilogue (``addmm``, C = gated grid + bias) instead of a separate pass; half-precision merge only."""
    if self.fp32:  # an fp32 merge keeps its fp32 sum
        return DeChunkDecoder.merge(self, y, plan, router_out, enc_tokens)
    with torch.autocast(device_type=enc_tokens.device.type, enabled=False):
        gated = _gated_grid(self, y, plan, router_out)  # (B, L, d)
        merged = torch.addmm((gated + self.residual.bias.to(y.dtype)).flatten(0, 1),
                             enc_tokens.flatten(0, 1).to(y.dtype), self.residual.weight.to(y.dtype).t())  # (B L, d)
    return merged.view_as(gated)


def _merge_in_bf16(self, y, plan, router_out, enc_tokens):
    """``DeChunkDecoder.merge`` as it was before it summed in fp32: ``full * gate + res`` in the half precision,
    which inductor may fold into the residual GEMM as an ``addmm`` whose C operand aten first copies into the
    output (a ``(B L, d)`` memcpy, 0.11 ms in an H100 profile). Half-precision merge only."""
    if self.fp32:
        return DeChunkDecoder.merge(self, y, plan, router_out, enc_tokens)
    res = self.residual(enc_tokens).to(y.dtype)  # (B, L, d), bf16 under autocast
    with torch.autocast(device_type=enc_tokens.device.type, enabled=False):
        return _gated_grid(self, y, plan, router_out) + res


class _MergeInGemm(DeChunkDecoder):
    merge = _merge_in_gemm


class _MergeInBf16(DeChunkDecoder):
    merge = _merge_in_bf16


def merge_in_bf16(model: nn.Module) -> nn.Module:
    """The decoder's half-precision merge summed in bf16, as before (bf16 routing only); in place."""
    model.decoder.__class__ = _MergeInBf16  # a class of its own: dynamo guards on it (not on a patched method)
    return model


@contextlib.contextmanager
def wide_persistent_reductions(limit: int = 2048):
    """Inductor compiles every row reduction of up to ``limit`` elements persistent (the row held in
    registers: one read) instead of looping over it twice past 1024, e.g. the encoder's RMSNorm over
    ``d = 1152``. For what compiles inside; the FX graph cache is off there, so nothing cached leaks in or out."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class WideRows(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction) -> bool:
            if (config.triton.persistent_reductions and not cooperative_reduction
                    and features.get_reduction_hint() == ReductionHint.INNER
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, limit)):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    with config.patch(fx_graph_cache=False), V.set_choices_handler(WideRows()):
        yield


@contextlib.contextmanager
def position_table_per_call():
    """DiT and DC-DiT compute their ``(L, d)`` sin-cos table in every call, as before they kept it as a buffer;
    compiled, inductor inlines it into the consumer, which then evaluates a sine or cosine for every element
    of the ``(B, L | M, d)`` sum. For what compiles inside (dynamo bakes the traced functions into the graph)."""
    from chunkformer.grid import sincos_table
    from chunkformer.models import dcdit, dit

    def per_call(model, grid):
        return sincos_table(grid, model.hidden_size, device=model.pos_table.device)

    before = dit.position_table, dcdit.position_table
    dit.position_table = dcdit.position_table = per_call
    try:
        with torch._inductor.config.patch(fx_graph_cache=False):
            yield
    finally:
        dit.position_table, dcdit.position_table = before


class _InductorGroupNorm(GroupNorm):
    """:class:`~chunkformer.norms.GroupNorm` with its Triton statistics off (a class of its own: dynamo guards on it)."""


class _InductorRMSNorm(RMSNorm):
    """:class:`~chunkformer.precision.RMSNorm` with its residual kernel off (a class of its own)."""


def inductor_norms(group: bool = True, rms: bool = True):
    """A patch turning off the Triton GroupNorm statistics and / or the encoder's residual RMSNorm (inductor's
    norms, as before session 15); in place."""
    def patch(model: nn.Module) -> nn.Module:
        for m in model.modules():
            if group and type(m) is GroupNorm:
                m.__class__, m.use_kernel = _InductorGroupNorm, False
            if rms and type(m) is RMSNorm:
                m.__class__, m.use_kernel = _InductorRMSNorm, False
        return model
    return patch


class _InductorApplyGroupNorm(GroupNorm):
    """:class:`~chunkformer.norms.GroupNorm` normalising in torch ops (one pass inductor writes, fp32 out, the SiLU
    outside), as in session 15, instead of :func:`~chunkformer.norms.scale_shift`'s kernel; the statistics unchanged."""

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
        if not self.takes_kernel(x):
            return GroupNorm.forward(self, x, shift, silu)
        centre, scale = cf.norms.group_norm_terms(x, self.num_groups, self.weight, self.eps, shift)  # (B, C) each
        out = (x.float() + centre[:, :, None, None]) * scale[:, :, None, None] + self.bias.float()[:, None, None]
        return F.silu(out) if silu else out


class _NCHWEncoder(ChunkEncoder):
    """:class:`~chunkformer.scaffold.ChunkEncoder` fed as called (NCHW), as before session 16: traced with NCHW
    strides, its four GroupNorms stay on inductor's path."""

    def _sampling_layout(self, x: torch.Tensor) -> torch.Tensor:
        return x


def session15_norms(apply: bool = True, encoder: bool = True, router: bool = True):
    """A patch undoing session 16's GroupNorm changes, each or all: the normalising pass by inductor
    (``apply``), the encoder fed NCHW (``encoder``), the router's ``nn.GroupNorm`` (``router``); in place."""
    def patch(model: nn.Module) -> nn.Module:
        if apply:
            for m in model.modules():
                if type(m) is GroupNorm:
                    m.__class__ = _InductorApplyGroupNorm
        if encoder:
            model.encoder.__class__ = _NCHWEncoder
        if router:
            m = model.router.scorer[1]
            m.__class__, m.use_kernel = _InductorGroupNorm, False
        return model
    return patch


class _CopiedInputGroupNorm(GroupNorm):
    """:class:`~chunkformer.norms.GroupNorm` without :func:`~chunkformer.inductor.written_once` (before session 17):
    an input inductor has not written is copied for each of the statistics and normalising kernels."""

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
        if self.takes_kernel(x):
            return cf.norms.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, shift, silu)
        return GroupNorm.forward(self, x, shift, silu)


class _CopiedInputResBlock(ResBlock):
    """:class:`~chunkformer.scaffold.ResBlock` whose input is not marked :func:`~chunkformer.inductor.written_once`."""

    def _shared_input(self, x: torch.Tensor) -> torch.Tensor:
        return x


def inputs_copied(model: nn.Module) -> nn.Module:
    """Undo session 17's :func:`~chunkformer.inductor.written_once` in the GroupNorms and ResBlocks; in place."""
    for m in model.modules():
        if type(m) is GroupNorm:
            m.__class__ = _CopiedInputGroupNorm
        elif type(m) is ResBlock:
            m.__class__ = _CopiedInputResBlock
    return model


def _merge_with(self, y, plan, router_out, enc_tokens, gate: bool = False, slots_written: bool = False):
    """``DeChunkDecoder.merge`` with the STE gate (exactly 1) multiplied in whether or not a gradient flows (as in
    session 16), and / or the smoothed slots marked :func:`~chunkformer.inductor.written_once` before the plug-back
    gathers them (else inductor inlines their smoothing into the gather: each slot's probability re-derived per
    channel of every cell)."""
    dtype = torch.float32 if self.fp32 else y.dtype
    autocast = torch.is_autocast_enabled(enc_tokens.device.type)
    res = self.residual(enc_tokens if autocast else enc_tokens.float())  # (B, L, d)
    with torch.autocast(device_type=enc_tokens.device.type, enabled=False):
        slots = plan.unchunk(y).to(dtype)  # (B, M, d)
        if self.smoothing != "none" and self.sigma > 0:
            p = torch.take_along_dim(router_out.probs.float(), plan.positions, dim=1).clamp(PROB_CLAMP, 1 - PROB_CLAMP)
            if resolve_smoothing(self.smoothing, slots.shape[1], plan.num_tokens, slots.device, dtype) == "dense":
                slots = smooth_dense(slots, p, plan, self.sigma)
            else:
                slots = smooth_windowed(slots, p, plan, self.sigma, truncate=self.truncate)
        full = plan.plug_back(written_once(slots) if slots_written else slots).float()  # (B, L, d)
        if gate:
            full = full * ste_ones(router_out.confidence.float())[..., None]
        return (full + res.float()).to(dtype)


class _MergeGated(DeChunkDecoder):
    def merge(self, y, plan, router_out, enc_tokens):
        return _merge_with(self, y, plan, router_out, enc_tokens, gate=True)


class _MergeSlotsWritten(DeChunkDecoder):
    def merge(self, y, plan, router_out, enc_tokens):
        return _merge_with(self, y, plan, router_out, enc_tokens, slots_written=True)


def gate_multiplied(model: nn.Module) -> nn.Module:
    """The de-chunk merge multiplying by the STE gate when sampling too, as in session 16; in place."""
    model.decoder.__class__ = _MergeGated
    return model


def slots_written(model: nn.Module) -> nn.Module:
    """The smoothed slots written once before the plug-back gathers them; in place."""
    model.decoder.__class__ = _MergeSlotsWritten
    return model


def dense_smoothing(model: nn.Module) -> nn.Module:
    """The de-chunk's smoothing in its dense ``(B, M, M)`` form whatever ``"auto"`` picks (at 512px it picks the
    windowed form, from fp32 timings: a bf16 merge makes the dense form's batched GEMM a bf16 one); in place."""
    model.decoder.smoothing = "dense"
    return model


def channels_last_weights(model: nn.Module) -> nn.Module:
    """Store every conv weight channels-last (``model.to(memory_format=torch.channels_last)``); in place. The
    compiled scaffold otherwise converts each 3x3 conv's weight to channels-last in every call (a small kernel
    and a launch each, about twenty per call with the router's casts: seen in inductor's output code)."""
    return model.to(memory_format=torch.channels_last)


def residual_in_gemm(model: nn.Module) -> nn.Module:
    """Add the de-chunked grid inside the decoder's residual GEMM (bf16 routing only); in place."""
    model.decoder.__class__ = _MergeInGemm
    return model


_NO_CACHE = {"options": {"fx_graph_cache": False}}
# settings unlike any other variant's (persistent_reductions=True is inductor's default): dynamo reuses a graph
# compiled under equal settings for an equal model, which would skip the context
_WIDE = {"options": {"fx_graph_cache": False, "triton.persistent_reductions": True}}
VARIANTS = {  # name -> (torch.compile keyword arguments, a compute-path change applied to a copy of the model)
    "default": ({}, None),
    "coordinate-descent": ({"options": {"coordinate_descent_tuning": True}}, None),
    "combo-kernels": ({"options": {"combo_kernels": True}}, None),
    "pointwise-autotune": ({"options": {"max_autotune_pointwise": True}}, None),
    "max-autotune": ({"mode": "max-autotune-no-cudagraphs"}, None),
    "multi-kernel": ({"options": {"triton.multi_kernel": 1}}, None),
    "multi-kernel + coordinate-descent": ({"options": {"triton.multi_kernel": 1, "coordinate_descent_tuning": True}}, None),
    "1x1 as GEMMs": ({}, gemm_1x1),
    "widening conv split": ({}, split_widening),
    "1x1 as GEMMs + widening conv split": ({}, lambda m: split_widening(gemm_1x1(m))),
    "residual in its GEMM": ({}, residual_in_gemm),
    "all three paths": ({}, lambda m: residual_in_gemm(split_widening(gemm_1x1(m)))),
    "merge summed in bf16 (before)": ({}, merge_in_bf16),
    "GroupNorm by inductor (before)": ({}, inductor_norms(rms=False)),
    "RMSNorm by inductor (before)": ({}, inductor_norms(group=False)),
    "both norms by inductor (before)": ({}, inductor_norms()),
    "normalising pass by inductor (before)": ({}, session15_norms(encoder=False, router=False)),
    "encoder fed NCHW (before)": ({}, session15_norms(apply=False, router=False)),
    "router GroupNorm by inductor (before)": ({}, session15_norms(apply=False, encoder=False)),
    "session 15 GroupNorms (before)": ({}, session15_norms()),
    "1x1 convs by cuDNN (before)": ({}, cudnn_1x1),
    "conv weights channels-last": ({}, channels_last_weights),
    "dense smoothing": ({}, dense_smoothing),
    "inputs copied per kernel (before)": ({}, inputs_copied),
    "gate multiplied (before)": ({}, gate_multiplied),
    "de-chunk slots written once": ({}, slots_written),
    "session 16 library (before)": ({}, lambda m: gate_multiplied(inputs_copied(m))),
    "session 15 library (before)": ({}, lambda m: cudnn_1x1(session15_norms()(m))),
    "default with the FX graph cache off": (_NO_CACHE, lambda m: m),  # what the settings of the context variants change alone
    # compiled inside wide_persistent_reductions(); settings of their own, so dynamo does not hand them the graph
    # it compiled for the same model under other settings
    "wide persistent reductions": (_WIDE, lambda m: m),
    "split + wide persistent": (_WIDE, split_widening),
    "1x1 + split + wide persistent": (_WIDE, lambda m: split_widening(gemm_1x1(m))),
    "position table per call (before)": (_NO_CACHE, lambda m: m),
}
# variants compiled inside a context: name -> context factory (their first call, which compiles, runs in it)
CONTEXTS = {name: wide_persistent_reductions for name in VARIANTS if "wide persistent" in name}
CONTEXTS["position table per call (before)"] = position_table_per_call
COMPILE_ONLY = [name for name, (_, patch) in VARIANTS.items() if patch is None]


def serving_scaffold(size: int, device: torch.device, batch: int | None = None):
    """DC-DiT-XL with no blocks at ``size`` px (batch 64 at 256, 16 at 512), bf16 weights and routing,
    filled plan of ``L / 4`` tokens, every token kept by the router; returns ``(model, (x, t, y))``."""
    side = size // 8
    batch = batch or (64 if size == 256 else 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, side, side, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    torch.manual_seed(0)
    model = cf.create_model(
        "DC-DiT-XL", input_size=side, depth=0, plan_mode="fixed", capacity=side * side // 4,
        fill_capacity=True, fp32_router_dechunk=False,
    ).to(device).eval()
    torch.nn.init.constant_(model.router.scorer[-1].bias, 30.0)  # keep everything: the capacity decides
    with torch.no_grad():  # zero-init layers (final layer, residual, modulations) would make the output 0
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    return model.to(torch.bfloat16), (x, t, y)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, choices=(256, 512), default=256)
    ap.add_argument("--variants", default=",".join(v for v in COMPILE_ONLY if v != "max-autotune"),
                    help=f"comma-separated, from {list(VARIANTS)} (default: the compile settings but max-autotune, "
                         "which compiles for longer than a 10-minute GPU call)")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also list each variant's heaviest kernels")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    if "default" not in names:
        names.insert(0, "default")  # the baseline of every ratio
    if not torch.cuda.is_available():
        ap.error("this benchmark times compiled CUDA graphs: run it on a GPU")
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name()
    torch._dynamo.config.recompile_limit = 64  # one graph per variant, all on DCDiT.forward
    model, inputs = serving_scaffold(args.size, dev)
    compiled, compile_s, outputs = {}, {}, {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for name in names:
            settings, patch = VARIANTS[name]
            fn = torch.compile(model if patch is None else patch(copy.deepcopy(model)), **settings)
            start = time.perf_counter()
            with CONTEXTS.get(name, contextlib.nullcontext)():
                outputs[name] = fn(*inputs).float()
            torch.cuda.synchronize()
            compile_s[name] = time.perf_counter() - start
            compiled[name] = fn
            print(f"compiled: {name} ({compile_s[name]:.0f} s)", flush=True)
        times = {name: [] for name in names}
        for _ in range(args.rounds):  # interleaved: drift falls on every variant alike
            for name in names:
                times[name].append(cuda_ms(compiled[name], args.reps, *inputs))
        profiles = {}
        if args.profile:
            from tap_conv import kernels

            profiles = {name: kernels(lambda fn=compiled[name]: fn(*inputs)) for name in names}
    base = statistics.median(times["default"])
    rows = []
    for name in names:
        ms = statistics.median(times[name])
        diff = (outputs[name] - outputs["default"]).abs().max().item()
        rows.append({"variant": name, "compile_s": compile_s[name], "ms": ms, "vs_default": base / ms,
                     "max_abs_diff": diff, "rounds": times[name]})
    head = (f"{card}, torch {torch.__version__}, DC-DiT-XL scaffold only, {args.size}px, batch {inputs[0].shape[0]}, "
            "bf16 weights + routing, filled, median of interleaved rounds")
    print(f"\n{head}\n{'variant':34s} {'compile s':>9s} {'ms':>8s} {'speed-up':>8s} {'max |diff|':>10s}")
    for r in rows:
        print(f"{r['variant']:34s} {r['compile_s']:9.0f} {r['ms']:8.3f} {r['vs_default']:8.3f} {r['max_abs_diff']:10.2e}")
    for name, ks in profiles.items():
        print(f"\n{name}: GPU ms per call by kernel")
        for k, v in list(ks.items())[:12] + [kv for kv in ks.items() if kv[0].startswith("(all ")]:
            print(f"{v:8.3f}  {k[:100]}")
    return save_result(args.out, card, size=args.size, batch=inputs[0].shape[0], rows=rows,
                       **({"profiles": profiles} if profiles else {}))


if __name__ == "__main__":
    main()
