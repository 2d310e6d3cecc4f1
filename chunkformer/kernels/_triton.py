"""Triton, when it is installed, and the two ways the kernels here become torch ops.

``triton`` is ``None`` without it (CPU-only builds of torch); every kernel then has a plain-torch path.
"""

import torch

from .._typing import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    tl = None
else:
    from torch._subclasses.fake_tensor import is_fake
    from torch.library import wrap_triton  # a kernel torch.compile traces into

__all__ = ["triton", "tl", "launcher", "kernel_op", "strided_custom_op"]


def launcher(kernel, x: Tensor):
    """``kernel`` to launch on ``x``: recorded by ``wrap_triton`` while torch traces ``x`` (a fake tensor, in an
    op torch.compile traces into), else the kernel itself (``wrap_triton`` outside an op adds host time to
    every launch)."""
    return wrap_triton(kernel) if is_fake(x) else kernel


def kernel_op(name: str):
    """``torch.library.triton_op(name)``: an op backed by Triton kernels that ``torch.compile`` traces into, so
    inductor launches each kernel from its own generated code (an opaque custom op would pay the dispatcher and
    the op's Python on the host at every call). Inductor hands a traced kernel its inputs with the strides the
    trace saw (copying any it laid out otherwise): the scaffold traces its grids channels-last for that."""
    return torch.library.triton_op(name, mutates_args=())


def strided_custom_op(name: str):
    """``torch.library.custom_op(name)`` for a kernel that reads its inputs through their strides: opaque to
    ``torch.compile`` and tagged ``flexible_layout``, so inductor hands the inputs over in the layout it has,
    with no copy to conform them to the strides the trace saw (inductor pads a taps GEMM's rows, and the exact
    strides would cost a copy of the whole tap tensor)."""
    return torch.library.custom_op(name, mutates_args=(), tags=(torch.Tag.flexible_layout,))
