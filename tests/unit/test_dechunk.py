"""De-chunking: identity when nothing is dropped, normalised weights, windowed == dense, isolation."""

import math

import pytest
import torch
from conftest import plan_inputs
from hypothesis import given
from hypothesis import strategies as st

from chunkformer import ChunkPlan, DeChunkDecoder
from chunkformer.dechunk import dechunk, smooth_dense, smooth_windowed, smoothing_weights, ste_ones


@given(plan_inputs(), st.sampled_from([torch.float32, torch.float64]))
def test_all_kept_without_smoothing_is_exact_identity(inputs, dtype):
    grid, _, probs, seed = inputs
    mask = torch.ones_like(probs, dtype=torch.bool)
    plan = ChunkPlan.from_mask(mask, probs, grid=grid)
    x = torch.randn(*mask.shape, 5, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    out = dechunk(plan.unchunk(plan.chunk(x)), probs, plan, smoothing="none")
    assert torch.equal(out, x.float())
    gate = ste_ones(torch.rand(*mask.shape, 1))
    assert torch.equal(out * gate, x.float())  # the STE gate is exactly 1 forward


@given(plan_inputs(), st.floats(0.3, 3.0))
def test_smoothing_weights_are_normalised_over_valid_slots(inputs, sigma):
    grid, mask, probs, _ = inputs
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode="padded")
    p = torch.take_along_dim(probs, plan.positions, 1).clamp(1e-4, 1 - 1e-4)
    w = smoothing_weights(plan.coords, p, plan.valid, sigma)
    valid = plan.valid
    sums = w.sum(-1)[valid]
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    assert torch.all(w >= 0)
    assert torch.all(w.masked_select(~valid[:, None, :].expand_as(w)) == 0)  # never weighs padding


@given(plan_inputs(max_tokens=64), st.floats(0.5, 2.5))
def test_windowed_smoothing_equals_dense_when_window_covers_grid(inputs, sigma):
    grid, mask, probs, seed = inputs
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode="padded")
    h = torch.randn(*plan.positions.shape, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    p = torch.take_along_dim(probs, plan.positions, 1).double().clamp(1e-4, 1 - 1e-4)
    dense = smooth_dense(h, p, plan, sigma)
    covering = (max(grid) + 1) / sigma  # radius >= grid extent: nothing truncated
    wide = smooth_windowed(h, p, plan, sigma, truncate=covering)
    v = plan.valid
    assert torch.allclose(wide[v], dense[v], rtol=1e-9, atol=1e-9)


def test_windowed_smoothing_default_truncation_is_close_to_dense():
    torch.manual_seed(0)
    grid = (32, 32)
    mask = torch.rand(4, 1024) < 0.25
    probs = torch.rand(4, 1024)
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode="padded")
    h = torch.randn(*plan.positions.shape, 8)
    p = torch.take_along_dim(probs, plan.positions, 1).clamp(1e-4, 1 - 1e-4)
    dense, fast = smooth_dense(h, p, plan, 1.0), smooth_windowed(h, p, plan, 1.0)
    err = (dense - fast)[plan.valid].abs().max()
    assert err < 1e-3, err  # truncation at 4 sigma


@given(plan_inputs(max_batch=4), st.sampled_from(["windowed", "dense", "none"]), st.data())
def test_a_sample_never_depends_on_another_samples_tokens(inputs, smoothing, data):
    grid, mask, probs, seed = inputs
    B, L = mask.shape
    if B < 2:
        return
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode="padded")
    y = torch.randn(*plan.positions.shape, 3, generator=torch.Generator().manual_seed(seed))
    victim = data.draw(st.integers(0, B - 1))
    y2 = y.clone()
    y2[victim] += torch.randn_like(y2[victim]) * 10
    probs2 = probs.clone()
    probs2[victim] = torch.rand(L)
    out1 = dechunk(y, probs, plan, smoothing=smoothing)
    out2 = dechunk(y2, probs2, plan, smoothing=smoothing)
    others = [b for b in range(B) if b != victim]
    assert torch.equal(out1[others], out2[others])


def test_ste_gate_passes_gradient_unchanged():
    c = torch.rand(3, 7, requires_grad=True)
    g = torch.randn(3, 7)
    (ste_ones(c) * g).sum().backward()
    assert torch.equal(c.grad, g)


def test_dechunk_runs_fp32_under_autocast():
    grid = (6, 6)
    mask = torch.rand(2, 36) < 0.5
    mask[:, 0] = True
    plan = ChunkPlan.from_mask(mask, grid=grid)
    y = torch.randn(int(mask.sum()), 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dechunk(plan.unchunk(y), torch.rand(2, 36), plan)
    assert out.dtype == torch.float32 and out.shape == (2, 36, 4)
    assert math.isfinite(out.sum().item())


@given(st.integers(1, 4096), st.integers(1, 4096))
def test_auto_smoothing_is_dense_only_while_the_kernel_stays_linear_in_the_grid(width, tokens):
    from chunkformer.dechunk import (
        DENSE_SMOOTHING_MAX_RATIO,
        DENSE_SMOOTHING_MAX_RATIO_HALF,
        resolve_smoothing,
    )

    choice = resolve_smoothing("auto", width, tokens, "cuda")
    assert choice == ("dense" if width**2 <= DENSE_SMOOTHING_MAX_RATIO * tokens else "windowed")
    for half in (torch.bfloat16, torch.float16):  # a half-precision GEMM: dense up to a larger ratio
        choice = resolve_smoothing("auto", width, tokens, "cuda", half)
        assert choice == ("dense" if width**2 <= DENSE_SMOOTHING_MAX_RATIO_HALF * tokens else "windowed")
        assert resolve_smoothing("auto", width, tokens, "cpu", half) == "windowed"
    assert resolve_smoothing("auto", width, tokens, "cpu") == "windowed"  # the dense kernel loses on CPUs
    for explicit in ("windowed", "dense", "none"):
        for device in ("cpu", "cuda"):
            assert resolve_smoothing(explicit, width, tokens, device) == explicit


def test_auto_smoothing_runs_the_form_it_names():
    torch.manual_seed(0)
    for grid, keep in (((16, 16), 0.25), ((64, 64), 0.5)):  # M^2 / L: about 16, then about 2048
        L = math.prod(grid)
        mask = torch.rand(2, L) < keep
        probs = torch.rand(2, L)
        plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode="padded")
        y = torch.randn(*plan.positions.shape, 4)
        want = "windowed"  # on the CPU "auto" always blurs the grid
        auto = dechunk(y, probs, plan, smoothing="auto")
        assert torch.equal(auto, dechunk(y, probs, plan, smoothing=want))
        other = dechunk(y, probs, plan, smoothing="windowed" if want == "dense" else "dense")
        assert (auto - other).abs().max() < 1e-3  # the two forms agree up to the 4-sigma truncation


def test_unknown_smoothing_names_the_choices():
    plan = ChunkPlan.from_mask(torch.ones(1, 4, dtype=torch.bool), grid=(2, 2), mode="padded")
    with pytest.raises(TypeError, match="'auto', 'windowed', 'dense', 'none'"):  # the type check says it first
        dechunk(torch.randn(1, 4, 2), torch.rand(1, 4), plan, smoothing="gaussian")
    with pytest.raises(ValueError, match="'auto', 'windowed', 'dense', 'none'"):
        DeChunkDecoder(8, 2, smoothing="gaussian")


@given(st.sampled_from([33, 64, 96, 128, 160]), st.integers(1, 40), st.floats(0.5, 8.0), st.integers(1, 3),
       st.integers(1, 4))
def test_tiled_blur_equals_one_band_matmul_along_any_axis_length(size, radius, sigma, outer, inner):
    """Long axes are filtered tile by tile with halo corrections; short, odd or wide-window ones in one
    matmul. Both must equal the whole banded matrix applied at once."""
    from chunkformer.dechunk import _band_matrix, _blur_axis

    x = torch.randn(outer, size, inner, dtype=torch.float64, generator=torch.Generator().manual_seed(size + radius))
    k = torch.arange(size, dtype=torch.float64)
    d = k[:, None] - k[None, :]
    band = torch.exp(-(d**2) / (2 * sigma**2)) * (d.abs() <= radius)  # written out here, not reused
    assert torch.allclose(_band_matrix(size, sigma, radius, None, torch.float64), band)
    assert torch.allclose(_blur_axis(x, size, sigma, radius), band @ x, rtol=1e-12, atol=1e-12)


def test_windowed_smoothing_on_a_tiled_grid_is_close_to_dense():
    torch.manual_seed(1)
    grid = (64, 96)  # both axes longer than a tile: the tiled path
    mask = torch.rand(2, 64 * 96) < 0.1
    probs = torch.rand(2, 64 * 96)
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode="padded")
    h = torch.randn(*plan.positions.shape, 4, dtype=torch.float64)
    p = torch.take_along_dim(probs, plan.positions, 1).double().clamp(1e-4, 1 - 1e-4)
    for sigma in (1.0, 2.0, 4.0):
        dense, fast = smooth_dense(h, p, plan, sigma), smooth_windowed(h, p, plan, sigma)
        v = plan.valid
        assert (dense - fast)[v].abs().max() / dense[v].abs().max() < 1e-4, sigma  # the bound docs/scaffold.md states


def test_blur_tiles_on_the_cpu_only_and_its_flop_count_follows():
    from chunkformer.dechunk import _tiled, blur_macs

    assert _tiled(128, 8, "cpu") and not _tiled(128, 8, "cuda") and not _tiled(32, 8, "cpu")
    assert blur_macs(128, 8, "cuda") == 128.0  # one (S, S) band matmul: S multiply-adds per element
    assert blur_macs(128, 8, "cpu") == 32 + 2 * 64 * 3 / (4 * 32)  # tiles of 32 + (r, r) halos between 4 tiles


def test_tiled_blur_gradient_is_the_band_matrix_transposed():
    """The tiled path adds its halo corrections in place; autograd must still see the whole band."""
    from chunkformer.dechunk import _blur_axis

    x = torch.randn(2, 64, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _blur_axis(x, 64, 1.5, 6), (x,))


@given(plan_inputs(max_tokens=48))
def test_merge_gates_with_the_ste_only_where_the_router_learns(inputs):
    """With grad, ``z = dechunk(y) * STE(c) + W e``: c's gradient is the de-chunked value summed over channels. Without
    (sampling), the gate, exactly 1, is left out: a NaN confidence cannot reach z."""
    from chunkformer.dechunk import Chunked
    from chunkformer.routing import RouterOutput

    grid, mask, probs, seed = inputs
    g = torch.Generator().manual_seed(seed)
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode="padded")
    dec = DeChunkDecoder(8, 2, cond_dim=0)
    torch.nn.init.normal_(dec.residual.weight, generator=g)
    y, enc = torch.randn(mask.shape[0], plan.width, 8, generator=g), torch.randn(*mask.shape, 8, generator=g)

    def route(confidence):
        return RouterOutput(probs=probs, mask=mask, natural_mask=mask, confidence=confidence, grid=tuple(grid),
                            batch_size=[mask.shape[0]])

    def chunked(confidence):
        routed = route(confidence)
        return Chunked(plan=plan, probs=routed.probs, confidence=routed.confidence, tokens=enc,
                       batch_size=[mask.shape[0]])

    confidence = torch.rand(mask.shape, generator=g).requires_grad_()
    z = dec.merge(y, chunked(confidence))
    z.sum().backward()
    full = dechunk(plan.unchunk(y), probs, plan, sigma=dec.sigma)  # (B, L, 8)
    torch.testing.assert_close(confidence.grad, full.sum(-1))
    with torch.no_grad():
        sampled = dec.merge(y, chunked(torch.full(mask.shape, float("nan"))))
    torch.testing.assert_close(sampled, z.detach(), rtol=0, atol=0)
