"""Fixed-seed CPU outputs of DC-DiT-S and of wrapped diffusers / original-layout DiTs match the stored ones.

The stored tensors come from ``tests/data/make_fixtures.py``; a refactor that moves code without changing the
algorithm keeps them to fp32 rounding.
"""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DATA = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(DATA))

import make_fixtures  # noqa: E402

STORED = load_file(DATA / "fixed_outputs.safetensors")


def test_the_fixture_holds_every_model_at_every_budget_and_the_budgets_differ():
    assert set(STORED) == {f"{m}/rho{r}" for m in make_fixtures.MODELS for r in make_fixtures.RHOS}
    for name in make_fixtures.MODELS:
        low, high = (STORED[f"{name}/rho{r}"] for r in make_fixtures.RHOS)
        assert low.abs().mean() > 1e-3 and not torch.allclose(low, high)  # a budget that changes nothing tests nothing


@pytest.mark.parametrize("name", list(make_fixtures.MODELS))
def test_outputs_match_the_stored_fixture(name):
    if name == "diffusers":
        pytest.importorskip("diffusers")
    got = make_fixtures.outputs(name, make_fixtures.MODELS[name]())
    for key, value in got.items():
        torch.testing.assert_close(value, STORED[key], rtol=0, atol=1e-6)
