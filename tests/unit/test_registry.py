"""Every ``chunkformer.models.list_models()`` entry, built at tiny size (in timm's manner): the forward
contract, the ``save_pretrained`` / ``create_model(dir)`` round trip and the FLOP count.

Weights are redrawn from a fixed seed after construction, so no zero-initialised layer (the final layers,
the de-chunker's residual) makes an output trivially equal across models or budgets.
"""

import pytest
import torch

import chunkformer as cf
from chunkformer.models import list_models

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2, "input_size": 16, "num_classes": 5}
B, C, GRID = 3, 4, (16, 16)


def build(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cf.create_model(name, **{**TINY, **kw})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    if isinstance(model, cf.DCDiT):  # a router that keeps most tokens, so a tail drop has something to drop
        torch.nn.init.constant_(model.router.scorer[-1].bias, 3.0)
    return model.eval()


def inputs():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(B, C, *GRID, generator=g), torch.randint(0, 1000, (B,), generator=g),
            torch.randint(0, TINY["num_classes"], (B,), generator=g))


def test_the_registry_lists_both_families_at_every_size():
    names = list_models()
    assert names == sorted(names) and len(names) == len(set(names))
    for size in ("S", "B", "L", "XL"):
        assert f"DC-DiT-{size}" in names and all(f"DiT-{size}/{p}" in names for p in (2, 4, 8))


@pytest.mark.parametrize("name", list_models())
def test_forward_contract(name):
    model = build(name)
    x, t, y = inputs()
    with torch.no_grad():
        out, info = model(x, t, y, return_info=True)
        plain = model(x, t, y)
    assert out.shape == (B, 2 * C, *GRID) and out.dtype == torch.float32  # learned sigma: 2 * in_channels
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3
    torch.testing.assert_close(plain, out, rtol=0, atol=0)  # return_info changes nothing but the return
    assert info.ratio_loss.ndim == 0 and info.kept.shape == (B,) and info.cached is False
    assert torch.all((info.kept >= 1) & (info.kept <= info.tokens))
    if isinstance(model, cf.DCDiT):
        assert info.tokens == 16 * 16 and info.router.probs.shape == (B, 256) and info.plan is not None
        assert torch.equal(info.kept, info.router.mask.sum(1)) and torch.equal(info.kept, info.plan.lengths)
    else:
        patch = int(name.split("/")[1])
        assert info.tokens == (16 // patch) ** 2 and info.router is None and torch.all(info.kept == info.tokens)


@pytest.mark.parametrize("name", list_models())
def test_save_pretrained_and_create_model_round_trip(name, tmp_path):
    model = build(name)
    cf.save_pretrained(model, tmp_path / "ckpt")
    again = cf.create_model(str(tmp_path / "ckpt")).eval()
    assert type(again) is type(model) and again.config == model.config
    assert list(again.state_dict()) == list(model.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        a, b = model(x, t, y), again(x, t, y)
    assert a.abs().mean() > 1e-3 and torch.equal(a, b)


@pytest.mark.parametrize("name", list_models())
def test_flop_count_is_positive_and_a_dc_dit_costs_less_at_a_higher_rho(name):
    model = build(name)
    x, t, y = inputs()
    with torch.no_grad():
        full = cf.count_flops(model, x, t, y)
        assert full.total > 0 and full.per_sample == pytest.approx(full.total / B)
        assert full.by_component and all(v >= 0 for v in full.by_component.values())
        if not isinstance(model, cf.DCDiT):
            return
        dropped = cf.count_flops(model, x, t, y, rho=0.5)
    assert torch.all(dropped.kept < full.kept)
    assert 0 < dropped.total < full.total


@pytest.mark.parametrize("name", list_models())
def test_backward_reaches_the_blocks_and_for_a_dc_dit_the_router(name):
    model = build(name).train()
    x, t, y = inputs()
    out, info = model(x, t, y, return_info=True)
    (out.square().mean() + info.ratio_loss).backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if isinstance(model, cf.DCDiT):
        assert sum(p.grad.abs().sum() for p in model.router.parameters() if p.grad is not None) > 0
