"""ChunkPlan: chunk / pack / plug-back / de-chunk round trips first (the properties the algorithm rests on), then\nthe nearest-kept reference, modes, concatenation and the Chunked hand-off."""

import itertools
import math
from unittest import mock

import pytest
import torch
from conftest import grids, masks, plan_inputs
from hypothesis import given
from hypothesis import strategies as st

from chunkformer import ChunkPlan
from chunkformer import plan as plan_module
from chunkformer.dechunk import Chunked, dechunk
from chunkformer.grid import grid_coords
from chunkformer.plan import PLAN_MODES, _nearest_kept_dense, nearest_kept
from chunkformer.routing import RouterOutput


def brute_force_nearest(mask_row: torch.Tensor, grid) -> list[int]:
    """For each raster position, the raster position of its nearest kept token (ties: earliest)."""
    coords = list(itertools.product(*[range(s) for s in grid]))
    kept = [i for i, k in enumerate(mask_row.tolist()) if k]
    out = []
    for c in coords:
        best, best_d = None, None
        for j in kept:
            d = sum((a - b) ** 2 for a, b in zip(c, coords[j]))
            if best_d is None or d < best_d:
                best, best_d = j, d
        out.append(best)
    return out


@given(plan_inputs(), st.sampled_from(["packed", "padded"]), st.sampled_from([torch.float32, torch.float64]))
def test_pack_unpack_and_chunk_unchunk_round_trip(inputs, mode, dtype):
    grid, mask, probs, seed = inputs
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode=mode)
    B, L = mask.shape
    x = torch.randn(B, L, 3, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    slots = plan.gather(x)
    assert slots.shape == (B, int(mask.sum(1).max()), 3)
    packed = plan.pack(slots)
    assert packed.shape == (int(mask.sum()), 3)
    # packed holds exactly the kept tokens, sample by sample, in raster order
    assert torch.equal(packed, x[mask])
    assert torch.equal(plan.pack(slots, total=int(mask.sum())), packed)  # the sync-free gather agrees
    # unpack inverts pack on the valid slots, zeros elsewhere
    back = plan.unpack(packed)
    assert torch.equal(back[plan.valid], slots[plan.valid])
    assert torch.all(back[~plan.valid] == 0)
    # chunk / unchunk agree with gather for the valid slots
    assert torch.equal(plan.unchunk(plan.chunk(x))[plan.valid], slots[plan.valid])
    cu = plan.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == mask.sum()
    assert torch.equal(cu.diff().long(), mask.sum(1))


@given(plan_inputs(), st.sampled_from(["packed", "padded", "fixed"]))
def test_chunk_then_dechunk_of_every_token_kept_is_the_identity(inputs, mode):
    """With every token kept (p = 1) the decoder's de-chunk inverts the chunking: plug-back puts every token back
    where it came from (exactly), and smoothing weighs its neighbours by ``1 - p = 0`` (to fp32 rounding)."""
    grid, mask, _, seed = inputs
    B, L = mask.shape
    every = torch.ones_like(mask)
    plan = ChunkPlan.from_mask(every, torch.ones(B, L), grid=grid, mode=mode, capacity=L if mode == "fixed" else None)
    x = torch.randn(B, L, 3, generator=torch.Generator().manual_seed(seed))
    slots, ones = plan.unchunk(plan.chunk(x)), torch.ones(B, L)
    assert torch.equal(dechunk(slots, ones, plan, smoothing="none"), x)
    torch.testing.assert_close(dechunk(slots, ones, plan, sigma=1.0), x, rtol=0, atol=1e-3)


@given(plan_inputs(max_batch=3), st.sampled_from(["packed", "padded"]))
def test_chunked_bundles_the_router_s_plan_and_cat_joins_every_part(inputs, mode):
    grid, mask, probs, seed = inputs
    B, L = mask.shape
    conf = torch.where(mask, probs, 1 - probs)
    routed = RouterOutput(probs=probs, mask=mask, natural_mask=mask, confidence=conf, grid=tuple(grid), batch_size=[B])
    tokens = torch.randn(B, L, 4, generator=torch.Generator().manual_seed(seed))
    one = Chunked.from_router(routed, tokens, mode=mode)
    assert torch.equal(one.plan.order, ChunkPlan.from_router(routed, mode=mode).order)
    both = torch.cat([one, one])
    assert both.batch_size[0] == 2 * B and both.plan.mode == mode
    assert torch.equal(both.plan.lengths, mask.sum(1).repeat(2)) and torch.equal(both.tokens, torch.cat([tokens, tokens]))
    assert torch.equal(both.probs, torch.cat([probs, probs])) and torch.equal(both.confidence, torch.cat([conf, conf]))
    first = both.plan.chunk(both.tokens)[: int(mask.sum()) if mode == "packed" else B]  # the first copy's tokens
    assert torch.equal(first, one.plan.chunk(tokens))


@given(plan_inputs())
def test_packing_backward_routes_each_gradient_to_its_slot_and_zeros_to_padding(inputs):
    grid, mask, probs, seed = inputs
    plan = ChunkPlan.from_mask(mask, probs, grid=grid)
    g = torch.Generator().manual_seed(seed)
    slots = torch.randn(mask.shape[0], plan.width, 3, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(int(mask.sum()), 3, dtype=torch.float64, generator=g)
    for total in (None, int(mask.sum())):  # the boolean-index path and the sync-free gather
        (grad,) = torch.autograd.grad(plan.pack(slots, total=total), slots, upstream)
        assert torch.equal(grad[plan.valid], upstream)  # valid slots, sample by sample, in order
        assert torch.all(grad[~plan.valid] == 0)
    torch.autograd.gradcheck(lambda s: plan.pack(s, total=int(mask.sum())), (slots,))


@given(plan_inputs())
def test_plug_back_takes_nearest_kept_token(inputs):
    grid, mask, probs, seed = inputs
    plan = ChunkPlan.from_mask(mask, probs, grid=grid)
    B, L = mask.shape
    x = torch.randn(B, L, 2, generator=torch.Generator().manual_seed(seed))
    full = plan.plug_back(plan.gather(x))
    for b in range(B):
        ref = brute_force_nearest(mask[b], grid)
        assert torch.equal(full[b], x[b, ref])
        # kept positions keep their own value
        assert torch.equal(full[b][mask[b]], x[b][mask[b]])



@given(plan_inputs(ranks=(1, 2), max_tokens=64), st.sampled_from(["packed", "padded", "fixed"]), st.data())
def test_nearest_kept_equals_dense_reference_on_plans(inputs, mode, data):
    grid, mask, probs, seed = inputs
    B, L = mask.shape
    capacity = data.draw(st.integers(1, max(1, L - 1))) if mode == "fixed" else None
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode=mode, capacity=capacity)
    coords, valid = plan.coords, plan.valid
    g = torch.Generator().manual_seed(seed)
    if data.draw(st.booleans()):  # pads moved onto random (often duplicated, often kept) positions
        extra = data.draw(st.integers(0, 3))
        coords = torch.cat([coords, coords.new_zeros(B, extra, len(grid))], 1)
        valid = torch.cat([valid, valid.new_zeros(B, extra)], 1)
        noise = grid_coords(grid)[torch.randint(L, valid.shape, generator=g)]  # (B, M, ndim)
        coords = torch.where(valid[..., None], coords, noise)
    block = data.draw(st.sampled_from([1, 7, 4096]))
    ref = _nearest_kept_dense(coords, valid, grid)
    assert torch.equal(nearest_kept(coords, valid, grid, block=block), ref)
    with mock.patch.object(plan_module, "_INT32_KEY_LIMIT", 0):  # the int64 key path
        assert torch.equal(nearest_kept(coords, valid, grid, block=block), ref)
    for b in range(B):  # and the slot found is the brute-force nearest position
        assert plan.positions[b, ref[b]].tolist() == brute_force_nearest(plan.kept_mask[b], grid)


@given(grids(ranks=(1, 2), max_tokens=48), st.integers(1, 3), st.integers(1, 40), st.integers(0, 2**16))
def test_nearest_kept_equals_dense_reference_on_any_slot_order(grid, B, M, seed):
    """Slots in any order, duplicated positions, valid not a prefix: still the lowest equidistant slot."""
    g = torch.Generator().manual_seed(seed)
    L = math.prod(grid)
    coords = grid_coords(grid)[torch.randint(L, (B, M), generator=g)]  # (B, M, ndim)
    valid = torch.rand(B, M, generator=g) < torch.rand(B, 1, generator=g)
    assert torch.equal(nearest_kept(coords, valid, grid, block=5), _nearest_kept_dense(coords, valid, grid))


@pytest.mark.parametrize("grid", [(7,), (1, 5), (4, 1), (3, 5)])
def test_nearest_kept_without_valid_slot_maps_to_slot_zero(grid):
    L = math.prod(grid)
    coords = grid_coords(grid)[torch.tensor([[L - 1, 0, 1], [1, 1, 0]]) % L]  # (2, 3, ndim)
    valid = torch.tensor([[False, False, False], [False, True, False]])
    out = nearest_kept(coords, valid, grid)
    assert out.dtype == torch.int64 and out.shape == (2, L)
    assert torch.all(out[0] == 0)
    assert torch.all(out[1] == 1)
    assert torch.equal(out, _nearest_kept_dense(coords, valid, grid))


@given(plan_inputs())
def test_chunk_then_plug_back_all_kept_is_identity(inputs):
    grid, _, probs, seed = inputs
    mask = torch.ones_like(probs, dtype=torch.bool)
    plan = ChunkPlan.from_mask(mask, probs, grid=grid)
    x = torch.randn(*mask.shape, 4, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(plan.plug_back(plan.unchunk(plan.chunk(x))), x)


@given(plan_inputs(max_batch=3), plan_inputs(max_batch=3), st.sampled_from(["packed", "padded"]))
def test_concatenated_plans_equal_plan_of_concatenated_batch(a, b, mode):
    grid, mask_a, probs_a, _ = a
    L = math.prod(grid)
    # give b the same grid
    g = torch.Generator().manual_seed(b[3])
    mask_b = torch.rand(b[1].shape[0], L, generator=g) < 0.5
    mask_b[:, 0] = True
    probs_b = torch.rand(mask_b.shape, generator=g)
    pa = ChunkPlan.from_mask(mask_a, probs_a, grid=grid, mode=mode)
    pb = ChunkPlan.from_mask(mask_b, probs_b, grid=grid, mode=mode)
    joint = ChunkPlan.from_mask(torch.cat([mask_a, mask_b]), torch.cat([probs_a, probs_b]), grid=grid, mode=mode)
    for cat in (torch.cat([pa, pb]), ChunkPlan.cat([pa, pb])):
        assert cat.width == joint.width and cat.grid == joint.grid and cat.mode == joint.mode
        assert torch.equal(cat.order, joint.order)
        assert torch.equal(cat.lengths, joint.lengths)
        x = torch.randn(cat.batch_size[0], L, 3)
        assert torch.equal(cat.chunk(x), joint.chunk(x))
        assert torch.equal(cat.cu_seqlens, joint.cu_seqlens)


@given(plan_inputs())
def test_padding_slots_hold_next_most_probable_real_tokens(inputs):
    grid, mask, probs, _ = inputs
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode="padded")
    order = plan.order
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        kept = order[b, :n]
        assert torch.equal(kept, torch.nonzero(mask[b]).flatten())  # raster order
        rest = order[b, n:]
        assert not mask[b, rest].any()
        p_rest = probs[b, rest]
        assert torch.all(p_rest[:-1] >= p_rest[1:])  # descending probability
        assert sorted(order[b].tolist()) == list(range(mask.shape[1]))  # a permutation


@given(plan_inputs(), st.integers(1, 8), st.sampled_from(PLAN_MODES))
def test_capacity_keeps_most_probable(inputs, capacity, mode):
    """``fixed``: a static width of ``capacity``; ``packed`` / ``padded``: ``capacity`` as an upper bound
    (a memory guard). Either way a sample keeps its ``capacity`` most probable kept tokens."""
    grid, mask, probs, seed = inputs
    L = math.prod(grid)
    capacity = min(capacity, L)
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode=mode, capacity=capacity)
    lengths = mask.sum(1).clamp(max=capacity)
    assert torch.equal(plan.lengths, lengths)
    assert plan.width == (capacity if mode == "fixed" else max(int(lengths.max()) if lengths.numel() else 0, 1))
    x = torch.randn(mask.shape[0], L, 2, generator=torch.Generator().manual_seed(seed))
    if mode != "packed":
        assert plan.chunk(x).shape == (mask.shape[0], plan.width, 2)
    else:
        assert plan.chunk(x).shape == (int(lengths.sum()), 2)
    kept = plan.kept_mask
    assert not (kept & ~mask).any()  # only originally kept tokens survive
    for b in range(mask.shape[0]):
        dropped = mask[b] & ~kept[b]
        if dropped.any():  # every survivor is at least as probable as every dropped token
            assert probs[b][kept[b]].min() >= probs[b][dropped].max()


@given(grids(), st.integers(1, 3), st.data())
def test_position_embedding_follows_original_coordinates(grid, B, data):
    from chunkformer.grid import grid_coords, sincos_embed

    L = math.prod(grid)
    mask = data.draw(masks(B, L))
    plan = ChunkPlan.from_mask(mask, grid=grid)
    pe = plan.position_embedding(12)
    table = sincos_embed(grid_coords(grid), 12)  # (L, 12)
    expected = torch.cat([table[mask[b]] for b in range(B)])
    assert torch.allclose(pe, expected)


@given(plan_inputs(), st.sampled_from(PLAN_MODES))
def test_position_embedding_is_every_slots_own_sincos_in_every_layout(inputs, mode):
    """The embedding comes from a per-position table gathered by slot; it must equal the sin-cos of each slot's
    own coordinates, padding slots and the packed layout included."""
    from chunkformer.grid import sincos_embed

    grid, mask, probs, _ = inputs
    L = math.prod(grid)
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode=mode, capacity=max(L // 2, 1) if mode == "fixed" else None)
    per_slot = sincos_embed(plan.coords, 12)  # (B, M, 12): every slot's coordinates embedded on their own
    expected = plan.pack(per_slot) if mode == "packed" else per_slot
    pe = plan.position_embedding(12)
    assert pe.shape == expected.shape
    torch.testing.assert_close(pe, expected, rtol=0, atol=1e-6)


def test_take_rejects_a_table_that_is_not_one_row_per_grid_position():
    plan = ChunkPlan.from_mask(torch.ones(1, 6, dtype=torch.bool), grid=(2, 3))
    with pytest.raises(ValueError, match=r"one row per position of grid \(2, 3\), got shape \(5, 4\)"):
        plan.take(torch.zeros(5, 4))


@given(plan_inputs(), st.integers(1, 8))
def test_fill_keeps_exactly_capacity_kept_tokens_first(inputs, capacity):
    """``fill``: exactly ``capacity`` tokens per sample: the most probable kept ones, then (when a sample
    keeps fewer) the most probable others; every slot is real, so the plan says ``full``."""
    grid, mask, probs, seed = inputs
    capacity = min(capacity, math.prod(grid))
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode="fixed", capacity=capacity, fill=True)
    assert plan.full and bool(plan.valid.all()) and torch.equal(plan.lengths, torch.full_like(plan.lengths, capacity))
    chosen = plan.kept_mask
    for b in range(mask.shape[0]):
        router, rest = mask[b], ~mask[b]
        if int(router.sum()) >= capacity:  # only router-kept tokens, the most probable of them
            assert not (chosen[b] & rest).any()
        else:  # every router-kept token, then the most probable others
            assert bool(chosen[b][router].all())
            extra, left = chosen[b] & rest, rest & ~chosen[b]
            if extra.any() and left.any():
                assert probs[b][extra].min() >= probs[b][left].max()
    masked = ChunkPlan(order=plan.order, lengths=plan.lengths, grid=plan.grid, width=plan.width, mode="fixed",
                       batch_size=plan.batch_size)
    assert not masked.full and torch.cat([plan, plan]).full and not torch.cat([plan, masked]).full
    assert plan[:1].full and not masked[:1].full


def test_bad_inputs_name_the_argument():
    mask = torch.ones(2, 12, dtype=torch.bool)
    with pytest.raises(ValueError, match="grid"):
        ChunkPlan.from_mask(mask, grid=(5, 5))
    with pytest.raises(ValueError, match="rank 1, 2 or 3"):
        ChunkPlan.from_mask(mask, grid=(1, 2, 2, 3))
    with pytest.raises(ValueError, match="mode"):
        ChunkPlan.from_mask(mask, grid=(3, 4), mode="ragged")
    with pytest.raises(ValueError, match="capacity"):
        ChunkPlan.from_mask(mask, grid=(3, 4), mode="fixed")
    with pytest.raises(ValueError, match="capacity"):
        ChunkPlan.from_mask(mask, grid=(3, 4), mode="fixed", capacity=13)
    with pytest.raises(ValueError, match="capacity"):
        ChunkPlan.from_mask(mask, grid=(3, 4), mode="packed", capacity=0)
    with pytest.raises(ValueError, match="fill=True.*mode='fixed'"):
        ChunkPlan.from_mask(mask, grid=(3, 4), mode="padded", capacity=4, fill=True)
    with pytest.raises(ValueError, match="probs"):
        ChunkPlan.from_mask(mask, torch.full((2, 12), float("nan")), grid=(3, 4))
    with pytest.raises(ValueError, match="bool"):
        ChunkPlan.from_mask(mask.float(), grid=(3, 4))
    plan = ChunkPlan.from_mask(mask, grid=(3, 4))
    with pytest.raises(ValueError, match="tokens"):
        plan.chunk(torch.randn(2, 11, 4))
    other = ChunkPlan.from_mask(torch.ones(2, 12, dtype=torch.bool), grid=(4, 3))
    with pytest.raises(ValueError, match="grids"):
        torch.cat([plan, other])


@given(grids(ranks=(1, 2), max_tokens=48), st.integers(1, 3), st.integers(1, 20), st.integers(0, 2**16))
def test_nearest_kept_methods_agree_and_auto_is_separable_on_the_cpu(grid, B, M, seed):
    g = torch.Generator().manual_seed(seed)
    coords = grid_coords(grid)[torch.randint(math.prod(grid), (B, M), generator=g)]
    valid = torch.rand(B, M, generator=g) < 0.5
    sep = nearest_kept(coords, valid, grid, method="separable")
    assert torch.equal(nearest_kept(coords, valid, grid, method="dense"), sep)
    assert torch.equal(nearest_kept(coords, valid, grid), sep)
    with pytest.raises(ValueError, match="method must be"):
        nearest_kept(coords, valid, grid, method="fast")


def test_auto_nearest_takes_the_brute_force_only_while_its_distances_fit():
    from chunkformer.plan import _auto_nearest_method

    cuda = torch.device("cuda")  # the choice only; nothing runs there
    assert _auto_nearest_method((32, 32), (64, 256), cuda) == "dense"  # a sampling batch at 256px
    assert _auto_nearest_method((32, 32), (256, 1024), cuda) == "separable"  # a training batch: 2^28 distances
    assert _auto_nearest_method((32, 32), (64, 256), torch.device("cpu")) == "separable"
    assert _auto_nearest_method((64, 64), (1, 16), cuda) == "separable"
    assert _auto_nearest_method((4, 4, 4), (256, 64), torch.device("cpu")) == "dense"  # rank 3 has no other


@given(st.integers(1, 3), st.integers(1, 12), st.integers(0, 2**16))
def test_the_brute_force_in_small_chunks_matches_the_separable_form(B, M, seed):
    import chunkformer.plan as plan_module

    grid = (5, 7)
    g = torch.Generator().manual_seed(seed)
    coords = grid_coords(grid)[torch.randint(35, (B, M), generator=g)]
    valid = torch.rand(B, M, generator=g) < 0.6
    old = plan_module.DENSE_NEAREST_MAX_PAIRS
    plan_module.DENSE_NEAREST_MAX_PAIRS = 3 * B * M  # three grid positions per chunk
    try:
        dense = nearest_kept(coords, valid, grid, method="dense")
    finally:
        plan_module.DENSE_NEAREST_MAX_PAIRS = old
    assert torch.equal(dense, nearest_kept(coords, valid, grid, method="separable"))


@given(st.sampled_from([(8, 8), (6, 10), (16,)]), st.sampled_from(["packed", "padded", "fixed"]),
       st.sampled_from(["dense", "windowed", "none"]))
def test_moving_tokens_keeps_one_index_per_token_for_backward(grid, mode, smoothing):
    """The backward pass of a DC-DiT forward keeps integer indices of at most one entry per grid position,
    never one broadcast over the channels: a compiled graph materialises a broadcast index, at ``d`` times
    the memory (a ``(B, M, d)`` int64 index for every gather)."""
    from chunkformer import create_model

    torch.manual_seed(0)
    L = math.prod(grid)
    model = create_model("DC-DiT-tiny", input_size=grid, in_channels=2, num_classes=5, smoothing=smoothing,
                         plan_mode=mode, capacity=L // 2 if mode == "fixed" else None).train()
    B = 3
    x, t, y = torch.randn(B, 2, *grid), torch.randint(0, 1000, (B,)), torch.randint(0, 5, (B,))
    indices = []

    def keep(saved):
        if not saved.is_floating_point() and saved.dtype != torch.bool:
            indices.append(tuple(saved.shape))
        return saved

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out, info = model(x, t, y, rho=0.3, return_info=True)
    (out.square().mean() + info.ratio_loss).backward()
    assert indices  # the plan's gathers do save their indices
    assert all(math.prod(s) <= B * L for s in indices), [s for s in indices if math.prod(s) > B * L]
