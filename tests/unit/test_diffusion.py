"""Diffusion processes, samplers and guidance: identities, oracle models, determinism."""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkformer as cf
from chunkformer.diffusion import (
    FlowMatching,
    GaussianDiffusion,
    create_diffusion,
    guided_model_fn,
    model_fn,
    space_timesteps,
)


# ---------------------------------------------------------------------------- oracles
def point_eps_oracle(diffusion: GaussianDiffusion, point: torch.Tensor):
    """The exact epsilon for data that is always ``point``: ``(x_t - sqrt(ab) x*) / sqrt(1 - ab)``.
    Indexes the *original* schedule with the timesteps it is given."""
    ab = diffusion.alphas_cumprod.float()

    def fn(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        a = ab[t].view(-1, *[1] * (x.ndim - 1))
        return (x - a.sqrt() * point) / (1 - a).sqrt()

    return fn


def gaussian_eps_oracle(diffusion: GaussianDiffusion, mu: float, s: float):
    """The exact ``E[eps | x_t]`` for data ``N(mu, s^2)`` per element."""
    ab = diffusion.alphas_cumprod.float()

    def fn(x, t):
        a = ab[t].view(-1, *[1] * (x.ndim - 1))
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)

    return fn


# ---------------------------------------------------------------------------- schedule and q_sample
@given(T=st.integers(1, 2000), schedule=st.sampled_from(["linear", "cosine"]))
def test_schedules_are_valid_and_alphas_cumprod_decreases(T, schedule):
    d = GaussianDiffusion(T, schedule)
    assert d.betas.shape == (T,) and bool(((d.betas > 0) & (d.betas <= 1)).all())
    ab = d.alphas_cumprod
    assert bool((ab > 0).all()) and bool((ab < 1).all())
    assert bool((ab[1:] < ab[:-1]).all())
    assert torch.isfinite(d.posterior_log_variance).all()


def test_linear_schedule_is_ddpm_at_1000_steps():
    betas = GaussianDiffusion(1000, "linear").betas
    assert math.isclose(betas[0].item(), 1e-4) and math.isclose(betas[-1].item(), 0.02)


@given(
    T=st.integers(2, 1000),
    batch=st.integers(1, 4),
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_q_sample_is_the_closed_form(T, batch, shape, seed):
    d = GaussianDiffusion(T)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 2, *shape, generator=g)
    eps = torch.randn(batch, 2, *shape, generator=g)
    t = torch.randint(0, T, (batch,), generator=g)
    x_t, noise = d.q_sample(x0, t, eps)
    assert noise is eps
    ab = torch.stack([torch.prod(1 - d.betas[: k + 1]) for k in t.tolist()]).view(-1, *[1] * (x0.ndim - 1))
    want = ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()
    torch.testing.assert_close(x_t.double(), want, atol=1e-5, rtol=1e-5)
    # without noise: drawn from the generator, reproducibly
    a, na = d.q_sample(x0, t, generator=torch.Generator().manual_seed(seed))
    b, nb = d.q_sample(x0, t, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a, b) and torch.equal(na, nb)


def test_q_sample_statistics():
    d = GaussianDiffusion(1000)
    g = torch.Generator().manual_seed(0)
    for k in (0, 100, 500, 999):
        x0 = torch.full((20000, 1), 0.5)
        x_t, _ = d.q_sample(x0, torch.full((20000,), k), generator=g)
        ab = d.alphas_cumprod[k].item()
        assert abs(x_t.mean().item() - math.sqrt(ab) * 0.5) < 0.03
        assert abs(x_t.var().item() - (1 - ab)) < 0.03 * (1 - ab) + 1e-4


# ---------------------------------------------------------------------------- respacing
@given(T=st.integers(1, 1000), data=st.data())
def test_respacing_keeps_noise_levels_at_kept_steps(T, data):
    steps = data.draw(st.integers(1, T))
    kept = space_timesteps(T, steps)
    assert len(kept) == steps and kept[-1] == T - 1 and all(a < b for a, b in zip(kept, kept[1:]))
    assert steps == 1 or kept[0] == 0
    d = GaussianDiffusion(T)
    r = d.respace(steps)
    assert r.timestep_map == kept
    torch.testing.assert_close(r.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-10, atol=0)
    if steps == T:
        torch.testing.assert_close(r.betas, d.betas, rtol=1e-9, atol=0)


def test_space_timesteps_rejects_bad_counts():
    for steps in (0, 11):
        with pytest.raises(ValueError, match="steps"):
            space_timesteps(10, steps)


# ---------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("ddim", 1), ("ddpm", 50)])
def test_oracle_model_recovers_a_fixed_point(sampler, steps):
    d = GaussianDiffusion(1000, learn_sigma=False)
    point = torch.linspace(-1, 1, 2 * 4 * 4).view(1, 2, 4, 4)
    seen = []
    x = d.sample(
        point_eps_oracle(d, point),
        (3, 2, 4, 4),
        sampler=sampler,
        steps=steps,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, t, x, out: seen.append((i, t)),
    )
    torch.testing.assert_close(x, point.expand(3, -1, -1, -1), atol=1e-4, rtol=0)
    # the model saw the original timesteps of the kept steps, noisiest first, once per step
    assert [i for i, _ in seen] == list(range(steps))
    assert [t[0].item() for _, t in seen] == space_timesteps(1000, steps)[::-1]


@pytest.mark.parametrize(
    "schedule, sampler, steps", [("linear", "ddpm", 1000), ("linear", "ddim", 200), ("cosine", "ddpm", 250)]
)
def test_oracle_model_samples_gaussian_data(schedule, sampler, steps):
    mu, s = 0.7, 0.3
    d = GaussianDiffusion(1000, schedule, learn_sigma=False)
    x = d.sample(
        gaussian_eps_oracle(d, mu, s),
        (1000, 1, 4),
        sampler=sampler,
        steps=steps,
        generator=torch.Generator().manual_seed(0),
    )
    assert abs(x.mean().item() - mu) < 0.02
    assert abs(x.std().item() - s) < 0.02


def test_ddpm_sampling_is_deterministic_given_a_seed():
    d = GaussianDiffusion(100, learn_sigma=False)
    fn = gaussian_eps_oracle(d, 0.0, 0.5)

    def draw(seed):
        return d.sample(fn, (2, 3, 4), steps=20, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.allclose(draw(1), draw(2))


def test_full_respacing_equals_the_unrespaced_ddpm_sampler():
    """Respacing 1000 -> 1000 reproduces DDPM's own update (Ho et al. eq. 11, fixed small variance)."""
    d = GaussianDiffusion(1000, learn_sigma=False, fixed_variance="small")
    fn = gaussian_eps_oracle(d, 0.3, 0.5)
    ours = d.sample(fn, (2, 3, 4), steps=1000, generator=torch.Generator().manual_seed(0))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g).double()
    betas, ab = d.betas, d.alphas_cumprod
    for k in range(999, -1, -1):
        eps = fn(x.float(), torch.full((2,), k)).double()
        x = (x - betas[k] / (1 - ab[k]).sqrt() * eps) / (1 - betas[k]).sqrt()
        if k > 0:
            var = betas[k] * (1 - ab[k - 1]) / (1 - ab[k])
            x = x + var.sqrt() * torch.randn(2, 3, 4, generator=g).double()
    torch.testing.assert_close(ours.double(), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("v, fixed", [(-1.0, "small"), (1.0, "large")])
def test_learned_variance_endpoints_are_the_fixed_variances(v, fixed):
    learned, fixed_d = (
        GaussianDiffusion(100, learn_sigma=True),
        GaussianDiffusion(100, learn_sigma=False, fixed_variance=fixed),
    )
    eps = gaussian_eps_oracle(fixed_d, 0.0, 0.5)
    with_v = lambda x, t: torch.cat([eps(x, t), torch.full_like(x, v)], dim=1)
    a = learned.sample(with_v, (2, 3, 4), steps=25, generator=torch.Generator().manual_seed(0))
    b = fixed_d.sample(eps, (2, 3, 4), steps=25, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ddim_eta_adds_noise_only_when_positive():
    d = GaussianDiffusion(100, learn_sigma=False)
    fn = gaussian_eps_oracle(d, 0.0, 0.5)
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    kw = dict(sampler="ddim", steps=10, noise=noise)
    a = d.sample(fn, noise.shape, generator=torch.Generator().manual_seed(1), **kw)
    b = d.sample(fn, noise.shape, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b)
    c = d.sample(fn, noise.shape, eta=1.0, generator=torch.Generator().manual_seed(1), **kw)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="eta"):
        d.sample(fn, noise.shape, sampler="ddpm", eta=0.5, steps=10)


def test_ddim_at_eta_one_is_ancestral_ddpm():
    """At eta = 1 DDIM's noise is the posterior variance, so it is DDPM with fixed small variance."""
    d = GaussianDiffusion(1000, learn_sigma=False, fixed_variance="small")
    fn = gaussian_eps_oracle(d, 0.2, 0.5)
    ddim = d.sample(
        fn, (2, 3, 4), sampler="ddim", eta=1.0, steps=30, generator=torch.Generator().manual_seed(0)
    )
    ddpm = d.sample(fn, (2, 3, 4), sampler="ddpm", steps=30, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- losses
@settings(max_examples=25)
@given(
    batch=st.integers(1, 4), seed=st.integers(0, 2**16), spread=st.floats(0.1, 3.0), force_zero=st.booleans()
)
def test_vb_term_is_nonnegative_and_losses_are_finite(batch, seed, spread, force_zero):
    d = GaussianDiffusion(1000, learn_sigma=True)
    g = torch.Generator().manual_seed(seed)
    x0 = (spread * torch.randn(batch, 2, 3, 3, generator=g)).clamp(-1.5, 1.5)
    t = torch.zeros(batch, dtype=torch.long) if force_zero else d.sample_timesteps(batch, generator=g)
    x_t, noise = d.q_sample(x0, t, generator=g)
    out = (spread * torch.randn(batch, 4, 3, 3, generator=g)).requires_grad_()
    losses = d.training_losses(out, x0, x_t, t, noise)
    assert set(losses) == {"loss", "mse", "vb"}
    for value in losses.values():
        assert value.shape == (batch,) and torch.isfinite(value).all()
    assert bool((losses["vb"] >= -1e-6).all())
    losses["loss"].sum().backward()
    assert out.grad is not None and torch.isfinite(out.grad).all()


def test_vb_vanishes_when_the_model_is_the_true_posterior():
    d = GaussianDiffusion(1000, learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 2, 4, generator=g)
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    x_t, noise = d.q_sample(x0, t, generator=g)
    perfect = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # true epsilon, v = -1: posterior variance
    losses = d.training_losses(perfect, x0, x_t, t, noise)
    torch.testing.assert_close(losses["vb"], torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(losses["mse"], torch.zeros(6), atol=1e-12, rtol=0)


def test_vb_at_step_zero_is_the_discretised_decoder_nll():
    d = GaussianDiffusion(1000, learn_sigma=True)
    x0 = torch.tensor([[-1.0, -0.5, 0.0, 0.3, 1.0, 1.7]])  # edge bins, interior levels, beyond the range
    mean = x0 + torch.tensor([[0.01, -0.02, 0.0, 0.005, -0.01, 0.3]])
    t = torch.zeros(1, dtype=torch.long)
    x_t, noise = d.q_sample(x0, t, generator=torch.Generator().manual_seed(0))
    eps = d.predict_eps(x_t, 0, mean)  # at step 0 the model's mean is its predicted x0: make it `mean`
    v = torch.full_like(x0, 0.3)
    vb = d.training_losses(torch.cat([eps, v], 1), x0, x_t, t, noise)["vb"]
    log_var = 0.65 * d.log_betas[0] + 0.35 * d.posterior_log_variance[0]
    normal = torch.distributions.Normal(mean.double(), (0.5 * log_var).exp())
    upper, lower = normal.cdf(x0.double() + 1 / 255), normal.cdf(x0.double() - 1 / 255)
    p = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1 - lower, upper - lower))
    torch.testing.assert_close(vb.double(), -p.log().mean(1) / math.log(2), atol=1e-4, rtol=1e-4)


def test_hybrid_loss_gradients_split_by_channel():
    """mse trains only the epsilon channels; vb (stop-gradient on the mean) only the variance ones."""
    d = GaussianDiffusion(1000, learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, generator=g).clamp(-1, 1)
    t = torch.tensor([0, 5, 500, 999])
    x_t, noise = d.q_sample(x0, t, generator=g)
    for term, live, dead in (("mse", slice(0, 3), slice(3, 6)), ("vb", slice(3, 6), slice(0, 3))):
        out = torch.randn(4, 6, 5, generator=g).requires_grad_()
        d.training_losses(out, x0, x_t, t, noise)[term].sum().backward()
        assert torch.all(out.grad[:, dead] == 0)
        assert out.grad[:, live].abs().sum(dim=(1, 2)).gt(0).all()


def test_fixed_variance_loss_is_mse_and_channels_are_checked():
    d = GaussianDiffusion(1000, learn_sigma=False)
    x0 = torch.randn(2, 3, 4)
    t = torch.tensor([3, 900])
    x_t, noise = d.q_sample(x0, t)
    losses = d.training_losses(torch.zeros(2, 3, 4), x0, x_t, t, noise)
    assert set(losses) == {"loss", "mse"} and torch.equal(losses["loss"], losses["mse"])
    torch.testing.assert_close(losses["mse"], noise.pow(2).mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="channels"):
        d.training_losses(torch.zeros(2, 6, 4), x0, x_t, t, noise)


# ---------------------------------------------------------------------------- flow matching
@given(
    batch=st.integers(1, 4), seed=st.integers(0, 2**16), sampling=st.sampled_from(["uniform", "logit_normal"])
)
def test_flow_path_velocity_and_timesteps(batch, seed, sampling):
    f = create_diffusion("flow", learn_sigma=True, timestep_sampling=sampling)
    g = torch.Generator().manual_seed(seed)
    t = f.sample_timesteps(batch, generator=g)
    assert t.dtype == torch.float32 and bool(((t >= 0) & (t < 1)).all())
    torch.testing.assert_close(f.model_timesteps(t), t * 999)
    x0 = torch.randn(batch, 2, 3, generator=g)
    x_t, noise = f.q_sample(x0, t, generator=g)
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise)
    oracle = torch.cat([noise - x0, torch.randn_like(x0)], dim=1)  # extra channels are ignored
    losses = f.training_losses(oracle, x0, x_t, t, noise)
    assert set(losses) == {"loss", "mse"} and losses["loss"].shape == (batch,)
    torch.testing.assert_close(losses["loss"], torch.zeros(batch), atol=1e-10, rtol=0)


def test_flow_euler_with_oracle_velocity():
    f = FlowMatching()
    point = torch.linspace(-1, 1, 8).view(1, 2, 4)
    seen = []

    def to_point(x, t):  # exact velocity towards a point: (x_t - x*) / t
        seen.append(t)
        return (x - point) / (t / 999).view(-1, 1, 1)

    x = f.sample(to_point, (3, 2, 4), steps=10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, point.expand(3, -1, -1), atol=1e-5, rtol=0)
    assert seen[0][0].item() == 999 and len(seen) == 10

    mu, s = 0.7, 0.3  # Gaussian data: v = E[noise - x0 | x_t]

    def gaussian(x, tm):
        t = (tm / 999).view(-1, 1, 1)
        var, r = (1 - t) ** 2 * s * s + t * t, x - (1 - t) * mu
        return t * r / var - (mu + (1 - t) * s * s * r / var)

    x = f.sample(gaussian, (1000, 1, 4), steps=50, generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - mu) < 0.02 and abs(x.std().item() - s) < 0.02
    with pytest.raises(ValueError, match="euler"):
        f.sample(gaussian, (1, 1, 4), sampler="ddim")


def test_create_diffusion():
    assert isinstance(create_diffusion("ddpm", num_timesteps=10, schedule="cosine"), GaussianDiffusion)
    assert create_diffusion("flow", num_timesteps=100).timestep_scale == 99
    with pytest.raises(ValueError, match="linear"):
        create_diffusion("flow", schedule="cosine")
    with pytest.raises(ValueError, match="kind"):
        create_diffusion("edm")


# ---------------------------------------------------------------------------- guidance
class Recorder:
    """A fake model: eps depends on the label, variance channels on x; records every call."""

    def __init__(self, chunks=True, channels=4, null_class=7):
        self.supports_chunking, self.null_class, self.C, self.calls = chunks, null_class, channels, []

    def __call__(self, x, t, y=None, **kwargs):
        self.calls.append(dict(x=x, t=t, y=y, **kwargs))
        scale = (y.float() + 1).view(-1, *[1] * (x.ndim - 1))
        out = torch.cat([x * scale, x + 100], dim=1)
        if not kwargs.get("return_info"):
            return out
        return out, SimpleNamespace(kept=torch.full((x.shape[0],), 5))


@settings(max_examples=15)
@given(batch=st.integers(1, 3), scale=st.floats(0.0, 8.0).filter(lambda s: s != 1), seed=st.integers(0, 99))
def test_guidance_batches_cond_and_uncond(batch, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, 4, 2, 2, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 5, (batch,), generator=g)
    model, infos = Recorder(), []
    out = guided_model_fn(model, y, scale=scale, on_info=infos.append)(x, t)
    (call,) = model.calls
    assert torch.equal(call["x"], torch.cat([x, x])) and torch.equal(call["t"], torch.cat([t, t]))
    assert call["y"].tolist() == y.tolist() + [7] * batch
    assert "rho" not in call and len(infos) == 1 and infos[0].kept.shape == (2 * batch,)
    eps_c, eps_u = x * (y.float() + 1).view(-1, 1, 1, 1), x * 8
    torch.testing.assert_close(out[:, :4], eps_u + scale * (eps_c - eps_u))  # all 4 channels guided
    torch.testing.assert_close(out[:, 4:], x + 100)  # conditional variance channels


def test_guidance_scale_one_is_the_conditional_model():
    x, t, y = torch.randn(2, 4, 3), torch.tensor([5, 9]), torch.tensor([0, 2])
    model = Recorder()
    out = guided_model_fn(model, y, scale=1.0, rho=0.3, uncond_rho=0.9)(x, t)
    (call,) = model.calls
    assert call["x"].shape[0] == 2 and call["y"].tolist() == [0, 2] and call["rho"] == 0.3
    assert torch.equal(out, model(x, t, y))
    plain = model_fn(Recorder(), y)(x, t)
    assert torch.equal(plain, out)


def test_lite_cfg_passes_per_sample_rho():
    x, t, y = torch.randn(3, 4, 2), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    model = Recorder()
    guided_model_fn(model, y, scale=1.5, rho=0.2, uncond_rho=0.9)(x, t)
    torch.testing.assert_close(model.calls[-1]["rho"], torch.tensor([0.2] * 3 + [0.9] * 3))
    guided_model_fn(model, y, scale=1.5, rho=0.2)(x, t)  # no Lite-CFG: one shared rho
    assert model.calls[-1]["rho"] == 0.2
    guided_model_fn(model, y, scale=1.5, uncond_rho=0.9)(x, t)  # conditional half at the natural choice
    torch.testing.assert_close(model.calls[-1]["rho"], torch.tensor([0.0] * 3 + [0.9] * 3))


def test_guidance_respects_models_that_do_not_chunk():
    x, t, y = torch.randn(2, 4, 2), torch.tensor([1, 2]), torch.tensor([0, 1])
    model = Recorder(chunks=False)
    guided_model_fn(model, y, scale=2.0, rho=0.0)(x, t)
    assert "rho" not in model.calls[-1]
    with pytest.raises(ValueError, match="does not chunk"):
        guided_model_fn(model, y, scale=2.0, uncond_rho=0.9)
    with pytest.raises(ValueError, match="null"):
        guided_model_fn(Recorder(null_class=None), y, scale=2.0)


# ---------------------------------------------------------------------------- a real model
def test_dcdit_trains_and_samples():
    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", hidden_size=32, depth=1, num_heads=2, input_size=8, num_classes=3)
    diffusion = create_diffusion("ddpm", num_timesteps=1000, learn_sigma=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 8, 8, generator=g).clamp(-1, 1)
    y = torch.randint(0, 3, (8,), generator=g)
    t = diffusion.sample_timesteps(8, "cpu", generator=g)
    x_t, noise = diffusion.q_sample(x0, t, generator=g)
    history = []
    for _ in range(20):
        out, info = model(x_t, diffusion.model_timesteps(t), y, return_info=True)
        losses = diffusion.training_losses(out, x0, x_t, t, noise)
        loss = losses["loss"].mean() + model.budget.ratio_weight * info.ratio_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(losses["loss"].mean().item())
    assert history[-1] < 0.97 * history[0]

    model.eval()
    kept, steps = [], []
    fn = guided_model_fn(model, y[:2], scale=1.5, uncond_rho=0.5, on_info=lambda info: kept.append(info.kept))
    samples = diffusion.sample(
        fn,
        (2, 4, 8, 8),
        steps=4,
        generator=torch.Generator().manual_seed(1),
        callback=lambda i, t, x, out: steps.append(i),
    )
    assert samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all()
    assert steps == [0, 1, 2, 3] and len(kept) == 4 and kept[0].shape == (4,)  # [cond; uncond] per step
