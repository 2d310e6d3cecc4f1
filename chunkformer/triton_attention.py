"""A Triton flash-attention forward for the short sequences and odd head dims of DC-DiT sampling.

DC-DiT-XL attends over 160-1024 kept tokens with 16 heads of 72. The kernels behind
``F.scaled_dot_product_attention`` pad the head dim to 128 and tile the sequence in blocks of
64 x 128, so at 160 tokens a call costs nearly what it costs at 256 (0.080 against 0.086 ms on
an H100, batch 64; ``benchmarks/results/attention_masks_h100.json``): the time the budget saves
elsewhere does not reach attention. This kernel splits the head dim into a power of two and a
remainder of at least 16 (72 = 64 + 16, 8 of them masked), and its block sizes are chosen per
sequence length (:func:`default_config`).

Forward only, no mask, non-causal: the unmasked attention of dense tokens and of full
fixed-capacity plans (``fill_capacity=True``) in sampling. Inputs are ``(B, L, H, dh)`` views of
any strides with ``dh`` contiguous (the ``rearrange`` of a fused qkv projection); the output is
``(B, L, H, dh)`` contiguous, so the projection that follows needs no transpose copy.
CPU tensors run only under ``TRITON_INTERPRET=1`` (Triton's interpreter; slow, for tests at toy sizes).

    import torch
    from chunkformer.triton_attention import flash_forward
    q, k, v = torch.randn(3, 2, 24, 4, 40).unbind(0)           # (B, L, H, dh); dh = 32 + 8
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    assert torch.allclose(flash_forward(q, k, v), ref.transpose(1, 2), atol=1e-4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:  # optional: CUDA wheels of torch ship it; the kernel is only defined where it imports
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

__all__ = ["flash_forward", "KernelConfig", "default_config", "split_head_dim", "available"]


def available() -> bool:
    """Whether Triton is importable (CUDA runs also need a GPU Triton supports)."""
    return triton is not None


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """``head_dim = main + rest`` with ``main`` the largest power of two <= head_dim and ``rest``
    padded to a power of two >= 16 (0 when head_dim is a power of two): 72 -> (64, 16)."""
    if head_dim < 16:
        raise ValueError(f"head_dim must be at least 16, got {head_dim}")
    main = 1 << (head_dim.bit_length() - 1)
    left = head_dim - main
    rest = 0 if left == 0 else max(16, 1 << (left - 1).bit_length())
    return main, rest


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch shape of one kernel instance."""

    block_m: int = 64   # query rows per program
    block_n: int = 64   # keys per inner step
    num_warps: int = 4
    num_stages: int = 2
    split: bool = True  # head dim 72 -> 64 + 16 lanes (two products); False: one product over 128 lanes


def default_config(seq_len: int, head_dim: int) -> KernelConfig:
    """Tiles for a sequence length: query blocks that waste little of a short sequence."""
    if seq_len <= 256:
        return KernelConfig(block_m=64, block_n=32 if seq_len % 64 else 64, num_warps=4, num_stages=2)
    return KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)


def _attn_step(acc_a, acc_b, m_i, l_i, qa, qb, k_ptr, v_ptr, s_kl, s_vl, start, L_K, scale_log2e,
               D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BLOCK_N: tl.constexpr, MASK_N: tl.constexpr):
    """One block of BLOCK_N keys: online-softmax update of (acc, m, l); MASK_N masks keys >= L_K."""
    cols = start + tl.arange(0, BLOCK_N)
    da = tl.arange(0, DA)
    col_ok = cols < L_K
    if MASK_N:
        keep = col_ok[:, None]
    else:
        keep = cols[:, None] >= 0
    a_mask = keep & (da[None, :] < D)  # D < DA: padded lanes
    ka = tl.load(k_ptr + cols[:, None] * s_kl + da[None, :], mask=a_mask, other=0.0)  # (BN, DA)
    s = tl.dot(qa, tl.trans(ka))
    if DB > 0:
        db = DA + tl.arange(0, DB)
        b_mask = keep & (db[None, :] < D)
        kb = tl.load(k_ptr + cols[:, None] * s_kl + db[None, :], mask=b_mask, other=0.0)
        s += tl.dot(qb, tl.trans(kb))
    s = s * scale_log2e
    if MASK_N:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(qa.dtype)
    va = tl.load(v_ptr + cols[:, None] * s_vl + da[None, :], mask=a_mask, other=0.0)  # (BN, DA)
    acc_a = tl.dot(p, va, acc_a * alpha[:, None])
    if DB > 0:
        vb = tl.load(v_ptr + cols[:, None] * s_vl + db[None, :], mask=b_mask, other=0.0)
        acc_b = tl.dot(p, vb, acc_b * alpha[:, None])
    return acc_a, acc_b, m_new, l_i


def _attn_fwd(Q, K, V, O, scale_log2e,
              s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh,
              H, L_Q, L_K,
              D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (query block, batch * head): its BLOCK_M rows against every key. The head dim is
    DA lanes (a power of two, masked beyond D) plus DB more (0, or a power of two >= 16)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    da = tl.arange(0, DA)
    db = DA + tl.arange(0, DB if DB > 0 else 16)
    q_ptr = Q + b * s_qb + h * s_qh
    k_ptr = K + b * s_kb + h * s_kh
    v_ptr = V + b * s_vb + h * s_vh
    row_ok = rows < L_Q
    qa = tl.load(q_ptr + rows[:, None] * s_ql + da[None, :], mask=row_ok[:, None] & (da[None, :] < D), other=0.0)
    qb = tl.load(q_ptr + rows[:, None] * s_ql + db[None, :], mask=row_ok[:, None] & (db[None, :] < D), other=0.0)
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, DB if DB > 0 else 16], dtype=tl.float32)  # unused (never computed) when DB == 0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full = L_K - L_K % BLOCK_N
    for start in range(0, full, BLOCK_N):  # whole blocks: no key mask
        acc_a, acc_b, m_i, l_i = _attn_step(acc_a, acc_b, m_i, l_i, qa, qb, k_ptr, v_ptr, s_kl, s_vl, start, L_K,
                                            scale_log2e, D, DA, DB, BLOCK_N, False)
    if full < L_K:  # the ragged tail
        acc_a, acc_b, m_i, l_i = _attn_step(acc_a, acc_b, m_i, l_i, qa, qb, k_ptr, v_ptr, s_kl, s_vl, full, L_K,
                                            scale_log2e, D, DA, DB, BLOCK_N, True)
    inv = 1.0 / l_i
    o_ptr = O + b * s_ob + h * s_oh
    tl.store(o_ptr + rows[:, None] * s_ol + da[None, :], (acc_a * inv[:, None]).to(O.dtype.element_ty),
             mask=row_ok[:, None] & (da[None, :] < D))
    if DB > 0:
        tl.store(o_ptr + rows[:, None] * s_ol + db[None, :], (acc_b * inv[:, None]).to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (db[None, :] < D))


if triton is not None:
    _attn_step = triton.jit(_attn_step)


_kernel = None if triton is None else triton.jit(_attn_fwd)  # under TRITON_INTERPRET=1: the interpreter


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KernelConfig | None = None,
                  scale: float | None = None) -> torch.Tensor:
    """Softmax attention ``(B, Lq, H, dh), (B, Lk, H, dh) x2 -> (B, Lq, H, dh)``, no mask, forward only.

    ``config``: tiles (default: :func:`default_config` for ``Lk``); ``scale``: logit scale
    (default ``1 / sqrt(dh)``). Gradients do not flow: use SDPA where they must.
    """
    if not available():
        raise ImportError("chunkformer.triton_attention needs triton (pip install triton, or torch's CUDA wheels)")
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"expected q (B, Lq, H, dh) and k, v (B, Lk, H, dh); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Lq, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree on batch, heads or head dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"on CUDA the kernel takes fp16 or bf16 (got {q.dtype}); cast, or run under autocast")
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported; use SDPA")
    if min(t.stride(-1) for t in (q, k, v)) != 1 or max(t.stride(-1) for t in (q, k, v)) != 1:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cfg = config or default_config(k.shape[1], D)
    if B * Lq * H == 0:
        return q.new_empty(B, Lq, H, D)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if not q.is_cuda:
        if not _interpreted():
            raise ValueError("the kernel runs on CUDA tensors; on the CPU only under TRITON_INTERPRET=1 (a testing "
                             "mode, set before triton is imported). Use SDPA on the CPU.")
        return _launch(_kernel, q, k, v, cfg, scale, {})
    return torch.ops.chunkformer.flash_forward(q, k, v, cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                                               cfg.split, scale)


def _launch(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: KernelConfig, scale: float,
            launch: dict) -> torch.Tensor:
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    DA, DB = split_head_dim(D) if cfg.split else (1 << (D - 1).bit_length(), 0)
    out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    grid = (-(-Lq // cfg.block_m), B * H)
    kernel[grid](q, k, v, out, scale * 1.4426950408889634,
                 *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(out), H, Lq, Lk,
                 D=D, DA=DA, DB=DB, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                 **launch)
    return out


if triton is not None:
    @torch.library.triton_op("chunkformer::flash_forward", mutates_args=())
    def _flash_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int, num_warps: int,
                  num_stages: int, split: bool, scale: float) -> torch.Tensor:
        """The CUDA launch as a custom op, so ``torch.compile`` keeps it inside the graph."""
        cfg = KernelConfig(block_m, block_n, num_warps, num_stages, split)
        return _launch(torch.library.wrap_triton(_kernel), q, k, v, cfg, scale,
                       dict(num_warps=num_warps, num_stages=num_stages))


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernel, InterpretedFunction)


def _bhl(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a ``(B, L, H, dh)`` tensor in the kernel's order: batch, position, head."""
    return t.stride(0), t.stride(1), t.stride(2)
