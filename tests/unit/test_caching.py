"""Step caching (chunkformer.StepCache) in the samplers, alone and with chunking and merging."""

import pytest
import torch
from test_merging import MODELS

import chunkformer as cf
from chunkformer.diffusion import create_diffusion
from chunkformer.diffusion.guidance import guided_model_fn
from chunkformer.flops import FlopCounter


def sampler_inputs(model, B=2, lite=False):
    y = torch.arange(B) % 10
    kw = {"rho": 0.0, "uncond_rho": 0.5} if lite and model.supports_chunking else {}
    fn = guided_model_fn(model, y, scale=2.0, **kw)
    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return fn, noise


@pytest.mark.parametrize("name", ["dit", "dcdit-packed", "dcdit-fixed", "wrap-dit"])
@pytest.mark.parametrize("process", ["ddim", "flow"])
@torch.no_grad()
def test_threshold_zero_is_exactly_the_uncached_sampler(name, process):
    model = MODELS[name]()
    diffusion = create_diffusion(process if process == "flow" else "ddpm")
    sampler = "euler" if process == "flow" else "ddim"
    fn, noise = sampler_inputs(model, lite=True)
    ref = diffusion.sample(fn, noise.shape, sampler=sampler, steps=6, noise=noise)
    cache = cf.StepCache(model, threshold=0.0)
    out = diffusion.sample(fn, noise.shape, sampler=sampler, steps=6, noise=noise, cache=cache)
    assert torch.equal(out, ref)
    assert (cache.computed, cache.skipped) == (6, 0)
    assert model.step_cache is None  # uninstalled after the run


@torch.no_grad()
def test_a_skipped_step_reuses_the_residual_on_the_grid():
    """The same input twice: the change is zero, the second call is skipped and gives the first's output."""
    for name in ("dit", "dcdit-packed", "wrap-chunkformer"):
        model = MODELS[name]()
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), torch.tensor([1, 2])
        cache = cf.StepCache(model, threshold=0.5, keep=0)
        with cache.sampling(steps=3):
            cache.at(0)
            first, info1 = model(x, t, y, return_info=True)
            cache.at(1)
            second, info2 = model(x, t, y, return_info=True)
        assert not info1.cached and info2.cached and (cache.computed, cache.skipped) == (1, 1)
        torch.testing.assert_close(second, first, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_skipping_follows_the_threshold_and_the_limits():
    model = MODELS["dcdit-packed"]()
    fn, noise = sampler_inputs(model)
    diffusion = create_diffusion()
    ref = diffusion.sample(fn, noise.shape, sampler="ddim", steps=10, noise=noise)
    skipped, errors = [], []
    for threshold in (0.05, 0.3, 1e9):
        cache = cf.StepCache(model, threshold)
        out = diffusion.sample(fn, noise.shape, sampler="ddim", steps=10, noise=noise, cache=cache)
        skipped.append(cache.skipped)
        errors.append(float((out - ref).norm() / ref.norm()))
        assert not cache.history[0][1] and not cache.history[-1][1]  # first and last steps compute
    assert skipped[0] <= skipped[1] <= skipped[2] == 8
    assert errors[0] <= errors[2]
    cache = cf.StepCache(model, 1e9, max_skips=2)
    diffusion.sample(fn, noise.shape, sampler="ddim", steps=10, noise=noise, cache=cache)
    flags = "".join("s" if s else "c" for _, s in cache.history)
    assert "sss" not in flags and flags == "csscsscssc", flags


@torch.no_grad()
def test_flops_of_a_cached_run_drop_with_merging_on_top():
    model = MODELS["dit"]()  # every step sees all tokens, so skipped steps are whole steps' blocks
    fn, noise = sampler_inputs(model)
    diffusion = create_diffusion()
    totals = {}
    for label, threshold in (("plain", 0.0), ("cached", 1e9)):
        with FlopCounter(model) as counter:
            diffusion.sample(fn, noise.shape, sampler="ddim", steps=6, noise=noise,
                             cache=cf.StepCache(model, threshold))
        totals[label] = counter.by_component
    cf.merging.apply(model, ratio=0.5)
    with FlopCounter(model) as counter:
        diffusion.sample(fn, noise.shape, sampler="ddim", steps=6, noise=noise, cache=cf.StepCache(model, 1e9))
    totals["both"] = counter.by_component
    mlp = "backbone MLP"
    assert totals["cached"][mlp] == pytest.approx(totals["plain"][mlp] * 2 / 6)  # 2 of 6 steps ran the blocks
    assert totals["cached"]["embed"] == totals["plain"]["embed"] > 0  # the rest runs every step
    assert totals["both"]["backbone attention"] < totals["cached"]["backbone attention"]
    assert totals["both"]["merging"] > 0


def test_errors():
    with pytest.raises(TypeError, match="chunkformer model"):
        cf.StepCache(torch.nn.Linear(2, 2), 0.1)
    model = MODELS["dit"]()
    with pytest.raises(ValueError, match=">= 0"):
        cf.StepCache(model, -1.0)
    with pytest.raises(ValueError, match=">= 0"):
        cf.StepCache(model, float("nan"))
    a, b = cf.StepCache(model, 0.1), cf.StepCache(model, 0.1)
    with a.sampling(3), pytest.raises(RuntimeError, match="another StepCache"):
        with b.sampling(3):
            pass
