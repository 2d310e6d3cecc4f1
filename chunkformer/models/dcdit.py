"""DC-DiT: a DiT backbone on a short, data-dependent token sequence.

Data flows one way (shapes for a 2D grid, ``L = H W``, ``T = sum_b M_b``)::

    x (B, C, H, W) --ChunkEncoder(c)--> tokens (B, L, d) --Router--> RouterOutput
        --ChunkPlan--> plan.chunk(tokens) + pos (T, d) --DiT blocks(c), RMSNorm--> (T, d)
        --DeChunkDecoder(c)--> (B, out, H, W)

The patch size is 1: the scaffold's convs see every latent pixel and the router
decides how many tokens the backbone gets.
"""

import math

from torch import nn

from .._typing import Bool, Float, Int, Tensor, typechecked
from ..attention import Backend
from ..budget import TimestepAdaptiveBudget
from ..caching import run_with_cache, skipped_last
from ..dechunk import Smoothing
from ..plan import ChunkPlan, PlanMode
from ..precision import RMSNorm
from ..routing import Router, RouterKind
from ..scaffold import ChunkEncoder, DeChunkDecoder
from .checkpoint import capture_config
from .dit import (
    DiTBlock,
    ForwardInfo,
    LabelEmbedder,
    LabelledModel,
    TimestepEmbedder,
    _check_input,
    as_grid,
    block_input,
    init_backbone_weights,
    position_table,
    register_position_table,
)

__all__ = ["DCDiT"]


class DCDiT(LabelledModel):
    """Dynamic Chunking DiT.

    Args:
        input_size: latent grid (int for square, or a tuple of rank 1-3; non-square works).
        in_channels: latent channels.
        hidden_size, depth, num_heads, mlp_ratio: the backbone (DiT blocks).
        class_dropout_prob, num_classes, learn_sigma: as in :class:`~chunkformer.models.dit.DiT`.
        router: ``"predictability"`` (default), ``"cosine"``, ``"cosine1d"`` or ``"random"``
            (content-blind boundaries keeping ``1 / target_ratio`` of the tokens: the ablation).
        target_ratio: ``N``: the ratio loss aims at keeping ``1/N`` of the tokens.
        encoder_depth, decoder_depth: conv ResBlocks in front of / behind the backbone (2 + 2).
        scaffold_width: conv width (default ``hidden_size // 4``).
        sigma: de-chunk smoothing bandwidth in grid cells (default ``max(grid) / 32``, at least 1).
        smoothing: ``"auto"`` (default), ``"windowed"``, ``"dense"`` or ``"none"`` (:func:`~chunkformer.dechunk.resolve_smoothing`).
        plan_mode: ``"packed"`` (default), ``"padded"`` or ``"fixed"`` (needs ``capacity``).
        capacity: tokens per sample in ``"fixed"`` mode (static shapes for torch.compile); in
            ``"packed"`` / ``"padded"`` mode an upper bound (a memory guard; least probable tokens go).
        attn_backend: see :mod:`chunkformer.attention`.
        fill_capacity: ``"fixed"`` mode only: every sample keeps exactly ``capacity`` tokens (a sample
            whose router keeps fewer also keeps its most probable others), so no slot is padding and
            attention runs without a mask, on the fastest kernels. Off by default (the paper keeps
            each sample's own count).
        fp32_router_dechunk: run the router and the de-chunk in fp32 with autocast off (default, DC-DiT's
            policy, as the release's flag of that name). ``False`` runs both in the caller's precision (bf16
            GEMMs and merge under autocast; ``p`` itself still fp32): a faster scaffold, with ``p`` and the
            de-chunked tokens at bf16 rounding (docs/performance.md measures both).
    """

    supports_chunking = True
    step_cache = None  # a StepCache installs itself here while sampling

    def __init__(
        self,
        input_size: int | tuple[int, ...] = 32,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        router: RouterKind | None = None,
        target_ratio: float = 4.0,
        encoder_depth: int = 2,
        decoder_depth: int = 2,
        scaffold_width: int | None = None,
        sigma: float | None = None,
        smoothing: Smoothing = "auto",
        plan_mode: PlanMode = "packed",
        capacity: int | None = None,
        attn_backend: Backend = "auto",
        *,
        fill_capacity: bool = False,
        fp32_router_dechunk: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.config = capture_config(locals())
        fk = {"device": device, "dtype": dtype}
        self.grid = as_grid(input_size)
        self.ndim = len(self.grid)
        self.in_channels, self.hidden_size = in_channels, hidden_size
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.plan_mode, self.capacity, self.fill_capacity = plan_mode, capacity, fill_capacity
        if plan_mode == "fixed" and capacity is None:
            raise ValueError("plan_mode='fixed' needs capacity (tokens per sample), e.g. capacity=L // 4")
        if fill_capacity and plan_mode != "fixed":
            raise ValueError(f"fill_capacity=True needs plan_mode='fixed' (and a capacity), got {plan_mode!r}")
        sigma = max(1.0, max(self.grid) / 32) if sigma is None else sigma
        self.budget = TimestepAdaptiveBudget(target_ratio=target_ratio)

        self.t_embedder = TimestepEmbedder(hidden_size, **fk)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, **fk)
        self.encoder = ChunkEncoder(
            in_channels, hidden_size, ndim=self.ndim, depth=encoder_depth, width=scaffold_width, **fk
        )
        self.router = Router(hidden_size, ndim=self.ndim, kind=router, keep_fraction=1 / target_ratio,
                             fp32=fp32_router_dechunk, **fk)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, attn_backend, **fk) for _ in range(depth)
        )
        self.norm = RMSNorm(hidden_size, eps=1e-5, **fk)  # the main network's output norm (H-Net)
        self.decoder = DeChunkDecoder(
            hidden_size, self.out_channels, ndim=self.ndim, depth=decoder_depth, width=scaffold_width,
            sigma=sigma, smoothing=smoothing, fp32=fp32_router_dechunk, **fk,
        )
        register_position_table(self, self.grid, device)
        init_backbone_weights(self)

    @typechecked
    def forward(
        self,
        x: Float[Tensor, "batch channels *grid"],
        t: Float[Tensor, "batch"] | Int[Tensor, "batch"],
        y: Int[Tensor, "batch"] | None = None,
        *,
        rho: float | Tensor | None = None,
        return_info: bool = False,
        label_drop: Bool[Tensor, "batch"] | None = None,
    ):
        """``x``: ``(B, C, *grid)``; ``t``: ``(B,)``; ``y``: ``(B,)`` labels or ``None``.

        ``rho``: tail-drop fraction (float or ``(B,)``); ``None`` follows the budget's
        timestep schedule if it has one, else keeps the router's natural choice.
        ``label_drop``: ``(B,)`` bool labels to replace by the null class (default: random in training).
        """
        _check_input(self, x, t, y, rho)
        grid = tuple(x.shape[2:])
        # 1. conditioning and encoder
        c = self.t_embedder(t) + self.y_embedder(y, x.shape[0], x.device, label_drop)  # (B, d)
        tokens = self.encoder(x, c)  # (B, L, d)
        # 2. route and plan
        if rho is None:
            rho = self.budget.rho_at(t) if self.budget.schedule is not None else 0.0
        routed = self.router(tokens, grid, rho=rho)  # RouterOutput, (B, L) fields
        plan = ChunkPlan.from_router(routed, mode=self.plan_mode, capacity=self.capacity, fill=self.fill_capacity)
        # 3. backbone on the kept tokens, at their original positions
        h = plan.chunk(tokens) + plan.take(position_table(self, grid)).to(tokens.dtype)  # (T, d) | (B, M, d)

        def blocks(h):
            for block in self.blocks:
                h = block(h, c, plan)
            return h

        h = self.norm(run_with_cache(self, h, plan, blocks, lambda: block_input(self.blocks[0], tokens, c)))
        # 4. de-chunk and decode
        out = self.decoder(h, plan, routed, tokens, c)  # (B, out, *grid)
        if not return_info:
            return out
        info = ForwardInfo(
            ratio_loss=self.budget.ratio_loss(routed), kept=plan.lengths, tokens=math.prod(grid),
            router=routed, plan=plan, cached=skipped_last(self),
        )
        return out, info

    def extra_repr(self) -> str:
        cap = "" if self.capacity is None else f", capacity={self.capacity}" + (", filled" if self.fill_capacity else "")
        return f"grid={self.grid}, target_ratio={self.budget.target_ratio}, plan_mode={self.plan_mode!r}{cap}"
