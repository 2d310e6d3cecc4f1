"""Host syncs on the hot path, counted on the CPU (chunkformer.count_host_syncs)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkformer as cf
from chunkformer._typing import value_checks
from chunkformer.diffusion import create_diffusion
from chunkformer.diffusion.guidance import guided_model_fn
from chunkformer.hostsync import count_host_syncs


def test_the_counter_sees_each_kind_of_read_back():
    x = torch.arange(6.0)
    with count_host_syncs() as syncs:
        x.sum().item()
        bool(x.max() > 2)
        x.tolist()
        x[x > 2]
        torch.nonzero(x)
        torch.repeat_interleave(x, torch.tensor([1, 0, 2, 1, 1, 1]))
    assert syncs.total == 6, syncs.by_site
    assert all("test_hostsync.py" in site for site in syncs.by_site)
    with count_host_syncs() as none:  # shapes known up front: nothing waits
        torch.repeat_interleave(x, torch.tensor([1, 0, 2, 1, 1, 1]), output_size=6)
        x[torch.tensor([0, 2])].sum() + x.cumsum(0)
        torch.where(x > 2, x, 0.0)
    assert none.total == 0, none.by_site


def tiny(mode, depth, learn_sigma=True):
    torch.manual_seed(depth)
    return cf.DCDiT(input_size=16, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=10,
                    plan_mode=mode, capacity=64 if mode == "fixed" else None, attn_backend="sdpa",
                    learn_sigma=learn_sigma)


@settings(deadline=None, max_examples=12)
@given(st.sampled_from(["packed", "padded", "fixed"]), st.integers(1, 4), st.floats(0, 0.8), st.booleans())
def test_a_forward_waits_at_most_once_whatever_the_depth(mode, depth, rho, training):
    """Fixed capacity: no host sync at all; packed / padded: one (the plan's width and total), not one
    per block. The value checks add two (the timestep / label range and the router's NaN check), and none when
    switched off."""
    model = tiny(mode, depth).train(training)
    x, t, y = torch.randn(3, 1, 16, 16), torch.rand(3) * 999, torch.randint(0, 10, (3,))
    with value_checks(False), count_host_syncs() as syncs:
        out = model(x, t, y, rho=rho)
        if training:
            out.float().square().mean().backward()
    assert syncs.total == (0 if mode == "fixed" else 1), syncs.by_site
    with count_host_syncs() as checked:
        model(x, t, y, rho=rho)
    assert checked.total == syncs.total + 2, checked.by_site


@pytest.mark.parametrize("kind,sampler", [("ddpm", "ddim"), ("ddpm", "ddpm"), ("flow", "euler")])
def test_a_lite_cfg_sampling_loop_in_fixed_capacity_mode_never_waits_per_step(kind, sampler):
    """Whole guided sampling loops (Lite-CFG: per-sample rho tensors): the count does not grow with
    the steps, and nothing in the model or the update reads the device."""
    counts = []
    for steps in (2, 5):
        learn_sigma = kind == "ddpm"
        model = tiny("fixed", 2, learn_sigma).eval()
        diffusion = create_diffusion(kind, learn_sigma=learn_sigma)
        y = torch.randint(0, 10, (4,))
        fn = guided_model_fn(model, y, scale=1.25, null_class=model.null_class, rho=0.0, uncond_rho=0.9,
                             learn_sigma=learn_sigma)
        kw = {"sampler": sampler} if kind == "ddpm" else {}
        with torch.no_grad(), value_checks(False), count_host_syncs() as syncs:
            diffusion.sample(fn, (4, 1, 16, 16), steps=steps, noise=torch.randn(4, 1, 16, 16), **kw)
        counts.append(syncs.total)
        model_sites = [s for s in syncs.by_site if not s.split("@ ")[1].startswith(("gaussian.py", "respace.py"))]
        assert not model_sites, syncs.by_site
    assert counts[0] == counts[1], counts  # only setup reads (respacing the host-side tables), once per call


def test_value_checks_switch_restores_and_still_catches_nan_when_on():
    model = tiny("fixed", 1)
    x = torch.full((2, 1, 16, 16), float("nan"))
    t, y = torch.rand(2) * 999, torch.randint(0, 10, (2,))
    with value_checks(False):
        model(x, t, y)  # unchecked: NaN flows through
    with pytest.raises(ValueError, match="must be finite"):
        model(x, t, y)


@settings(deadline=None, max_examples=20)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**16))
def test_packing_a_plan_or_a_cfg_concatenation_reads_nothing_from_the_device(B1, B2, seed):
    """A built plan knows its total on the host: pack gathers, and so does the torch.cat of two (Lite-CFG)."""
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(B, 12, generator=g) < torch.rand(B, 1, generator=g) for B in (B1, B2)]
    plans = [cf.ChunkPlan.from_mask(m, grid=(3, 4)) for m in masks]
    both = torch.cat(plans)
    for plan in (*plans, both):
        x = torch.randn(plan.lengths.shape[0], plan.width, 5, generator=g)
        with count_host_syncs() as syncs:
            packed = plan.pack(x)
        assert syncs.total == 0, syncs.by_site
        assert torch.equal(packed, x[plan.valid])  # the reference: boolean-mask indexing (a sync)
        assert torch.equal(plan.unpack(packed)[plan.valid], packed)
