"""Unmasked attention at DC-DiT-XL's kept lengths: SDPA's kernels against Triton kernels of our own.

    python benchmarks/short_attention.py --out benchmarks/results/short_attention_h100.json
    python benchmarks/short_attention.py --no-flex --lengths 128,136,144,160,176,192   # the window's edges

DC-DiT-XL attends over 160-1024 kept tokens with 16 heads of 72, and SDPA's default kernel on an
H100 (cuDNN's flash kernel, which pads the head dim to 128 and tiles 64 x 128) takes nearly as
long at 160 tokens as at 256. This asks whether a kernel of our own would shrink with the budget.
At the step benchmark's token counts (batch 64 at 160 / 208 / 256 tokens, batch 16 at 616 / 824 /
1024; ``--lengths``: batch 64 at the counts given) it times one attention call as the model makes it:
q, k, v are views of a fused ``(B, L, 3, H, dh)`` projection and the result must reach the output
projection as a contiguous ``(B, L, H * dh)``. Rows: SDPA's default choice with the transpose copy
after it, the same without the copy, FlexAttention compiled (no mask), with ``--sdpa-backends`` each
of SDPA's kernels forced alone (copy included), and the key-block kernel of
:mod:`chunkformer.short_attention` at each tile configuration in ``CONFIGS`` (flash attention's
forward; head dim split as 64 + 16 lanes, 8 masked; one program per query block and head). "ideal"
scales the longest length's SDPA time by the FLOPs (``L^2``). Errors are max |diff| against fp32 SDPA.
Each call is timed from a CUDA graph of 50 calls (``--host-clock``: between two events around 200 launches,
the clock of sessions 13-19, where the host's launch time shows through at these 0.06-0.08 ms kernels).

That kernel lost everywhere in session 13 (1.6-2.1x slower than cuDNN) with one-element loads at head
dim 72. With its loads vectorised (``_head_start``; ``kernel_loads.py``) it beats cuDNN at 136-192 keys
(0.057-0.062 against 0.079 ms on an H100) and loses at 128 and below and at 208 and above, so the
library takes it in that window only (``chunkformer.short_attention.WINS``; docs/performance-log.md).

``--tails`` adds a variant of it (session 19): whole blocks of keys unmasked, then what they leave as one
tile of 16 or 32 keys, and the query rows past the last whole block in a second launch with 16- or 32-row
blocks (``--tails-whole-rows``: no second launch). At 208 keys (3 x 64 + 16) the library's kernel computes
4 x 4 tiles of 64, 1.5x the work, and loses to cuDNN by 6%. Timed in session 20 on an H200, the variant
lost everywhere: 0.095-0.104 ms at 208 keys against the kernel's 0.087 and cuDNN's 0.082, and slower than
the kernel at 160 too; two of its configurations hit an illegal memory access past 160 keys (``--tails-configs``
runs one configuration per process for that reason).

``--whole-head`` adds a second candidate (session 18) for up to 256 keys: one pass over every key of a
head, held as up to four power-of-two tiles (160 = 128 + 32, so no padded columns) with no running
max, at each configuration in ``WHOLE_HEAD_CONFIGS``. At head dim 64 it beats cuDNN at 160 tokens; at
72, before ``_head_start``, it faulted or ran 3-41x slower than cuDNN on the H200's Triton, depending on
the layout of its products (docs/performance-log.md; ``whole_head_isolated.py`` runs each configuration in a
process of its own). Not in the package either.

Both candidates are also ops that ``torch.compile`` traces into (``whole_head_attention``,
``key_block_attention``), and ``use_in_models`` routes chunkformer's unmasked no-grad attention through
one of them: ``step_speed.py --attention-kernel`` times whole models that way.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

from chunkformer.short_attention import (AttentionTiles, _attention_kernel, _head_start, _key_step,  # noqa: F401
                                         _scores, _store_rows, forward, head_alignment, launch_inputs, split_head_dim)  # the key-block kernel and its pieces are the library's
from chunkformer.tapconv import kernel_op, launcher


KernelConfig = AttentionTiles  # the key-block kernel's tiles (block_m, block_n, num_warps, num_stages)


def default_config(seq_len: int, head_dim: int) -> KernelConfig:
    """Tiles for a sequence length: query blocks that waste little of a short sequence."""
    if seq_len <= 256:
        return KernelConfig(block_m=64, block_n=32 if seq_len % 64 else 64, num_warps=4, num_stages=2)
    return KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KernelConfig | None = None) -> torch.Tensor:
    """The key-block kernel (:func:`chunkformer.short_attention.forward`, session 13's candidate) at ``config``
    (default: :func:`default_config` for the key count): ``(B, Lq, H, dh), (B, Lk, H, dh) x2 -> (B, Lq, H, dh)``."""
    return forward(q, k, v, config or default_config(k.shape[1], q.shape[-1]))


def key_chunks(seq_len: int, smallest: int = 16) -> tuple[int, int, int, int]:
    """Powers of two, largest first, that cover ``seq_len`` rounded up to ``smallest``: the key
    tiles of :func:`whole_head_forward` (160 -> (128, 32, 0, 0); 208 -> (128, 64, 16, 0)).
    Unused tiles are 0. Four tiles of at least 16 cover any multiple of 16 up to 256."""
    if not 0 < seq_len <= 256:
        raise ValueError(f"key_chunks covers 1..256 keys, got {seq_len}")
    left = -(-seq_len // smallest) * smallest
    chunks = []
    while left:
        c = 1 << (left.bit_length() - 1)
        chunks.append(c)
        left -= c
    return tuple(chunks + [0] * (4 - len(chunks)))


@triton.jit
def _values(p, acc, acc_b, v_ptr, s_vl, start, L_K, dv, dv_ok, db, d_ok, N: tl.constexpr, SPLIT: tl.constexpr):
    """``acc += p @ v[start:start + N]``: over the head dim padded to a power of two, or (``SPLIT``) as
    two products, the first ``DA`` lanes into ``acc`` and the rest into ``acc_b``."""
    cols = start + tl.arange(0, N)
    col_ok = cols < L_K
    v = tl.load(v_ptr + cols[:, None] * s_vl + dv[None, :], mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
    acc = acc + tl.dot(p, v)
    if SPLIT:
        vb = tl.load(v_ptr + cols[:, None] * s_vl + db[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc_b = acc_b + tl.dot(p, vb)
    return acc, acc_b


@triton.jit
def _attn_whole_head(Q, K, V, O, scale_log2e,
                     s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh,
                     H, L_Q, L_K,
                     D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr,
                     KA: tl.constexpr, KB: tl.constexpr, KC: tl.constexpr, KD: tl.constexpr,
                     GRID_M: tl.constexpr, SPLIT_V: tl.constexpr, HEAD_ALIGN: tl.constexpr):
    """All keys of one head in one pass (no running max): the keys come as up to four power-of-two
    tiles ``KA + KB + KC + KD >= L_K``, so a 160-key head computes 160 columns, not 256. Program
    ``(m, b * H + h)`` takes query blocks ``m, m + GRID_M, ...``."""
    scale_log2e = tl.full([], scale_log2e, tl.float32)  # as in _attn_fwd
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_ptr = Q + b * s_qb + _head_start(h, s_qh, HEAD_ALIGN)
    k_ptr = K + b * s_kb + _head_start(h, s_kh, HEAD_ALIGN)
    v_ptr = V + b * s_vb + _head_start(h, s_vh, HEAD_ALIGN)
    o_ptr = O + b * s_ob + _head_start(h, s_oh, HEAD_ALIGN)
    da = tl.arange(0, DA)
    db = DA + tl.arange(0, DB if DB > 0 else 16)
    d_ok = db < D
    SPLIT: tl.constexpr = SPLIT_V and DB > 0
    DV: tl.constexpr = DA if DB == 0 or SPLIT else 2 * DA
    dv = tl.arange(0, DV)
    dv_ok = dv < D
    for m0 in range(pid_m * BLOCK_M, L_Q, GRID_M * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < L_Q
        qa = tl.load(q_ptr + rows[:, None] * s_ql + da[None, :], mask=row_ok[:, None], other=0.0)
        qb = tl.load(q_ptr + rows[:, None] * s_ql + db[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        s0 = _scores(qa, qb, k_ptr, s_kl, 0, L_K, da, db, d_ok, KA, DB, KB == 0) * scale_log2e
        m = tl.max(s0, 1)
        if KB > 0:
            s1 = _scores(qa, qb, k_ptr, s_kl, KA, L_K, da, db, d_ok, KB, DB, KC == 0) * scale_log2e
            m = tl.maximum(m, tl.max(s1, 1))
        if KC > 0:
            s2 = _scores(qa, qb, k_ptr, s_kl, KA + KB, L_K, da, db, d_ok, KC, DB, KD == 0) * scale_log2e
            m = tl.maximum(m, tl.max(s2, 1))
        if KD > 0:
            s3 = _scores(qa, qb, k_ptr, s_kl, KA + KB + KC, L_K, da, db, d_ok, KD, DB, True) * scale_log2e
            m = tl.maximum(m, tl.max(s3, 1))
        acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, DB if DB > 0 else 16], dtype=tl.float32)
        p = tl.exp2(s0 - m[:, None])
        l_i = tl.sum(p, 1)
        acc, acc_b = _values(p.to(V.dtype.element_ty), acc, acc_b, v_ptr, s_vl, 0, L_K, dv, dv_ok, db, d_ok, KA,
                             SPLIT)
        if KB > 0:
            p = tl.exp2(s1 - m[:, None])
            l_i += tl.sum(p, 1)
            acc, acc_b = _values(p.to(V.dtype.element_ty), acc, acc_b, v_ptr, s_vl, KA, L_K, dv, dv_ok, db, d_ok,
                                 KB, SPLIT)
        if KC > 0:
            p = tl.exp2(s2 - m[:, None])
            l_i += tl.sum(p, 1)
            acc, acc_b = _values(p.to(V.dtype.element_ty), acc, acc_b, v_ptr, s_vl, KA + KB, L_K, dv, dv_ok, db,
                                 d_ok, KC, SPLIT)
        if KD > 0:
            p = tl.exp2(s3 - m[:, None])
            l_i += tl.sum(p, 1)
            acc, acc_b = _values(p.to(V.dtype.element_ty), acc, acc_b, v_ptr, s_vl, KA + KB + KC, L_K, dv, dv_ok,
                                 db, d_ok, KD, SPLIT)
        tl.store(o_ptr + rows[:, None] * s_ol + dv[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
                 mask=row_ok[:, None] & dv_ok[None, :])
        if SPLIT:
            tl.store(o_ptr + rows[:, None] * s_ol + db[None, :], (acc_b / l_i[:, None]).to(O.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok[None, :])


def tail_tile(count: int, block: int) -> int:
    """Width of a last tile that covers what whole blocks leave: 0 when ``block`` divides ``count``, else the
    remainder rounded up to a power of two of at least 16 (208 in blocks of 64: 16, not another 64)."""
    rest = count % block
    return 0 if rest == 0 else max(16, 1 << (rest - 1).bit_length())


@triton.jit
def _attn_tails(Q, K, V, O, scale_log2e,
                s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh,
                H, L_Q, L_K, ROW0,
                D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, HEAD_ALIGN: tl.constexpr):
    """The key-block kernel with no padded tiles to speak of: whole blocks of ``BLOCK_N`` keys unmasked, then the
    rest as one masked tile of ``TAIL_N`` keys; query rows from ``ROW0`` (:func:`tails_forward` launches the
    rows that whole blocks of ``BLOCK_M`` leave again, in blocks of 16 or 32)."""
    scale_log2e = tl.full([], scale_log2e, tl.float32)  # inductor passes a Python float as fp64
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = ROW0 + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L_Q
    q_ptr = Q + b * s_qb + _head_start(h, s_qh, HEAD_ALIGN)
    k_ptr = K + b * s_kb + _head_start(h, s_kh, HEAD_ALIGN)
    v_ptr = V + b * s_vb + _head_start(h, s_vh, HEAD_ALIGN)
    da = tl.arange(0, DA)
    DBP: tl.constexpr = DB if DB > 0 else 16
    db = DA + tl.arange(0, DBP)
    d_ok = db < D
    qa = tl.load(q_ptr + rows[:, None] * s_ql + da[None, :], mask=row_ok[:, None], other=0.0)
    qb = tl.load(q_ptr + rows[:, None] * s_ql + db[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, DBP], dtype=tl.float32)  # unused when DB == 0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    whole = (L_K // BLOCK_N) * BLOCK_N
    for start in range(0, whole, BLOCK_N):
        acc_a, acc_b, m_i, l_i = _key_step(qa, qb, acc_a, acc_b, m_i, l_i, k_ptr, v_ptr, s_kl, s_vl, start, L_K,
                                           da, db, d_ok, scale_log2e, BLOCK_N, DB, False)
    if TAIL_N > 0:
        acc_a, acc_b, m_i, l_i = _key_step(qa, qb, acc_a, acc_b, m_i, l_i, k_ptr, v_ptr, s_kl, s_vl, whole, L_K,
                                           da, db, d_ok, scale_log2e, TAIL_N, DB, True)
    _store_rows(O + b * s_ob + _head_start(h, s_oh, HEAD_ALIGN), rows, row_ok, s_ol, acc_a, acc_b, l_i, da, db, d_ok, DB)


def tails_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KernelConfig | None = None,
                  split_rows: bool = True) -> torch.Tensor:
    """:func:`_attn_tails` at ``config`` (default: the library's tiles), ``(B, L, H, dh)`` in and out. With
    ``split_rows`` the rows past the last whole block of ``block_m`` run in a second launch with blocks of
    ``tail_tile`` rows (two warps: no spills on sm_90 at dh 72), so 16 rows are not computed as 64; else every
    block is ``block_m``."""
    out, common, consts = launch_inputs(q, k, v)
    if out.numel() == 0:
        return out
    B, Lq, H, _ = out.shape
    cfg = config or AttentionTiles()
    consts |= dict(BLOCK_N=cfg.block_n, TAIL_N=tail_tile(k.shape[1], cfg.block_n), num_stages=cfg.num_stages)
    rows = (Lq // cfg.block_m) * cfg.block_m if split_rows else -(-Lq // cfg.block_m) * cfg.block_m
    if rows:
        launcher(_attn_tails, q)[(rows // cfg.block_m, B * H)](*common, 0, BLOCK_M=cfg.block_m,
                                                              num_warps=cfg.num_warps, **consts)
    rest = tail_tile(Lq, cfg.block_m) if split_rows else 0
    if rest:
        launcher(_attn_tails, q)[(1, B * H)](*common, rows, BLOCK_M=rest, num_warps=2, **consts)
    return out


@dataclass(frozen=True)
class WholeHeadConfig:
    """Launch shape of :func:`whole_head_forward`: query rows per block, query-block programs per
    head (0: one per block), warps, pipeline stages, and whether the values' product is split as the
    head dim is (64 + 16 lanes at 72) or runs over the head dim padded to a power of two (128)."""

    block_m: int = 64
    grid_m: int = 0
    num_warps: int = 4
    num_stages: int = 1
    split_values: bool = False


def whole_head_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: WholeHeadConfig | None = None,
                       scale: float | None = None) -> torch.Tensor:
    """Softmax attention ``(B, Lq, H, dh), (B, Lk, H, dh) x2 -> (B, Lq, H, dh)`` for ``Lk <= 256``, no
    mask, forward only: every key of a head in one pass, in power-of-two tiles (:func:`key_chunks`)."""
    KA, KB, KC, KD = key_chunks(k.shape[1])
    out, args, consts = launch_inputs(q, k, v, scale)
    if out.numel() == 0:
        return out
    B, Lq, H, _ = out.shape
    cfg = config or WholeHeadConfig()
    blocks = -(-Lq // cfg.block_m)
    grid_m = blocks if cfg.grid_m <= 0 else min(cfg.grid_m, blocks)
    launcher(_attn_whole_head, q)[(grid_m, B * H)](*args, BLOCK_M=cfg.block_m, KA=KA, KB=KB, KC=KC, KD=KD,
                                                  GRID_M=grid_m, SPLIT_V=cfg.split_values,
                                                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **consts)
    return out


# The candidates as ops torch.compile traces into, so that a whole compiled model can run them (step_speed.py
# --attention-kernel). Their tiles are read when an op is traced: set them before compiling.
OP_CONFIGS: dict[str, KernelConfig | WholeHeadConfig | None] = {"whole head": WholeHeadConfig(64, 1, 4, 2),
                                                                 "key blocks": None, "key blocks, tails": None}


@kernel_op("chunkformer_bench::whole_head_attention")
def whole_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`whole_head_forward` with ``OP_CONFIGS["whole head"]``, ``(B, L, H, dh)`` in and out."""
    return whole_head_forward(q, k, v, OP_CONFIGS["whole head"])


@kernel_op("chunkformer_bench::key_block_attention")
def key_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`flash_forward` (session 13's kernel) with ``OP_CONFIGS["key blocks"]``, ``(B, L, H, dh)``."""
    return flash_forward(q, k, v, OP_CONFIGS["key blocks"])


@kernel_op("chunkformer_bench::key_tail_attention")
def key_tail_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`tails_forward` with ``OP_CONFIGS["key blocks, tails"]``, ``(B, L, H, dh)`` in and out."""
    return tails_forward(q, k, v, OP_CONFIGS["key blocks, tails"])


KERNEL_OPS = {"whole head": whole_head_attention, "key blocks": key_block_attention,
              "key blocks, tails": key_tail_attention}


def use_in_models(kind: str, max_tokens: int, config=None, cuda_only: bool = True):
    """Route chunkformer's unmasked attention through a candidate wherever no gradient is taken and the
    sequence has at most ``max_tokens`` keys (both DiT-XL/2 and DC-DiT-XL call ``masked_sdpa``); SDPA does
    the rest. Installs for the whole process; returns a function that restores SDPA. ``cuda_only=False``
    lets the CPU take it too (Triton's interpreter, for tests)."""
    import chunkformer.attention as attention

    if kind not in KERNEL_OPS:
        raise ValueError(f"unknown attention kernel {kind!r}; one of {sorted(KERNEL_OPS)}")
    if kind == "whole head" and not 0 < max_tokens <= 256:
        raise ValueError(f"the whole-head kernel takes up to 256 keys, got max_tokens={max_tokens}")
    op, sdpa = KERNEL_OPS[kind], attention.masked_sdpa
    OP_CONFIGS[kind] = config if config is not None else OP_CONFIGS[kind]

    def masked_sdpa(q, k, v, mask):  # (B, H, M, dh), as attention.masked_sdpa takes them
        if (mask is None and (q.is_cuda or not cuda_only) and not torch.is_grad_enabled()
                and k.shape[-2] <= max_tokens and q.shape[-1] <= 256):
            return op(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        return sdpa(q, k, v, mask)

    attention.masked_sdpa = masked_sdpa

    def restore():
        attention.masked_sdpa = sdpa
    return restore


SDPA_BACKENDS = {"sdpa cuDNN": SDPBackend.CUDNN_ATTENTION, "sdpa flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa memory-efficient": SDPBackend.EFFICIENT_ATTENTION}
SHAPES = ((64, 160), (64, 208), (64, 256), (16, 616), (16, 824), (16, 1024))
CONFIGS = [KernelConfig(64, 32, 4, 2), KernelConfig(64, 64, 4, 2), KernelConfig(64, 64, 4, 3),
           KernelConfig(64, 128, 4, 2), KernelConfig(128, 32, 8, 2), KernelConfig(128, 64, 8, 2),
           KernelConfig(128, 64, 8, 3), KernelConfig(128, 128, 8, 2), KernelConfig(128, 64, 4, 2),
           KernelConfig(32, 32, 4, 2), KernelConfig(64, 32, 4, 1), KernelConfig(32, 64, 2, 2)]
WHOLE_HEAD_CONFIGS = [WholeHeadConfig(bm, gm, w, st) for bm in (64, 128) for gm in (0, 1) for w in (4, 8)
                      for st in (1, 2)] + [WholeHeadConfig(32, 0, 4, 1), WholeHeadConfig(32, 0, 2, 1)]


def config_name(cfg: KernelConfig | WholeHeadConfig) -> str:
    """How the tables name a configuration: ``64x32 w4 s2``; whole head ``64 rows, 1 program, w4 s2``."""
    if isinstance(cfg, WholeHeadConfig):
        return (f"{cfg.block_m} rows, {'1 program' if cfg.grid_m == 1 else 'a program per block'}, "
                f"w{cfg.num_warps} s{cfg.num_stages}")
    return f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"


def best_correct(timings: dict) -> str | None:
    """The fastest configuration whose error is under 1e-2 (bf16 against fp32 SDPA), or None."""
    good = [n for n in timings if timings[n]["err"] < 1e-2]
    return min(good, key=lambda n: timings[n]["ms"]) if good else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-triton", action="store_true", help="leave out the Triton candidate (a quick run)")
    ap.add_argument("--whole-head", action="store_true",
                    help="also time the whole-head Triton candidate (up to 256 tokens; some configurations fault at "
                         "head dim 72 on the H200's Triton, which ends the run: see whole_head_isolated.py)")
    ap.add_argument("--tails", action="store_true",
                    help="also time the key-block kernel with tail tiles (tails_forward): the keys and query rows "
                         "that whole blocks leave as one 16- or 32-wide tile, not a whole padded block")
    ap.add_argument("--tails-configs", default=None, metavar="TILES",
                    help="the --tails configurations to time instead of CONFIGS, 'block_m,block_n,warps,stages' "
                         "separated by ';' (a configuration that faults ends the process: give one per run)")
    ap.add_argument("--tails-whole-rows", action="store_true",
                    help="--tails with every query block block_m rows (the last one masked), no second launch")
    ap.add_argument("--host-clock", action="store_true",
                    help="time calls between two CUDA events as they are launched (sessions 13-19's clock; host "
                         "launch time included) instead of replaying a CUDA graph of them")
    ap.add_argument("--short-only", action="store_true", help="only the batch-64 shapes (160-256 tokens)")
    ap.add_argument("--lengths", default=None, metavar="INTS",
                    help="these token counts at batch 64 instead of the step benchmark's shapes, e.g. 128,144,160")
    ap.add_argument("--sdpa-backends", action="store_true",
                    help="also time each of SDPA's kernels (cuDNN, flash, memory-efficient) on its own")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dev, H, D = torch.device("cuda"), args.heads, args.head_dim
    from step_speed import cuda_ms, graph_ms, save_result  # benchmarks/ is on the path as a script
    from torch.nn.attention.flex_attention import flex_attention

    def ms(fn):
        return cuda_ms(fn, 200, warmup=10) if args.host_clock else graph_ms(fn, 50)

    tails_configs = CONFIGS
    if args.tails_configs:
        try:
            tiles = [[int(n) for n in c.split(",")] for c in args.tails_configs.split(";")]
        except ValueError:
            tiles = [[]]
        if any(len(t) != 4 for t in tiles):
            ap.error(f"--tails-configs: expected four integers per configuration, 'block_m,block_n,warps,stages', "
                     f"separated by ';'; got {args.tails_configs!r}")
        tails_configs = [KernelConfig(*t) for t in tiles]

    flex = torch.compile(flex_attention)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {H} heads of {D}")
    rows = []
    shapes = ([(64, int(n)) for n in args.lengths.split(",")] if args.lengths else
              [s for s in SHAPES if s[1] <= 256 or not args.short_only])
    for B, L in shapes:
        qkv = torch.randn(B, L, 3, H, D, device=dev, dtype=torch.bfloat16)
        q, k, v = qkv.unbind(2)  # (B, L, H, dh) views, as the model's rearrange gives them
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float()).transpose(1, 2)

        def sdpa_copy():
            return rearrange(F.scaled_dot_product_attention(qt, kt, vt), "b h l d -> b l (h d)").contiguous()

        row = {"batch": B, "tokens": L, "sdpa + copy": ms(sdpa_copy),
               "sdpa": ms(lambda: F.scaled_dot_product_attention(qt, kt, vt))}
        if not args.no_flex:
            try:
                row["flex"] = ms(lambda: flex(qt, kt, vt))
            except Exception as e:  # noqa: BLE001
                print("flex:", type(e).__name__, str(e)[:200])
                row["flex"] = float("nan")
        row["sdpa_err"] = float((F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).float() - ref).abs().max())
        if args.sdpa_backends:
            row["backends"] = {}
            for name, backend in SDPA_BACKENDS.items():
                try:
                    with sdpa_kernel([backend]):
                        err = float((F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).float() - ref).abs().max())
                        row["backends"][name] = {"ms": ms(sdpa_copy), "err": err}
                except RuntimeError as e:  # this kernel does not take these shapes here
                    print(f"{name}: {str(e)[:160]}")
                    row["backends"][name] = None
        def timed(forward, configs, label=""):
            """``{config name: {"ms", "err"}}`` for ``forward`` at each config; a failure is printed, not fatal."""
            out = {}
            for cfg in configs:
                name = config_name(cfg)
                if name in out:
                    continue
                try:
                    err = float((forward(q, k, v, cfg).float() - ref).abs().max())
                    out[name] = {"ms": ms(lambda: forward(q, k, v, cfg)), "err": err}
                except Exception as e:  # noqa: BLE001
                    print(f"{label}{name}: {type(e).__name__} {str(e)[:200]}")
            return out

        triton_rows = timed(flash_forward, [] if args.no_triton else CONFIGS + [default_config(L, D)])
        row["tails"] = timed(lambda q, k, v, cfg: tails_forward(q, k, v, cfg, split_rows=not args.tails_whole_rows),
                             tails_configs if args.tails else [], "tails ")
        row["tails best"] = best_correct(row["tails"])
        whole = timed(whole_head_forward, WHOLE_HEAD_CONFIGS if args.whole_head and L <= 256 else [], "whole head ")
        row["whole head"] = whole
        row["whole head best"] = best_correct(whole)
        d = default_config(L, D)
        row["triton"] = triton_rows
        row["triton default"] = config_name(d)
        best = min(triton_rows, key=lambda n: triton_rows[n]["ms"]) if triton_rows else None
        row["triton best"] = best
        rows.append(row)
        cells = "  ".join(f"{n}: {r['ms']:.4f} ({r['err']:.1e})" for n, r in {**row.get("backends", {}), **triton_rows,
                                                                               **{f"tails {t}": x for t, x in row["tails"].items()}, **whole}.items()
                          if r is not None)
        print(f"B={B} L={L}: sdpa+copy {row['sdpa + copy']:.4f} sdpa {row['sdpa']:.4f} flex {row.get('flex', 0):.4f} "
              f"err {row['sdpa_err']:.1e} | {cells}", flush=True)
    for B in sorted({r["batch"] for r in rows}):
        longest = max((r for r in rows if r["batch"] == B), key=lambda r: r["tokens"])
        for r in rows:
            if r["batch"] == B:
                r["ideal"] = longest["sdpa + copy"] * (r["tokens"] / longest["tokens"]) ** 2
    print(f"\n{'shape':<14}{'ideal':>8}{'sdpa+copy':>11}{'flex':>8}{'triton dflt':>12}{'triton best':>12}  best config")
    for r in rows:
        t = r["triton"]
        dflt = t.get(r["triton default"], {}).get("ms", float("nan"))
        best = t[r["triton best"]]["ms"] if r["triton best"] else float("nan")
        shape = "B={batch} L={tokens}".format(**r)
        print(f"{shape:<14}{r['ideal']:>8.4f}{r['sdpa + copy']:>11.4f}{r.get('flex', float('nan')):>8.4f}"
              f"{dflt:>12.4f}{best:>12.4f}  {r['triton best']}")
    if any(r.get("tails best") for r in rows):
        print(f"\n{'shape':<14}{'sdpa+copy':>11}{'key blocks':>12}{'tails':>10}{'/ sdpa':>8}  best config (error)")
        for r in rows:
            if r.get("tails best"):
                w = r["tails"][r["tails best"]]
                kb = r["triton"][r["triton best"]]["ms"] if r["triton best"] else float("nan")
                print(f"{'B={batch} L={tokens}'.format(**r):<14}{r['sdpa + copy']:>11.4f}{kb:>12.4f}"
                      f"{w['ms']:>10.4f}{w['ms'] / r['sdpa + copy']:>8.2f}  {r['tails best']} ({w['err']:.1e})")
    if any(r.get("whole head best") for r in rows):
        print(f"\n{'shape':<14}{'ideal':>8}{'sdpa+copy':>11}{'whole head':>12}{'/ sdpa':>8}  best config (error)")
        for r in rows:
            if r.get("whole head best"):
                w = r["whole head"][r["whole head best"]]
                print(f"{'B={batch} L={tokens}'.format(**r):<14}{r['ideal']:>8.4f}{r['sdpa + copy']:>11.4f}"
                      f"{w['ms']:>12.4f}{w['ms'] / r['sdpa + copy']:>8.2f}  {r['whole head best']} ({w['err']:.1e})")
    if args.sdpa_backends:
        print(f"\n{'shape':<14}{'ideal':>8}" + "".join(f"{n:>24}" for n in SDPA_BACKENDS) + "   (ms, copy included)")
        for r in rows:
            cells = "".join(f"{'-' if b is None else format(b['ms'], '.4f'):>24}" for b in r["backends"].values())
            print(f"{'B={batch} L={tokens}'.format(**r):<14}{r['ideal']:>8.4f}{cells}")
    if args.out:
        save_result(args.out, torch.cuda.get_device_name(), heads=H, head_dim=D,
                    clock="host: CUDA events around launches" if args.host_clock else "CUDA graph of 50 calls", rows=rows)


if __name__ == "__main__":
    main()
