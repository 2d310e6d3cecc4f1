"""The same backbone on packed, padded, fixed-capacity and per-sample-loop layouts agrees."""

import math

import torch
from conftest import plan_inputs
from einops import rearrange
from hypothesis import given
from torch import nn

from chunkformer import ChunkPlan, chunk_attention


class TinyBlock(nn.Module):
    """Pre-norm attention + MLP block that runs on any plan layout."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, plan):
        q, k, v = rearrange(self.qkv(self.norm1(x)), "... (three h d) -> three ... h d", three=3, h=self.heads)
        x = x + self.proj(rearrange(chunk_attention(q, k, v, plan), "... h d -> ... (h d)"))
        return x + self.mlp(self.norm2(x))


@given(plan_inputs(max_tokens=48))
def test_packed_padded_fixed_and_per_sample_loop_agree(inputs):
    grid, mask, probs, seed = inputs
    torch.manual_seed(seed)
    block = TinyBlock()
    B, L = mask.shape
    x = torch.randn(B, L, 16)

    def run(plan, x=x):
        tokens = plan.chunk(x) + plan.position_embedding(16)
        return plan.unchunk(block(tokens, plan))[plan.valid]  # (T, 16) real tokens only

    packed = run(ChunkPlan.from_mask(mask, probs, grid=grid, mode="packed"))
    padded = run(ChunkPlan.from_mask(mask, probs, grid=grid, mode="padded"))
    fixed = run(ChunkPlan.from_mask(mask, probs, grid=grid, mode="fixed", capacity=L))
    loop = []
    for b in range(B):  # each sample alone, no other sample in the batch
        one = ChunkPlan.from_mask(mask[b : b + 1], probs[b : b + 1], grid=grid, mode="padded")
        loop.append(run(one, x[b : b + 1]))
    loop = torch.cat(loop)
    assert packed.shape == (int(mask.sum()), 16)
    for other in (padded, fixed, loop):
        assert torch.allclose(packed, other, atol=1e-5, rtol=1e-5)


def test_padded_mode_runs_an_unmodified_backbone():
    """A plain nn.TransformerEncoder (knows nothing of plans) runs on padded chunks."""
    torch.manual_seed(0)
    grid = (6, 6)
    mask = torch.rand(3, math.prod(grid)) < 0.3
    mask[:, 0] = True
    probs = torch.rand(3, 36)
    plan = ChunkPlan.from_mask(mask, probs, grid=grid, mode="padded")
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    x = torch.randn(3, 36, 16)
    y = layer(plan.chunk(x))  # (B, M, 16): pad slots are real, high-probability tokens
    full = plan.plug_back(plan.unchunk(y))
    assert full.shape == (3, 36, 16) and torch.isfinite(full).all()
    # with the key-padding mask it matches the per-sample computation exactly
    y_masked = layer(plan.chunk(x), src_key_padding_mask=~plan.valid)
    for b in range(3):
        alone = layer(x[b : b + 1][:, mask[b]])
        assert torch.allclose(y_masked[b, : int(mask[b].sum())], alone[0], atol=1e-5)


def test_masked_attention_that_will_be_differentiated_on_a_gpu_keeps_off_cudnn():
    from types import SimpleNamespace

    from chunkformer.attention import avoids_cudnn

    mask = torch.ones(2, 1, 1, 4, dtype=torch.bool)
    gpu_training = SimpleNamespace(is_cuda=True, requires_grad=True)
    assert avoids_cudnn(gpu_training, mask)
    assert not avoids_cudnn(gpu_training, None)  # unmasked attention keeps the fastest kernel
    assert not avoids_cudnn(SimpleNamespace(is_cuda=True, requires_grad=False), mask)  # sampling
    assert not avoids_cudnn(SimpleNamespace(is_cuda=False, requires_grad=True), mask)
    with torch.no_grad():
        assert not avoids_cudnn(gpu_training, mask)


def test_masked_sdpa_with_the_kernel_choice_forced_matches_the_default(monkeypatch):
    import chunkformer.attention as attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 1, 5, generator=g) < 0.7
    mask[..., 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    monkeypatch.setattr(attention, "avoids_cudnn", lambda q, mask: True)  # take the GPU-training branch here
    out = attention.masked_sdpa(q, k, v, mask)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
