"""Routers: always-kept ends, fp32 under autocast, gradients, variants per rank, bad input."""

import math

import pytest
import torch
from conftest import grids
from hypothesis import given
from hypothesis import strategies as st

from chunkformer import Chunked, ChunkEncoder, DeChunkDecoder, Router, TimestepAdaptiveBudget


def kinds_for(ndim):
    return ["cosine1d", "random"] if ndim == 1 else ["predictability", "cosine", "random"]


@given(grids(), st.integers(1, 3), st.floats(0.0, 0.9), st.data())
def test_router_output_contract(grid, B, rho, data):
    ndim = len(grid)
    kind = data.draw(st.sampled_from(kinds_for(ndim)))
    torch.manual_seed(0)
    router = Router(16, ndim=ndim, kind=kind, init_bias=data.draw(st.floats(-3, 3)))
    x = torch.randn(B, math.prod(grid), 16)
    out = router(x, grid, rho=rho)
    L = math.prod(grid)
    assert out.probs.shape == out.mask.shape == out.natural_mask.shape == out.confidence.shape == (B, L)
    assert out.probs.dtype == torch.float32 and out.mask.dtype == torch.bool
    assert out.mask[:, 0].all() and out.mask[:, -1].all()
    assert torch.all(out.probs[:, [0, -1]] == 1)
    assert torch.equal(out.natural_mask, out.probs > 0.5)
    assert not (out.mask & ~out.natural_mask).any()
    conf = torch.where(out.natural_mask, out.probs, 1 - out.probs)
    assert torch.equal(out.confidence, conf)
    assert torch.all(out.confidence >= 0.5)
    assert out.grid == tuple(grid)


def test_router_runs_fp32_under_bf16_autocast():
    router = Router(32)
    x = torch.randn(2, 64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x, (8, 8))
    assert out.probs.dtype == torch.float32
    assert torch.allclose(out.probs, router(x, (8, 8)).probs)


def test_predictability_router_starts_near_a_quarter():
    torch.manual_seed(0)
    router = Router(64)
    p = router.scores(torch.randn(4, 256, 64), (16, 16))
    assert 0.15 < p.mean().item() < 0.4  # sigmoid(-1.1) = 0.25 at initialisation


def test_cosine1d_router_compares_each_token_with_its_predecessor():
    router = Router(8, ndim=1)
    x = torch.randn(1, 6, 8)
    x[0, 3] = x[0, 2] * 5  # same direction as its predecessor: cosine 1 -> p = 0
    x[0, 4] = -x[0, 3]  # opposite direction: cosine -1 -> p = 1
    p = router.scores(x, (6,))
    assert p[0, 0] == 1.0
    assert p[0, 3].item() == pytest.approx(0.0, abs=1e-6)
    assert p[0, 4].item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind,grid", [("predictability", (8, 8)), ("cosine", (8, 8)), ("cosine1d", (64,)),
                                        ("predictability", (4, 4, 4)), ("cosine", (4, 4, 4))])
def test_router_gets_gradients_through_ste_and_ratio_loss(kind, grid):
    torch.manual_seed(0)
    ndim, d = len(grid), 32
    enc = ChunkEncoder(3, d, ndim=ndim)
    router = Router(d, ndim=ndim, kind=kind)
    dec = DeChunkDecoder(d, 3, ndim=ndim)
    torch.nn.init.normal_(dec.final.linear.weight, std=0.1)  # un-zero the output so a loss reaches the gate
    x, c = torch.randn(2, 3, *grid), torch.randn(2, d)
    tokens = enc(x, c)
    out = router(tokens, grid)
    chunked = Chunked.from_router(out, tokens)
    y = chunked.plan.chunk(tokens) * 2.0  # stand-in backbone
    (dec(y, chunked, c) ** 2).mean().backward()
    grads = [p.grad for p in router.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0  # through STE(c_sel)
    router.zero_grad()
    TimestepAdaptiveBudget().ratio_loss(router(tokens.detach(), grid)).backward()
    grads = [p.grad for p in router.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0  # through G = mean(p)


def test_router_rejects_bad_input_with_named_arguments():
    router = Router(16)
    with pytest.raises(ValueError, match="width 8 .* dim=16"):
        router(torch.randn(2, 16, 8), (4, 4))
    with pytest.raises(ValueError, match="17 tokens but grid"):
        router(torch.randn(2, 17, 16), (4, 4))
    with pytest.raises(ValueError, match="rank 1 .* ndim=2"):
        router(torch.randn(2, 16, 16), (16,))
    with pytest.raises(ValueError, match="rho"):
        router(torch.randn(2, 16, 16), (4, 4), rho=1.0)
    with pytest.raises(ValueError, match="router probabilities must be finite"):
        router(torch.full((2, 16, 16), float("nan")), (4, 4))
    with pytest.raises(ValueError, match="kind must be one of"):
        Router(16, kind="topk")
    with pytest.raises(ValueError, match="cosine1d"):
        Router(16, ndim=2, kind="cosine1d")
    with pytest.raises(ValueError, match="ndim must be 1, 2 or 3"):
        Router(16, ndim=4)


@given(st.floats(0.05, 0.95), st.integers(0, 2**31 - 1))
def test_random_router_keeps_its_fraction_whatever_the_content(keep, seed):
    """Content-blind: two unrelated inputs get the same boundaries from the same RNG state, and the
    kept fraction matches keep_fraction within 5 binomial standard deviations."""
    router = Router(8, kind="random", keep_fraction=keep)
    assert not list(router.parameters())
    B, grid = 4, (32, 32)
    L = math.prod(grid)
    torch.manual_seed(seed)
    a = router(torch.randn(B, L, 8), grid)
    torch.manual_seed(seed)
    b = router(100 * torch.randn(B, L, 8) + 3, grid)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.probs, b.probs)
    inner = a.natural_mask[:, 1:-1].float()  # first and last are forced
    n = inner.numel()
    assert abs(inner.mean().item() - keep) <= 5 * math.sqrt(keep * (1 - keep) / n) + 1e-6
    # the tail drop still drops the lowest-p kept tokens
    torch.manual_seed(seed)
    dropped = router(torch.randn(B, L, 8), grid, rho=0.5)
    assert (dropped.mask.sum(-1) <= a.mask.sum(-1)).all()


def test_random_router_checks_keep_fraction_and_dcdit_uses_the_target_ratio():
    from chunkformer import DCDiT
    with pytest.raises(ValueError, match="keep_fraction"):
        Router(8, kind="random", keep_fraction=0.0)
    model = DCDiT(input_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                  router="random", target_ratio=2.0)
    assert model.router.kind == "random" and model.router.keep_fraction == 0.5


@given(st.sampled_from(["keep", "selected"]), st.integers(0, 2**31 - 1))
def test_gate_grad_sets_the_confidence_gradient_and_never_the_value(gate_grad, seed):
    torch.manual_seed(seed % 1000)
    router = Router(16, init_bias=0.0, gate_grad=gate_grad)
    x = torch.randn(2, 36, 16)
    out = router(x, (6, 6))
    inner = torch.ones(36, dtype=torch.bool)
    inner[[0, -1]] = False  # the ends are forced to p = 1: no gradient there
    (grad,) = torch.autograd.grad(out.confidence.sum(), out.probs)  # d sum(c) / d p, per token
    sign = torch.ones_like(grad) if gate_grad == "keep" else torch.where(out.natural_mask, 1.0, -1.0)
    assert torch.equal(grad[:, inner], sign[:, inner])
    assert torch.equal(out.confidence, torch.where(out.natural_mask, out.probs, 1 - out.probs))


@pytest.mark.parametrize("init", ["oriented", "release"])
def test_router_options_leave_the_forward_of_given_weights_unchanged(init):
    torch.manual_seed(0)
    reference = Router(32, init="release", gate_grad="selected")
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in reference.state_dict().items()}
    reference.load_state_dict(state)
    other = Router(32, init=init, gate_grad="keep")
    other.load_state_dict(state)
    x = torch.randn(2, 64, 32)
    a, b = reference(x, (8, 8)), other(x, (8, 8))
    assert torch.equal(a.probs, b.probs) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.confidence, b.confidence)


def _spot_tokens(seed: int, d: int = 32, size: int = 16):
    """A flat grid of one token value with a 3x3 patch of other content: tokens (1, L, d), the patch's
    mask, and the tokens the router's two 3x3 convs see as flat (>= 3 cells from the patch, 2 from edges)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, d, generator=g).expand(1, size * size, d).clone()  # one value everywhere
    r, c = torch.randint(2, size - 5, (2,), generator=g).tolist()
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    spot = (rows >= r) & (rows < r + 3) & (cols >= c) & (cols < c + 3)
    x[0, spot.flatten()] = 3 * torch.randn(9, d, generator=g)
    near = (rows >= r - 3) & (rows < r + 6) & (cols >= c - 3) & (cols < c + 6)
    inner = (rows >= 2) & (rows < size - 2) & (cols >= 2) & (cols < size - 2)
    return x, spot.flatten(), (inner & ~near).flatten()


@given(st.integers(0, 2**31 - 1))
def test_oriented_router_starts_keeping_what_its_neighbours_do_not_predict(seed):
    torch.manual_seed(seed % 10_000)
    x, spot, flat = _spot_tokens(seed)
    p = Router(32, init="oriented").scores(x, (16, 16))[0]
    assert flat.sum() > 20
    assert p[spot].mean() > p[flat].mean() + 0.1  # the patch is what its neighbours do not predict
    assert p[flat].std() < 1e-4 and (p[flat] < 0.5).all()  # a flat region: r = 0, one low score


def test_oriented_router_builds_on_the_meta_device_with_any_group_layout():
    for dim in (4, 8, 24, 64, 96):
        Router(dim, device="meta")
        Router(dim, norm_groups=3)


@pytest.mark.parametrize("init,gate_grad", [("oriented", "keep"), ("release", "selected"), ("oriented", "selected")])
def test_models_pass_the_router_settings_through_and_keep_them_in_their_config(init, gate_grad, tmp_path):
    import chunkformer as cf
    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", input_size=8, in_channels=1, depth=1, num_classes=3, router_init=init,
                            gate_grad=gate_grad)
    wrapped = cf.wrap(cf.create_model("DiT-S/2", input_size=8, in_channels=1, depth=1, num_classes=3),
                      router_init=init, gate_grad=gate_grad)
    for m in (model, wrapped):
        assert (m.router.init, m.router.gate_grad) == (init, gate_grad)
    # the oriented predictor starts as the neighbours' mean: zero at its centre tap; PyTorch's init is not
    centre = model.router.predictor.weight[:, :, 1, 1]
    assert (centre.abs().max() == 0) == (init == "oriented")
    cf.save_pretrained(model, tmp_path / "ckpt")
    again = cf.create_model(str(tmp_path / "ckpt"))
    assert (again.router.init, again.router.gate_grad) == (init, gate_grad)


# ---------------------------------------------------------------------------- orientation prior
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**31 - 1), st.floats(-3, 3))
def test_unpredictability_is_zero_on_flat_input_and_blind_to_a_constant_shift(ndim, channels, seed, shift):
    from chunkformer.routing import unpredictability
    g = torch.Generator().manual_seed(seed)
    grid = (8,) * ndim
    x = torch.randn(2, channels, *grid, generator=g)
    assert unpredictability(torch.full_like(x, shift), grid).abs().max() < 1e-5
    torch.testing.assert_close(unpredictability(x + shift, grid), unpredictability(x, grid),
                               atol=1e-5, rtol=1e-5)


@given(st.integers(0, 7), st.integers(0, 7), st.sampled_from([1, 2, 4]))
def test_unpredictability_peaks_at_an_isolated_pixel_on_the_token_grid(i, j, patch):
    from chunkformer.routing import unpredictability
    x = torch.zeros(1, 1, 8 * patch, 8 * patch)
    x[0, 0, i * patch, j * patch] = 1.0
    score = unpredictability(x, (8, 8))
    assert score.shape == (1, 64) and score.argmax().item() == i * 8 + j


def test_unpredictability_rejects_a_grid_it_cannot_pool_onto():
    from chunkformer.routing import unpredictability
    with pytest.raises(ValueError, match="not a multiple"):
        unpredictability(torch.zeros(1, 1, 10, 10), (4, 4))
    with pytest.raises(ValueError, match="rank 2"):
        unpredictability(torch.zeros(1, 10, 10), (10, 10))


@given(st.integers(0, 2**31 - 1), st.sampled_from([0.25, 0.5]))
def test_orientation_loss_vanishes_on_an_oriented_router_and_a_step_on_it_orients_an_inverted_one(seed, keep):
    from chunkformer.routing import orientation_loss
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(3, 64, generator=g)
    rank = score.argsort(1).argsort(1).float() / 63  # 0 .. 1, by score
    oriented = torch.sigmoid(8 * (rank - 0.5))
    assert orientation_loss(oriented, score, keep) == 0
    logits = (-8 * (rank - 0.5)).requires_grad_()  # keeps the predictable tokens
    before = orientation_loss(torch.sigmoid(logits), score, keep)
    before.backward()
    assert before > 1.0
    after = orientation_loss(torch.sigmoid(logits.detach() - 50 * logits.grad), score, keep)
    assert after < before
    inner = torch.arange(1, 63)
    corr = torch.corrcoef(torch.stack([-logits.grad[0, inner], score[0, inner]]))[0, 1]
    assert corr > 0.5  # the step raises the unpredictable tokens' logits


def test_orientation_loss_ignores_the_always_kept_ends_and_checks_its_input():
    from chunkformer.routing import orientation_loss
    score = torch.linspace(0, 1, 16)[None]
    p = torch.sigmoid(4 * (score - 0.5))
    p_ends = p.clone()
    p_ends[:, 0] = p_ends[:, -1] = 1.0
    assert orientation_loss(p_ends, score, 0.25, margin=10.0) == orientation_loss(p, score, 0.25, margin=10.0)
    with pytest.raises(ValueError, match="keep_fraction"):
        orientation_loss(p, score, 1.0)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        orientation_loss(p, score[0], 0.25)
