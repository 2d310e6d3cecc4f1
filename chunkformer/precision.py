"""Modules whose parameters stay fp32 whatever the model is cast to.

DC-DiT runs its router and the de-chunk residual in fp32 (with autocast off) because
a boundary decision flips on tiny changes of ``p`` near 0.5. ``model.to(torch.bfloat16)``
or ``model.half()`` would silently cast them too; :class:`FP32Module` casts its floating
parameters and buffers back after every such conversion (like diffusers'
``_keep_in_fp32_modules``).
"""

import torch
from torch import nn

__all__ = ["FP32Module"]


class FP32Module(nn.Module):
    """An ``nn.Module`` that keeps its floating-point parameters and buffers in fp32."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)

        def to_fp32(t: torch.Tensor) -> torch.Tensor:
            return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t

        return super()._apply(to_fp32, recurse)
