"""Shape annotations and the one switch that turns runtime shape checks on.

Every public function and module ``forward`` carries jaxtyping annotations such as
``Float[Tensor, "batch tokens dim"]``. They are *checked* (by beartype, through
jaxtyping) only when the environment variable ``CHUNKFORMER_TYPECHECK`` is set to
``1`` **before** ``chunkformer`` is imported. The decision is made once, at import
time: with the switch off, :func:`typechecked` returns the function itself, so
there is no wrapper left for ``torch.compile`` to trace or recompile on.

The test suite turns the switch on (``tests/conftest.py``); users get plain
functions by default.

Value checks that shapes cannot express (probabilities that are NaN, budgets out
of range) are plain Python and on by default. Those that read a tensor (:func:`check_finite`,
the range of a per-sample ``rho``) cost a device-to-host sync on CUDA each;
``with value_checks(False):`` (or ``CHUNKFORMER_VALUE_CHECKS=0``) turns them off for a
sync-free eager hot path.
"""

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from jaxtyping import Bool, Float, Int, Shaped  # noqa: F401  (re-exported)
from torch import Tensor  # noqa: F401  (re-exported)

__all__ = [
    "TYPECHECK",
    "typechecked",
    "check_finite",
    "value_checks",
    "value_checks_enabled",
    "Bool",
    "Float",
    "Int",
    "Shaped",
    "Tensor",
]

TYPECHECK: bool = os.environ.get("CHUNKFORMER_TYPECHECK", "0").lower() in ("1", "true", "yes")

F = TypeVar("F", bound=Callable)

if TYPECHECK:
    from beartype import BeartypeConf, beartype
    from jaxtyping import jaxtyped

    # PEP 484's numeric tower: an ``int`` is accepted where a ``float`` is annotated.
    _beartype = beartype(conf=BeartypeConf(is_pep484_tower=True))

    def typechecked(fn: F) -> F:
        """Check ``fn``'s jaxtyping annotations on every call (switch is on)."""
        return jaxtyped(typechecker=_beartype)(fn)

else:

    def typechecked(fn: F) -> F:
        """Return ``fn`` unchanged (switch is off: no wrapper, nothing to trace)."""
        return fn


_VALUE_CHECKS = [os.environ.get("CHUNKFORMER_VALUE_CHECKS", "1").lower() not in ("0", "false", "no")]


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the checks that read tensor values (NaN probabilities, per-sample ``rho`` range) on or
    off inside a ``with`` block (process-wide; restored on exit).

        with value_checks(False):                # no device-to-host sync from value checks
            samples = diffusion.sample(model_fn, shape)
    """
    previous = _VALUE_CHECKS[0]
    _VALUE_CHECKS[0] = bool(enabled)
    try:
        yield
    finally:
        _VALUE_CHECKS[0] = previous


def value_checks_enabled() -> bool:
    """Whether checks that read tensor values run (off while compiling or inside ``value_checks(False)``)."""
    return _VALUE_CHECKS[0] and not torch.compiler.is_compiling()


def check_finite(name: str, value: Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if ``value`` holds NaN or inf.

    Skipped while ``torch.compile`` traces (a data-dependent check would break
    the graph) and inside ``value_checks(False)``; elsewhere it costs one
    device-to-host sync on CUDA.
    """
    if not value_checks_enabled():
        return
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(
            f"{name} must be finite, but {bad} of {value.numel()} entries are NaN or inf; "
            f"check the inputs that produced {name} (the noisy latent, timestep and labels) "
            "and the loss scale."
        )
