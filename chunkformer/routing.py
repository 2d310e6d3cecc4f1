"""Routers: score every grid token and decide which ones the backbone sees.

Four variants, all run in fp32 with autocast off (``fp32=False``: under the caller's autocast, the
probabilities still fp32; the release's ``fp32_router_dechunk=False``):

* ``"predictability"`` (default, DC-DiT v2): ``z = Conv1x1(x)`` to ``d/4``; the
  residual ``r = z - Conv3x3(z)`` measures how badly a token is predicted by its
  neighbours; ``Conv3x3 -> GroupNorm -> SiLU -> Conv1x1`` turns it into a keep logit.
  Its bias starts at ``-1.1``: ``p ~ 0.25 = 1/N`` on average, so a new router keeps little
  beyond the first and last token (``p > 0.5`` is rare) until the ratio loss pulls ``G``
  up towards ``1/N`` and the diffusion loss teaches it where tokens matter.
* ``"cosine"`` (DC-DiT v1, any rank >= 2): ``p = (1 - q . k_bar) / 2`` with unit
  ``q = W_q x``, ``k = W_k x`` and ``k_bar`` a learnable depthwise 3^n average of ``k``.
* ``"cosine1d"`` (H-Net, rank 1): ``p_t = (1 - cos(q_t, k_{t-1})) / 2``, ``p_1 = 1``.
* ``"random"`` (the papers' ablation baseline, no parameters): every token is kept with
  probability ``keep_fraction``, independently of the content; ``p`` is a random score whose
  order decides the tail drop.

The first and last token are always kept. A token is kept when ``p > 0.5``;
``rho`` then tail-drops the least confident kept tokens (:func:`~chunkformer.budget.tail_drop`).

    router = Router(dim=256)
    out = router(tokens, grid=(16, 16))            # tokens: (B, 256, 256)
    assert out.mask.shape == (B, 256) and out.mask[:, 0].all()
"""

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from tensordict import tensorclass
from torch import nn

from ._typing import Float, Tensor, check_finite, typechecked
from .budget import Rho, check_rho, tail_drop
from .grid import GridShape, check_grid, conv_nd, to_grid
from .grid import norm_groups as group_count
from .precision import FP32Module

__all__ = ["Router", "RouterOutput", "RouterKind", "ROUTER_KINDS", "RouterInit", "ROUTER_INITS", "GateGrad",
           "GATE_GRADS", "unpredictability", "orientation_loss"]

RouterKind = Literal["predictability", "cosine", "cosine1d", "random"]
ROUTER_KINDS: tuple[str, ...] = ("predictability", "cosine", "cosine1d", "random")
RouterInit = Literal["oriented", "release"]
ROUTER_INITS: tuple[str, ...] = ("oriented", "release")
GateGrad = Literal["keep", "selected"]
GATE_GRADS: tuple[str, ...] = ("keep", "selected")
# E[SiLU(a)] for a ~ N(0, 1): the mean a scorer channel adds after GroupNorm, subtracted from the
# oriented head's bias so that the mean keep logit starts near ``init_bias``
_SILU_GAUSSIAN_MEAN = 0.2066


@tensorclass
class RouterOutput:
    """What a router decided, batch dimension first.

    Attributes:
        probs: ``(B, L)`` fp32 keep probabilities ``p`` (first and last token are 1).
        mask: ``(B, L)`` bool, the tokens the backbone sees (after tail drop).
        natural_mask: ``(B, L)`` bool, ``p > 0.5`` before tail drop (the ratio loss uses it).
        confidence: ``(B, L)`` fp32 ``c_sel = p`` where the natural mask keeps a token, else
            ``1 - p``; the de-chunker gates its output with ``STE(c_sel)``. Its gradient to ``p`` is
            ``+-1`` by default (``Router(gate_grad="selected")``), ``+1`` everywhere with ``"keep"``.
        grid: the grid shape the ``L`` tokens came from.
    """

    probs: torch.Tensor
    mask: torch.Tensor
    natural_mask: torch.Tensor
    confidence: torch.Tensor
    grid: tuple

    @property
    def kept(self) -> Tensor:
        """Tokens kept per sample, ``(B,)``."""
        return self.mask.sum(-1)

    @property
    def kept_fraction(self) -> Tensor:
        """Fraction of tokens kept per sample, ``(B,)``."""
        return self.mask.float().mean(-1)


class Router(FP32Module):
    """Score tokens of an N-D grid and pick the ones to keep.

    Args:
        dim: token width ``d`` of the encoder output the router reads.
        ndim: grid rank (1, 2 or 3).
        kind: ``"predictability"`` (default), ``"cosine"`` (rank >= 2), ``"cosine1d"``
            (rank 1) or ``"random"`` (content-blind boundaries, any rank). ``kind=None`` picks
            ``"cosine1d"`` for rank 1, else ``"predictability"``.
        hidden: bottleneck width of the predictability router (default ``dim // 4``).
        norm_groups: GroupNorm groups in the scorer (default 8; reduced to divide ``hidden``).
        init_bias: initial keep-logit bias (``-1.1``: ``sigmoid ~ 0.25`` at start); with
            ``init="oriented"`` the mean logit over GroupNorm-normalised channels.
        init: how the predictability router starts. ``"oriented"`` (default): the predictor is the
            mean of each token's neighbours (``r`` is a discrete Laplacian, 0 on flat regions), the
            scorer's 3x3 conv comes in sign-flipped channel pairs and its head weighs every channel
            equally and positively, so the keep logit starts as an even, increasing function of the
            residual (``SiLU(a) + SiLU(-a) = a tanh(a / 2)``): tokens the neighbours predict badly
            start with the higher ``p``. ``"release"``: PyTorch's default init with the head bias at
            ``init_bias``, as in the authors' release, whose scorer may start (and stay) keeping the
            predictable tokens instead. Same parameters and forward either way (docs/routing.md).
        gate_grad: the gradient ``confidence`` carries back to ``p`` (its value is ``c_sel`` either
            way, and the de-chunker's gate is exactly 1 forward, so outputs do not depend on it).
            ``"selected"`` (default): ``c_sel = p`` or ``1 - p``, ``d c / d p = +-1`` as in the
            paper and the release. It rewards confidence in whatever the router decided, so routers
            split sharply, to the side picked early in training. ``"keep"``: ``d c / d p = +1`` at
            every token, so the diffusion loss raises ``p`` where the backbone's output helps and
            lowers it where it hurts; it never locks onto the background, and it orients small models
            that start keeping almost nothing, but at DiT-S width it leaves low-noise routing close to
            content-blind (docs/routing.md, "Orientation").
        keep_fraction: expected fraction of tokens the ``"random"`` router keeps (``1/N``).
        fp32: score in fp32 with autocast off (default, DC-DiT's policy: a boundary flips on tiny
            changes of ``p`` near 0.5). ``False`` runs the convs / projections under the caller's
            autocast (bf16 GEMMs instead of TF32 / fp32 ones, no fp32 copy of the tokens) and only
            the sigmoid in fp32: faster, and ``p`` moves by about bf16's rounding.

    Parameters stay fp32 when the model is cast to bf16/fp16 (:class:`FP32Module`).
    """

    def __init__(
        self,
        dim: int,
        ndim: int = 2,
        kind: RouterKind | None = None,
        *,
        hidden: int | None = None,
        norm_groups: int = 8,
        init_bias: float = -1.1,
        keep_fraction: float = 0.25,
        fp32: bool = True,
        init: RouterInit = "oriented",
        gate_grad: GateGrad = "selected",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dtype = torch.float32 if dtype is not None and dtype.is_floating_point else dtype
        if ndim not in (1, 2, 3):
            raise ValueError(f"ndim must be 1, 2 or 3 (grid rank), got {ndim}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer (the token width), got {dim!r}")
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"hidden must be a positive integer (the predictor's width) or None, got {hidden!r}")
        kind = kind or ("cosine1d" if ndim == 1 else "predictability")
        if kind not in ROUTER_KINDS:
            raise ValueError(f"kind must be one of {ROUTER_KINDS}, got {kind!r}")
        if kind == "cosine1d" and ndim != 1:
            raise ValueError(f"kind='cosine1d' needs a rank-1 grid (ndim=1), got ndim={ndim}; "
                             "use kind='cosine' for images and video")
        if kind == "cosine" and ndim == 1:
            raise ValueError("kind='cosine' needs a grid of rank >= 2; use kind='cosine1d' for sequences")
        if init not in ROUTER_INITS:
            raise ValueError(f"init must be one of {ROUTER_INITS}, got {init!r}")
        if gate_grad not in GATE_GRADS:
            raise ValueError(f"gate_grad must be one of {GATE_GRADS}, got {gate_grad!r}")
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        self.dim, self.ndim, self.kind, self.keep_fraction, self.fp32 = dim, ndim, kind, keep_fraction, fp32
        self.init, self.gate_grad = init, gate_grad
        fk = {"device": device, "dtype": dtype}

        if kind == "predictability":
            hidden = hidden or max(dim // 4, 1)
            self.proj = conv_nd(ndim, dim, hidden, 1, **fk)
            self.predictor = conv_nd(ndim, hidden, hidden, 3, padding=1, **fk)
            self.scorer = nn.Sequential(
                conv_nd(ndim, hidden, hidden, 3, padding=1, **fk),
                nn.GroupNorm(group_count(hidden, norm_groups), hidden, **fk),
                nn.SiLU(),
                conv_nd(ndim, hidden, 1, 1, **fk),
            )
            nn.init.constant_(self.scorer[-1].bias, init_bias)
            if init == "oriented":
                self._orient(init_bias)
        elif kind != "random":
            self.q_proj = nn.Linear(dim, dim, bias=False, **fk)
            self.k_proj = nn.Linear(dim, dim, bias=False, **fk)
            with torch.no_grad():  # H-Net's init: q = k = x, so p starts as (1 - cos) / 2
                self.q_proj.weight.copy_(torch.eye(dim))
                self.k_proj.weight.copy_(torch.eye(dim))
            if kind == "cosine":
                # depthwise 3^n neighbourhood average of k, learnable, uniform at start
                self.k_average = conv_nd(ndim, dim, dim, 3, padding=1, groups=dim, bias=False, **fk)
                nn.init.constant_(self.k_average.weight, 1.0 / 3**ndim)

    @torch.no_grad()
    def _orient(self, init_bias: float) -> None:
        """Start the predictability scorer with ``p`` increasing in ``|r|`` (see ``init``)."""
        hidden, taps = self.predictor.out_channels, 3**self.ndim
        centre = (1,) * self.ndim
        neighbours = torch.full((3,) * self.ndim, 1.0 / (taps - 1))
        neighbours[centre] = 0.0
        self.predictor.weight.zero_()
        channel = torch.arange(hidden)
        self.predictor.weight[channel, channel] = neighbours.to(self.predictor.weight)
        self.predictor.bias.zero_()
        conv, norm, _, head = self.scorer
        per_group = hidden // norm.num_groups
        if hidden >= 2:
            # pairs (k, k') with w_k' = -w_k, both in one group or in mirrored groups, so GroupNorm keeps
            # a_k' = -a_k and the pair adds SiLU(a) + SiLU(-a) = a tanh(a / 2), even in a
            if per_group % 2 == 0:
                first, second = torch.arange(0, hidden - 1, 2), torch.arange(1, hidden, 2)
            else:
                half = hidden // 2 if norm.num_groups % 2 == 0 else 0
                first, second = torch.arange(half), torch.arange(half, 2 * half)
            conv.weight[second] = -conv.weight[first]
        conv.bias.zero_()
        scale = 2.0  # logit spread: a stroke-like token (|a| ~ 2) starts about 1.5 above a flat one
        head.weight.fill_(scale / hidden)
        head.bias.fill_(init_bias - scale * _SILU_GAUSSIAN_MEAN)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, ndim={self.ndim}, kind={self.kind!r}" + ("" if self.fp32 else ", fp32=False")

    @typechecked
    def scores(
        self, x: Float[Tensor, "batch tokens dim"], grid: GridShape
    ) -> Float[Tensor, "batch tokens"]:
        """Raw keep probabilities ``p`` in fp32, before forcing first/last to 1."""
        low = not self.fp32 and torch.is_autocast_enabled(x.device.type)  # else fp32 (the weights' dtype)
        with contextlib.nullcontext() if low else torch.autocast(device_type=x.device.type, enabled=False):
            x = x if low else x.float()
            if self.kind == "random":  # u < keep -> p in (0.5, 1], else p in [0, 0.5]: kept w.p. keep
                u, keep = torch.rand(x.shape[:2], device=x.device), self.keep_fraction
                return torch.where(u < keep, 1 - u / (2 * keep), 0.5 * (1 - u) / max(1 - keep, 1e-6))
            if self.kind == "predictability":
                z = self.proj(to_grid(x, grid))  # (B, d/4, *grid)
                logit = self.scorer(z - self.predictor(z))  # conv -> GroupNorm -> SiLU -> 1x1 head: (B, 1, *grid)
                return torch.sigmoid(logit.flatten(1).float())  # (B, L)
            q = F.normalize(self.q_proj(x).float(), dim=-1)  # (B, L, d)
            k = F.normalize(self.k_proj(x).float(), dim=-1)  # (B, L, d)
            if self.kind == "cosine":
                k_bar = self.k_average(to_grid(k, grid)).float().flatten(2).transpose(1, 2)  # (B, L, d)
                return ((1 - (q * k_bar).sum(-1)) / 2).clamp(0, 1)
            cos = (q[:, 1:] * k[:, :-1]).sum(-1)  # (B, L-1): token t against t-1
            return F.pad((1 - cos) / 2, (1, 0), value=1.0).clamp(0, 1)

    @typechecked
    def forward(
        self,
        x: Float[Tensor, "batch tokens dim"],
        grid: GridShape,
        rho: Rho = 0.0,
    ) -> RouterOutput:
        """Route ``x`` (``(B, L, d)`` tokens of a grid of shape ``grid``).

        ``rho`` (float or ``(B,)`` tensor in ``[0, 1)``) tail-drops that fraction of each
        sample's kept tokens, lowest probability first.
        """
        grid = check_grid(grid)
        B, L, d = x.shape
        if L != math.prod(grid):
            raise ValueError(f"x has {L} tokens but grid {grid} holds {math.prod(grid)}")
        if d != self.dim:
            raise ValueError(f"x has width {d} but this Router was built for dim={self.dim}")
        if len(grid) != self.ndim:
            raise ValueError(f"grid {grid} has rank {len(grid)} but this Router has ndim={self.ndim}")
        p = self.scores(x, grid)  # (B, L) fp32
        check_finite("router probabilities", p)
        ends = torch.zeros(L, dtype=torch.bool, device=x.device)
        ends[0] = ends[-1] = True
        p = torch.where(ends, torch.ones_like(p), p)  # first and last token always kept
        natural = p > 0.5
        if _nonzero(rho):
            check_rho(rho, batch=B)
            mask = tail_drop(p, natural, rho, protected=ends.expand(B, L), check=False)  # both checked above
        else:
            mask = natural
        confidence = torch.where(natural, p, 1 - p)
        if self.gate_grad == "keep" and confidence.requires_grad:  # value c_sel, gradient +1 to p everywhere
            confidence = confidence.detach() + (p - p.detach())
        return RouterOutput(
            probs=p, mask=mask, natural_mask=natural, confidence=confidence, grid=grid,
            batch_size=[B],
        )


def _nonzero(rho: "float | Tensor") -> bool:
    return torch.is_tensor(rho) or rho != 0.0


# ---------------------------------------------------------------------------- orientation prior
_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def unpredictability(x: Tensor, grid: GridShape) -> Tensor:
    """How badly each token's neighbourhood predicts it, on the model's input: ``(B, C, *S) -> (B, L)``.

    Per channel ``|x - mean of its 3^n neighbourhood|`` (replicate padding), summed over channels and
    average-pooled from the input grid ``S`` onto the token grid ``grid`` (``S`` a multiple of it, as with
    a patch embedding). A fixed, parameter-free predictability rule: 0 on flat regions, highest on
    isolated detail. On the built-in digits its top quarter keeps strokes about 5x as densely as
    background (``studies/predictability_rule.py``).
    """
    grid = check_grid(grid)
    n = len(grid)
    if x.dim() != n + 2:
        raise ValueError(f"x must be (B, C, *grid) with a grid of rank {n}, got shape {tuple(x.shape)}")
    if any(s % g for s, g in zip(x.shape[2:], grid)):
        raise ValueError(f"input grid {tuple(x.shape[2:])} is not a multiple of the token grid {grid}")
    x = x.detach().float()
    mean = _POOL[n](F.pad(x, (1, 1) * n, mode="replicate"), 3, stride=1)
    score = (x - mean).abs().sum(1, keepdim=True)  # (B, 1, *S)
    patch = tuple(s // g for s, g in zip(x.shape[2:], grid))
    return _POOL[n](score, patch).flatten(1)  # (B, L)


def orientation_loss(probs: Tensor, score: Tensor, keep_fraction: float, margin: float = 1.0) -> Tensor:
    """Hinge that orients a router: the keep logit of the ``keep_fraction`` of tokens ``score`` ranks highest
    must exceed the rest's by ``margin`` on average, per sample. ``probs``, ``score``: ``(B, L)`` -> scalar.

    ``mean_i(max(0, margin - (mean logit of top set - mean logit of the rest)))``; the first and last token
    (kept by rule, ``p = 1``) belong to neither set. Zero, with zero gradient, once every sample's gap
    reaches ``margin``, so it only breaks the symmetry between keeping the detail and keeping the
    background (docs/routing.md, "Orientation") and leaves the paper's losses to decide the rest.
    """
    if probs.shape != score.shape or probs.dim() != 2:
        raise ValueError(f"probs and score must both be (B, L), got {tuple(probs.shape)} "
                         f"and {tuple(score.shape)}")
    B, L = probs.shape
    if L < 4:
        raise ValueError(f"orientation_loss needs at least 4 tokens per sample, got {L}")
    if not 0.0 < keep_fraction < 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1), got {keep_fraction}")
    inner = torch.ones(L, dtype=torch.bool, device=probs.device)
    inner[0] = inner[-1] = False
    k = min(max(1, round(keep_fraction * (L - 2))), L - 3)
    top = score.float().masked_fill(~inner, -math.inf).topk(k, dim=1).indices
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top, True)
    rest = inner & ~chosen
    logit = torch.logit(probs.float(), eps=1e-6)
    gap = (logit * chosen).sum(1) / k - (logit * rest).sum(1) / rest.sum(1)
    return F.relu(margin - gap).mean()
