"""Respacing: sample a ``T``-step Gaussian process in fewer, evenly spaced steps.

Keeping steps ``k_0 < k_1 < ... < k_{S-1}`` of the original process and asking that the
new process reach the same noise levels there fixes its betas:
``alpha_bar'_i = alpha_bar[k_i]``, so ``beta'_i = 1 - alpha_bar[k_i] / alpha_bar[k_{i-1}]``
(with ``alpha_bar[k_{-1}] = 1``). A model trained on the original process then sees the
same marginals at the kept steps; it is called with the *original* indices ``k_i``.

    kept = space_timesteps(1000, 250)                  # [0, 4, 8, 12, 16, 20, 24, 28, 32, ..., 999]
    betas = respaced_betas(alphas_cumprod, kept)       # (250,) float64
"""

import torch

from .._typing import Float, Tensor, typechecked

__all__ = ["space_timesteps", "respaced_betas"]


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced, strictly increasing indices into ``range(num_timesteps)``.

    The first is 0 and the last ``num_timesteps - 1`` (one step keeps only the last: a
    single jump from pure noise to the data). Positions ``i (T - 1) / (S - 1)`` are rounded
    to the nearest integer; the stride is at least 1, so none repeat, and ``steps == T``
    keeps every step.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}] (the trained process length), got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return [int(i * stride + 0.5) for i in range(steps)]


@typechecked
def respaced_betas(alphas_cumprod: Float[Tensor, "T"], kept: list[int]) -> Float[Tensor, "S"]:
    """Betas of the process that visits only the ``kept`` steps (see the module docstring)."""
    ab = alphas_cumprod[torch.as_tensor(kept, dtype=torch.long)]  # (S,)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    return 1 - ab / ab_prev
