"""``fp32_router_dechunk``: DC-DiT's fp32 router and de-chunk, or the caller's precision (the release's flag)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkformer as cf
import chunkformer.kernels
from chunkformer.dechunk import Chunked, dechunk
from chunkformer.plan import ChunkPlan
from chunkformer.routing import Router


def pair(plan_mode="packed", **kw):
    """The same tiny DC-DiT twice: fp32 router / de-chunk (default) and in the caller's precision."""
    torch.manual_seed(0)
    make = lambda fp32: cf.create_model(  # noqa: E731
        "DC-DiT-S", hidden_size=32, depth=1, num_heads=2, input_size=8, num_classes=3, plan_mode=plan_mode,
        fp32_router_dechunk=fp32, **kw).eval()
    strict, low = make(True), make(False)
    torch.nn.init.normal_(strict.decoder.residual.weight, std=0.05)  # zero at init: make the residual count
    torch.nn.init.normal_(strict.decoder.final.linear.weight, std=0.05)
    low.load_state_dict(strict.state_dict())
    return strict, low


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g), torch.tensor([0, 2])


@pytest.mark.parametrize("plan_mode,kw", [("packed", {}), ("padded", {}), ("fixed", {"capacity": 24}),
                                          ("fixed", {"capacity": 24, "fill_capacity": True})])
def test_in_fp32_without_autocast_the_flag_changes_nothing(plan_mode, kw):
    strict, low = pair(plan_mode, **kw)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(strict(x, t, y, rho=0.2), low(x, t, y, rho=0.2))  # the same function in fp32


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_under_bf16_autocast_only_the_low_precision_model_rounds_its_routing(seed):
    strict, low = pair()
    x, t, y = inputs(seed)
    with torch.no_grad():
        ref_tokens = strict.encoder(x, strict.t_embedder(t) + strict.y_embedder(y, 2, x.device, None))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c = strict.t_embedder(t) + strict.y_embedder(y, 2, x.device, None)
            tokens = strict.encoder(x, c)
            p_strict = strict.router.scores(tokens, (8, 8))
            p_low = low.router.scores(tokens, (8, 8))
            out_strict, out_low = strict(x, t, y), low(x, t, y)
    assert p_strict.dtype == p_low.dtype == torch.float32  # p is fp32 either way
    assert torch.equal(p_strict, strict.router.scores(tokens.float(), (8, 8)))  # autocast off inside: exact fp32
    assert not torch.equal(p_low, p_strict)  # the low-precision router did run in bf16 ...
    assert (p_low - p_strict).abs().max() < 2e-2  # ... and lands within bf16 rounding of the fp32 one
    assert ref_tokens.dtype == torch.float32 and out_low.shape == out_strict.shape
    scale = out_strict.float().abs().max()
    assert ((out_low.float() - out_strict.float()).abs().max() / scale) < 5e-2


def test_merge_keeps_the_backbone_precision_only_when_asked():
    strict, low = pair()
    x, t, y = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        merged = {}
        for name, m in (("strict", strict), ("low", low)):
            c = m.t_embedder(t) + m.y_embedder(y, 2, x.device, None)
            tokens = m.encoder(x, c)
            routed = m.router(tokens, (8, 8))
            chunked = Chunked.from_router(routed, tokens, mode="packed")
            h = chunked.plan.chunk(tokens).to(torch.bfloat16)  # a bf16 backbone output stand-in
            merged[name] = m.decoder.merge(h, chunked)
    assert merged["strict"].dtype == torch.float32 and merged["low"].dtype == torch.bfloat16
    rel = (merged["low"].float() - merged["strict"]).abs().max() / merged["strict"].abs().max()
    assert 0 < rel < 2e-2


def test_half_precision_merge_is_the_correctly_rounded_sum_of_its_bf16_parts():
    """The bf16 merge sums in fp32 and rounds once: the same values as adding the bf16 de-chunked grid and the
    bf16 residual (a bf16 add rounds its exact sum once too; the gate is 1 forward)."""
    from chunkformer.dechunk import dechunk

    _, low = pair()
    torch.nn.init.normal_(low.decoder.residual.weight, std=0.5)  # zero-init would make the sum trivial
    x, t, y = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        c = low.t_embedder(t) + low.y_embedder(y, 2, x.device, None)
        tokens = low.encoder(x, c)
        routed = low.router(tokens, (8, 8))
        chunked = Chunked.from_router(routed, tokens, mode="packed")
        plan = chunked.plan
        h = plan.chunk(tokens).to(torch.bfloat16)
        merged = low.decoder.merge(h, chunked)
        res = low.decoder.residual(tokens)  # bf16 under autocast
    dec = low.decoder
    full = dechunk(plan.unchunk(h), routed.probs, plan, sigma=dec.sigma, smoothing=dec.smoothing,
                   truncate=dec.truncate, dtype=torch.bfloat16)
    assert res.dtype == full.dtype == merged.dtype == torch.bfloat16
    assert torch.equal(merged, full + res)


@pytest.mark.parametrize("smoothing", ["dense", "windowed", "none"])
def test_dechunk_in_bf16_stays_within_bf16_rounding_of_fp32(smoothing):
    g = torch.Generator().manual_seed(1)
    router = Router(16)
    torch.nn.init.constant_(router.scorer[-1].bias, 0.3)  # p near 0.57: many kept, neighbours weigh in
    routed = router(torch.randn(2, 64, 16, generator=g), (8, 8))
    plan = ChunkPlan.from_router(routed, mode="padded")
    y = torch.randn(2, plan.width, 16, generator=g).to(torch.bfloat16).float()  # bf16-exact values
    full = dechunk(y, routed.probs, plan, sigma=1.0, smoothing=smoothing)
    half = dechunk(y, routed.probs, plan, sigma=1.0, smoothing=smoothing, dtype=torch.bfloat16)
    assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
    err = (half.float() - full).abs().max() / full.abs().max()
    assert err < 2e-2 and (smoothing == "none") == bool(err == 0)  # plug-back alone copies values exactly


def test_a_bf16_cast_model_runs_without_autocast_and_reports_the_flag():
    strict, low = pair()
    x, t, y = inputs()
    low = low.to(torch.bfloat16)
    assert low.router.proj.weight.dtype == torch.float32  # the router's weights stay fp32 regardless
    with torch.no_grad():
        out = low(x.to(torch.bfloat16), t, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert "fp32=False" in repr(low.router) and low.config["fp32_router_dechunk"] is False
    assert "fp32" not in repr(strict.router)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), enabled=st.booleans())
def test_switching_a_built_model_equals_building_it_that_way(seed, enabled):
    """set_fp32_router_dechunk on a built model gives the model the flag builds (outputs under bf16 autocast,
    the captured config), and switching back restores it."""
    strict, low = pair()
    torch.manual_seed(seed)
    torch.nn.init.normal_(strict.router.scorer[-1].weight, std=1.0)  # p spread around 0.5, away from its start
    torch.nn.init.zeros_(strict.router.scorer[-1].bias)  # value, so the router's precision shows in the output
    low.load_state_dict(strict.state_dict())
    built, other = (strict, low) if enabled else (low, strict)
    assert cf.kernels.set_fp32_router_dechunk(other, enabled) == 2  # the router and the decoder
    assert other.config["fp32_router_dechunk"] is enabled
    x, t, y = inputs(seed)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(other(x, t, y), built(x, t, y))
        cf.kernels.set_fp32_router_dechunk(other, not enabled)
        assert not torch.equal(other(x, t, y), built(x, t, y))  # the flag is read at every forward


def test_switching_needs_a_model_that_routes():
    with pytest.raises(ValueError, match="no Router or DeChunkDecoder"):
        cf.kernels.set_fp32_router_dechunk(cf.create_model("DiT-S/2", input_size=8, depth=1), False)
