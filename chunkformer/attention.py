"""Attention over chunked tokens, in whatever layout a :class:`ChunkPlan` produced.

* dense ``(B, L, H, dh)`` (no plan): ordinary attention over the whole grid.
* packed ``(T, H, dh)``: samples are contiguous runs (``plan.cu_seqlens``); a token
  attends only within its own run.
* padded / fixed ``(B, M, H, dh)``: keys in padding slots are masked out, so the real
  tokens' outputs equal those of the packed layout; padding slots' outputs are ignored.

Backends (``backend=`` or :func:`set_attention_backend`; ``"auto"`` picks the first that fits):

=========  =========================================  ==========================
backend    packed sequences via                       where
=========  =========================================  ==========================
``flash``  ``flash_attn_varlen_func`` (cu_seqlens)    CUDA, fp16/bf16, if installed (auto)
``varlen`` PyTorch's ``varlen_attn`` (cu_seqlens)     CUDA sm80+, fp16/bf16, no package (auto)
``flex``   FlexAttention with a document mask         opt-in; CUDA (CPU: forward only)
``sdpa``   unpack to ``(B, M)``, SDPA with key mask   anywhere, trainable on CPU (auto elsewhere)
``math``   SDPA with a ``(T, T)`` block-diagonal mask reference for tests
=========  =========================================  ==========================

All backends compute the same function (tested against each other).

``key_bias`` adds a per-key term to every attention logit (``log(size)`` for token merging's
proportional attention): ``(B, L)`` dense, ``(T,)`` packed, ``(B, M)`` padded. flash has no
such input, so biased packed calls take the sdpa path.
"""

import functools
import importlib.util
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._typing import Float, Tensor, typechecked
from .plan import ChunkPlan

__all__ = ["chunk_attention", "dense_attention", "masked_sdpa", "set_attention_backend", "resolve_backend", "BACKENDS"]

Backend = Literal["auto", "flash", "varlen", "flex", "sdpa", "math"]
BACKENDS: tuple[str, ...] = ("auto", "flash", "varlen", "flex", "sdpa", "math")
# SDPA on (B, H, M, dh) with an optional mask: masked_sdpa, or a fast path that falls back to it
Sdpa = Callable[..., Tensor]
_default_backend: str = "auto"
# FLOP counters listen here: observer(heads, head_dim, sum_of_squared_lengths) per attention call
_observers: list = []


def _flash_installed() -> bool:
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):  # a stand-in module without a spec: not the real package
        return False


_HAS_FLASH = _flash_installed()


@functools.cache
def _varlen_runs_on(device: torch.device) -> bool:
    """Whether PyTorch's own varlen flash kernels exist here and ``device`` is sm80 or newer."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def set_attention_backend(backend: Backend) -> None:
    """Set the process-wide default backend used when ``backend="auto"`` is not overridden."""
    global _default_backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _default_backend = backend


def resolve_backend(backend: Backend, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend ``"auto"`` stands for on ``device`` / ``dtype``."""
    if backend == "auto":
        backend = _default_backend
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        return backend
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _HAS_FLASH:
            return "flash"
        if _varlen_runs_on(device):  # no padding to the longest sample (docs/performance.md)
            return "varlen"
    # FlexAttention stays opt-in: building its block mask per step costs more than the padded
    # SDPA path saves (docs/performance.md)
    return "sdpa"


@typechecked
def dense_attention(
    q: Float[Tensor, "batch tokens heads head_dim"],
    k: Float[Tensor, "batch tokens heads head_dim"],
    v: Float[Tensor, "batch tokens heads head_dim"],
    key_bias: Float[Tensor, "batch tokens"] | None = None,
    *,
    sdpa: Sdpa | None = None,
) -> Float[Tensor, "batch tokens heads head_dim"]:
    """Plain multi-head attention over whole sequences (``key_bias``: added to every logit per key).
    ``sdpa``: what attends on ``(B, H, L, dh)`` (default :func:`masked_sdpa`)."""
    if _observers:
        _notify(q, float(q.shape[0] * q.shape[1] ** 2))
    q_, k_, v_ = (rearrange(t, "b l h d -> b h l d") for t in (q, k, v))
    bias = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
    return rearrange((sdpa or masked_sdpa)(q_, k_, v_, bias), "b h l d -> b l h d")


def _notify(q: Tensor, sum_sq: float) -> None:
    for observer in _observers:
        observer(q.shape[-2], q.shape[-1], sum_sq)


@typechecked
def chunk_attention(
    q: Float[Tensor, "*layout heads head_dim"],
    k: Float[Tensor, "*layout heads head_dim"],
    v: Float[Tensor, "*layout heads head_dim"],
    plan: ChunkPlan,
    backend: Backend = "auto",
    key_bias: Float[Tensor, "*keys"] | None = None,
    *,
    sdpa: Sdpa | None = None,
) -> Float[Tensor, "*layout heads head_dim"]:
    """Multi-head attention restricted to each sample's kept tokens; layout in == layout out.

    ``key_bias``: ``(T,)`` packed or ``(B, M)`` padded, added to the logits of each key. ``sdpa``: what
    attends on ``(B, H, M, dh)`` in the padded / fixed and ``"sdpa"`` paths (default :func:`masked_sdpa`).
    """
    sdpa = sdpa or masked_sdpa
    if _observers:  # padding slots are masked out, so only kept lengths count (read once per plan)
        _notify(q, plan._derived(("sum_sq",), lambda: float((plan.lengths.double() ** 2).sum())))
    if plan.mode != "packed":
        if q.ndim != 4:
            raise ValueError(
                f"{plan.mode} plans take (batch, slots, heads, head_dim) inputs, got {tuple(q.shape)}"
            )
        # (B, 1, 1, M): attend to real tokens only; a full plan has no others, so no mask (the fast kernels)
        mask = None if plan.full and key_bias is None else _key_mask(plan.valid, key_bias, q.dtype)
        q_, k_, v_ = (rearrange(t, "b m h d -> b h m d") for t in (q, k, v))
        out = sdpa(q_, k_, v_, mask)
        return rearrange(out, "b h m d -> b m h d")

    if q.ndim != 3:
        raise ValueError(f"packed plans take (tokens, heads, head_dim) inputs, got {tuple(q.shape)}")
    backend = resolve_backend(backend, q.device, q.dtype)
    if key_bias is not None and backend in ("flash", "varlen", "flex"):
        backend = "sdpa"  # none takes a per-key bias here
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        cu = plan.cu_seqlens
        return flash_attn_varlen_func(q, k, v, cu, cu, plan.width, plan.width)
    if backend == "varlen":
        return _varlen_packed(q, k, v, plan)
    if backend == "flex":
        return _flex_packed(q, k, v, plan)
    if backend == "math":
        seg = plan.segment_ids()  # (T,)
        mask = seg[:, None] == seg[None, :]  # (T, T) block diagonal
        if key_bias is not None:
            mask = torch.where(mask, key_bias[None, :].to(q.dtype), float("-inf"))
        q_, k_, v_ = (rearrange(t, "t h d -> 1 h t d") for t in (q, k, v))
        out = masked_sdpa(q_, k_, v_, mask)
        return rearrange(out, "1 h t d -> t h d")
    # sdpa: unpack to (B, M), attend with a key mask, pack again
    H = q.shape[1]
    qkv = plan.unpack(torch.cat([rearrange(t, "t h d -> t (h d)") for t in (q, k, v)], dim=-1))  # (B, M, 3 H dh)
    q_, k_, v_ = (rearrange(t, "b m (h d) -> b h m d", h=H) for t in qkv.chunk(3, dim=-1))
    bias = None if key_bias is None else plan.unpack(key_bias[:, None].to(q.dtype))[..., 0]  # (B, M)
    out = sdpa(q_, k_, v_, _key_mask(plan.valid, bias, q.dtype))
    out = plan.pack(rearrange(out, "b h m d -> b m (h d)"), total=q.shape[0])  # sync-free: T is known
    return rearrange(out, "t (h d) -> t h d", h=H)


# SDPA kernels for masked attention that will be differentiated on a GPU: all but cuDNN's fused one,
# whose backward with an attention mask fails ("mha_graph.execute(...).is_good()", pytorch#134001;
# it stopped a DC-DiT-S training run with torch 2.11) or returns NaN in dQ for
# lengths of 64 mod 128 (pytorch#196678). Inference and unmasked attention keep the default choice.
_MASKED_TRAINING_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def avoids_cudnn(q: Tensor, mask: Tensor | None) -> bool:
    """Whether :func:`masked_sdpa` keeps this call off cuDNN attention (masked, CUDA, differentiated)."""
    return mask is not None and q.is_cuda and q.requires_grad and torch.is_grad_enabled()


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` on ``(B, H, M, dh)``, off cuDNN's
    kernel when its masked backward would run (see :func:`avoids_cudnn`)."""
    if avoids_cudnn(q, mask):
        with sdpa_kernel(_MASKED_TRAINING_KERNELS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _key_mask(valid: Tensor, key_bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``(B, M)`` valid keys (+ optional ``(B, M)`` bias) -> an SDPA mask ``(B, 1, 1, M)``:
    boolean without a bias, additive float (``-inf`` on invalid keys) with one."""
    if key_bias is None:
        return valid[:, None, None, :]
    return torch.where(valid, key_bias.to(dtype), float("-inf"))[:, None, None, :]


def _varlen_packed(q: Tensor, k: Tensor, v: Tensor, plan: ChunkPlan) -> Tensor:
    """Packed attention through ``torch.nn.attention.varlen.varlen_attn`` (flash varlen kernels that ship
    with PyTorch, forward and backward): no padding to the longest sample, no flash-attn package."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        raise ValueError(f"backend='varlen' runs on CUDA in fp16/bf16 (got {q.device.type}, {q.dtype}); "
                         "use 'sdpa' elsewhere, or bf16 autocast on a GPU")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        raise ImportError(f"backend='varlen' needs torch.nn.attention.varlen (torch {torch.__version__} lacks it); "
                          "use 'sdpa' or install flash-attn for 'flash'") from e
    cu = plan.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, plan.width, plan.width)


_flex_compiled = None


def _flex_packed(q: Tensor, k: Tensor, v: Tensor, plan: ChunkPlan) -> Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _flex_compiled
    seg = plan.segment_ids()  # (T,)
    T = seg.shape[0]

    def same_sample(b, h, q_idx, kv_idx):
        return seg[q_idx] == seg[kv_idx]

    # compiled mask construction never materialises the (T, T) mask (eager would, at O(T^2) memory)
    block_mask = create_block_mask(same_sample, None, None, T, T, device=q.device, _compile=q.device.type == "cuda")
    q_, k_, v_ = (rearrange(t, "t h d -> 1 h t d") for t in (q, k, v))
    if q.device.type == "cuda":
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=True)
        out = _flex_compiled(q_, k_, v_, block_mask=block_mask)
    else:
        out = flex_attention(q_, k_, v_, block_mask=block_mask)
    return rearrange(out, "1 h t d -> t h d")
