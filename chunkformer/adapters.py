"""Backbone adapters: how :func:`chunkformer.wrap` drives a DiT it did not build.

An adapter answers three questions about a backbone, and nothing else:

1. **conditioning**: ``condition(t, y, label_drop)`` -> :class:`Conditioning` (the
   ``(B, d)`` vector the scaffold is conditioned on, plus whatever the blocks need);
2. **blocks**: ``run_block(i, h, cond, plan)`` runs block ``i`` on a token sequence in
   the layout ``plan.chunk`` produced (packed ``(T, d)`` or padded ``(B, M, d)``);
3. **positions**: ``position_embedding(coords)`` for fractional grid coordinates.

Built in, found by structure (``find_adapter``) or named (``wrap(model, adapter=...)``):

================  ==================================================================
name              models
================  ==================================================================
``chunkformer``   :class:`chunkformer.DiT` (and any model built from its blocks)
``dit``           the original DiT release layout: ``x_embedder``, ``t_embedder``,
                  ``y_embedder``, ``pos_embed``, ``blocks`` with ``adaLN_modulation``,
                  timm-style ``attn.qkv`` / ``attn.proj`` (SiT, fast-DiT, ... keep it)
``diffusers``     diffusers ``DiTTransformer2DModel`` (per-block conditioning embedders)
================  ==================================================================

Attention the adapter understands (``attention_known``) runs on packed sequences with
varlen attention; anything else runs on padded ``(B, M, d)`` batches whose pad slots
hold the next most probable *real* tokens, through the block's own modules.

Anything else: subclass :class:`BackboneAdapter` (see docs/wrap.md)::

    class MyAdapter(BackboneAdapter):
        name = "mine"
        requires = ("blocks", "cond_mlp")
        def condition(self, t, y, label_drop=None):
            return Conditioning(self.model_cond(t, y), t, y)
        def run_block(self, i, h, cond, plan):
            return self.blocks[i](h, cond.vector)           # h: (B, M, d), pad slots are real tokens
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import chunk_attention, dense_attention
from .grid import raster_index, sincos_embed, sincos_table
from .models.dit import block_input
from .plan import ChunkPlan

__all__ = [
    "Conditioning",
    "BackboneAdapter",
    "ChunkformerDiTAdapter",
    "OriginalDiTAdapter",
    "DiffusersDiTAdapter",
    "ADAPTERS",
    "register_adapter",
    "find_adapter",
    "UnsupportedModelError",
]


class UnsupportedModelError(TypeError):
    """``wrap`` found no adapter for a model; the message lists what each adapter missed."""


@dataclass
class Conditioning:
    """What the blocks are conditioned on.

    Attributes:
        vector: ``(B, d)``: the scaffold's conditioning (and the blocks', for DiT layouts).
        t: ``(B,)`` timesteps.
        y: ``(B,)`` labels after label dropout (null class where dropped), or ``None``.
    """

    vector: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor | None = None


def _get(model: nn.Module, path: str):
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def drop_labels(y: torch.Tensor | None, *, batch: int, device, num_classes: int, dropout: float,
                training: bool, label_drop: torch.Tensor | None) -> torch.Tensor:
    """Labels with the null class (``num_classes``) where dropped; ``None`` -> all null (or 0)."""
    null = num_classes if dropout > 0 else None
    if y is None:
        return torch.full((batch,), null or 0, device=device, dtype=torch.long)
    if label_drop is None and training and dropout > 0:
        label_drop = torch.rand(y.shape[0], device=y.device) < dropout
    if label_drop is not None:
        if null is None:
            raise ValueError("label dropout needs a null class; this backbone was built without one")
        y = torch.where(label_drop, num_classes, y)
    return y


def per_token(ada: torch.Tensor, plan: ChunkPlan | None, tokens: int) -> torch.Tensor:
    """``(B, k)`` per-sample modulation -> broadcastable over the layout ``plan.chunk`` made."""
    if plan is not None and plan.mode == "packed":
        return torch.repeat_interleave(ada, plan.lengths, dim=0, output_size=tokens)  # (T, k)
    return ada[:, None]  # (B, 1, k)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def run_attention(q, k, v, plan: ChunkPlan | None, backend: str = "auto", key_bias=None) -> torch.Tensor:
    """``(..., H, dh)`` q/k/v in any layout -> attention within each sample's kept tokens."""
    if plan is None:
        return dense_attention(q, k, v, key_bias)
    return chunk_attention(q, k, v, plan, backend, key_bias)


def call_attention(attn: nn.Module, x: torch.Tensor, plan: ChunkPlan | None, fn) -> torch.Tensor:
    """``fn(attn, x, plan)``, unless ``attn`` takes the plan itself (a token-merging wrapper)."""
    return attn(x, plan) if getattr(attn, "takes_plan", False) else fn(attn, x, plan)


class BackboneAdapter(nn.Module):
    """Base class: registers the backbone's blocks (shared, not copied) and exposes its geometry.

    Subclasses set ``name`` and ``requires`` (dotted attribute paths checked at wrap time) and
    implement :meth:`condition` and :meth:`run_block`. Class attributes:

    * ``attention_known``: ``run_block`` restricts attention to each sample's kept tokens
      (packed or padded plans); if ``False`` the wrapper uses padded plans and the pad slots,
      real tokens, take part in attention.
    """

    name: ClassVar[str] = "custom"
    requires: ClassVar[tuple[str, ...]] = ("blocks",)
    attention_known: bool = False

    def __init__(self, model: nn.Module, *, blocks: str = "blocks") -> None:
        super().__init__()
        missing = self.missing(model)
        if missing:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not fit the {self.name!r} adapter: missing {', '.join(missing)}"
            )
        self.blocks = _get(model, blocks)  # shared with the model, registered here
        if not isinstance(self.blocks, nn.ModuleList):
            self.blocks = nn.ModuleList(self.blocks)

    @classmethod
    def missing(cls, model: nn.Module) -> list[str]:
        """What this adapter needs and ``model`` lacks (empty: the adapter fits)."""
        return [path for path in cls.requires if _get(model, path) is None]

    # geometry: subclasses fill these in __init__
    hidden_size: int
    in_channels: int
    out_channels: int
    patch_size: int = 1
    grid: tuple[int, ...] | None = None  # latent grid the backbone was built for (None: any)
    num_classes: int = 1
    class_dropout: float = 0.0

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.class_dropout > 0 else None

    def condition(self, t: torch.Tensor, y: torch.Tensor | None, label_drop: torch.Tensor | None = None
                  ) -> Conditioning:
        raise NotImplementedError(f"{type(self).__name__} must implement condition(t, y, label_drop)")

    def run_block(self, index: int, h: torch.Tensor, cond: Conditioning, plan: ChunkPlan | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement run_block(index, h, cond, plan)")

    def block_input(self, h: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Block 0's attention input for dense ``(B, L, d)`` tokens (step caching's change signal):
        ``modulate(norm1(h))`` for blocks with ``adaLN_modulation`` and ``norm1`` (DiT layouts),
        else a plain LayerNorm that ignores the conditioning."""
        block = self.blocks[0]
        if hasattr(block, "adaLN_modulation") and hasattr(block, "norm1"):
            return block_input(block, h, cond.vector)
        return F.layer_norm(h, h.shape[-1:])

    def position_embedding(self, coords: torch.Tensor) -> torch.Tensor:
        """``(..., ndim)`` coordinates in backbone-patch units -> ``(..., d)``; sin-cos by default."""
        return sincos_embed(coords, self.hidden_size)

    def embedders(self) -> list[nn.Module]:
        """Modules that embed ``t`` and ``y`` (frozen when upcycling)."""
        return []

    @staticmethod
    def call_original(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Run the unwrapped model once (FLOP baselines)."""
        return model(x, t, y)

    @staticmethod
    def patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The unwrapped model's block-0 input: patch tokens with positions, ``(B, L_patch, d)``
        (what upcycling distils from)."""
        raise NotImplementedError("implement patch_tokens(model, x) on your adapter to distil from the original")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, blocks={len(self.blocks)}, hidden_size={self.hidden_size}"


def _table_lookup(table: torch.Tensor, patch_grid: tuple[int, ...]):
    """A position table ``(L, d)`` over ``patch_grid`` as a function of fractional coordinates."""
    sincos = sincos_table(patch_grid, table.shape[-1], device=table.device)
    if torch.allclose(table.float().cpu(), sincos.cpu(), atol=1e-5):
        return None  # the standard sin-cos table: evaluate it at fractional coordinates instead

    def lookup(coords: torch.Tensor) -> torch.Tensor:
        limit = torch.tensor(patch_grid, device=coords.device) - 1
        idx = torch.minimum(coords.floor().long().clamp(min=0), limit)
        return table.to(coords.device)[raster_index(idx, patch_grid)]

    return lookup


# ---------------------------------------------------------------------------- chunkformer's DiT
class ChunkformerDiTAdapter(BackboneAdapter):
    """:class:`chunkformer.DiT`: its blocks take every plan layout natively."""

    name = "chunkformer"
    requires = ("blocks", "t_embedder", "y_embedder", "x_embedder", "final_layer", "config")
    attention_known = True

    @classmethod
    def missing(cls, model):
        from .models.dit import DiT

        return [] if isinstance(model, DiT) else [f"an instance of chunkformer.DiT (got {type(model).__name__})"]

    def __init__(self, model) -> None:
        super().__init__(model)
        self.t_embedder, self.y_embedder = model.t_embedder, model.y_embedder
        self.hidden_size, self.in_channels = model.hidden_size, model.in_channels
        self.out_channels, self.patch_size, self.grid = model.out_channels, model.patch_size, model.grid
        self.num_classes, self.class_dropout = model.y_embedder.num_classes, model.y_embedder.dropout

    def condition(self, t, y, label_drop=None):
        B = t.shape[0]
        y = drop_labels(y, batch=B, device=t.device, num_classes=self.num_classes, dropout=self.class_dropout,
                        training=self.training, label_drop=label_drop)
        return Conditioning(self.t_embedder(t) + self.y_embedder.embedding_table(y), t, y)

    def run_block(self, index, h, cond, plan):
        return self.blocks[index](h, cond.vector, plan)

    def embedders(self):
        return [self.t_embedder, self.y_embedder]

    @staticmethod
    def patch_tokens(model, x):
        h = model.x_embedder(x).flatten(2).transpose(1, 2)  # (B, L, d)
        patch_grid = tuple(s // model.patch_size for s in x.shape[2:])
        return h + sincos_table(patch_grid, model.hidden_size, device=x.device).to(h.dtype)


# ---------------------------------------------------------------------------- original DiT layout
def _timm_attention_known(attn: nn.Module) -> bool:
    """timm-style ``Attention``: fused ``qkv``, ``proj``, ``num_heads``, default scale, no extras."""
    if not all(hasattr(attn, n) for n in ("qkv", "proj", "num_heads")):
        return False
    if not isinstance(attn.qkv, nn.Linear) or attn.qkv.out_features != 3 * attn.proj.in_features:
        return False
    head_dim = attn.proj.in_features // attn.num_heads
    scale = getattr(attn, "scale", head_dim**-0.5)
    return abs(scale - head_dim**-0.5) < 1e-9 and not isinstance(getattr(attn, "norm", None), nn.Module)


def timm_attention(attn: nn.Module, x: torch.Tensor, plan: ChunkPlan | None, key_bias=None) -> torch.Tensor:
    """A timm-style attention module applied to any plan layout (``q_norm`` / ``k_norm`` honoured)."""
    q, k, v = rearrange(attn.qkv(x), "... (three h d) -> three ... h d", three=3, h=attn.num_heads)
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    out = run_attention(q, k, v, plan, getattr(attn, "backend", "auto"), key_bias)
    out = rearrange(out, "... h d -> ... (h d)")
    return getattr(attn, "proj_drop", nn.Identity())(attn.proj(out))


class OriginalDiTAdapter(BackboneAdapter):
    """The original DiT release layout (and forks that keep its module names).

    Blocks are ``block(x, c)`` with ``adaLN_modulation`` (SiLU, Linear -> 6d), ``norm1`` /
    ``norm2``, ``attn`` and ``mlp``; ``c = t_embedder(t) + y_embedder.embedding_table(y)``.
    """

    name = "dit"
    requires = (
        "x_embedder", "t_embedder", "y_embedder.embedding_table", "pos_embed", "blocks", "final_layer",
        "blocks.0.adaLN_modulation", "blocks.0.norm1", "blocks.0.norm2", "blocks.0.attn", "blocks.0.mlp",
    )

    def __init__(self, model) -> None:
        super().__init__(model)
        self.t_embedder, self.y_embedder = model.t_embedder, model.y_embedder
        proj = getattr(model.x_embedder, "proj", model.x_embedder)
        self.hidden_size, self.in_channels = proj.out_channels, proj.in_channels
        self.patch_size = proj.kernel_size[0]
        self.out_channels = getattr(model, "out_channels", None) or (
            model.final_layer.linear.out_features // self.patch_size ** (proj.weight.ndim - 2)
        )
        L = model.pos_embed.shape[1]
        side = round(L ** (1 / (proj.weight.ndim - 2)))
        self.patch_grid = (side,) * (proj.weight.ndim - 2)
        self.grid = tuple(s * self.patch_size for s in self.patch_grid)
        self.num_classes = model.y_embedder.num_classes
        self.class_dropout = float(getattr(model.y_embedder, "dropout_prob", 0.0))
        self._lookup = _table_lookup(model.pos_embed.detach()[0], self.patch_grid)
        self.attention_known = all(_timm_attention_known(b.attn) for b in self.blocks)

    def condition(self, t, y, label_drop=None):
        y = drop_labels(y, batch=t.shape[0], device=t.device, num_classes=self.num_classes,
                        dropout=self.class_dropout, training=self.training, label_drop=label_drop)
        return Conditioning(self.t_embedder(t) + self.y_embedder.embedding_table(y), t, y)

    def run_block(self, index, h, cond, plan):
        block = self.blocks[index]
        ada = per_token(block.adaLN_modulation(cond.vector), plan, h.shape[0])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada.chunk(6, dim=-1)
        a = modulate(block.norm1(h), shift_msa, scale_msa)
        a = call_attention(block.attn, a, plan, timm_attention) if self.attention_known else block.attn(a)
        h = h + gate_msa * a
        return h + gate_mlp * block.mlp(modulate(block.norm2(h), shift_mlp, scale_mlp))

    def position_embedding(self, coords):
        return super().position_embedding(coords) if self._lookup is None else self._lookup(coords)

    def embedders(self):
        return [self.t_embedder, self.y_embedder]

    @staticmethod
    def patch_tokens(model, x):
        return model.x_embedder(x) + model.pos_embed


# ---------------------------------------------------------------------------- diffusers
def _diffusers_attention_known(attn: nn.Module) -> bool:
    """diffusers ``Attention`` with a plain SDPA processor and no q/k norms or extras."""
    processor = type(getattr(attn, "processor", None)).__name__
    if processor not in ("AttnProcessor2_0", "AttnProcessor"):
        return False
    for extra in ("norm_q", "norm_k", "spatial_norm", "group_norm", "norm_cross"):
        if getattr(attn, extra, None) is not None:
            return False
    head_dim = attn.to_q.out_features // attn.heads
    return (not attn.residual_connection and attn.rescale_output_factor == 1.0
            and abs(attn.scale - head_dim**-0.5) < 1e-9 and not getattr(attn, "is_cross_attention", False))


def diffusers_attention(attn: nn.Module, x: torch.Tensor, plan: ChunkPlan | None, key_bias=None) -> torch.Tensor:
    """A diffusers ``Attention`` (SDPA processor) applied to any plan layout."""
    q, k, v = (rearrange(proj(x), "... (h d) -> ... h d", h=attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
    out = rearrange(run_attention(q, k, v, plan, key_bias=key_bias), "... h d -> ... (h d)")
    return attn.to_out[1](attn.to_out[0](out))


class DiffusersDiTAdapter(BackboneAdapter):
    """diffusers ``DiTTransformer2DModel``: every block embeds ``(t, y)`` itself (``norm1.emb``);
    the scaffold is conditioned on block 0's embedding, as diffusers' output layer is."""

    name = "diffusers"
    requires = (
        "pos_embed.proj", "transformer_blocks", "proj_out_1", "proj_out_2",
        "transformer_blocks.0.norm1.emb.time_proj", "transformer_blocks.0.norm1.emb.timestep_embedder",
        "transformer_blocks.0.norm1.emb.class_embedder", "transformer_blocks.0.norm1.linear",
        "transformer_blocks.0.attn1", "transformer_blocks.0.norm3", "transformer_blocks.0.ff",
    )

    def __init__(self, model) -> None:
        super().__init__(model, blocks="transformer_blocks")
        cfg = model.config
        proj = model.pos_embed.proj
        self.hidden_size, self.in_channels, self.patch_size = proj.out_channels, proj.in_channels, cfg.patch_size
        self.out_channels = model.out_channels
        self.patch_grid = (cfg.sample_size // cfg.patch_size,) * 2
        self.grid = (cfg.sample_size,) * 2
        emb = self.blocks[0].norm1.emb.class_embedder
        self.num_classes, self.class_dropout = emb.num_classes, float(emb.dropout_prob)
        table = getattr(model.pos_embed, "pos_embed", None)
        self._lookup = None if table is None else _table_lookup(table.detach()[0], self.patch_grid)
        self.attention_known = all(_diffusers_attention_known(b.attn1) for b in self.blocks)

    def _embed(self, index: int, cond: Conditioning, dtype) -> torch.Tensor:
        emb = self.blocks[index].norm1.emb
        t_emb = emb.timestep_embedder(emb.time_proj(cond.t).to(dtype))
        return t_emb + emb.class_embedder.embedding_table(cond.y)  # (B, d)

    def condition(self, t, y, label_drop=None):
        y = drop_labels(y, batch=t.shape[0], device=t.device, num_classes=self.num_classes,
                        dropout=self.class_dropout, training=self.training, label_drop=label_drop)
        cond = Conditioning(t.new_zeros(()), t, y)
        dtype = self.blocks[0].norm1.linear.weight.dtype
        cond.vector = self._embed(0, cond, dtype)
        return cond

    def run_block(self, index, h, cond, plan):
        block = self.blocks[index]
        e = cond.vector if index == 0 else self._embed(index, cond, h.dtype)
        ada = per_token(block.norm1.linear(F.silu(e)), plan, h.shape[0])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada.chunk(6, dim=-1)
        a = modulate(block.norm1.norm(h), shift_msa, scale_msa)
        a = call_attention(block.attn1, a, plan, diffusers_attention) if self.attention_known else block.attn1(a)
        h = h + gate_msa * a
        return h + gate_mlp * block.ff(modulate(block.norm3(h), shift_mlp, scale_mlp))

    def block_input(self, h, cond):
        block = self.blocks[0]
        shift, scale = block.norm1.linear(F.silu(cond.vector.to(h.dtype))).chunk(6, dim=-1)[:2]
        return modulate(block.norm1.norm(h), shift[:, None], scale[:, None])

    def position_embedding(self, coords):
        return super().position_embedding(coords) if self._lookup is None else self._lookup(coords)

    def embedders(self):
        return [b.norm1.emb for b in self.blocks]

    @staticmethod
    def call_original(model, x, t, y):
        return model(x, timestep=t, class_labels=y).sample

    @staticmethod
    def patch_tokens(model, x):
        return model.pos_embed(x)


# ---------------------------------------------------------------------------- registry
ADAPTERS: dict[str, type[BackboneAdapter]] = {}


def register_adapter(cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
    """Register an adapter class under ``cls.name`` (usable as a decorator); later ones are tried first."""
    ADAPTERS[cls.name] = cls
    return cls


for _cls in (ChunkformerDiTAdapter, OriginalDiTAdapter, DiffusersDiTAdapter):
    register_adapter(_cls)


def find_adapter(model: nn.Module, adapter: "str | type[BackboneAdapter] | None" = None) -> BackboneAdapter:
    """The adapter for ``model``: named, a class, or found by structure (first that fits).

    Raises :class:`UnsupportedModelError` naming what every adapter missed.
    """
    if isinstance(adapter, BackboneAdapter):
        return adapter
    if isinstance(adapter, str):
        if adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {adapter!r}; registered: {sorted(ADAPTERS)}")
        return ADAPTERS[adapter](model)
    if isinstance(adapter, type):
        return adapter(model)
    reasons = []
    for name, cls in reversed(list(ADAPTERS.items())):
        missing = cls.missing(model)
        if not missing:
            return cls(model)
        reasons.append(f"  {name}: missing {', '.join(missing)}")
    raise UnsupportedModelError(
        f"chunkformer.wrap does not know how to drive {type(model).__name__}. Each adapter needs:\n"
        + "\n".join(reasons)
        + "\nWrite a BackboneAdapter subclass (docs/wrap.md) and pass wrap(model, adapter=MyAdapter)."
    )
