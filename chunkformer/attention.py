"""Attention over chunked tokens, in whatever layout a :class:`ChunkPlan` produced.

* packed ``(T, H, dh)``: samples are contiguous runs (``plan.cu_seqlens``); a token
  attends only within its own run.
* padded / fixed ``(B, M, H, dh)``: keys in padding slots are masked out, so the real
  tokens' outputs equal those of the packed layout; padding slots' outputs are ignored.

This is the reference path (PyTorch SDPA with a boolean mask; runs and trains
anywhere, including CPU). Faster varlen kernels plug in behind the same call.
"""

import torch.nn.functional as F
from einops import rearrange

from ._typing import Float, Tensor, typechecked
from .plan import ChunkPlan

__all__ = ["chunk_attention"]


@typechecked
def chunk_attention(
    q: Float[Tensor, "*layout heads head_dim"],
    k: Float[Tensor, "*layout heads head_dim"],
    v: Float[Tensor, "*layout heads head_dim"],
    plan: ChunkPlan,
) -> Float[Tensor, "*layout heads head_dim"]:
    """Multi-head attention restricted to each sample's kept tokens; layout in == layout out."""
    if plan.mode == "packed":
        if q.ndim != 3:
            raise ValueError(f"packed plans take (tokens, heads, head_dim) inputs, got {tuple(q.shape)}")
        seg = plan.segment_ids()  # (T,)
        mask = seg[:, None] == seg[None, :]  # (T, T) block diagonal
        q_, k_, v_ = (rearrange(t, "t h d -> 1 h t d") for t in (q, k, v))
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask)
        return rearrange(out, "1 h t d -> t h d")
    if q.ndim != 4:
        raise ValueError(f"{plan.mode} plans take (batch, slots, heads, head_dim) inputs, got {tuple(q.shape)}")
    mask = plan.valid[:, None, None, :]  # (B, 1, 1, M): attend to real tokens only
    q_, k_, v_ = (rearrange(t, "b m h d -> b h m d") for t in (q, k, v))
    out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask)
    return rearrange(out, "b h m d -> b m h d")
