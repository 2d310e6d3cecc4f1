"""A stand-in for a checkout of the original DiT code, for ``benchmarks/step_speed.py --original``'s tests.

Exposes what the benchmark uses of the original ``models.py``: a ``DiT`` class taking ``input_size``,
``num_classes``, ``hidden_size``, ``depth`` and ``num_heads``, a ``DiT_models`` registry with a
``"DiT-XL/2"`` entry, ``forward(x, t, y)`` and ``forward_with_cfg(x, t, y, cfg_scale)``. The network is
``examples/_original_layout.py``'s, written in this repository; no code of the original is here.
"""

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
from _original_layout import OriginalLayoutDiT  # noqa: E402

__all__ = ["DiT", "DiT_models"]


class DiT(OriginalLayoutDiT):
    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float):
        """``x`` (2B, C, H, W) whose first half is the batch, ``t`` (2B,), ``y`` (2B,) the labels then the
        null labels -> (2B, out, H, W): the guided noise prediction ``u + s (c - u)`` for both halves, the
        other output channels as predicted."""
        half = x[: x.shape[0] // 2]
        out = self(torch.cat([half, half]), t, y)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


DiT_models = {"DiT-XL/2": partial(DiT, depth=28, hidden_size=1152, patch_size=2, num_heads=16)}
