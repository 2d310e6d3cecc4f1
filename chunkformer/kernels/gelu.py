"""The MLP's GELU in its first GEMM's epilogue when sampling on a GPU in half precision.

:func:`gelu_linear` is ``gelu_tanh(x @ weight.T + bias)`` as one cuBLASLt GEMM with the bias and the GELU in
its epilogue (``torch._addmm_activation``), instead of a separate pass over the ``(tokens, 4d)`` hidden tensor,
a DiT block's largest. :class:`Mlp` takes it when sampling (CUDA, no grad, bf16/fp16 input or autocast).
"""

import torch
import torch.nn.functional as F

from .._typing import Tensor
from ..models.dit import Mlp as PlainMlp

__all__ = ["Mlp", "gelu_linear"]


def gelu_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``gelu_tanh(x @ weight.T + bias)``: one GEMM with the GELU in its epilogue on CUDA; two ops elsewhere
    (on the CPU that op's GELU is the exact one, not tanh's). ``x`` ``(..., in)`` -> ``(..., out)``, in the
    autocast dtype when autocast is on, else in ``x``'s."""
    if not x.is_cuda:
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    on = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if on else x.dtype
    rows = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
    out = torch._addmm_activation(bias.to(dtype), rows, weight.to(dtype).t(), use_gelu=True)  # (N, out)
    return out.view(*x.shape[:-1], weight.shape[0])


class Mlp(PlainMlp):
    """DiT's :class:`~chunkformer.models.dit.Mlp` with its GELU in fc1's GEMM epilogue (:func:`gelu_linear`)
    when sampling on a GPU in bf16/fp16 and ``use_kernel``; a class swap made by :func:`chunkformer.kernels.apply`
    (same parameters and state dict)."""

    plain_class = PlainMlp
    use_kernel = True

    def takes_epilogue(self, x: Tensor) -> bool:
        """Whether ``forward(x)`` runs the GELU in fc1's GEMM epilogue (else as its own op)."""
        if not (self.use_kernel and x.is_cuda and self.fc1.bias is not None) or torch.is_grad_enabled():
            return False  # (autocast is asked only on CUDA: meta tensors, the FLOP counter's, have no autocast)
        return x.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cuda")

    def forward(self, x: Tensor) -> Tensor:
        if self.takes_epilogue(x):
            return self.fc2(gelu_linear(x, self.fc1.weight, self.fc1.bias))
        return super().forward(x)
