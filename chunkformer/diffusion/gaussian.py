"""Gaussian diffusion (DDPM): noise schedule, forward process, hybrid loss, DDPM and DDIM sampling.

Written from the papers (Ho et al. 2020; Nichol & Dhariwal 2021; Song et al. 2021), in
the setting DiT trains in: epsilon prediction, a linear beta schedule over ``T = 1000``
steps and, with ``learn_sigma``, a learned-range variance trained by the hybrid loss.

    diffusion = GaussianDiffusion(1000, "linear", learn_sigma=True)
    t = diffusion.sample_timesteps(B, device)              # (B,) int64 in [0, T)
    x_t, noise = diffusion.q_sample(x0, t)                 # forward process
    out = model(x_t, diffusion.model_timesteps(t), y)      # (B, 2C, *grid): epsilon, then v
    loss = diffusion.training_losses(out, x0, x_t, t, noise)["loss"].mean()
    x0 = diffusion.sample(lambda x, t: model(x, t, y), x0.shape, steps=250)

Notation: ``ab = alpha_bar_t = prod_{s <= t} (1 - beta_s)``; indices run ``0 .. T-1`` (index
``t`` is the paper's step ``t + 1``). Schedule tables are float64 on the CPU; each is copied
once per device as float32 for training. Sampling reads per-step coefficients as Python
floats, so the step loop issues no gathers and no host syncs.
"""

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Literal

import torch

from .._typing import Float, Int, Tensor, typechecked
from ..caching import StepCache
from ..progress import Progress
from ..progress import progress as track
from .respace import respaced_betas, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "beta_schedule",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "ModelFn",
    "StepCallback",
]

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""``model_fn(x, t) -> output``: ``x`` ``(B, C, *grid)``, ``t`` ``(B,)`` model timesteps."""
StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]
"""``callback(step_index, t, x_t, model_output)``, once per sampling step."""

Schedule = Literal["linear", "cosine"]
FixedVariance = Literal["small", "large"]


# ---------------------------------------------------------------------------- schedules
def beta_schedule(name: Schedule, num_timesteps: int) -> Tensor:
    """``(T,)`` float64 betas.

    ``"linear"``: DDPM's ``1e-4 .. 0.02`` at ``T = 1000``, both ends scaled by ``1000 / T``
    so other lengths follow the same curve of noise levels (capped at 0.999 for ``T < 21``,
    where the scaled end would pass 1). ``"cosine"``: improved DDPM's
    ``alpha_bar(s) = cos^2((s / T + 0.008) / 1.008 * pi / 2)``, betas capped at 0.999.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "linear":
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64).clamp(max=0.999)
    if name == "cosine":
        s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        ab = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # (T + 1,)
        return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {name!r}; choose 'linear' or 'cosine'")


# ---------------------------------------------------------------------------- likelihood helpers
def mean_flat(x: Tensor) -> Tensor:
    """Mean over every axis but the batch: ``(B, ...)`` -> ``(B,)``."""
    return x.flatten(1).mean(1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` elementwise, in nats (broadcasts)."""
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Log-probability (nats, elementwise) of data ``x`` in ``[-1, 1]`` quantised to 256 levels.

    Each level owns a bin of width ``2 / 255`` around it; the two end bins extend to
    ``-inf`` and ``+inf``, so values outside ``[-1, 1]`` (latents often are) count as the
    end level. ``log_scale`` is ``log(std)``.
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1 / 255)  # standardised bin edges
    lower = inv_std * (x - mean - 1 / 255)
    log_below_upper = torch.special.log_ndtr(upper)  # log P(z < upper): the bottom bin
    log_above_lower = torch.special.log_ndtr(-lower)  # log P(z > lower): the top bin
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, log_bin))


def _exp(v: "float | Tensor") -> "float | Tensor":
    return v.exp() if torch.is_tensor(v) else math.exp(v)


def initial_noise(
    shape: "tuple[int, ...] | torch.Size",
    noise: Tensor | None,
    generator: torch.Generator | None,
    device: "torch.device | str | None",
) -> Tensor:
    """A sampler's start: ``noise`` itself (checked against ``shape``), else a standard normal
    draw on ``device``, defaulting to the generator's device, then the CPU."""
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape is {tuple(shape)}")
        return noise.to(device) if device is not None else noise
    if device is None:
        device = generator.device if generator is not None else "cpu"
    return torch.randn(tuple(shape), generator=generator, device=device)


# ---------------------------------------------------------------------------- the process
class GaussianDiffusion:
    """A discrete-time Gaussian diffusion with epsilon prediction.

    Args:
        num_timesteps: ``T`` (1000 in DDPM and DiT).
        schedule: ``"linear"`` (DDPM, DiT) or ``"cosine"`` (improved DDPM).
        learn_sigma: the model outputs ``2C`` channels, epsilon then ``v``;
            ``log sigma^2 = f log beta_t + (1 - f) log beta~_t`` with ``f = (v + 1) / 2``
            (the learned range of improved DDPM), trained by ``loss = mse + vb``.
        fixed_variance: without ``learn_sigma``: ``"small"`` (default) samples with the
            posterior variance ``beta~_t``, the right choice when the data is a point mass
            and the one that keeps few-step ancestral sampling sharp; ``"large"`` with
            ``beta_t`` (DDPM's other option, the right one for ``N(0, I)`` data).
        betas: explicit ``(T,)`` betas, overriding ``num_timesteps`` and ``schedule``.
        timestep_map: the original timestep of each step (set by :meth:`respace`).
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: Schedule = "linear",
        learn_sigma: bool = True,
        fixed_variance: FixedVariance = "small",
        *,
        betas: Tensor | None = None,
        timestep_map: list[int] | None = None,
    ) -> None:
        betas = (
            beta_schedule(schedule, num_timesteps) if betas is None else torch.as_tensor(betas).double().cpu()
        )
        if betas.ndim != 1 or not all(0 < b <= 1 for b in betas.tolist()):
            raise ValueError("betas must be a 1-D tensor with every value in (0, 1]")
        if fixed_variance not in ("small", "large"):
            raise ValueError(f"fixed_variance must be 'small' or 'large', got {fixed_variance!r}")
        T = betas.shape[0]
        self.num_timesteps, self.learn_sigma, self.fixed_variance = T, learn_sigma, fixed_variance
        self.timestep_map = list(range(T)) if timestep_map is None else list(timestep_map)
        if len(self.timestep_map) != T:
            raise ValueError(f"timestep_map has {len(self.timestep_map)} entries for {T} steps")

        # 1. marginals q(x_t | x_0) = N(sqrt(ab) x_0, (1 - ab) I)
        self.betas = betas
        self.alphas_cumprod = ab = torch.cumprod(1 - betas, 0)
        self.alphas_cumprod_prev = ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - ab).sqrt()
        self.sqrt_recip_alphas_cumprod = ab.rsqrt()  # x_0 = sqrt(1/ab) x_t - sqrt(1/ab - 1) eps
        self.sqrt_recipm1_alphas_cumprod = (1 / ab - 1).sqrt()
        # 2. posteriors q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, beta~_t I)
        self.posterior_variance = betas * (1 - ab_prev) / (1 - ab)
        self.posterior_mean_coef_x0 = betas * ab_prev.sqrt() / (1 - ab)
        self.posterior_mean_coef_xt = (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)
        # beta~_0 = 0: its log would be -inf, so step 0 borrows step 1's (it never adds noise)
        first = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance = torch.cat([first, self.posterior_variance[1:]]).log()
        self.log_betas = betas.log()
        self.large_log_variance = torch.cat([first, betas[1:]]).log()  # "fixed large", same step-0 rule
        self._tables: dict[torch.device, dict[str, Tensor]] = {}
        # the same tables as Python floats: a sampling step reads its coefficients without a tensor op
        self._host_tables: dict[str, list[float]] = {
            name: value.tolist() for name, value in vars(self).items() if torch.is_tensor(value) and value.ndim == 1}

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.num_timesteps}, learn_sigma={self.learn_sigma}, "
            f"fixed_variance={self.fixed_variance!r})"
        )

    # ------------------------------------------------------------------ coefficients
    def _coef(self, name: str, t: "int | Tensor", like: Tensor) -> "float | Tensor":
        """Table ``name`` at step ``t``: a Python float for an int step (sampling), else the
        per-sample values ``(B, 1, ..., 1)`` gathered on ``like``'s device (training)."""
        if isinstance(t, int):
            return self._host_tables[name][t]
        tables = self._tables.setdefault(like.device, {})
        if name not in tables:
            tables[name] = getattr(self, name).to(device=like.device, dtype=torch.float32)
        return tables[name][t].view(-1, *[1] * (like.ndim - 1))

    # ------------------------------------------------------------------ training
    def sample_timesteps(
        self, batch: int, device: "torch.device | str | None" = None, generator: torch.Generator | None = None
    ) -> Int[Tensor, "batch"]:
        """``(batch,)`` int64 steps, uniform in ``[0, T)`` (``generator`` must live on ``device``)."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """What the model's timestep embedder sees: the step index ``t`` itself."""
        return t

    @typechecked
    def q_sample(
        self,
        x0: Float[Tensor, "batch channels *grid"],
        t: Int[Tensor, "batch"],
        noise: Float[Tensor, "batch channels *grid"] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Float[Tensor, "batch channels *grid"], Float[Tensor, "batch channels *grid"]]:
        """``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``; returns ``(x_t, noise)``."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = (
            self._coef("sqrt_alphas_cumprod", t, x0) * x0
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )
        return x_t, noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: "int | Tensor") -> tuple[Tensor, "float | Tensor"]:
        """Mean and (step-0-clipped) log variance of ``q(x_{t-1} | x_t, x_0)``."""
        mean = (
            self._coef("posterior_mean_coef_x0", t, x_t) * x0
            + self._coef("posterior_mean_coef_xt", t, x_t) * x_t
        )
        return mean, self._coef("posterior_log_variance", t, x_t)

    def predict_x0(self, x_t: Tensor, t: "int | Tensor", eps: Tensor) -> Tensor:
        return (
            self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps(self, x_t: Tensor, t: "int | Tensor", x0: Tensor) -> Tensor:
        return (self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._coef(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: "int | Tensor", clip_denoised: bool = False
    ) -> dict[str, "Tensor | float"]:
        """The model's ``p(x_{t-1} | x_t)``: ``mean``, ``log_variance``, and its ``x0`` and ``eps``."""
        C = x_t.shape[1]
        self._check_channels(model_output, C)
        eps = model_output[:, :C].float()
        if self.learn_sigma:
            frac = (model_output[:, C:].float() + 1) / 2  # v in [-1, 1] -> [0, 1]
            log_var = frac * self._coef("log_betas", t, x_t) + (1 - frac) * self._coef(
                "posterior_log_variance", t, x_t
            )
        else:
            table = "posterior_log_variance" if self.fixed_variance == "small" else "large_log_variance"
            log_var = self._coef(table, t, x_t)
        x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = self.predict_eps(x_t, t, x0)
        mean, _ = self.q_posterior(x0, x_t, t)
        return {"mean": mean, "log_variance": log_var, "x0": x0, "eps": eps}

    def vb_terms(
        self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Int[Tensor, "batch"]
    ) -> Float[Tensor, "batch"]:
        """One term of the variational bound per sample, in bits per dimension (``>= 0``).

        ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for ``t > 0``; at ``t = 0`` the
        decoder's negative log-likelihood of ``x0`` under a discretised Gaussian (see
        :func:`discretized_gaussian_log_likelihood`).
        """
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2)
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        ) / math.log(2)
        return torch.where(t == 0, nll, kl)

    @typechecked
    def training_losses(
        self,
        model_output: Float[Tensor, "batch out *grid"],
        x0: Float[Tensor, "batch channels *grid"],
        x_t: Float[Tensor, "batch channels *grid"],
        t: Int[Tensor, "batch"],
        noise: Float[Tensor, "batch channels *grid"],
    ) -> dict[str, Float[Tensor, "batch"]]:
        """Per-sample losses ``(B,)``: ``"mse"`` of epsilon, ``"vb"`` (``learn_sigma`` only)
        and their sum ``"loss"``.

        The ``vb`` term sees the predicted epsilon through a stop-gradient, so it trains
        only the variance channels and ``mse`` only the epsilon ones (improved DDPM's
        hybrid loss). It is one bound term in bits/dim, not rescaled by ``T / 1000``
        (the two agree at ``T = 1000``).
        """
        C = x0.shape[1]
        self._check_channels(model_output, C)
        eps = model_output[:, :C].float()
        terms = {"mse": mean_flat((noise.float() - eps) ** 2)}
        if self.learn_sigma:
            frozen = torch.cat([eps.detach(), model_output[:, C:].float()], dim=1)
            terms["vb"] = self.vb_terms(frozen, x0.float(), x_t.float(), t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def _check_channels(self, model_output: Tensor, C: int) -> None:
        want = 2 * C if self.learn_sigma else C
        if model_output.shape[1] != want:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels, expected {want} for {C} data channels "
                f"with learn_sigma={self.learn_sigma} (a learned-sigma model outputs epsilon then v)"
            )

    # ------------------------------------------------------------------ sampling
    def respace(self, steps: int) -> "GaussianDiffusion":
        """The process that visits ``steps`` evenly spaced steps of this one (see :mod:`.respace`)."""
        kept = space_timesteps(self.num_timesteps, steps)
        return GaussianDiffusion(
            learn_sigma=self.learn_sigma,
            fixed_variance=self.fixed_variance,
            betas=respaced_betas(self.alphas_cumprod, kept),
            timestep_map=[self.timestep_map[k] for k in kept],
        )

    def ddpm_step(
        self,
        model_output: Tensor,
        x_t: Tensor,
        i: int,
        *,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
    ) -> Tensor:
        """Ancestral step ``x_i -> x_{i-1}``: posterior mean plus ``sigma z`` (no noise at ``i = 0``)."""
        p = self.p_mean_variance(model_output, x_t, i, clip_denoised)
        if i == 0:
            return p["mean"]
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return p["mean"] + _exp(0.5 * p["log_variance"]) * z

    def ddim_step(
        self,
        model_output: Tensor,
        x_t: Tensor,
        i: int,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
    ) -> Tensor:
        """DDIM step ``x_i -> x_{i-1}``: deterministic at ``eta = 0``, DDPM-like at ``eta = 1``."""
        p = self.p_mean_variance(model_output, x_t, i, clip_denoised)
        ab, ab_prev = self._coef("alphas_cumprod", i, x_t), self._coef("alphas_cumprod_prev", i, x_t)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x_prev = math.sqrt(ab_prev) * p["x0"] + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * p["eps"]
        if sigma == 0:
            return x_prev
        return x_prev + sigma * torch.randn(
            x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype
        )

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: "tuple[int, ...] | torch.Size",
        *,
        sampler: Literal["ddpm", "ddim"] = "ddpm",
        steps: int = 250,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        progress: "bool | Progress" = False,
        callback: StepCallback | None = None,
        clip_denoised: bool = False,
        device: "torch.device | str | None" = None,
        cache: "StepCache | None" = None,
    ) -> Tensor:
        """Draw ``x_0`` of ``shape`` ``(B, C, *grid)`` by ``steps`` evenly spaced steps.

        ``model_fn(x, t)`` gets the *original* int64 timesteps ``(B,)`` of each kept step.
        ``noise`` is ``x_T`` (else drawn from ``generator``, which must live on ``device``;
        ``device`` defaults to ``noise``'s, then the generator's, then the CPU). ``eta``
        is DDIM's (``sampler="ddim"`` only). ``clip_denoised`` clamps each predicted ``x_0``
        to ``[-1, 1]`` (pixels; leave it off for latents). ``callback(step_index, t, x_t,
        model_output)`` runs once per step. ``cache``: a :class:`~chunkformer.caching.StepCache`
        on the model ``model_fn`` calls, to skip backbone passes (``threshold=0`` changes nothing).
        """
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"GaussianDiffusion samples with 'ddpm' or 'ddim', got {sampler!r}")
        if sampler == "ddpm" and eta != 0:
            raise ValueError("eta applies to sampler='ddim' only (ancestral DDPM has no eta)")
        process = self.respace(steps)
        x = initial_noise(shape, noise, generator, device)  # x_T
        B = x.shape[0]
        with nullcontext() if cache is None else cache.sampling(steps):
            for step, i in enumerate(track(range(steps - 1, -1, -1), progress, desc=sampler)):
                t = torch.full((B,), process.timestep_map[i], device=x.device, dtype=torch.long)
                if cache is not None:
                    cache.at(step)
                out = model_fn(x, self.model_timesteps(t))
                if callback is not None:
                    callback(step, t, x, out)
                if sampler == "ddpm":
                    x = process.ddpm_step(out, x, i, generator=generator, clip_denoised=clip_denoised)
                else:
                    x = process.ddim_step(out, x, i, eta=eta, generator=generator, clip_denoised=clip_denoised)
        return x
