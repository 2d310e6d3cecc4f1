"""chunkformer.kernels.tapconv: a 3x3 conv as a GEMM of its taps plus their shifted sum, and a 1x1 conv as a GEMM
over cells, equal the convolutions; kernels.apply() gives them to the layers they fit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkformer as cf
from chunkformer import kernels
from chunkformer.kernels.tapconv import (
    PointwiseConv2d,
    TapConv2d,
    conv3x3_taps,
    tap_sum,
    tap_sum_reference,
    tap_weights,
)
from chunkformer.scaffold import ResBlock

ROOT = Path(__file__).resolve().parents[3]


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    cin=st.integers(1, 9),
    cout=st.integers(1, 9),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_taps_equal_the_padded_convolution(b, h, w, cin, cout, bias, seed):
    """Any grid (1x1 included: every neighbour is padding), any widths, with and without bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    bb = torch.randn(cout, generator=g, dtype=torch.float64) if bias else None
    out = conv3x3_taps(x.to(memory_format=torch.channels_last), weight, bb)
    assert out.shape == (b, cout, h, w)
    torch.testing.assert_close(out, F.conv2d(x, weight, bb, padding=1), rtol=1e-10, atol=1e-10)


def test_taps_sum_each_neighbour_with_its_own_offset():
    """One unit tap at a time: tap k of cell (i, j) lands on cell (i - a + 1, j - b + 1), k = 3a + b."""
    for k in range(9):
        a, b = divmod(k, 3)
        taps = torch.zeros(1, 3, 3, 9, 1)
        taps[0, 1, 1, k] = 1.0  # the centre cell contributes through tap k only
        out = tap_sum_reference(taps)[0, 0]
        expected = torch.zeros(3, 3)
        expected[2 - a, 2 - b] = 1.0  # out[i, j] reads cell (i + a - 1, j + b - 1) = (1, 1)
        assert torch.equal(out, expected), k


def test_tap_weights_order_is_offset_major():
    weight = torch.arange(2 * 3 * 9, dtype=torch.float32).reshape(2, 3, 3, 3)
    t = tap_weights(weight)
    assert t.shape == (18, 3)
    assert torch.equal(t[2 * 5 + 1], weight[1, :, 1, 2])  # tap (1, 2) = 5, output channel 1


def test_bad_shapes_are_refused_with_the_expected_layout():
    with pytest.raises(ValueError, match=r"\(batch, h, w, 9, channels\)"):
        tap_sum(torch.zeros(1, 2, 2, 8, 4))
    with pytest.raises(ValueError, match="bias must have shape"):
        tap_sum(torch.zeros(1, 2, 2, 9, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="3x3 conv weights"):
        tap_weights(torch.zeros(4, 4, 5, 5))
    with pytest.raises(ValueError, match="for these weights"):
        conv3x3_taps(torch.zeros(1, 5, 4, 4), torch.zeros(2, 4, 3, 3))


def test_apply_gives_the_taps_path_to_narrowing_convs_only_where_it_is_meant_to():
    """Narrowing 2-D blocks get a TapConv2d, by default only for the measured shape; on the CPU (no CUDA) the
    patched block runs the plain conv, so its outputs equal the plain block's exactly."""
    def patched(block, **kw):
        holder = torch.nn.Sequential(cf.DeChunkDecoder(8, 4, depth=1))  # apply() patches scaffolds only
        holder[0].blocks[0] = block
        kernels.apply(holder, force=True, **kw)
        return block

    assert isinstance(patched(ResBlock(1152, 288, None)).conv1, TapConv2d)  # DC-DiT-XL's decoder, in TAPS_FASTER
    for cin, cout in ((1024, 256), (768, 192)):  # L and B: no taps path unless asked
        assert type(patched(ResBlock(cin, cout, None)).conv1) is torch.nn.Conv2d
        assert isinstance(patched(ResBlock(cin, cout, None), taps=True).conv1, TapConv2d)
    assert type(patched(ResBlock(288, 288, None), taps=True).conv1) is torch.nn.Conv2d  # not narrowing
    assert type(patched(ResBlock(1152, 288, None, ndim=1), taps=True).conv1) is torch.nn.Conv1d
    torch.manual_seed(0)
    block = ResBlock(1024, 256, 8).eval()
    keys = block.state_dict().keys()
    x, c = torch.randn(1, 1024, 3, 3), torch.randn(1, 8)
    with torch.no_grad():
        plain = block(x, c)
        patched(block, taps=True)
        assert isinstance(block.conv1, TapConv2d) and block.state_dict().keys() == keys  # checkpoints load as before
        torch.testing.assert_close(block(x, c), plain, rtol=0, atol=0)


def test_triton_tap_sum_matches_torch_under_the_triton_interpreter():
    """The CUDA kernel run on the CPU by Triton's interpreter (set before import), ragged tiles included, and
    its op eager (torch.compile traces into it only on a GPU: tests/gpu/test_fast_paths.py)."""
    pytest.importorskip("triton")
    code = """
import torch
from chunkformer.kernels import tapconv
for (B, H, W, C), tiles in [((2, 5, 7, 40), (4, 32, 1)), ((1, 3, 9, 64), (8, 64, 1)), ((2, 4, 4, 16), None)]:
    taps = torch.randn(B, H, W, 9, C)
    for bias in (None, torch.randn(C)):
        out = tapconv.launch_tap_sum(taps, bias, torch.empty(B, H, W, C), tiles)
        ref = tapconv.tap_sum_reference(taps, bias).permute(0, 2, 3, 1)  # (B, H, W, C) as the kernel writes it
        assert torch.allclose(out, ref, atol=1e-5), ((B, H, W, C), tiles, (out - ref).abs().max())
taps, bias = torch.randn(2, 5, 6, 9, 72)[..., :64], torch.randn(64)  # padded rows: read through the strides
ref = tapconv.tap_sum_reference(taps, bias)
out = tapconv._tap_sum_op(taps, bias)  # the custom op, eager: (B, C, H, W) channels-last
assert out.shape == (2, 64, 5, 6) and out.is_contiguous(memory_format=torch.channels_last)
assert torch.allclose(out, ref, atol=1e-5)
print('ok')
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CHUNKFORMER_TYPECHECK": "0"}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_set_taps_narrowing_switches_every_narrowing_conv_of_a_model():
    model = cf.create_model("DC-DiT-S", input_size=8, depth=1)  # decoder 384 -> 96: not in TAPS_FASTER
    kernels.apply(model, force=True)
    assert not [m for m in model.modules() if isinstance(m, TapConv2d)]
    assert kernels.set_taps_narrowing(model, True) == 1
    (conv,) = [m for m in model.modules() if isinstance(m, TapConv2d)]
    assert conv.use_kernel
    assert kernels.set_taps_narrowing(model, None) == 1 and not conv.use_kernel  # back to TAPS_FASTER's choice
    assert kernels.set_taps_narrowing(model, False) == 1 and not conv.use_kernel
    kernels.remove(model)
    assert type(conv) is torch.nn.Conv2d and "use_kernel" not in conv.__dict__
    with pytest.raises(ValueError, match="has no narrowing 3x3 conv"):
        kernels.set_taps_narrowing(cf.create_model("DiT-S/2", input_size=8, depth=1), False)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6), cin=st.integers(1, 9), cout=st.integers(1, 9),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_pointwise_conv_as_a_gemm_over_cells_equals_the_1x1_convolution(b, h, w, cin, cout, bias, seed):
    """The GEMM path (forced on the CPU) against F.conv2d, with and without the bias, and through _conv_forward
    without it (what ResBlock.raw_terms calls); the result is channels-last, like cuDNN's for such an input."""
    torch.manual_seed(seed)
    conv = PointwiseConv2d(cin, cout, bias=bias).double()
    x = torch.randn(b, cin, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(PointwiseConv2d, "takes_gemm", lambda self, x: True)
        ref = F.conv2d(x, conv.weight, conv.bias)
        out = conv(x)
        raw = conv._conv_forward(x, conv.weight, None)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(raw, F.conv2d(x, conv.weight), rtol=1e-10, atol=1e-10)
    assert out.permute(0, 2, 3, 1).is_contiguous()


def test_pointwise_conv_takes_the_gemm_only_when_sampling_on_a_gpu_in_half_precision_from_channels_last():
    conv = PointwiseConv2d(4, 3)
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    assert not conv.takes_gemm(x)  # CPU
    assert conv.state_dict().keys() == torch.nn.Conv2d(4, 3, 1).state_dict().keys()
    if torch.cuda.is_available():  # pragma: no cover - GPU runs only
        xc = x.cuda().bfloat16()
        with torch.no_grad():
            assert conv.cuda().bfloat16().takes_gemm(xc)
            assert not conv.takes_gemm(xc.contiguous())  # NCHW: the cells are not rows
            assert not conv.float().takes_gemm(xc.float())  # fp32 without autocast: cuDNN (TF32), not an fp32 GEMM


def test_apply_makes_gemms_of_the_scaffolds_plain_2d_1x1_convs_only():
    from chunkformer.grid import conv_nd

    assert PointwiseConv2d.fits(conv_nd(2, 8, 4, 1)) and PointwiseConv2d.fits(conv_nd(2, 8, 4, 1, bias=False))
    assert not PointwiseConv2d.fits(conv_nd(2, 8, 4, 3, padding=1))
    assert not PointwiseConv2d.fits(conv_nd(2, 8, 8, 1, groups=8))
    assert not PointwiseConv2d.fits(conv_nd(2, 8, 4, 1, stride=2))
    assert not PointwiseConv2d.fits(conv_nd(3, 8, 4, 1))
    model = cf.create_model("DC-DiT-S", input_size=16, depth=1)
    kernels.apply(model, force=True)
    names = [n for n, m in model.named_modules() if isinstance(m, PointwiseConv2d)]
    assert names == ["encoder.blocks.1.skip", "router.proj", "router.scorer.3", "decoder.blocks.0.skip"]


def test_a_model_with_every_pointwise_conv_forced_onto_its_gemm_computes_the_same(monkeypatch):
    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", input_size=16, depth=1).eval()
    with torch.no_grad():
        for p in model.parameters():  # zero-init layers would hide the decoder's skip
            p.add_(torch.randn_like(p) * 0.02)
        x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])
        ref = model(x, t, y)
        kernels.apply(model, force=True)
        calls = []
        monkeypatch.setattr(PointwiseConv2d, "takes_gemm", lambda self, x: calls.append(self) or True)
        out = model(x, t, y)
    assert len({id(m) for m in calls}) == 4
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
