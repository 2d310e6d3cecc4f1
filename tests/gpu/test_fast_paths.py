"""On a GPU: the fast paths of chunkformer.kernels against the plain model and torch's references (the GEMM
epilogue's GELU, every fast path together compiled in bf16, the norm and tap ops traced by inductor, the
short-attention kernel). Marked ``gpu``: skipped without CUDA, run on the device with ``pytest tests/gpu``."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from chunkformer.kernels import norms, short_attention
from chunkformer.kernels.gelu import gelu_linear

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a GPU)")]


def test_gelu_in_the_gemm_epilogue_matches_gelu_after_the_gemm_on_a_gpu():  # pragma: no cover - GPU runs only
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 208, 64, generator=g), torch.randn(256, 64, generator=g) / 8, torch.randn(256, generator=g)
    ref = torch.nn.functional.gelu(torch.nn.functional.linear(x.double(), w.double(), b.double()), approximate="tanh")
    with torch.no_grad():
        fused = gelu_linear(x.cuda().bfloat16(), w.cuda().bfloat16(), b.cuda().bfloat16())
        two_ops = torch.nn.functional.gelu(
            torch.nn.functional.linear(x.cuda().bfloat16(), w.cuda().bfloat16(), b.cuda().bfloat16()), approximate="tanh")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            autocast = gelu_linear(x.cuda(), w.cuda(), b.cuda())
    assert fused.shape == (3, 208, 256) and fused.dtype == autocast.dtype == torch.bfloat16
    err = lambda y: (y.double().cpu() - ref).abs().max().item()  # noqa: E731
    assert err(fused) <= 1.5 * err(two_ops) + 1e-3 and err(autocast) <= 1.5 * err(two_ops) + 1e-3


def test_on_a_gpu_every_fast_path_together_stays_within_bf16_of_the_plain_model():  # pragma: no cover - GPU runs
    """DC-DiT-S compiled whole in bf16, fixed capacity (the serving configuration), with every fast path forced on
    (taps included) against the same model plain; then with grad, where the patched model takes the plain paths.
    The capacity is every token of the grid: with random weights many keep probabilities sit within bf16's
    rounding of each other, so a smaller capacity would compare different kept sets, not the kernels.
    In a subprocess without the jaxtyping wrappers, which compiled models do not trace."""
    code = """
        import torch, chunkformer as cf
        from chunkformer import kernels
        torch.manual_seed(0)
        model = cf.create_model("DC-DiT-S", input_size=32, depth=2, plan_mode="fixed", capacity=32 * 32,
                                fill_capacity=True).cuda().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model = model.to(torch.bfloat16)
        x = torch.randn(4, 4, 32, 32, device="cuda")
        t, y = torch.tensor([1, 200, 500, 900], device="cuda"), torch.tensor([1, 2, 3, 4], device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            plain = torch.compile(model, fullgraph=True)(x, t, y).float()
            counts = kernels.apply(model, taps=True)
            assert set(counts) == set(kernels.FAST_PATHS), counts
            torch._dynamo.reset()
            fast = torch.compile(model, fullgraph=True)(x, t, y).float()
            eager = model(x, t, y).float()
        scale = plain.abs().max()
        print(counts, (fast - plain).abs().max().item(), (eager - plain).abs().max().item(), scale.item())
        assert scale > 0 and (fast - plain).abs().max() <= 3e-2 * scale and (eager - plain).abs().max() <= 3e-2 * scale
        model.float().train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, t, y).float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        kernels.remove(model)
        assert kernels.applied(model) == {}
        print("ok")
    """
    env = {**os.environ, "CHUNKFORMER_TYPECHECK": "0"}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-500:] + res.stderr[-3000:]


def test_the_kernel_ops_compiled_by_inductor_compute_the_references_on_a_gpu():  # pragma: no cover - GPU runs
    """Each op traced into by torch.compile (inductor launches the kernel itself, with the strides the trace saw),
    against the torch references, from channels-last, NCHW and strided inputs."""
    from chunkformer.kernels import tapconv

    dev = torch.device("cuda")
    torch.manual_seed(0)
    grid = torch.randn(2, 64, 6, 5, device=dev) + 3
    centre, scale, bias = torch.randn(2, 64, device=dev), torch.randn(2, 64, device=dev), torch.randn(64, device=dev)
    with torch.no_grad():
        for x in (grid, grid.contiguous(memory_format=torch.channels_last)):
            moments = torch.compile(lambda t: norms.channel_moments(t * 1).sum(1) + 1)(x)
            torch.testing.assert_close(moments, norms.channel_moments_reference(x).sum(1) + 1, rtol=1e-4, atol=1e-3)
            applied = torch.compile(lambda t: norms.scale_shift(t * 1, centre, scale, bias, True) + 1)(x)
            torch.testing.assert_close(applied, norms.scale_shift_reference(x, centre, scale, bias, True) + 1)
        rows, other = grid.flatten(2).transpose(1, 2), torch.randn(2, 30, 64, device=dev)  # NCHW token rows
        rms = torch.compile(lambda a, b: norms.add_rms_norm(a * 1, b, None, 1e-5, bias) + 1)(rows, other)
        torch.testing.assert_close(rms, norms.add_rms_norm_reference(rows, other, None, 1e-5, bias) + 1)
        taps = torch.randn(2, 5, 6, 9, 72, device=dev)[..., :64]  # padded rows: read through the strides
        summed = torch.compile(lambda t: tapconv.tap_sum(t * 1, bias) + 1)(taps)
        torch.testing.assert_close(summed, tapconv.tap_sum_reference(taps, bias) + 1)


def test_on_a_gpu_the_kernel_matches_sdpa_alone_in_a_model_and_compiled():  # pragma: no cover - GPU runs
    """DC-DiT-XL's shapes (16 heads of 72, 160 kept tokens): one call against fp32 SDPA; a two-block DC-DiT-XL with
    the kernel against the same model on SDPA; and compiled, where the op is traced in."""
    torch.manual_seed(0)
    q, k, v = torch.randn(64, 160, 3, 16, 72, device="cuda", dtype=torch.bfloat16).unbind(2)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)))
    with torch.no_grad():
        assert short_attention.runs_here(q.transpose(1, 2), k.transpose(1, 2), None)
        out = short_attention.attend(*(t.transpose(1, 2) for t in (q, k, v)))
    assert (out.float() - ref).abs().max() < 1e-2

    code = """
import torch, chunkformer as cf
from chunkformer import kernels
from chunkformer.kernels import short_attention
torch.manual_seed(0)
m = cf.create_model("DC-DiT-XL", input_size=32, depth=2, plan_mode="fixed", capacity=160, fill_capacity=True).cuda().eval()
with torch.no_grad():  # adaLN-zero and the zero final layer would make every output 0
    for p in m.parameters():
        if not p.any():
            p.normal_(0, 0.02)
x = torch.randn(4, 4, 32, 32, device="cuda")
t, y = torch.tensor([1, 200, 500, 900], device="cuda"), torch.tensor([1, 2, 3, 4], device="cuda")
kernels.apply(m)
calls, real = [], short_attention.forward
short_attention.forward = lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw)
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    fast = m(x, t, y).float()
    assert len(calls) == 2, calls  # one per block
    compiled = torch.compile(m)(x, t, y).float()
    short_attention.set_short_attention(False)
    slow = m(x, t, y).float()
    torch._dynamo.reset()
    compiled_slow = torch.compile(m)(x, t, y).float()
scale = slow.abs().max()
print((fast - slow).abs().max().item(), (compiled - compiled_slow).abs().max().item(), (compiled - fast).abs().max().item(), scale.item())
assert scale > 0 and (fast - slow).abs().max() <= 2e-2 * scale, ((fast - slow).abs().max(), scale)
assert (compiled - compiled_slow).abs().max() <= 2e-2 * scale, ((compiled - compiled_slow).abs().max(), scale)
short_attention.set_short_attention(True)
print('ok')
"""
    env = {**os.environ, "CHUNKFORMER_TYPECHECK": "0"}  # compiled models run without the jaxtyping wrappers
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-500:] + res.stderr[-3000:]


def test_on_a_gpu_compiled_prefix_attention_matches_masked_sdpa_forward_and_backward():  # pragma: no cover - GPU
    """The compiled training step's FlexAttention path: SDPA's outputs and gradients with the same key mask (bf16),
    at the study's shapes with kept lengths off the block size."""
    from chunkformer.kernels import prefix_attention as prefix

    torch.manual_seed(0)
    lengths = torch.tensor([320, 250, 128, 1, 200, 129] * 4, device="cuda")
    q, k, v = (torch.randn(24, 6, 320, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    keep = (torch.arange(320, device="cuda") < lengths[:, None])[:, None, None]
    grad = torch.randn(24, 6, 320, 64, device="cuda", dtype=torch.bfloat16)
    out = torch.compile(prefix.prefix_attention)(q, k, v, lengths)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in ((out, ref), *zip(ours, theirs)):
        scale = b.float().abs().max()
        assert scale > 0 and (a.float() - b.float()).abs().max() <= 2e-2 * scale
