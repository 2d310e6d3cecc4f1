"""ChunkEncoder / DeChunkDecoder on rank-1, -2 and -3 grids; start-up identity; bad input."""

import math

import pytest
import torch
from conftest import grids
from hypothesis import given
from hypothesis import strategies as st

from chunkformer import Chunked, ChunkEncoder, DeChunkDecoder, Router, TimestepAdaptiveBudget


@given(grids(max_tokens=64), st.integers(1, 3), st.sampled_from(["packed", "padded", "fixed"]), st.floats(0, 0.6))
def test_encoder_router_plan_decoder_shapes_on_every_rank(grid, B, mode, rho):
    torch.manual_seed(0)
    ndim, d, C = len(grid), 32, 3
    enc, router, dec = ChunkEncoder(C, d, ndim=ndim), Router(d, ndim=ndim), DeChunkDecoder(d, 2 * C, ndim=ndim)
    x, c = torch.randn(B, C, *grid), torch.randn(B, d)
    tokens = enc(x, c)
    L = math.prod(grid)
    assert tokens.shape == (B, L, d)
    out = router(tokens, grid, rho=rho)
    capacity = max(1, L // 2) if mode == "fixed" else None
    chunked = Chunked.from_router(out, tokens, mode=mode, capacity=capacity)
    plan = chunked.plan
    y = plan.chunk(tokens) + plan.position_embedding(d)
    assert dec(y, chunked, c).shape == (B, 2 * C, *grid)


def test_encoder_widths_follow_the_paper():
    enc = ChunkEncoder(4, 384)
    assert enc.embed.out_channels == 96 and enc.embed.kernel_size == (3, 3)
    assert [b.conv1.out_channels for b in enc.blocks] == [96, 96]  # inner width min(in, out)
    assert [b.conv2.out_channels for b in enc.blocks] == [96, 384]  # last block lifts to d
    dec = DeChunkDecoder(384, 8)
    assert [b.conv1.out_channels for b in dec.blocks] == [96, 96]  # first block narrows in conv1
    assert dec.residual.weight.dtype == torch.float32 and dec.final.linear.out_features == 8


def test_new_decoder_starts_from_zero_output_and_zero_residual():
    """Zero-init final layer and residual projection: a new model predicts zeros."""
    torch.manual_seed(0)
    enc, router, dec = ChunkEncoder(4, 32), Router(32), DeChunkDecoder(32, 8)
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 32)
    tokens = enc(x, c)
    out = router(tokens, (8, 8))
    chunked = Chunked.from_router(out, tokens)
    plan = chunked.plan
    assert torch.equal(dec(plan.chunk(tokens), chunked, c), torch.zeros(2, 8, 8, 8))
    merged = dec.merge(plan.chunk(tokens), chunked)  # residual starts at zero
    assert torch.allclose(merged, plan.plug_back(plan.gather(tokens)), atol=1e-6)


def test_a_few_steps_of_training_lower_the_loss():
    torch.manual_seed(0)
    d, grid = 32, (8, 8)
    enc, router, dec = ChunkEncoder(1, d), Router(d), DeChunkDecoder(d, 1)
    params = [*enc.parameters(), *router.parameters(), *dec.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    budget = TimestepAdaptiveBudget()
    x = torch.randn(8, 1, *grid)
    target = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    c = torch.zeros(8, d)
    losses = []
    for _ in range(30):
        tokens = enc(x, c)
        out = router(tokens, grid)
        chunked = Chunked.from_router(out, tokens)
        pred = dec(chunked.plan.chunk(tokens), chunked, c)
        loss = ((pred - target) ** 2).mean() + budget.ratio_weight * budget.ratio_loss(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_scaffold_rejects_bad_input():
    enc = ChunkEncoder(4, 32)
    with pytest.raises(ValueError, match="in_channels=4"):
        enc(torch.randn(2, 3, 8, 8), torch.randn(2, 32))
    with pytest.raises(ValueError, match="rank-2 grid"):
        enc(torch.randn(2, 4, 8, 8, 8), torch.randn(2, 32))
    with pytest.raises(ValueError, match="depth"):
        ChunkEncoder(4, 32, depth=0)


def test_missing_conditioning_and_bad_decoder_settings_are_named():
    enc = ChunkEncoder(4, 32)
    with pytest.raises(ValueError, match=r"pass c of shape \(batch, 32\)"):
        enc(torch.randn(2, 4, 8, 8))
    assert ChunkEncoder(4, 32, cond_dim=0)(torch.randn(2, 4, 8, 8)).shape == (2, 64, 32)
    with pytest.raises(ValueError, match="smoothing"):
        DeChunkDecoder(32, 8, smoothing="gaussian")
    with pytest.raises(ValueError, match="sigma"):
        DeChunkDecoder(32, 8, sigma=-1)


def test_list_grids_work_with_shape_checks_on():
    router = Router(16)
    out = router(torch.randn(2, 64, 16), [8, 8])
    assert out.grid == (8, 8)


def test_rmsnorm_keeps_the_fused_path_under_autocast_and_matches_fp32():
    """bf16 activations with an fp32 weight: no 'Mismatch dtype' fallback warning, and the value of the
    fp32 norm up to bf16 rounding; fp32 inputs are untouched (the weight stays fp32)."""
    import warnings

    from chunkformer.precision import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 16)
    reference = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight  # written out
    assert torch.allclose(norm(x), reference, atol=1e-6) and norm.weight.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warns; this must not
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, rtol=2e-2, atol=2e-2)
    import chunkformer as cf

    model = cf.create_model("DC-DiT-S", hidden_size=32, depth=1, num_heads=2, input_size=8, num_classes=3)
    assert all(type(m) is RMSNorm for m in model.modules() if isinstance(m, torch.nn.RMSNorm))


@given(st.sampled_from([(8, 8), (6, 10), (16,)]), st.integers(1, 3), st.sampled_from(["packed", "padded", "fixed"]),
       st.sampled_from([None, "random"]), st.floats(0, 0.6),
       st.sampled_from([(True, 0), (False, 1), (True, 4)]))
def test_checkpointing_gives_the_same_gradients_and_holds_less(grid, B, mode, router, rho, recompute):
    """checkpoint_scaffold and checkpoint_blocks, alone and together (up to all 4 of DC-DiT-tiny's blocks)."""
    from chunkformer import create_model

    torch.manual_seed(0)
    L = math.prod(grid)
    model = create_model("DC-DiT-tiny", input_size=grid, in_channels=2, num_classes=5, router=router,
                         plan_mode=mode, capacity=max(1, L // 2) if mode == "fixed" else None).train()
    with torch.no_grad():  # every weight random: zero-init output layers would leave the scaffold without gradients
        for p in model.parameters():
            p.normal_(0, 0.2)
    x, t, y = torch.randn(B, 2, *grid), torch.randint(0, 1000, (B,)), torch.randint(0, 5, (B,))
    drop = torch.zeros(B, dtype=torch.bool)

    def step(checkpointed: bool):
        model.checkpoint_scaffold, model.checkpoint_blocks = recompute if checkpointed else (False, 0)
        model.zero_grad(set_to_none=True)
        held = []
        torch.manual_seed(1)  # the random router draws: the same in both runs (and in the recomputation)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(t.numel()) or t, lambda t: t):
            out, info = model(x, t, y, rho=rho, return_info=True, label_drop=drop)
            loss = out.square().mean() + 0.03 * info.ratio_loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(held)

    loss, grads, held = step(False)
    loss_ck, grads_ck, held_ck = step(True)
    assert torch.equal(loss, loss_ck) and grads.keys() == grads_ck.keys()
    assert any(n.startswith("encoder.") and g.abs().sum() > 0 for n, g in grads.items())  # the scaffold learns
    for name, g in grads.items():
        assert torch.equal(g, grads_ck[name]), name
    assert held_ck < held


@given(st.sampled_from([None, "random", "cosine"]), st.sampled_from(["packed", "fixed"]))
def test_checkpointed_scaffold_regions_hand_back_plain_tensors(router, mode):
    """Each region checkpoint_scaffold recomputes returns a tensor or a tuple of tensors, never the router's
    tensorclass (whose tensors torch.compile's tracer loses across a checkpoint in torch 2.11), and the
    router's decision rebuilt from them is the one an unchecked forward makes."""
    from chunkformer import create_model
    from chunkformer.models import dcdit

    returned = []

    def watched(fn, *args, **kwargs):
        out = torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)
        returned.append(out)
        return out

    torch.manual_seed(0)
    model = create_model("DC-DiT-tiny", input_size=(8, 8), in_channels=2, num_classes=5, router=router,
                         plan_mode=mode, capacity=32 if mode == "fixed" else None).train()
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4])
    infos = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dcdit, "checkpoint", watched)
        for checkpointed in (False, True):
            model.checkpoint_scaffold = checkpointed
            torch.manual_seed(1)
            out, info = model(x, t, y, rho=0.2, return_info=True, label_drop=torch.zeros(2, dtype=torch.bool))
            infos.append(info.router)
    assert len(returned) == 2  # the encoder and the router (the decoder runs last: never recomputed)
    for out in returned:
        parts = out if isinstance(out, tuple) else (out,)
        assert all(type(p) is torch.Tensor for p in parts), [type(p).__name__ for p in parts]
    plain, rebuilt = infos
    assert type(rebuilt) is type(plain) and rebuilt.grid == plain.grid
    assert rebuilt.batch_size == plain.batch_size
    for field in ("probs", "mask", "natural_mask", "confidence"):
        assert torch.equal(getattr(rebuilt, field), getattr(plain, field)), field
