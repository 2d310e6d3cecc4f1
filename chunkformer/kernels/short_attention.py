"""A Triton attention forward for short unmasked sequences, where SDPA's default kernel pads.

On recent GPUs SDPA's default choice (cuDNN's flash kernel) pads the keys to a multiple of 128 and a head
dim of 72 to 128, so just past 128 keys it costs what it costs at 256; DC-DiT-XL at rho 0.4 attends over
160 kept tokens in each block. This kernel runs key blocks of 64 with a running max (flash attention's
forward), the head dim split as 64 + 16 lanes (8 masked at 72) so nothing is padded to 128, one program
per 64 queries and head.

:func:`sdpa` sends a call here when :func:`runs_here`: CUDA, fp16 / bf16, no mask, no gradient, and a head
dim and key count inside :data:`WINS` (where ``benchmarks/short_attention.py`` measured it ahead of SDPA;
docs/performance.md), and to :func:`~chunkformer.attention.masked_sdpa` otherwise. :class:`Attention`, which
:func:`chunkformer.kernels.apply` swaps in for DiT's attention, attends through it; :func:`set_short_attention`
turns it off process-wide. It is a ``torch.library.triton_op``: compiled graphs launch the kernel from their
own code.

    import torch
    from chunkformer.kernels import short_attention
    q = torch.randn(2, 4, 160, 72)                          # (B, H, L, dh)
    assert not short_attention.runs_here(q, q, None)        # fp32 on the CPU: SDPA runs
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention import masked_sdpa
from ..models.dit import Attention as PlainAttention
from . import prefix_attention as prefix
from ._triton import kernel_op, launcher, tl, triton

__all__ = ["Attention", "AttentionTiles", "WINS", "attend", "forward", "runs_here", "sdpa", "set_short_attention",
           "split_head_dim"]

# head dim -> (lo, hi]: the key counts where the kernel beat SDPA's choice (bf16, batch 64, 16 heads;
# benchmarks/short_attention.py --lengths, docs/performance.md). At dh 64 cuDNN pads nothing and SDPA stays.
WINS: dict[int, tuple[int, int]] = {72: (128, 192)}
_enabled = True


def set_short_attention(enabled: bool) -> None:
    """Let :func:`sdpa` use the kernel where it wins (the default), or never (process-wide)."""
    global _enabled
    _enabled = bool(enabled)


@dataclass(frozen=True)
class AttentionTiles:
    """Tiles and launch shape of the kernel: 64 queries x 64 keys, 4 warps, 3 stages (the best of the tilings
    ``benchmarks/short_attention.py`` sweeps at 136-192 keys)."""

    block_m: int = 64   # query rows per program
    block_n: int = 64   # keys per inner step
    num_warps: int = 4
    num_stages: int = 3


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """``head_dim = main + rest`` with ``main`` the largest power of two <= head_dim and ``rest``
    padded to a power of two >= 16 (0 when head_dim is a power of two): 72 -> (64, 16)."""
    if head_dim < 16:
        raise ValueError(f"head_dim must be at least 16, got {head_dim}")
    main = 1 << (head_dim.bit_length() - 1)
    left = head_dim - main
    rest = 0 if left == 0 else max(16, 1 << (left - 1).bit_length())
    return main, rest


def head_alignment(*head_strides: int) -> int:
    """The largest power of two up to 16 that divides every head stride (in elements): what the kernel may
    tell Triton about where a head starts (8 at dh = 72). Triton infers alignment only from integer
    arguments divisible by 16; without the hint, a head stride of 72 makes every load one element wide."""
    return math.gcd(16, *head_strides)


def runs_here(q: Tensor, k: Tensor, mask: Tensor | None) -> bool:
    """Whether attention of ``q (B, H, Lq, dh)`` over ``k (B, H, Lk, dh)`` takes the kernel: on, Triton,
    CUDA, fp16 / bf16, no mask, no gradient, and ``Lk`` inside ``WINS[dh]``."""
    window = WINS.get(q.shape[-1])
    return (_enabled and triton is not None and window is not None and mask is None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and not torch.is_grad_enabled()
            and window[0] < k.shape[-2] <= window[1])


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention ``(B, H, Lq, dh), (B, H, Lk, dh) x2 -> (B, H, Lq, dh)``, no mask, forward only,
    as SDPA takes and returns it (any strides in; the output is a view of a ``(B, Lq, H, dh)`` tensor)."""
    return _short_attention_op(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`~chunkformer.attention.masked_sdpa` on ``(B, H, M, dh)``, through the kernel where
    :func:`runs_here`, and a compiled training step's key-masked attention through FlexAttention where
    :func:`~chunkformer.kernels.prefix_attention.runs_here` (off unless ``set_prefix_attention(True)``)."""
    if runs_here(q, k, mask):
        return attend(q, k, v)
    if prefix.runs_here(q, mask):
        return prefix.prefix_attention(q, k, v, prefix.prefix_lengths(mask))
    return masked_sdpa(q, k, v, mask)


class Attention(PlainAttention):
    """DiT's :class:`~chunkformer.models.dit.Attention` attending through :func:`sdpa` (a class swap made by
    :func:`chunkformer.kernels.apply`: same parameters and state dict)."""

    plain_class = PlainAttention

    def forward(self, x: Tensor, plan=None, key_bias: Tensor | None = None) -> Tensor:
        return self.attend(x, plan, key_bias, sdpa)


def _checked(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``q (B, Lq, H, dh)``, ``k, v (B, Lk, H, dh)`` with unit stride on the head dim, or a ValueError."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B, Lq, H, dh) and k, v (B, Lk, H, dh); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} disagree on batch, heads or head dim")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} > 256 is not supported; use SDPA")
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))


def launch_inputs(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, tuple, dict]:
    """What every launch of a kernel of this form takes, for ``q (B, Lq, H, dh)``, ``k, v (B, Lk, H, dh)``:
    ``(out, args, consts)`` with ``out`` an empty contiguous ``(B, Lq, H, dh)``; ``args`` = q, k, v, out (checked),
    the logit scale in log2 units (default ``1 / sqrt(dh)``), the batch, position and head strides of each, then
    H, Lq, Lk; ``consts`` = the head dim and its split (``D, DA, DB``) and ``HEAD_ALIGN``."""
    q, k, v = _checked(q, k, v)
    B, Lq, H, D = q.shape
    out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    strides = [s for x in (q, k, v, out) for s in (x.stride(0), x.stride(1), x.stride(2))]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    args = (q, k, v, out, scale * 1.4426950408889634, *strides, H, Lq, k.shape[1])
    DA, DB = split_head_dim(D)
    consts = dict(D=D, DA=DA, DB=DB, HEAD_ALIGN=head_alignment(*(x.stride(2) for x in (q, k, v, out))))
    return out, args, consts


def forward(q: Tensor, k: Tensor, v: Tensor, tiles: AttentionTiles | None = None) -> Tensor:
    """Run the kernel: ``q (B, Lq, H, dh)``, ``k, v (B, Lk, H, dh)`` (any strides) -> a contiguous
    ``(B, Lq, H, dh)``, scale ``1 / sqrt(dh)``. Raises on CPU tensors unless Triton's interpreter is on."""
    if triton is None:
        raise RuntimeError("the short-attention kernel needs Triton (it ships with CUDA builds of torch); use SDPA")
    out, args, consts = launch_inputs(q, k, v)
    if out.numel() == 0:
        return out
    B, Lq, H, _ = out.shape
    t = tiles or AttentionTiles()
    launcher(_attention_kernel, q)[(triton.cdiv(Lq, t.block_m), B * H)](
        *args, BLOCK_M=t.block_m, BLOCK_N=t.block_n, EVEN_N=k.shape[1] % t.block_n == 0,
        num_warps=t.num_warps, num_stages=t.num_stages, **consts,
    )
    return out


if triton is not None:

    @triton.jit
    def _head_start(h, stride, ALIGN: tl.constexpr):
        """``h * stride`` elements, declared a multiple of ``ALIGN`` (1: nothing declared), so that a head
        stride of 72 still gets 16-byte loads."""
        start = h * stride
        if ALIGN > 1:
            start = tl.multiple_of(start, ALIGN)
        return start

    @triton.jit
    def _scores(qa, qb, k_ptr, s_kl, start, L_K, da, db, d_ok,
                N: tl.constexpr, DB: tl.constexpr, LAST: tl.constexpr):
        """Logits ``(BM, N)`` of a query block against keys ``[start, start + N)`` (-inf past ``L_K`` on the
        last tile): the first ``DA`` lanes of the head dim in one product, the rest in another."""
        cols = start + tl.arange(0, N)
        col_ok = cols < L_K
        ka = tl.load(k_ptr + cols[None, :] * s_kl + da[:, None], mask=col_ok[None, :], other=0.0)  # (DA, N)
        s = tl.dot(qa, ka)
        if DB > 0:
            kb = tl.load(k_ptr + cols[None, :] * s_kl + db[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            s += tl.dot(qb, kb)
        if LAST:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        return s

    @triton.jit
    def _key_step(qa, qb, acc_a, acc_b, m_i, l_i, k_ptr, v_ptr, s_kl, s_vl, start, L_K, da, db, d_ok, scale_log2e,
                  N: tl.constexpr, DB: tl.constexpr, MASKED: tl.constexpr):
        """One step of the running-max softmax over keys ``[start, start + N)`` (-inf past ``L_K`` if ``MASKED``):
        the updated ``(acc_a, acc_b, m_i, l_i)`` (``acc_b``, the last ``DB`` lanes, untouched when ``DB == 0``)."""
        cols = start + tl.arange(0, N)
        col_ok = cols < L_K
        s = _scores(qa, qb, k_ptr, s_kl, start, L_K, da, db, d_ok, N, DB, MASKED) * scale_log2e
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v_ptr.dtype.element_ty)
        va = tl.load(v_ptr + cols[:, None] * s_vl + da[None, :], mask=col_ok[:, None], other=0.0)  # (N, DA)
        acc_a = tl.dot(p, va, acc_a * alpha[:, None])
        if DB > 0:
            vb = tl.load(v_ptr + cols[:, None] * s_vl + db[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc_b = tl.dot(p, vb, acc_b * alpha[:, None])
        return acc_a, acc_b, m_new, l_i

    @triton.jit
    def _store_rows(o_ptr, rows, row_ok, s_ol, acc_a, acc_b, l_i, da, db, d_ok, DB: tl.constexpr):
        """Write ``acc / l`` for ``rows`` of one head: the first ``DA`` lanes, then the last ``DB`` (if any)."""
        inv = 1.0 / l_i
        tl.store(o_ptr + rows[:, None] * s_ol + da[None, :], (acc_a * inv[:, None]).to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        if DB > 0:
            tl.store(o_ptr + rows[:, None] * s_ol + db[None, :], (acc_b * inv[:, None]).to(o_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _attention_kernel(Q, K, V, O, scale_log2e,
                          s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh,
                          H, L_Q, L_K,
                          D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, HEAD_ALIGN: tl.constexpr):
        """Program ``(m, b * H + h)``: query rows ``[m * BLOCK_M, (m + 1) * BLOCK_M)`` of head ``h`` of sample
        ``b`` against every key, ``BLOCK_N`` at a time with a running max; fp32 accumulators."""
        scale_log2e = tl.full([], scale_log2e, tl.float32)  # inductor passes a Python float as fp64: keep fp32
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < L_Q
        q_ptr = Q + b * s_qb + _head_start(h, s_qh, HEAD_ALIGN)
        k_ptr = K + b * s_kb + _head_start(h, s_kh, HEAD_ALIGN)
        v_ptr = V + b * s_vb + _head_start(h, s_vh, HEAD_ALIGN)
        da = tl.arange(0, DA)
        DBP: tl.constexpr = DB if DB > 0 else 16
        db = DA + tl.arange(0, DBP)  # the rest of the head dim, padded to DB lanes (masked past D)
        d_ok = db < D
        qa = tl.load(q_ptr + rows[:, None] * s_ql + da[None, :], mask=row_ok[:, None], other=0.0)  # (BM, DA)
        qb = tl.load(q_ptr + rows[:, None] * s_ql + db[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, DBP], dtype=tl.float32)  # unused when DB == 0
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, L_K, BLOCK_N):
            acc_a, acc_b, m_i, l_i = _key_step(qa, qb, acc_a, acc_b, m_i, l_i, k_ptr, v_ptr, s_kl, s_vl, start, L_K,
                                               da, db, d_ok, scale_log2e, BLOCK_N, DB, not EVEN_N)
        _store_rows(O + b * s_ob + _head_start(h, s_oh, HEAD_ALIGN), rows, row_ok, s_ol, acc_a, acc_b, l_i,
                    da, db, d_ok, DB)

    @kernel_op("chunkformer::short_attention")
    def _short_attention_op(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """:func:`forward` with the default tiles, ``(B, L, H, dh)`` in and out: traced into by torch.compile."""
        return forward(q, k, v)

else:  # pragma: no cover - no Triton: runs_here is never true

    def _short_attention_op(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return forward(q, k, v)
