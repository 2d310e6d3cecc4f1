"""What the sampling fast paths tell ``torch.compile``'s inductor about buffers.

    import torch
    from chunkformer.kernels.inductor import written_once

    def f(a, b):
        h = written_once(a + b)                          # one buffer, however many consumers read it
        return h.sum((2, 3)), h.flatten(2)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(torch.compile(f)(x, x)[1], f(x, x)[1])

Inductor inlines a pointwise result (a conv's bias add, a residual sum, the de-chunk merge) into each of its
consumers instead of writing it, and gives an op that needs a buffer, such as a Triton kernel, a copy of its
own. Where several kernels read one such result, :func:`written_once` makes it one buffer.
"""

import torch

from .._typing import Tensor

__all__ = ["compiling", "written_once"]


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing."""
    return torch.compiler.is_compiling()


def written_once(x: Tensor) -> Tensor:
    """``x``; while ``torch.compile`` traces, marked so that inductor writes it once, in the strides the trace
    saw, as the one buffer all its consumers read (no copy if it is a buffer with those strides already).

    A ResBlock's input, read by its GroupNorm's statistics, the normalising pass and the skip, would otherwise
    be written once per consumer. Eager, and where the marker is missing, ``x`` itself."""
    if compiling() and _FORCE_STRIDES is not None:
        return _FORCE_STRIDES(x, x.stride())  # lowered to a stride requirement on x (ExternKernel.require_strides)
    return x


def _force_strides_op():
    try:
        import torch._inductor.inductor_prims  # noqa: F401  (registers the op)

        return torch.ops.prims.inductor_force_stride_order.default
    except (ImportError, AttributeError):  # pragma: no cover - every torch this package supports has it
        return None


_FORCE_STRIDES = _force_strides_op()
