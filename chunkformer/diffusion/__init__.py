"""Diffusion processes and samplers: DDPM/DDIM (:mod:`.gaussian`), respacing (:mod:`.respace`),
flow matching (:mod:`.flow`) and classifier-free guidance closures (:mod:`.guidance`).

Both processes share one interface, so a training step and a sampler are written once::

    diffusion = create_diffusion("ddpm")                    # or "flow"
    t = diffusion.sample_timesteps(B, device)
    x_t, noise = diffusion.q_sample(x0, t)
    out = model(x_t, diffusion.model_timesteps(t), y)
    loss = diffusion.training_losses(out, x0, x_t, t, noise)["loss"].mean()
    x = diffusion.sample(guided_model_fn(model, y, scale=1.5), x0.shape, steps=250)
"""

from typing import Literal

from .flow import FlowMatching
from .gaussian import GaussianDiffusion, beta_schedule
from .guidance import guided_model_fn, model_fn
from .respace import respaced_betas, space_timesteps

__all__ = [
    "create_diffusion",
    "GaussianDiffusion",
    "FlowMatching",
    "guided_model_fn",
    "model_fn",
    "beta_schedule",
    "space_timesteps",
    "respaced_betas",
]


def create_diffusion(
    kind: Literal["ddpm", "flow"] = "ddpm",
    num_timesteps: int = 1000,
    schedule: str = "linear",
    learn_sigma: bool = True,
    **kwargs,
) -> "GaussianDiffusion | FlowMatching":
    """Build a process by name.

    ``"ddpm"``: :class:`GaussianDiffusion` (``kwargs``: ``fixed_variance``). ``"flow"``:
    :class:`FlowMatching` with ``model_timesteps(t) = t * (num_timesteps - 1)``; its path is
    straight, so ``schedule`` must stay ``"linear"`` (``kwargs``: ``timestep_sampling``,
    ``logit_mean``, ``logit_std``).
    """
    if kind == "ddpm":
        return GaussianDiffusion(num_timesteps, schedule, learn_sigma, **kwargs)
    if kind == "flow":
        if schedule != "linear":
            raise ValueError(
                f"flow matching has a straight path; schedule must be 'linear', got {schedule!r}"
            )
        return FlowMatching(learn_sigma=learn_sigma, timestep_scale=float(num_timesteps - 1), **kwargs)
    raise ValueError(f"unknown diffusion kind {kind!r}; choose 'ddpm' or 'flow'")
