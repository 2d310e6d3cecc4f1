"""Precision policy of chunkformer's layers.

DC-DiT runs its router and the de-chunk residual in fp32 (with autocast off) because
a boundary decision flips on tiny changes of ``p`` near 0.5. ``model.to(torch.bfloat16)``
or ``model.half()`` would silently cast them too; :class:`FP32Module` casts its floating
parameters and buffers back after every such conversion (like diffusers'
``_keep_in_fp32_modules``). :func:`set_fp32_router_dechunk` switches that policy on a built (or
loaded) model, as ``fp32_router_dechunk=`` does at construction. :class:`RMSNorm` is the other way round: its fp32 weight
follows bf16 activations under autocast, which ``torch.autocast`` does not do for it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .norms import add_rms_norm, sampling_kernel

__all__ = ["FP32Module", "RMSNorm", "set_fp32_router_dechunk"]


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose weight is cast to the input's dtype when they differ.

    Under bf16 autocast the activations reaching a norm are bf16 while its weight stays fp32;
    ``nn.RMSNorm`` then falls back to its unfused implementation and warns ("Mismatch dtype
    between input and weight") at every call. Casting the weight, as autocast does for a
    linear layer's, keeps the fused kernel (which accumulates in fp32) and the log clean.

    ``forward(x, residual, bias)`` normalises ``x + residual + bias``; when sampling on a GPU (CUDA, no
    grad, ``use_kernel``: on by default, :func:`~chunkformer.norms.set_norm_kernels`) that is
    :func:`~chunkformer.norms.add_rms_norm`, which reads each addend once.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_kernel = True

    def takes_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x, residual)`` runs :func:`~chunkformer.norms.add_rms_norm`'s kernel."""
        return self.use_kernel and len(self.normalized_shape) == 1 and sampling_kernel(x)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Normalise ``x`` (``x + residual + bias``: summed inside the norm when sampling on a GPU)."""
        weight = self.weight
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if (residual is not None or bias is not None) and self.takes_kernel(x):
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            return add_rms_norm(x, residual, weight, eps, bias)
        if residual is not None:
            x = x + residual
        if bias is not None:
            x = x + bias
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class FP32Module(nn.Module):
    """An ``nn.Module`` that keeps its floating-point parameters and buffers in fp32."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)

        def to_fp32(t: torch.Tensor) -> torch.Tensor:
            return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t

        return super()._apply(to_fp32, recurse)


def set_fp32_router_dechunk(model: nn.Module, enabled: bool) -> int:
    """Run every router and de-chunk in ``model`` in fp32 with autocast off (``True``, DC-DiT's policy)
    or under the caller's autocast (``False``: bf16 GEMMs, about 0.5-0.7 ms less per DC-DiT-XL step on
    an H100; ``p`` moves by about bf16's rounding). What ``fp32_router_dechunk=`` sets at construction,
    for a model already built or loaded; a captured ``config`` is updated to match. Weights stay fp32
    either way. Returns the number of layers switched; raises if ``model`` has none.

        import chunkformer as cf
        model = cf.create_model("DC-DiT-S", input_size=16, depth=1)
        assert cf.set_fp32_router_dechunk(model, False) == 2 and model.config["fp32_router_dechunk"] is False
    """
    from .routing import Router  # here, not at the top: both modules import this one
    from .scaffold import DeChunkDecoder

    layers = [m for m in model.modules() if isinstance(m, (Router, DeChunkDecoder))]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Router or DeChunkDecoder: only DC-DiT models and "
                         "chunkformer.wrap(...) models route and de-chunk")
    for layer in layers:
        layer.fp32 = bool(enabled)
    for m in model.modules():
        config = getattr(m, "config", None)
        if isinstance(config, dict) and "fp32_router_dechunk" in config:
            config["fp32_router_dechunk"] = bool(enabled)
    return len(layers)
