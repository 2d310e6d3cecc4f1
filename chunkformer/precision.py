"""Precision policy of chunkformer's layers.

DC-DiT runs its router and the de-chunk residual in fp32 (with autocast off) because
a boundary decision flips on tiny changes of ``p`` near 0.5. ``model.to(torch.bfloat16)``
or ``model.half()`` would silently cast them too; :class:`FP32Module` casts its floating
parameters and buffers back after every such conversion (like diffusers'
``_keep_in_fp32_modules``). :class:`RMSNorm` is the other way round: its fp32 weight
follows bf16 activations under autocast, which ``torch.autocast`` does not do for it.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FP32Module", "RMSNorm"]


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose weight is cast to the input's dtype when they differ.

    Under bf16 autocast the activations reaching a norm are bf16 while its weight stays fp32;
    ``nn.RMSNorm`` then falls back to its unfused implementation and warns ("Mismatch dtype
    between input and weight") at every call. Casting the weight, as autocast does for a
    linear layer's, keeps the fused kernel (which accumulates in fp32) and the log clean.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class FP32Module(nn.Module):
    """An ``nn.Module`` that keeps its floating-point parameters and buffers in fp32."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)

        def to_fp32(t: torch.Tensor) -> torch.Tensor:
            return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t

        return super()._apply(to_fp32, recurse)
