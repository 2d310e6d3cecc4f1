"""Step caching: skip the backbone on sampling steps where its input barely moved.

Adjacent sampling steps feed the backbone nearly the same input, so its *residual*
(output minus input) changes slowly. :class:`StepCache` measures, at each step, the
relative L1 change of the first block's modulated input (the timestep-aware signal
TeaCache uses), accumulates it, and while the sum stays under ``threshold`` reuses the
last computed residual instead of running the blocks; once the sum crosses it, the
blocks run and the sum restarts at zero. The first and last ``keep`` steps always run.

    cache = cf.StepCache(model, threshold=0.1)
    x0 = diffusion.sample(fn, shape, steps=50, cache=cache)   # fn = guided_model_fn(model, ...)
    cache.skipped, cache.computed                              # backbone passes saved / run

With a DC-DiT the kept tokens change from step to step, so the residual is stored on the
grid: each grid position holds the residual of its nearest kept token (``plan.plug_back``),
and a cached step reads it at the tokens it keeps now (``plan.chunk``). ``threshold=0``
runs every step and is exactly the uncached sampler. It composes with token merging (the
blocks that run are the merged ones) and with any budget.

The sampler calls the model once per step (CFG halves travel in one batch); the cache
assumes so. A call whose batch or grid differs from the last one always runs.
"""

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .plan import ChunkPlan

__all__ = ["StepCache", "cached_backbone", "skipped_last"]


class StepCache:
    """TeaCache-style reuse of the backbone residual across sampling steps.

    Args:
        model: a DiT, DC-DiT or ``chunkformer.wrap`` result (the model the sampler calls).
        threshold: skip while the accumulated relative change stays below this (0 = never skip).
        rescale: polynomial coefficients (highest power first, ``numpy.polyval`` order) applied
            to each step's relative change before accumulating (TeaCache fits one per model);
            ``None`` accumulates the raw change.
        max_skips: at most this many consecutive skipped steps (``None``: no limit).
        keep: the first and last ``keep`` steps of a run always compute.
    """

    def __init__(self, model: nn.Module, threshold: float, *, rescale: Sequence[float] | None = None,
                 max_skips: int | None = None, keep: int = 1) -> None:
        if not hasattr(type(model), "step_cache"):
            raise TypeError(
                f"StepCache needs a chunkformer model (DiT, DCDiT or a wrap(...) result), got {type(model).__name__}"
            )
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (0 disables skipping), got {threshold!r}")
        if max_skips is not None and max_skips < 0:
            raise ValueError(f"max_skips must be >= 0 or None, got {max_skips}")
        self.model, self.threshold, self.rescale = model, float(threshold), rescale
        self.max_skips, self.keep = max_skips, keep
        self._reset()

    def _reset(self) -> None:
        self.computed = self.skipped = 0
        self.history: list[tuple[float, bool]] = []  # (accumulated change, skipped) per step
        self._prev: torch.Tensor | None = None
        self._residual: torch.Tensor | None = None
        self._acc, self._streak = 0.0, 0
        self._step, self._steps = 0, None
        self.last_skipped = False

    @contextmanager
    def sampling(self, steps: int):
        """Install on the model for one sampling run of ``steps`` steps (the samplers do this)."""
        if getattr(self.model, "step_cache", None) not in (None, self):
            raise RuntimeError("another StepCache is installed on this model")
        self._reset()
        self._steps = steps
        self.model.step_cache = self
        try:
            yield self
        finally:
            del self.model.step_cache  # back to the class default, None

    def at(self, step: int) -> None:
        """The sampler announces step ``step`` (0-based) before calling the model."""
        self._step = step

    def _forced(self) -> bool:
        if self._steps is None:
            return False
        return self._step < self.keep or self._step >= self._steps - self.keep

    @property
    def measures(self) -> bool:
        """Whether :meth:`decide` reads a change signal (``threshold > 0``); else every step runs."""
        return self.threshold > 0

    def decide(self, signal: torch.Tensor | None) -> bool:
        """Record this step and say whether to skip the blocks; ``signal``: block 0's ``(B, L, d)`` input on the
        grid, whatever was kept (``None`` when :attr:`measures` is off)."""
        self.last_skipped = False
        if not self.measures:  # exactly the uncached forward
            self.history.append((0.0, False))
            return False
        current = signal.float()
        skip = False
        if self._prev is not None and self._prev.shape == current.shape and not self._forced():
            change = float((current - self._prev).abs().mean() / self._prev.abs().mean().clamp_min(1e-12))
            if self.rescale is not None:
                change = sum(c * change**k for k, c in enumerate(reversed(list(self.rescale))))
            self._acc += change
            skip = self._acc < self.threshold and (self.max_skips is None or self._streak < self.max_skips)
        self._prev = current
        self.history.append((self._acc, skip))
        return skip

    def reuse(self, h: torch.Tensor, plan: ChunkPlan | None) -> torch.Tensor:
        """The skipped blocks' output: ``h`` plus the stored residual at the tokens ``plan`` keeps now."""
        self._streak += 1
        self.skipped += 1
        self.last_skipped = True
        residual = self._residual if plan is None else plan.chunk(self._residual)
        return h + residual.to(h.dtype)

    def store(self, h: torch.Tensor, out: torch.Tensor, plan: ChunkPlan | None) -> None:
        """The blocks ran (``h`` -> ``out``): keep their residual on the grid, ``(B, L, d)``."""
        self._acc, self._streak = 0.0, 0
        self.computed += 1
        if not self.measures:
            return
        residual = out - h
        self._residual = residual if plan is None else plan.plug_back(plan.unchunk(residual))  # (B, L, d)


def cached_backbone(model: nn.Module, h: torch.Tensor, cond, plan: ChunkPlan | None, tokens: torch.Tensor,
                    keep: list | None = None) -> torch.Tensor:
    """``model.run_backbone(h, cond, plan, keep)``, or the installed :class:`StepCache`'s stored residual.

    ``h``: the blocks' input (``plan.chunk`` layout, or dense ``(B, L, d)`` with ``plan=None``);
    ``tokens``: ``(B, L, d)`` on the grid, from which ``model.block_input(tokens, cond)`` gives the change signal.
    """
    cache = model.step_cache
    if cache is None:
        return model.run_backbone(h, cond, plan, keep)
    if cache.decide(model.block_input(tokens, cond) if cache.measures else None):
        return cache.reuse(h, plan)
    out = model.run_backbone(h, cond, plan, keep)
    cache.store(h, out, plan)
    return out


def skipped_last(model: nn.Module) -> bool:
    """Whether the model's last forward reused a cached residual (``ForwardInfo.cached``)."""
    return model.step_cache is not None and model.step_cache.last_skipped
