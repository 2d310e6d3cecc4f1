"""Flow matching on the straight path (rectified flow), with an Euler sampler.

``x_t = (1 - t) x0 + t noise`` for ``t`` in ``[0, 1]``: data at ``t = 0``, noise at ``t = 1``.
The model predicts the velocity ``v = dx_t / dt = noise - x0`` and is trained by MSE;
sampling integrates ``dx/dt = v`` from ``t = 1`` down to ``t = 0``. The interface matches
:class:`~chunkformer.diffusion.GaussianDiffusion`, so training and sampling code serves both.

    flow = FlowMatching(timestep_sampling="logit_normal")
    t = flow.sample_timesteps(B, device)                   # (B,) float in (0, 1)
    x_t, noise = flow.q_sample(x0, t)
    out = model(x_t, flow.model_timesteps(t), y)           # the embedder sees t * 999
    loss = flow.training_losses(out, x0, x_t, t, noise)["loss"].mean()
"""

from contextlib import nullcontext
from typing import Literal

import torch

from .._typing import Float, Tensor, typechecked
from ..caching import StepCache
from ..progress import Progress
from ..progress import progress as track
from .gaussian import ModelFn, StepCallback, initial_noise, mean_flat

__all__ = ["FlowMatching"]

TimestepSampling = Literal["uniform", "logit_normal"]


class FlowMatching:
    """Straight-path flow matching with velocity prediction.

    Args:
        timestep_sampling: ``"uniform"`` ``t ~ U(0, 1)``, or ``"logit_normal"``
            ``t = sigmoid(N(logit_mean, logit_std^2))`` (more weight on middle times, as in
            Stable Diffusion 3).
        learn_sigma: the model outputs ``2C`` channels (a DiT built with ``learn_sigma``);
            only the first ``C`` are the velocity, the rest are ignored.
        timestep_scale: ``model_timesteps(t) = t * timestep_scale`` (999: the DDPM index range,
            so DiT's sinusoidal embedder and timestep-keyed budget schedules fit unchanged).
        logit_mean, logit_std: the logit-normal's parameters.
    """

    def __init__(
        self,
        timestep_sampling: TimestepSampling = "uniform",
        learn_sigma: bool = False,
        *,
        timestep_scale: float = 999.0,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ) -> None:
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(
                f"timestep_sampling must be 'uniform' or 'logit_normal', got {timestep_sampling!r}"
            )
        self.timestep_sampling, self.learn_sigma = timestep_sampling, learn_sigma
        self.timestep_scale, self.logit_mean, self.logit_std = timestep_scale, logit_mean, logit_std

    def __repr__(self) -> str:
        return f"FlowMatching(timestep_sampling={self.timestep_sampling!r}, learn_sigma={self.learn_sigma})"

    # ------------------------------------------------------------------ training
    def sample_timesteps(
        self, batch: int, device: "torch.device | str | None" = None, generator: torch.Generator | None = None
    ) -> Float[Tensor, "batch"]:
        """``(batch,)`` float32 times in ``[0, 1)`` (``generator`` must live on ``device``)."""
        if self.timestep_sampling == "uniform":
            return torch.rand((batch,), generator=generator, device=device)
        z = torch.randn((batch,), generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """What the model's timestep embedder sees: ``t * 999`` (float), on DDPM's index scale."""
        return t.float() * self.timestep_scale

    @typechecked
    def q_sample(
        self,
        x0: Float[Tensor, "batch channels *grid"],
        t: Float[Tensor, "batch"],
        noise: Float[Tensor, "batch channels *grid"] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Float[Tensor, "batch channels *grid"], Float[Tensor, "batch channels *grid"]]:
        """``x_t = (1 - t) x0 + t noise``; returns ``(x_t, noise)``."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        tt = t.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
        return (1 - tt) * x0 + tt * noise, noise

    @typechecked
    def training_losses(
        self,
        model_output: Float[Tensor, "batch out *grid"],
        x0: Float[Tensor, "batch channels *grid"],
        x_t: Float[Tensor, "batch channels *grid"],
        t: Float[Tensor, "batch"],
        noise: Float[Tensor, "batch channels *grid"],
    ) -> dict[str, Float[Tensor, "batch"]]:
        """``"mse"`` of the velocity ``noise - x0`` per sample ``(B,)``; ``"loss"`` is the same."""
        v = self._velocity(model_output, x0.shape[1])
        mse = mean_flat((noise.float() - x0.float() - v) ** 2)
        return {"loss": mse, "mse": mse}

    def _velocity(self, model_output: Tensor, C: int) -> Tensor:
        want = 2 * C if self.learn_sigma else C
        if model_output.shape[1] != want:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels, expected {want} for {C} data channels "
                f"with learn_sigma={self.learn_sigma}"
            )
        return model_output[:, :C].float()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: "tuple[int, ...] | torch.Size",
        *,
        sampler: Literal["euler"] = "euler",
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
        """Euler integration from ``t = 1`` (``noise``) to ``t = 0`` in ``steps`` equal steps.

        ``model_fn(x, t)`` gets ``model_timesteps`` of the current time, float ``(B,)``.
        ``eta`` and ``clip_denoised`` exist for a signature shared with
        :meth:`GaussianDiffusion.sample`; the ODE sampler has neither, so they must stay off.
        ``cache``: a :class:`~chunkformer.caching.StepCache` on the model ``model_fn`` calls.
        """
        if sampler != "euler":
            raise ValueError(f"FlowMatching samples with 'euler', got {sampler!r}")
        if eta != 0 or clip_denoised:
            raise ValueError(
                "eta and clip_denoised do not apply to the Euler flow sampler; leave them at 0/False"
            )
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        x = initial_noise(shape, noise, generator, device)  # x_T
        B, C = x.shape[:2]
        times = [1 - i / steps for i in range(steps + 1)]  # host floats: 1, ..., 0
        with nullcontext() if cache is None else cache.sampling(steps):
            for step in track(range(steps), progress, desc="euler"):
                t = self.model_timesteps(torch.full((B,), times[step], device=x.device))  # (B,) in [0, 999]
                if cache is not None:
                    cache.at(step)
                out = model_fn(x, t)
                if callback is not None:
                    callback(step, t, x, out)
                x = x + (times[step + 1] - times[step]) * self._velocity(out, C)
        return x
