"""chunkformer.kernels.norms: GroupNorm from per-channel sums and a normalising pass of its own, the residual
RMSNorm, their Triton kernels and the model paths that kernels.apply() gives them, against torch's norms."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import chunkformer as cf
from chunkformer import kernels
from chunkformer.kernels import norms

ROOT = Path(__file__).resolve().parents[3]


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    groups=st.integers(1, 4),
    per_group=st.integers(1, 5),
    grid=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    offset=st.sampled_from([0.0, 3.0, 100.0]),
    with_shift=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_group_norm_from_channel_sums_equals_torch_group_norm_of_the_shifted_input(
    batch, groups, per_group, grid, offset, with_shift, seed
):
    assume(per_group * math.prod(grid) >= 4)  # a group of one value has no spread: 1 / sqrt(eps) amplifies fp32 rounding
    g = torch.Generator().manual_seed(seed)
    C = groups * per_group
    shape = (batch, C, *grid)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x + offset * torch.randn(1, C, *[1] * len(grid), generator=g, dtype=torch.float64)  # channel offsets
    shift = torch.randn(batch, C, generator=g, dtype=torch.float64) if with_shift else None
    w, b = torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    full = x if shift is None else x + shift.view(batch, C, *[1] * len(grid))
    ref = F.group_norm(full, groups, w, b, 1e-5)
    out = norms.group_norm(x, groups, w, b, 1e-5, shift)
    assert out.shape == shape and out.dtype == x.dtype == torch.float64  # x.dtype out, channels-last
    assert out.movedim(1, -1).is_contiguous()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_group_stats_keep_the_variance_under_a_large_offset_where_one_pass_moments_cancel():
    """Pivoted sums: an offset of 1e4 standard deviations leaves the fp32 variance exact to 1e-3; the plain
    E[x^2] - E[x]^2 of the same fp32 data is off by far more."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 8, 16, 16, generator=g, dtype=torch.float64) + 1e4).float()
    mean, var = norms.group_stats(x, 4)
    ref_var, ref_mean = torch.var_mean(x.double().view(2, 4, -1), dim=-1, unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)
    flat = x.view(2, 4, -1)
    naive = (flat * flat).mean(-1) - flat.mean(-1) ** 2
    assert ((naive.double() - ref_var).abs() / ref_var).max() > 1e-2


def test_group_norm_rejects_groups_that_do_not_divide_and_misshapen_shifts():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="do not split into 4 groups"):
        norms.group_stats(x, 4)
    with pytest.raises(ValueError, match=r"shift must be \(batch, channels\)"):
        norms.group_stats(x, 3, torch.randn(6))
    with pytest.raises(ValueError, match="grid of rank >= 1"):
        norms.channel_moments(torch.randn(2, 6))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), dim=st.integers(1, 70), parts=st.sampled_from(["a", "ab", "ab+bias", "a+bias"]),
       seed=st.integers(0, 2**16))
def test_add_rms_norm_is_rms_norm_of_the_sum(rows, dim, parts, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    w, bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    b = b if "b" in parts.split("+")[0] else None
    bias = bias if "bias" in parts else None
    total = a + (0 if b is None else b) + (0 if bias is None else bias)
    ref = F.rms_norm(total.double(), (dim,), w.double(), 1e-5)
    torch.testing.assert_close(norms.add_rms_norm(a, b, w, 1e-5, bias).double(), ref, rtol=1e-5, atol=1e-5)


def test_add_rms_norm_checks_its_shapes():
    with pytest.raises(ValueError, match="one shape"):
        norms.add_rms_norm(torch.randn(3, 4), torch.randn(3, 5), None, 1e-5)
    with pytest.raises(ValueError, match=r"bias must be \(4,\)"):
        norms.add_rms_norm(torch.randn(3, 4), None, None, 1e-5, torch.randn(3))


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), channels=st.integers(1, 9), grid=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       with_bias=st.booleans(), silu=st.booleans(), channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_scale_shift_is_the_affine_map_per_sample_and_channel_then_silu_written_channels_last(
    batch, channels, grid, with_bias, silu, channels_last, seed
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *grid, generator=g)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    centre, scale = torch.randn(batch, channels, generator=g), torch.randn(batch, channels, generator=g)
    bias = torch.randn(channels, generator=g) if with_bias else None
    out = norms.scale_shift(x, centre, scale, bias, silu)
    expect = torch.empty_like(x, dtype=torch.float64)
    for b in range(batch):  # element by element from the definition, in fp64
        for c in range(channels):
            v = (x[b, c].double() + centre[b, c].double()) * scale[b, c].double() + (bias[c].double() if with_bias else 0)
            expect[b, c] = v * torch.sigmoid(v) if silu else v
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.movedim(1, -1).is_contiguous()  # channels-last, whatever x's layout: what the next conv reads
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)


def test_scale_shift_checks_its_shapes():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match=r"centre must be \(batch, channels\)"):
        norms.scale_shift(x, torch.randn(6), torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"bias must be \(6,\)"):
        norms.scale_shift(x, torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 6))


def test_triton_norm_kernels_match_torch_under_the_triton_interpreter():
    """The three CUDA kernels run on the CPU by Triton's interpreter (set before import): ragged tiles, channels-last
    and contiguous grids, strided token rows (torch.compile traces into them only on a GPU: the next test)."""
    pytest.importorskip("triton")
    code = """
import torch
from chunkformer.kernels import norms
torch.manual_seed(0)
for shape, tiles in [((2, 40, 5, 7), (8, 32, 3, 16)), ((3, 64, 33), None), ((1, 70, 3, 3), (4, 64, 3, 4))]:
    x = torch.randn(shape) + 5
    for xx in (x, x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x.transpose(1, 2).contiguous().transpose(1, 2)):
        out = norms.launch_channel_moments(xx, tiles).sum(1)
        ref = norms.channel_moments_reference(xx).sum(1)
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-5), (shape, tiles, (out - ref).abs().max())
for N, D, tiles in [(7, 40, None), (5, 96, (2, 128, 4)), (9, 33, (4, 64, 4))]:
    a, b, w, bias = torch.randn(N, D), torch.randn(N, D), torch.randn(D), torch.randn(D)
    for bb, ww, bi in [(None, None, None), (b, w, None), (b, w, bias), (None, w, bias)]:
        out = norms.launch_add_rms_norm(a, bb, ww, 1e-5, bi, tiles)
        assert torch.allclose(out, norms.add_rms_norm_reference(a, bb, ww, 1e-5, bi), atol=1e-5), (N, D, tiles)
nchw_rows = torch.randn(2, 8, 5, 6).flatten(2).transpose(1, 2)  # tokens of an NCHW grid: column stride 30
b, bias = torch.randn(2, 30, 8), torch.randn(8)
out = norms.launch_add_rms_norm(nchw_rows, b, None, 1e-5, bias)
assert torch.allclose(out, norms.add_rms_norm_reference(nchw_rows, b, None, 1e-5, bias), atol=1e-5)
for shape, tiles in [((2, 40, 5, 7), (8, 32, 4)), ((3, 24, 33), None), ((1, 70, 3, 3), (4, 64, 4))]:
    x = torch.randn(shape)
    centre, scale, bias = torch.randn(shape[:2]), torch.randn(shape[:2]), torch.randn(shape[1])
    for xx in (x, x.movedim(1, -1).contiguous().movedim(-1, 1)):
        for bi, silu in [(None, False), (bias, True), (bias, False)]:
            out = norms.launch_scale_shift(xx, centre, scale, bi, silu, tiles)
            ref = norms.scale_shift_reference(xx, centre, scale, bi, silu)
            assert out.stride() == ref.stride() and torch.allclose(out, ref, atol=1e-5), (shape, tiles, silu)
print('ok')
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CHUNKFORMER_TYPECHECK": "0"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_the_rms_kernel_keeps_an_fp64_eps_out_of_its_arithmetic():
    """Inductor types a Python float argument fp64 on a GPU: compiled for sm_90 that way, the residual RMSNorm kernel
    must cast ``eps`` once and keep its rows in fp32 (it squared, scaled and rounded them in f64 before)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = norms._add_rms_norm_kernel
    names = fn.arg_names
    constexprs = dict(HAS_B=True, HAS_BIAS=True, HAS_W=True, BLOCK_R=4, BLOCK_D=1024)

    def ptx(eps_type: str) -> str:
        signature = {n: "constexpr" if n in constexprs else "*bf16" if n in ("A", "B", "BIAS", "W", "OUT") else
                     eps_type if n == "eps" else "i32" for n in names}
        source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]

    try:
        ptx("fp32")
    except Exception as e:  # noqa: BLE001 - this Triton has no NVIDIA backend or ptxas
        pytest.skip(f"Triton cannot compile for sm_90 here: {type(e).__name__}: {str(e)[:200]}")
    f64 = set(re.findall(r"(?<![\w.])[a-z]+(?:\.[a-z0-9]+)*\.f64\b", ptx("fp64")))
    assert f64 == {"cvt.rn.f32.f64"}, f64




def _seeded_model():
    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", input_size=16, depth=1).eval()
    with torch.no_grad():  # zero-init layers and unit norms would hide the biases and the affine parameters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.02 if p.dim() > 1 else 0.1))
    assert kernels.apply(model, force=True)["norms"] == 10  # 9 GroupNorms (scaffold, router), the encoder's RMSNorm
    return model


@pytest.fixture
def kernels_everywhere(monkeypatch):
    """The norms take their kernel path on the CPU, compiled or not (torch stands in for Triton there); counts
    the calls. ``compiling`` is a switch: GroupNorm takes its path only while torch.compile traces."""
    calls = {"moments": 0, "rms": 0, "apply": 0, "compiling": True}
    moments, rms, apply = norms.channel_moments, norms.add_rms_norm, norms.scale_shift

    def counted_moments(x):
        calls["moments"] += 1
        return moments(x)

    def counted_rms(*args):
        calls["rms"] += 1
        return rms(*args)

    def counted_apply(*args):
        calls["apply"] += 1
        return apply(*args)

    monkeypatch.setattr(norms, "sampling_kernel", lambda x: not torch.is_grad_enabled())
    monkeypatch.setattr(norms, "compiling", lambda: calls["compiling"])
    monkeypatch.setattr(norms, "channel_moments", counted_moments)
    monkeypatch.setattr(norms, "add_rms_norm", counted_rms)
    monkeypatch.setattr(norms, "scale_shift", counted_apply)
    return calls


def _inputs():
    x = torch.randn(2, 4, 16, 16)  # NCHW, as users pass it: the encoder lays it out channels-last for the kernels
    return x, torch.tensor([10, 900]), torch.tensor([1, 2])


def test_the_norm_kernel_paths_compute_what_torchs_norms_compute(kernels_everywhere):
    """On once applied: every GroupNorm (the scaffold's 8, from an NCHW input too, and the router's) takes the
    channel sums and the normalising pass (the conditioning and conv1's bias folded in) and the encoder's output
    norm sums its last block inside add_rms_norm; the output is torch's."""
    model = _seeded_model()
    x, t, y = _inputs()
    with torch.no_grad():
        assert kernels.set_norm_kernels(model, False) == 10
        ref = model(x, t, y)
        assert (kernels_everywhere["moments"], kernels_everywhere["apply"], kernels_everywhere["rms"]) == (0, 0, 0)
        assert kernels.set_norm_kernels(model, True) == 10
        out = model(x, t, y)
        kernels.remove(model)
        plain = model(x, t, y)
    assert (kernels_everywhere["moments"], kernels_everywhere["apply"], kernels_everywhere["rms"]) == (9, 9, 1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref, plain, rtol=0, atol=0)  # switched off, the patched model is the plain one
    kernels.apply(model, force=True)
    model(x, t, y).sum().backward()  # with grad: torch's norms, so training works as before
    assert (kernels_everywhere["moments"], kernels_everywhere["apply"], kernels_everywhere["rms"]) == (9, 9, 1)


def test_group_norm_takes_its_kernel_only_when_compiled_and_by_default(kernels_everywhere):
    """Eager, nn.GroupNorm's fused kernel beats the sums plus separate torch ops: only the RMSNorm path runs."""
    model = _seeded_model()  # fresh: the default settings
    kernels_everywhere["compiling"] = False
    with torch.no_grad():
        model(*_inputs())
    assert (kernels_everywhere["moments"], kernels_everywhere["rms"]) == (0, 1)
    assert all(m.use_kernel for m in model.modules() if isinstance(m, (norms.GroupNorm, norms.RMSNorm)))


def test_set_norm_kernels_needs_a_patched_model():
    with pytest.raises(ValueError, match="no kernel GroupNorm or RMSNorm.*apply"):
        kernels.set_norm_kernels(cf.create_model("DC-DiT-S", input_size=8, depth=1), True)


def test_flop_counts_do_not_depend_on_the_norm_kernel_paths(kernels_everywhere):
    """The kernel paths call convs past their modules (the FLOP counter's hooks): the counter counts torch's
    path instead, which has the same FLOPs, and leaves the settings as it found them."""
    model = _seeded_model()
    x, t, y = _inputs()
    with torch.no_grad():
        with_kernels = cf.count_flops(model, x, t, y).total
        assert all(m.use_kernel for m in model.modules() if isinstance(m, (norms.GroupNorm, norms.RMSNorm)))
        kernels.set_norm_kernels(model, False)
        without = cf.count_flops(model, x, t, y).total
    assert with_kernels == without > 0
