"""DC-DiT: a DiT backbone on a short, data-dependent token sequence.

Data flows one way (shapes for a 2D grid, ``L = H W``, ``T = sum_b M_b``)::

    x (B, C, H, W) --ChunkEncoder(c)--> tokens (B, L, d) --Router--> RouterOutput
        --Chunked.from_router--> plan.chunk(tokens) + pos (T, d) --backbone blocks(c), RMSNorm--> (T, d)
        --DeChunkDecoder(h, chunked, c)--> (B, out, H, W)

:class:`ChunkPipeline` is that pipeline, written once: one scaffold constructor, one forward,
one :meth:`~ChunkPipeline.set_plan`. A subclass says only how its backbone is conditioned,
positioned and run. :class:`DCDiT` runs chunkformer's own DiT blocks;
:class:`~chunkformer.wrapping.ChunkWrapper` (built by :func:`chunkformer.wrap`) runs a
foreign DiT's blocks through a :class:`~chunkformer.adapters.BackboneAdapter`.

The patch size is 1: the scaffold's convs see every latent pixel and the router
decides how many tokens the backbone gets.
"""

import dataclasses
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._typing import Bool, Float, Int, Tensor, typechecked
from ..attention import Backend
from ..budget import TimestepAdaptiveBudget
from ..caching import cached_backbone, skipped_last
from ..dechunk import Chunked, Smoothing
from ..plan import ChunkPlan, PlanMode
from ..precision import RMSNorm
from ..routing import GateGrad, Router, RouterInit, RouterKind, RouterOutput
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

__all__ = ["ChunkPipeline", "DCDiT"]

PLAN_SETTINGS = ("auto", "packed", "padded", "fixed")
_UNCHANGED = object()


class ChunkPipeline(nn.Module):
    """The DC-DiT pipeline around any backbone: encoder, router, plan, backbone, de-chunk, decoder.

    Submodules built here (:meth:`build_scaffold`): ``encoder``, ``router``, ``norm`` (RMSNorm on
    the backbone's output), ``decoder``; ``budget`` holds the ratio-loss / tail-drop settings.
    A subclass builds its conditioning and backbone and implements four hooks:
    :meth:`condition`, :meth:`position_table`, :meth:`run_backbone` and :meth:`block_input`.

    The plan settings (``plan_mode``, ``capacity``, ``fill_capacity``) are read-only attributes;
    :meth:`set_plan` validates and changes them.

    ``checkpoint_scaffold = True`` recomputes the encoder and the router in the backward pass instead of
    keeping their activations (non-reentrant :func:`torch.utils.checkpoint.checkpoint`, in training mode with
    gradients on): they run at full grid resolution, ``(B, L, d)`` and ``(B, d, *grid)`` tensors where the
    backbone's are ``(T, d)``. ``checkpoint_blocks = N`` recomputes the first ``N`` backbone blocks alike
    (each keeps only its input). The gradients are the same. The de-chunk decoder is never recomputed: it
    runs last, so backward needs its activations first, and recomputing them there would not lower the peak.
    With both, four blocks bring DC-DiT-XL's peak below DiT-XL/2's in an eager step (simulated); a compiled
    step does not gain from them (docs/recipes.md).
    """

    supports_chunking = True
    checkpoint_scaffold: bool = False  # recompute the encoder and the router in backward (see above)
    checkpoint_blocks: int = 0  # recompute the first N backbone blocks in backward (see above)
    step_cache = None  # a StepCache installs itself here while sampling
    num_timesteps: int = 1000  # model timesteps accepted: [0, num_timesteps) (set to the diffusion's T)
    attention_known: bool = True  # the backbone restricts attention to a sample's tokens (packed plans work)

    def build_scaffold(
        self,
        *,
        in_channels: int,
        hidden_size: int,
        out_channels: int,
        grid: tuple[int, ...],
        target_ratio: float,
        router: RouterKind | None,
        encoder_depth: int,
        decoder_depth: int,
        scaffold_width: int | None,
        sigma: float | None,
        smoothing: Smoothing,
        plan_mode: str,
        capacity: int | None,
        fill_capacity: bool,
        fp32_router_dechunk: bool,
        router_init: RouterInit = "oriented",
        gate_grad: GateGrad = "selected",
        build_backbone=None,
        device=None,
        dtype=None,
    ) -> None:
        """Build the scaffold around a backbone: encoder and router, then ``build_backbone()`` (if
        given; it registers the backbone's modules), then the output norm and the decoder."""
        fk = {"device": device, "dtype": dtype}
        self.grid = tuple(grid)
        self.ndim = len(self.grid)
        self.in_channels, self.hidden_size, self.out_channels = in_channels, hidden_size, out_channels
        self.set_plan(mode=plan_mode, capacity=capacity, fill=fill_capacity)
        sigma = max(1.0, max(self.grid) / 32) if sigma is None else sigma
        self.budget = TimestepAdaptiveBudget(target_ratio=target_ratio)
        self.encoder = ChunkEncoder(in_channels, hidden_size, ndim=self.ndim, depth=encoder_depth,
                                    width=scaffold_width, **fk)
        self.router = Router(hidden_size, ndim=self.ndim, kind=router, keep_fraction=1 / target_ratio,
                             fp32=fp32_router_dechunk, init=router_init, gate_grad=gate_grad, **fk)
        if build_backbone is not None:
            build_backbone()
        self.norm = RMSNorm(hidden_size, eps=1e-5, **fk)  # the main network's output norm (H-Net)
        self.decoder = DeChunkDecoder(
            hidden_size, out_channels, ndim=self.ndim, depth=decoder_depth, width=scaffold_width,
            sigma=sigma, smoothing=smoothing, fp32=fp32_router_dechunk, **fk,
        )

    # ------------------------------------------------------------------ plan settings
    def set_plan(self, mode: str | None = None, capacity=_UNCHANGED, fill: bool | None = None) -> "ChunkPipeline":
        """Validate and set how the kept tokens are laid out for the backbone; returns the model.

        Args:
            mode: ``"packed"`` (one ``(T, d)`` sequence, varlen attention), ``"padded"``
                (``(B, M, d)``), ``"fixed"`` (``(B, capacity, d)``: static shapes for torch.compile)
                or ``"auto"`` (packed where the backbone's attention is known, else padded).
                ``None`` keeps the current mode.
            capacity: tokens per sample in ``"fixed"`` mode; in ``"packed"`` / ``"padded"`` mode an
                upper bound (a memory guard: the least probable tokens go). ``None`` removes it;
                left out, it is kept.
            fill: ``"fixed"`` mode only: every sample keeps exactly ``capacity`` tokens (no slot is
                padding, attention runs unmasked). ``None`` keeps the current setting.
        """
        mode = getattr(self, "_plan_mode", "packed") if mode is None else mode
        capacity = getattr(self, "_capacity", None) if capacity is _UNCHANGED else capacity
        fill = getattr(self, "_fill_capacity", False) if fill is None else fill
        if mode not in PLAN_SETTINGS:
            raise ValueError(f"plan_mode must be one of {PLAN_SETTINGS}, got {mode!r}")
        if mode == "auto":
            mode = "packed" if self.attention_known else "padded"
        if mode == "packed" and not self.attention_known:
            raise ValueError(
                f"{self._backbone_name()} cannot restrict its attention to a sample's tokens (unknown attention "
                "implementation): use plan_mode='padded' or 'fixed', whose pad slots are real tokens"
            )
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive integer (tokens per sample) or None, got {capacity!r}")
        if mode == "fixed" and capacity is None:
            raise ValueError("plan_mode='fixed' needs capacity (tokens per sample), e.g. capacity=L // 4")
        if not isinstance(fill, bool):
            raise ValueError(f"fill_capacity must be True or False, got {fill!r}")
        if fill and mode != "fixed":
            raise ValueError(f"fill_capacity=True needs plan_mode='fixed' (and a capacity), got {mode!r}")
        self._plan_mode, self._capacity, self._fill_capacity = mode, capacity, fill
        return self

    @property
    def plan_mode(self) -> PlanMode:
        """``"packed"``, ``"padded"`` or ``"fixed"`` (change it with :meth:`set_plan`)."""
        return self._plan_mode

    @property
    def capacity(self) -> int | None:
        """Tokens per sample in ``"fixed"`` mode, else an upper bound or ``None`` (see :meth:`set_plan`)."""
        return self._capacity

    @property
    def fill_capacity(self) -> bool:
        """Whether every sample keeps exactly ``capacity`` tokens (see :meth:`set_plan`)."""
        return self._fill_capacity

    @plan_mode.setter
    def plan_mode(self, value):
        raise AttributeError(f"use model.set_plan(mode={value!r}): it validates the plan settings together")

    @capacity.setter
    def capacity(self, value):
        raise AttributeError(f"use model.set_plan(capacity={value!r}): it validates the plan settings together")

    @fill_capacity.setter
    def fill_capacity(self, value):
        raise AttributeError(f"use model.set_plan(fill={value!r}): it validates the plan settings together")

    def _backbone_name(self) -> str:
        return f"this {type(self).__name__}"

    # ------------------------------------------------------------------ budget
    def set_budget(self, **settings) -> TimestepAdaptiveBudget:
        """Configure the model's :class:`~chunkformer.budget.TimestepAdaptiveBudget`, the one owner of the
        ratio loss, tail drop, multi-budget draws and schedules; returns it.

        ``settings``: any of its fields but ``target_ratio`` (``ratio_weight``, ``group_size``, ``fractions``,
        ``warmup_steps``, ``seed``, ``cfg_rho``, ``schedule``), validated by the budget itself. The target
        ratio is fixed at construction: the router is built with it.
        """
        if "target_ratio" in settings and settings["target_ratio"] != self.budget.target_ratio:
            raise ValueError(f"target_ratio is fixed when the model is built (this one: {self.budget.target_ratio}); "
                             "build the model with the target_ratio you want")
        fields = {f.name for f in dataclasses.fields(TimestepAdaptiveBudget)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise ValueError(f"unknown budget settings {unknown}; TimestepAdaptiveBudget has {sorted(fields)}")
        self.budget = dataclasses.replace(self.budget, **settings)
        return self.budget

    # ------------------------------------------------------------------ backbone hooks
    def condition(self, t: Tensor, y: Tensor | None, label_drop: Tensor | None = None):
        """``(cond, c)``: what the backbone is conditioned on, and the scaffold's ``(B, d)`` vector."""
        raise NotImplementedError

    def position_table(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        """``(L, d)`` position embedding of every grid cell (the plan takes the kept ones)."""
        raise NotImplementedError

    def run_backbone(self, h: Tensor, cond, plan: ChunkPlan | None, keep: list | None = None) -> Tensor:
        """Every block on ``h`` (``plan.chunk`` layout, or dense ``(B, L, d)`` with ``plan=None``);
        each block's output is appended to ``keep`` if given."""
        raise NotImplementedError

    def block_input(self, tokens: Tensor, cond) -> Tensor:
        """Block 0's attention input for dense ``(B, L, d)`` tokens (step caching's change signal)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ forward
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
        block_outputs: bool = False,
    ):
        """``x``: ``(B, C, *grid)``; ``t``: ``(B,)``; ``y``: ``(B,)`` labels or ``None`` -> ``(B, out, *grid)``.

        ``rho``: tail-drop fraction (float or ``(B,)``); ``None`` follows the budget's
        timestep schedule if it has one, else keeps the router's natural choice.
        ``label_drop``: ``(B,)`` bool labels to replace by the null class (default: random in training).
        ``return_info=True`` also returns a :class:`~chunkformer.models.dit.ForwardInfo`;
        ``block_outputs=True`` fills its ``block_outputs``.
        """
        _check_input(self, x, t, y, rho)
        grid = tuple(x.shape[2:])
        # 1. conditioning and encoder
        cond, c = self.condition(t, y, label_drop)  # c: (B, d)
        tokens = self._scaffold(self.encoder, x, c)  # (B, L, d)
        # 2. route and plan
        if rho is None:
            rho = self.budget.rho_at(t) if self.budget.schedule is not None else 0.0
        routed = self._scaffold(self.router, tokens, grid, rho=rho)  # RouterOutput, (B, L) fields
        chunked = Chunked.from_router(routed, tokens, mode=self.plan_mode, capacity=self.capacity,
                                      fill=self.fill_capacity)  # the plan and what de-chunking needs
        plan = chunked.plan
        # 3. backbone on the kept tokens, at their original positions
        pos = plan.take(self.position_table(grid, tokens.device)).to(tokens.dtype)  # (T, d) | (B, M, d)
        h = plan.chunk(tokens) + pos
        keep = [] if block_outputs else None
        h = self.norm(cached_backbone(self, h, cond, plan, tokens, keep))
        # 4. de-chunk and decode
        out = self.decoder(h, chunked, c)  # (B, out, *grid): last, so never recomputed (see the class)
        if not return_info:
            return out
        info = ForwardInfo(
            ratio_loss=self.budget.ratio_loss(routed), kept=plan.lengths, tokens=math.prod(grid),
            router=routed, plan=plan, block_outputs=keep, cached=skipped_last(self),
        )
        return out, info

    def _scaffold(self, module: nn.Module, *args, **kwargs):
        """``module(*args, **kwargs)``, recomputed in backward under :attr:`checkpoint_scaffold`."""
        if not (self.checkpoint_scaffold and self.training and torch.is_grad_enabled()):
            return module(*args, **kwargs)
        if module is not self.router:
            return checkpoint(module, *args, use_reentrant=False, **kwargs)
        # the router's decision leaves the checkpoint as plain tensors: torch.compile (torch 2.11) loses
        # track of the tensors of a tensorclass a checkpointed region returns
        tokens, grid = args
        probs, mask, natural, confidence = checkpoint(_router_tensors, module, tokens, grid,
                                                      use_reentrant=False, **kwargs)
        return RouterOutput(probs=probs, mask=mask, natural_mask=natural, confidence=confidence, grid=grid,
                            batch_size=[tokens.shape[0]])

    def _block(self, i: int, block, h: Tensor, cond, plan: ChunkPlan | None) -> Tensor:
        """``block(h, cond, plan)``, the backbone's ``i``-th block, recomputed in backward when
        ``i < checkpoint_blocks``."""
        if not (i < self.checkpoint_blocks and self.training and torch.is_grad_enabled()):
            return block(h, cond, plan)
        # the plan enters the checkpoint as its fields: torch.compile does not trace a tensorclass into one
        fields = (None,) * 6 if plan is None else (plan.order, plan.lengths, plan.grid, plan.width, plan.mode,
                                                   plan.full)
        return checkpoint(_block_on_fields, block, h, cond, *fields, use_reentrant=False)

    def plan_repr(self) -> str:
        cap = "" if self.capacity is None else f", capacity={self.capacity}" + (", filled" if self.fill_capacity else "")
        return f"grid={self.grid}, target_ratio={self.budget.target_ratio}, plan_mode={self.plan_mode!r}{cap}"

    def extra_repr(self) -> str:
        return self.plan_repr()


class DCDiT(ChunkPipeline, LabelledModel):
    """Dynamic Chunking DiT: :class:`ChunkPipeline` around chunkformer's own DiT blocks.

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
        plan_mode, capacity, fill_capacity: the plan settings (:meth:`~ChunkPipeline.set_plan`
            validates them and changes them on a built model): ``"packed"`` (default), ``"padded"``
            or ``"fixed"`` (needs ``capacity``); ``fill_capacity`` (``"fixed"`` only) keeps exactly
            ``capacity`` tokens per sample, so attention runs without a mask. The paper keeps each
            sample's own count.
        attn_backend: see :mod:`chunkformer.attention`.
        fp32_router_dechunk: run the router and the de-chunk in fp32 with autocast off (default, DC-DiT's
            policy, as the release's flag of that name). ``False`` runs both in the caller's precision (bf16
            GEMMs and merge under autocast; ``p`` itself still fp32): a faster scaffold, with ``p`` and the
            de-chunked tokens at bf16 rounding (docs/performance.md measures both).
        router_init, gate_grad: the predictability router's ``init`` and ``gate_grad``
            (:class:`~chunkformer.routing.Router`; ``"release"`` / ``"selected"`` train as the paper
            and the authors' release do; docs/routing.md, "Orientation").
    """

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
        router_init: RouterInit = "oriented",
        gate_grad: GateGrad = "selected",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.config = capture_config(locals())
        fk = {"device": device, "dtype": dtype}
        grid = as_grid(input_size)
        self.t_embedder = TimestepEmbedder(hidden_size, **fk)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, **fk)

        def build_blocks():
            self.blocks = nn.ModuleList(
                DiTBlock(hidden_size, num_heads, mlp_ratio, attn_backend, **fk) for _ in range(depth)
            )

        self.build_scaffold(
            in_channels=in_channels, hidden_size=hidden_size, out_channels=2 * in_channels if learn_sigma else in_channels,
            grid=grid, target_ratio=target_ratio, router=router, encoder_depth=encoder_depth,
            decoder_depth=decoder_depth, scaffold_width=scaffold_width, sigma=sigma, smoothing=smoothing,
            plan_mode=plan_mode, capacity=capacity, fill_capacity=fill_capacity,
            fp32_router_dechunk=fp32_router_dechunk, router_init=router_init, gate_grad=gate_grad,
            build_backbone=build_blocks, **fk,
        )
        register_position_table(self, self.grid, device)
        init_backbone_weights(self)

    def condition(self, t, y, label_drop=None):
        c = self.t_embedder(t) + self.y_embedder(y, t.shape[0], t.device, label_drop)  # (B, d)
        return c, c

    def position_table(self, grid, device):
        return position_table(self, grid)

    def run_backbone(self, h, cond, plan, keep=None):
        for i, block in enumerate(self.blocks):
            h = self._block(i, block, h, cond, plan)
            if keep is not None:
                keep.append(h)
        return h

    def block_input(self, tokens, cond):
        return block_input(self.blocks[0], tokens, cond)


def _block_on_fields(block, h: Tensor, cond, order, lengths, grid, width, mode, full) -> Tensor:
    """``block(h, cond, plan)`` with the plan rebuilt from its fields (``order=None``: no plan). The rebuilt
    plan shares the original's derived indices: they are kept by its ``lengths`` tensor."""
    if order is None:
        return block(h, cond, None)
    plan = ChunkPlan(order=order, lengths=lengths, grid=grid, width=width, mode=mode, full=full,
                     batch_size=[order.shape[0]])
    return block(h, cond, plan)


def _router_tensors(router: nn.Module, tokens: Tensor, grid: tuple, **kwargs) -> tuple[Tensor, ...]:
    """The router's ``(B, L)`` probs, mask, natural mask and confidence for ``tokens`` ``(B, L, d)``."""
    routed = router(tokens, grid, **kwargs)
    return routed.probs, routed.mask, routed.natural_mask, routed.confidence
