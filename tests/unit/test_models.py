"""Model specifics: registered sizes, DC-DiT options, attention backends, plan settings (the registry-wide
contract is tests/unit/test_registry.py)."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import chunkformer as cf
import chunkformer.kernels
from chunkformer.attention import chunk_attention

TINY = {"hidden_size": 32, "depth": 1, "num_heads": 2, "input_size": 16, "num_classes": 3}


def tiny(name, **kw):
    torch.manual_seed(0)
    return cf.create_model(name, **{**TINY, **kw})


def batch(B=2, C=4, grid=(16, 16), num_classes=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, C, *grid, generator=g), torch.randint(0, 1000, (B,), generator=g),
            torch.randint(0, num_classes, (B,), generator=g))


def test_registered_sizes_match_the_papers():
    expected = {"S": (384, 6, 12), "B": (768, 12, 12), "L": (1024, 16, 24), "XL": (1152, 16, 28)}
    for size, (d, heads, depth) in expected.items():
        for name in (f"DiT-{size}/2", f"DC-DiT-{size}"):
            m = cf.create_model(name, device="meta")
            assert (m.hidden_size, len(m.blocks), m.blocks[0].attn.num_heads) == (d, depth, heads)
        dc = cf.create_model(f"DC-DiT-{size}", device="meta")
        assert dc.encoder.width == dc.decoder.width == d // 4
        assert len(dc.encoder.blocks) == len(dc.decoder.blocks) == 2
    # DiT-XL/2 has about 675M parameters (Peebles & Xie)
    n = sum(p.numel() for p in cf.create_model("DiT-XL/2", device="meta").parameters())
    assert abs(n / 675e6 - 1) < 0.005


def test_overrides_unconditional_non_square_and_no_sigma():
    model = tiny("DC-DiT-S", num_classes=1, input_size=(8, 12), learn_sigma=False, router="cosine",
                 target_ratio=2)
    x = torch.randn(3, 4, 8, 12)
    out, info = model(x, torch.rand(3) * 999, None, return_info=True)
    assert out.shape == (3, 4, 8, 12) and info.router.probs.shape == (3, 96)
    assert model.router.kind == "cosine" and model.budget.target_ratio == 2
    dit = tiny("DiT-S/2", num_classes=1, input_size=(8, 12))
    assert dit(x, torch.rand(3) * 999).shape == (3, 8, 8, 12)


@pytest.mark.parametrize("name", ["DiT-S/2", "DC-DiT-S"])
def test_position_table_is_a_cache_a_model_at_another_grid_gives_the_same_output(name):
    """The sin-cos table a model keeps for its own grid is not saved, and a model run on another grid (where it
    computes the table per call) gives what a model built for that grid gives with the same weights."""
    built_for_16 = tiny(name)
    assert "pos_table" not in built_for_16.state_dict()
    built_for_8x12 = tiny(name, input_size=(8, 12))
    built_for_8x12.load_state_dict(built_for_16.state_dict())  # strict: the table is no weight
    for layer in (m for m in built_for_16.modules() if isinstance(m, torch.nn.Linear) and not m.weight.any()):
        torch.nn.init.normal_(layer.weight, std=0.02)  # zero-init output layers would hide the positions
    built_for_8x12.load_state_dict(built_for_16.state_dict())
    x, t, y = batch(grid=(8, 12))
    with torch.no_grad():
        out = built_for_8x12(x, t, y)
        torch.testing.assert_close(built_for_16(x, t, y), out)
        built_for_8x12.pos_table += 1.0  # a test that can fail: the output reads the table
        assert not torch.allclose(built_for_8x12(x, t, y), out)
        assert built_for_16.to(torch.bfloat16)(x.bfloat16(), t, y).dtype == torch.bfloat16  # the table follows .to()


def test_dcdit_with_every_token_kept_equals_backbone_on_the_unchunked_grid():
    model = tiny("DC-DiT-S", depth=2, smoothing="none").eval()
    torch.nn.init.constant_(model.router.scorer[-1].bias, 50.0)  # p = 1 everywhere: keep all
    for block in model.blocks:  # non-trivial blocks
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
    torch.nn.init.normal_(model.decoder.residual.weight, std=0.05)
    torch.nn.init.normal_(model.decoder.final.linear.weight, std=0.05)
    x, t, y = batch()
    with torch.no_grad():
        out, info = model(x, t, y, return_info=True)
        assert torch.all(info.kept == 256)
        # the same computation by hand, with no chunking at all
        c = model.t_embedder(t) + model.y_embedder(y, 2, x.device)
        tokens = model.encoder(x, c)
        h = tokens + cf.grid.sincos_embed(cf.grid.grid_coords((16, 16)), 32)
        for block in model.blocks:
            h = block(h, c)  # dense (B, L, d) path
        z = model.norm(h) + model.decoder.residual(tokens)
        ref = cf.grid.to_grid(z, (16, 16))
        for blk in model.decoder.blocks:
            ref = blk(ref, c)
        ref = cf.grid.to_grid(model.decoder.final(model.decoder.norm(cf.grid.to_tokens(ref)), c), (16, 16))
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["packed", "padded", "fixed"])
def test_plan_modes_give_the_same_model_output(mode):
    ref_model = tiny("DC-DiT-S", depth=2)
    torch.nn.init.normal_(ref_model.router.scorer[-1].weight, std=1.0)  # logits around 0: keep about half
    torch.nn.init.zeros_(ref_model.router.scorer[-1].bias)
    for block in ref_model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
    torch.nn.init.normal_(ref_model.decoder.final.linear.weight, std=0.05)
    other = tiny("DC-DiT-S", depth=2, plan_mode=mode, capacity=256 if mode == "fixed" else None)
    other.load_state_dict(ref_model.state_dict())
    x, t, y = batch()
    with torch.no_grad():
        a, info = ref_model.eval()(x, t, y, return_info=True)
        b = other.eval()(x, t, y)
    assert 2 < info.kept.float().mean() < 256
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_capacity_caps_a_dynamic_layout_like_the_fixed_one(mode):
    """A memory guard: in packed / padded mode ``capacity`` bounds the tokens a sample keeps, with the
    same choice (and so the same output) as fixed capacity."""
    ref = tiny("DC-DiT-S", depth=2, plan_mode="fixed", capacity=20)
    torch.nn.init.constant_(ref.router.scorer[-1].bias, 0.3)  # keeps far more than 20 of 256
    torch.nn.init.normal_(ref.decoder.final.linear.weight, std=0.05)
    capped = tiny("DC-DiT-S", depth=2, plan_mode=mode, capacity=20)
    capped.load_state_dict(ref.state_dict())
    x, t, y = batch()
    with torch.no_grad():
        a, info_a = ref.eval()(x, t, y, return_info=True)
        b, info_b = capped.eval()(x, t, y, return_info=True)
    assert torch.equal(info_b.plan.lengths, torch.full((2,), 20)) and info_b.plan.width == 20
    assert torch.equal(info_a.plan.kept_mask, info_b.plan.kept_mask)
    assert torch.allclose(a, b, atol=1e-5)


def test_fill_capacity_runs_unmasked_and_keeps_exactly_capacity(monkeypatch):
    """fill_capacity: every sample keeps ``capacity`` tokens; when the router keeps at least that many the
    model is the fixed-capacity one, now without an attention mask."""
    import chunkformer.attention as attention

    masks = []
    real = attention.masked_sdpa
    monkeypatch.setattr(attention, "masked_sdpa", lambda q, k, v, mask: masks.append(mask) or real(q, k, v, mask))
    ref = tiny("DC-DiT-S", depth=2, plan_mode="fixed", capacity=20)
    torch.nn.init.constant_(ref.router.scorer[-1].bias, 0.3)  # keeps far more than 20 of 256
    torch.nn.init.normal_(ref.decoder.final.linear.weight, std=0.05)
    filled = tiny("DC-DiT-S", depth=2, plan_mode="fixed", capacity=20, fill_capacity=True)
    filled.load_state_dict(ref.state_dict())
    x, t, y = batch()
    with torch.no_grad():
        a = ref.eval()(x, t, y)
        masks.clear()
        b, info = filled.eval()(x, t, y, return_info=True)
    assert masks and all(m is None for m in masks)  # every block's attention ran unmasked
    assert info.plan.full and torch.allclose(a, b, atol=1e-5)
    torch.nn.init.constant_(filled.router.scorer[-1].bias, -30.0)  # the router keeps almost nothing
    with torch.no_grad():
        _, info = filled(x, t, y, return_info=True)
    assert torch.equal(info.plan.lengths, torch.full((2,), 20))
    with pytest.raises(ValueError, match="fill_capacity=True needs plan_mode='fixed'"):
        tiny("DC-DiT-S", fill_capacity=True)


def packed_case(requires_grad: bool = False):
    """``(mask, plan, q, k, v)``: 3 samples of a 5x8 grid, about 40% kept, packed ``(T, 2, 8)`` inputs."""
    torch.manual_seed(0)
    mask = torch.rand(3, 40) < 0.4
    mask[:, 0] = True
    plan = cf.ChunkPlan.from_mask(mask, grid=(5, 8))
    T = int(mask.sum())
    return (mask, plan, *(torch.randn(T, 2, 8, requires_grad=requires_grad) for _ in range(3)))


def test_attention_backends_agree_on_packed_sequences():
    _, plan, q, k, v = packed_case(requires_grad=True)
    outs = {b: chunk_attention(q, k, v, plan, backend=b) for b in ("sdpa", "math")}
    # FlexAttention runs forward-only on CPU
    outs["flex"] = chunk_attention(q.detach(), k.detach(), v.detach(), plan, backend="flex")
    for name, out in outs.items():
        assert torch.allclose(out, outs["math"], atol=1e-5), name
    # gradients agree between the trainable CPU paths
    g_sdpa = torch.autograd.grad(outs["sdpa"].square().sum(), (q, k, v))
    g_math = torch.autograd.grad(chunk_attention(q, k, v, plan, backend="math").square().sum(), (q, k, v))
    for a, b in zip(g_sdpa, g_math):
        assert torch.allclose(a, b, atol=1e-5)
    assert cf.attention.resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"


def test_varlen_backend_says_where_it_runs_and_matches_math_on_a_gpu():
    mask, plan, q, k, v = packed_case()
    with pytest.raises(ValueError, match="backend='varlen' runs on CUDA in fp16/bf16"):
        chunk_attention(q, k, v, plan, backend="varlen")
    if not torch.cuda.is_available():
        pytest.skip("the varlen kernels need a GPU; on the CPU only the error is checked")
    plan = cf.ChunkPlan.from_mask(mask.cuda(), grid=(5, 8))
    q, k, v = (t.cuda().bfloat16().requires_grad_() for t in (q, k, v))
    out = chunk_attention(q, k, v, plan, backend="varlen")
    ref = chunk_attention(q, k, v, plan, backend="math")
    assert torch.allclose(out.float(), ref.float(), atol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    refs = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    for a, b in zip(grads, refs):
        assert torch.allclose(a.float(), b.float(), atol=5e-2)


def test_state_dicts_from_compile_and_ddp_wrappers_load(tmp_path):
    model = tiny("DiT-S/2")
    state = model.state_dict()
    wrapped = {f"module._orig_mod.{k}": v for k, v in state.items()}
    torch.save({"model": wrapped, "ema": {f"_orig_mod.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pt")
    fresh = tiny("DiT-S/2", class_dropout_prob=0.1)
    torch.nn.init.normal_(fresh.final_layer.linear.weight)
    cf.load_weights(fresh, tmp_path / "ckpt.pt")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    assert cf.models.clean_state_dict({"module.blocks.0.x": 1, "_orig_mod.y": 2}) == {"blocks.0.x": 1, "y": 2}


def test_create_model_errors_say_what_to_do():
    with pytest.raises(ValueError, match="unknown model 'dit-xl'.*Did you mean"):
        cf.create_model("dit-xl")
    with pytest.raises(TypeError, match="bad override for DiT-S/2"):
        cf.create_model("DiT-S/2", hiden_size=3)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        cf.create_model("DiT-S/8", input_size=12)
    model = tiny("DC-DiT-S")
    with pytest.raises(ValueError, match="in_channels=4"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="rho"):
        model(torch.randn(2, 4, 16, 16), torch.zeros(2), rho=1.5)
    with pytest.raises(ValueError, match="capacity"):
        tiny("DC-DiT-S", plan_mode="fixed")
    with pytest.raises(ValueError, match="num_classes"):
        tiny("DC-DiT-S", num_classes=0)


@pytest.mark.parametrize("fill", [False, True])
def test_fixed_capacity_model_compiles_fullgraph_with_bounded_recompiles(fill):
    code = f"""
        import torch, chunkformer as cf
        torch.manual_seed(0)
        model = cf.create_model("DC-DiT-S", hidden_size=32, depth=1, num_heads=2, input_size=8,
                                num_classes=3, plan_mode="fixed", capacity=24, fill_capacity={fill}).eval()
        compiles = 0
        def backend(gm, example_inputs):
            global compiles
            compiles += 1
            return gm.forward
        fn = torch.compile(model, fullgraph=True, backend=backend)
        x, t, y = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 3, (2,))
        with torch.no_grad():
            for rho in (0.0, 0.4, 0.2):  # three budgets, as (B,) tensors
                r = torch.full((2,), rho)
                out = fn(x, t, y, rho=r)
                assert torch.allclose(out, model(x, t, y, rho=r), atol=1e-5)
        print(compiles)
    """
    env = {k: v for k, v in os.environ.items() if k != "CHUNKFORMER_TYPECHECK"}
    env["CHUNKFORMER_TYPECHECK"] = "0"
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert int(res.stdout.strip().splitlines()[-1]) <= 2  # one graph, at most one recompile


def test_kept_tokens_fall_as_rho_rises():
    model = tiny("DC-DiT-S")
    torch.nn.init.constant_(model.router.scorer[-1].bias, 0.5)
    x, t, y = batch()
    kept = [model(x, t, y, rho=r, return_info=True)[1].kept.sum().item() for r in (0.0, 0.3, 0.6)]
    assert kept[0] > kept[1] > kept[2]
    assert math.isclose(kept[2], kept[0] * 0.4, rel_tol=0.1)


def test_router_and_residual_stay_fp32_when_the_model_is_cast_to_bf16():
    model = tiny("DC-DiT-S").to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.router.parameters())
    assert model.decoder.residual.weight.dtype == torch.float32
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    x, t, y = batch()
    out, info = model(x.bfloat16(), t, y, return_info=True)
    assert out.dtype == torch.bfloat16 and info.router.probs.dtype == torch.float32
    assert torch.isfinite(out.float()).all()


def test_a_whole_guided_sampling_step_is_one_graph_in_fixed_capacity_mode():
    """Lite-CFG forward + DDIM update, fixed capacity: captured whole (no graph break = no host sync in Python)."""
    code = """
        import torch, chunkformer as cf
        from chunkformer.diffusion import create_diffusion
        from chunkformer.diffusion.guidance import guided_model_fn
        torch.manual_seed(0)
        model = cf.create_model("DC-DiT-S", hidden_size=32, depth=1, num_heads=2, input_size=8, num_classes=3,
                                plan_mode="fixed", capacity=16).eval()
        process = create_diffusion().respace(10)
        fn = guided_model_fn(model, torch.tensor([0, 1]), scale=2.0, rho=0.0, uncond_rho=0.5)
        def step(x, t):
            return process.ddim_step(fn(x, t), x, 5)
        step_fn = torch.compile(step, fullgraph=True, backend="eager")
        x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 500)
        with torch.no_grad():
            print(float((step_fn(x, t) - step(x, t)).abs().max()))
    """
    env = {k: v for k, v in os.environ.items() if k != "CHUNKFORMER_TYPECHECK"}
    env["CHUNKFORMER_TYPECHECK"] = "0"
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert float(res.stdout.strip().splitlines()[-1]) == 0.0


def test_auto_attention_prefers_flash_then_torchs_varlen_kernels_on_a_gpu(monkeypatch):
    attention = cf.attention
    cuda = torch.device("cuda")  # the choice only; nothing runs there
    monkeypatch.setattr(attention, "_HAS_FLASH", False)
    monkeypatch.setattr(attention, "_varlen_runs_on", lambda device: True)
    assert attention.resolve_backend("auto", cuda, torch.bfloat16) == "varlen"
    assert attention.resolve_backend("auto", cuda, torch.float32) == "sdpa"  # the flash kernels need 16 bits
    assert attention.resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    assert attention.resolve_backend("sdpa", cuda, torch.bfloat16) == "sdpa"  # an explicit choice stands
    monkeypatch.setattr(attention, "_varlen_runs_on", lambda device: False)  # pre-Ampere, or an older torch
    assert attention.resolve_backend("auto", cuda, torch.bfloat16) == "sdpa"
    monkeypatch.setattr(attention, "_HAS_FLASH", True)
    assert attention.resolve_backend("auto", cuda, torch.bfloat16) == "flash"


def test_set_plan_validates_the_settings_together_and_attribute_assignment_is_refused():
    model = tiny("DC-DiT-S")
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])
    assert model.set_plan(mode="fixed", capacity=20, fill=True) is model
    with torch.no_grad():
        _, info = model(x, t, y, return_info=True)
    assert info.plan.mode == "fixed" and torch.equal(info.plan.lengths, torch.full((2,), 20))
    model.set_plan(mode="packed", capacity=None, fill=False)
    with torch.no_grad():
        _, info = model(x, t, y, return_info=True)
    assert info.plan.mode == "packed"
    for bad in ({"mode": "fixed"}, {"fill": True}, {"capacity": 0}, {"mode": "dense"}):
        with pytest.raises(ValueError):
            model.set_plan(**bad)
    assert (model.plan_mode, model.capacity, model.fill_capacity) == ("packed", None, False)  # unchanged by refusals
    for name in ("plan_mode", "capacity", "fill_capacity"):
        with pytest.raises(AttributeError, match="set_plan"):
            setattr(model, name, 8)


def test_a_compiled_training_step_recomputes_the_checkpointed_scaffold_and_block_to_the_same_gradients():
    """checkpoint_scaffold and checkpoint_blocks under torch.compile (one graph: dynamo and AOT autograd trace
    the checkpointed regions; fixed capacity): the loss and every gradient of the eager step without them."""
    code = """
        import torch, chunkformer as cf
        torch.manual_seed(0)
        model = cf.create_model("DC-DiT-S", hidden_size=32, depth=1, num_heads=2, input_size=8, num_classes=3,
                                plan_mode="fixed", capacity=16).train()
        with torch.no_grad():  # zero-init output layers would leave the scaffold without gradients
            for p in model.parameters():
                p.normal_(0, 0.2)
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 2])
        rho = torch.tensor([0.0, 0.3])
        def step(run):
            model.zero_grad(set_to_none=True)
            out, info = run(x, t, y, rho=rho, return_info=True)
            loss = out.square().mean() + 0.03 * info.ratio_loss
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        loss, grads = step(model)
        model.checkpoint_scaffold, model.checkpoint_blocks = True, 1
        loss_ck, grads_ck = step(torch.compile(model, backend="aot_eager", fullgraph=True))
        assert grads.keys() == grads_ck.keys() and any(n.startswith("encoder.") for n in grads)
        worst = max(float((grads_ck[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in grads.items())
        print(float((loss_ck - loss).abs()), worst)
    """
    env = {**os.environ, "CHUNKFORMER_TYPECHECK": "0"}  # compiled models run without the jaxtyping wrappers
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    loss_gap, worst = map(float, res.stdout.strip().splitlines()[-1].split())
    assert loss_gap < 1e-5 and worst < 1e-4
