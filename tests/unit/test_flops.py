"""FLOP counter: the paper's DiT rows, a FlopCounterMode cross-check, budgets lower the count."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import chunkformer as cf

# DC-DiT v2 Table 1: TFLOPs per image, 250 steps, no CFG
PAPER_ROWS = [("DiT-S/2", 32, 3.02), ("DiT-B/2", 32, 11.46), ("DiT-L/2", 32, 40.21),
              ("DiT-XL/2", 32, 59.00), ("DiT-XL/2", 64, 261.25)]


@pytest.mark.parametrize("name,size,paper", PAPER_ROWS)
def test_paper_dit_rows_within_one_percent(name, size, paper):
    model = cf.create_model(name, input_size=size, device="meta")
    x = torch.empty(1, 4, size, size, device="meta")
    t, y = torch.zeros(1, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")
    ours = cf.count_flops(model, x, t, y).tflops_per_image(steps=250)
    residual = ours / paper - 1
    # plain matmul count + attention formula: 0.4-0.6% above the paper (docs/flops.md)
    assert 0.0 < residual < 0.01, (name, size, ours, paper)


def _fcm_total(model, *args, **kwargs):
    # the math SDPA kernel decomposes into bmm, which FlopCounterMode counts (the fused CPU kernel
    # has no registered formula and would count as 0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fcm:
        model(*args, **kwargs)
    return fcm.get_total_flops()


@pytest.mark.parametrize("name,kwargs", [("DiT-S/2", {}), ("DiT-S/4", {"input_size": (16, 24)}),
                                         ("DC-DiT-S", {"plan_mode": "padded"}),
                                         ("DC-DiT-S", {"plan_mode": "padded", "smoothing": "dense"}),
                                         ("DC-DiT-S", {"plan_mode": "padded", "input_size": 64})])  # tiled blur
def test_counter_matches_flop_counter_mode_on_the_sdpa_path(name, kwargs):
    """Ours = FlopCounterMode (matmuls, convs, SDPA at 4 H L^2 d_head) + 3 H L^2 for softmax."""
    torch.manual_seed(0)
    model = cf.create_model(name, **{"hidden_size": 32, "depth": 2, "num_heads": 2, "input_size": 16,
                                     "num_classes": 3, **kwargs}).eval()
    if isinstance(model, cf.DCDiT):  # every token kept: padded SDPA then does exactly sum L_b^2 work
        torch.nn.init.constant_(model.router.scorer[-1].bias, 50.0)
    grid = model.grid
    x, t, y = torch.randn(2, 4, *grid), torch.randint(0, 1000, (2,)), torch.randint(0, 3, (2,))
    report = cf.count_flops(model, x, t, y)
    reference = _fcm_total(model, x, t, y)
    P = getattr(model, "patch_size", 1)
    L = (grid[0] // P) * (grid[1] // P)
    softmax = 3 * 2 * L**2 * 2 * 2  # 3 * heads * L^2 * batch * depth
    assert report.total == pytest.approx(reference + softmax, rel=1e-9)
    assert report.per_sample == pytest.approx(report.total / 2)
    assert sum(report.by_component.values()) == pytest.approx(report.total)


def test_dcdit_components_and_budget_lower_the_count():
    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", hidden_size=64, depth=2, num_heads=2, input_size=16,
                            num_classes=3).eval()
    torch.nn.init.constant_(model.router.scorer[-1].bias, 0.5)  # keep ~60% before tail drop
    x, t, y = torch.randn(2, 4, 16, 16), torch.randint(0, 1000, (2,)), torch.randint(0, 3, (2,))
    reports = [cf.count_flops(model, x, t, y, rho=r) for r in (0.0, 0.2, 0.4, 0.6)]
    totals = [r.total for r in reports]
    assert all(a > b for a, b in zip(totals, totals[1:]))
    backbone = [r.by_component["backbone MLP"] for r in reports]
    kept = [int(r.kept.sum()) for r in reports]
    for b, k in zip(backbone, kept):  # MLP FLOPs are exactly linear in kept tokens
        assert b == pytest.approx(2 * k * 64 * 256 * 2 * 2)
    comp = reports[0].by_component
    for name in ("embed", "encoder", "router", "backbone attention", "backbone MLP", "de-chunk", "decoder",
                 "final layer"):
        assert comp[name] > 0, name
    assert comp["chunk"] == 0  # gathers are not FLOPs in this convention
    assert "backbone attention" in reports[0].table()


def test_sampling_tflops_with_cfg_and_lite_cfg():
    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", hidden_size=32, depth=1, num_heads=2, input_size=16,
                            num_classes=3).eval()
    torch.nn.init.constant_(model.router.scorer[-1].bias, 0.5)
    x, t, y = torch.randn(2, 4, 16, 16), torch.randint(0, 1000, (2,)), torch.randint(0, 3, (2,))
    plain = cf.flops.sampling_tflops(model, x, t, y, steps=10)
    cfg = cf.flops.sampling_tflops(model, x, t, y, steps=10, guidance="cfg")
    lite = cf.flops.sampling_tflops(model, x, t, y, steps=10, guidance="lite")
    assert plain < lite < cfg
    assert cfg == pytest.approx(2 * plain, rel=0.05)  # null label changes routing slightly
    with pytest.raises(ValueError, match="guidance"):
        cf.flops.sampling_tflops(model, x, t, y, guidance="cfg++")
