"""Key-masked attention for training through FlexAttention, with a block mask built from the lengths.

A fixed (or padded) plan holds each sample's kept tokens in its first ``lengths[b]`` slots and padding after
them, so the backbone's key mask is a prefix. Differentiated on a GPU, SDPA with such a mask runs the
memory-efficient kernel (cuDNN's masked backward is avoided: :func:`chunkformer.attention.avoids_cudnn`).
FlexAttention with a block mask skips the padding's key blocks and runs the partial block through
``kv < lengths[b]``; its kernels exist only in a compiled graph, so :func:`runs_here` asks for one.

:func:`prefix_block_mask` builds the ``BlockMask`` from ``lengths`` with tensor arithmetic alone (no vmap over
the mask, no host sync), so it traces into the compiled training step:

    import torch
    from chunkformer.kernels.prefix_attention import prefix_attention
    q = k = v = torch.randn(2, 4, 96, 32)                       # (B, H, M, dh)
    lengths = torch.tensor([96, 40])                            # kept slots per sample
    out = prefix_attention(q, k, v, lengths)                    # (B, H, M, dh)
    keep = (torch.arange(96) < lengths[:, None])[:, None, None]  # the same key mask for SDPA
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert torch.allclose(out, ref, atol=1e-5)
"""

import torch
from torch import Tensor

__all__ = ["prefix_block_mask", "prefix_attention", "prefix_lengths", "runs_here", "set_prefix_attention"]

BLOCK = 128  # FlexAttention's default block, queries and keys
_enabled = False


def set_prefix_attention(enabled: bool) -> None:
    """Send key-masked attention of a compiled training step through FlexAttention (off by default:
    process-wide, like :func:`chunkformer.kernels.set_short_attention`)."""
    global _enabled
    _enabled = bool(enabled)


def prefix_block_mask(lengths: Tensor, slots: int, block: int = BLOCK):
    """The ``BlockMask`` of "key ``j`` of sample ``b`` is valid iff ``j < lengths[b]``" over ``slots`` queries
    and keys: per sample, ``lengths // block`` full key blocks, and the block holding the last valid key as a
    partial one when ``lengths`` is not a multiple of ``block``."""
    from torch.nn.attention.flex_attention import BlockMask

    B = lengths.shape[0]
    n = -(-slots // block)  # key (and query) blocks
    lengths = lengths.to(torch.int32)
    full = (lengths // block).clamp(max=n)  # (B,)
    partial = (lengths % block != 0).to(torch.int32)  # (B,): 0 or 1 partial block, at index `full`
    blocks = torch.arange(n, device=lengths.device, dtype=torch.int32)
    full_indices = blocks.expand(B, 1, n, n).contiguous()  # (B, 1, q blocks, kv blocks): 0, 1, ... first
    partial_indices = (full[:, None] + blocks).clamp(max=n - 1)  # (B, n): the partial block first
    partial_indices = partial_indices[:, None, None, :].expand(B, 1, n, n).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    return BlockMask.from_kv_blocks(partial[:, None, None].expand(B, 1, n).contiguous(), partial_indices,
                                    full[:, None, None].expand(B, 1, n).contiguous(), full_indices,
                                    BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(slots, slots))


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
    """Attention of ``q, k, v (B, H, M, dh)`` over each sample's first ``lengths[b]`` keys, ``(B, H, M, dh)``:
    what SDPA computes with the key mask ``arange(M) < lengths[:, None]`` (rows of padding included), for
    samples with at least one valid key."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=prefix_block_mask(lengths, k.shape[-2]))


def prefix_lengths(mask: Tensor) -> Tensor:
    """``(B, 1, 1, M)`` boolean prefix key mask -> ``(B,)`` lengths."""
    return mask.flatten(1).sum(1)


def runs_here(q: Tensor, mask: Tensor | None) -> bool:
    """Whether :func:`prefix_attention` takes this call: on, a boolean ``(B, 1, 1, M)`` key mask, CUDA,
    differentiated, inside a compiled graph. The mask must be a prefix one: the backbone's masks are."""
    return (_enabled and mask is not None and mask.dtype == torch.bool and mask.ndim == 4
            and mask.shape[1] == mask.shape[2] == 1 and q.is_cuda and q.requires_grad
            and torch.is_grad_enabled() and torch.compiler.is_compiling())
