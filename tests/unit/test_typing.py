"""The shape-check switch: on in this suite, off (no wrappers, no graph breaks) by default."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import chunkformer as cf
from chunkformer._typing import TYPECHECK


def run_python(code: str, typecheck: str | None) -> str:
    env = dict(os.environ)
    env.pop("CHUNKFORMER_TYPECHECK", None)
    if typecheck is not None:
        env["CHUNKFORMER_TYPECHECK"] = typecheck
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_switch_is_on_in_the_suite_and_catches_wrong_shapes():
    assert TYPECHECK
    plan = cf.ChunkPlan.from_mask(torch.ones(2, 6, dtype=torch.bool), grid=(2, 3))
    with pytest.raises(Exception, match="(?i)type-check|shape|dimension"):
        plan.pack(torch.randn(2, 6))  # missing the feature dimension
    with pytest.raises(Exception):
        cf.grid.to_grid(torch.randn(2, 6), (2, 3))


def test_switch_off_by_default_leaves_plain_functions():
    code = """
        import chunkformer as cf
        from chunkformer._typing import TYPECHECK
        from chunkformer.plan import ChunkPlan
        print(TYPECHECK, hasattr(ChunkPlan.gather, "__wrapped__"), hasattr(cf.grid.to_grid, "__wrapped__"))
    """
    assert run_python(code, None) == "False False False"
    assert run_python(code, "1") == "True True True"


def test_fixed_capacity_plan_traces_without_graph_breaks_when_switch_is_off():
    """Fixed mode never reads device values, so dynamo captures build + gather in one graph."""
    code = """
        import torch
        from chunkformer import ChunkPlan
        def f(mask, probs, x):
            plan = ChunkPlan.from_mask(mask, probs, grid=(4, 4), mode="fixed", capacity=6)
            return plan.gather(x), plan.lengths
        e = torch._dynamo.explain(f)(torch.rand(2, 16) < 0.5, torch.rand(2, 16), torch.randn(2, 16, 3))
        print(e.graph_break_count)
    """
    assert run_python(code, "0").splitlines()[-1] == "0"
