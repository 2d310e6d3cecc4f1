"""chunkformer.kernels.short_attention: the Triton forward for short unmasked attention, where it is chosen, and
that a patched DiT's attention sends it the calls it should (the kernel runs here under Triton's interpreter)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from chunkformer.kernels import short_attention

ROOT = Path(__file__).resolve().parents[3]


@given(head_dim=st.integers(16, 512))
def test_split_head_dim_is_a_power_of_two_and_a_padded_rest(head_dim):
    main, rest = short_attention.split_head_dim(head_dim)
    assert main & (main - 1) == 0 and main <= head_dim < 2 * main
    if head_dim == main:
        assert rest == 0
    else:
        assert rest & (rest - 1) == 0 and rest >= 16 and main + rest >= head_dim
        assert rest == 16 or main + rest // 2 < head_dim  # no smaller power of two would cover it


def test_split_head_dim_refuses_tiny_heads():
    with pytest.raises(ValueError, match="at least 16"):
        short_attention.split_head_dim(8)


BASE = dict(head_dim=72, keys=160, dtype=torch.bfloat16, device="cuda", mask=False, grad=False, enabled=True)
CASES = [  # each differs from BASE (taken) in one respect
    ({}, True),
    (dict(keys=129), True), (dict(keys=192), True), (dict(keys=128), False), (dict(keys=193), False),
    (dict(keys=256), False), (dict(dtype=torch.float16), True), (dict(dtype=torch.float32), False),
    (dict(head_dim=64), False), (dict(head_dim=80), False), (dict(device="cpu"), False),
    (dict(mask=True), False), (dict(grad=True), False), (dict(enabled=False), False),
]


@pytest.mark.parametrize("change,taken", CASES)
def test_runs_here_only_for_unmasked_gradient_free_half_precision_cuda_calls_inside_the_window(change, taken):
    c = {**BASE, **change}
    if taken:
        pytest.importorskip("triton")  # without Triton nothing is taken
    try:
        short_attention.set_short_attention(c["enabled"])
        with FakeTensorMode(allow_non_fake_inputs=True), torch.set_grad_enabled(c["grad"]):
            q = torch.empty(2, 16, 100, c["head_dim"], device=c["device"], dtype=c["dtype"])  # queries: any count
            k = torch.empty(2, 16, c["keys"], c["head_dim"], device=c["device"], dtype=c["dtype"])
            mask = torch.ones(2, 1, 1, c["keys"], dtype=torch.bool, device=c["device"]) if c["mask"] else None
            assert short_attention.runs_here(q, k, mask) is taken
    finally:
        short_attention.set_short_attention(True)


def test_forward_checks_its_inputs():
    q = torch.randn(2, 10, 4, 72)
    for bad, match in [((q, q[:1], q[:1]), "disagree"), ((q, q, q.half()), "share a dtype"),
                       ((q[0], q[0], q[0]), "expected q"), ((q, q[..., :64], q[..., :64]), "disagree")]:
        with pytest.raises(ValueError, match=match):
            short_attention._checked(*bad)


def test_kernel_equals_sdpa_and_a_patched_dit_routes_through_it_under_the_triton_interpreter():
    """The kernel on the CPU (Triton's interpreter, set before import): ragged query and key counts, head dims with
    and without a padded rest, strided views of a fused projection. Then a DiT patched by kernels.apply, told the
    kernel runs here, calls it for unmasked attention (its two blocks) and gives the plain model's outputs."""
    pytest.importorskip("triton")
    code = """
import torch, torch.nn.functional as F, chunkformer as cf
from chunkformer import kernels
from chunkformer.kernels import short_attention as sa
torch.manual_seed(0)
for B, Lq, Lk, H, D, tiles in [(2, 37, 37, 2, 72, sa.AttentionTiles(16, 16)), (1, 20, 50, 3, 64, sa.AttentionTiles(16, 32)),
                               (2, 33, 64, 1, 80, sa.AttentionTiles(32, 16)), (1, 5, 3, 2, 72, sa.AttentionTiles(16, 16))]:
    q = torch.randn(B, Lq, H, D)
    k, v = torch.randn(B, Lk, 2, H, D).unbind(2)  # strided views
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    out = sa.forward(q, k, v, tiles)
    assert out.shape == ref.shape and out.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-5), (B, Lq, Lk, H, D, (out - ref).abs().max())
calls = []
sa.runs_here = lambda q, k, mask: mask is None  # as if on a GPU, inside the window
real = sa.forward
sa.forward = lambda q, k, v, tiles=None: calls.append(q.shape) or real(q, k, v, sa.AttentionTiles(16, 16))
model = cf.create_model("DiT-S/2", input_size=8, depth=2, hidden_size=64, num_heads=2).eval()  # head dim 32
x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
with torch.no_grad():
    plain = model(x, t, y)
    assert not calls
    assert kernels.apply(model, force=True)["attention"] == 2
    out = model(x, t, y)
assert len(calls) == 2, calls
assert torch.allclose(out, plain, atol=1e-5)
print('ok')
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CHUNKFORMER_TYPECHECK": "0"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-500:] + res.stderr[-3000:]
