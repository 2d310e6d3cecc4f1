"""DiT: a diffusion transformer with adaLN-Zero blocks, written here from the paper.

One file, read top to bottom: embedders, the block, the model, init. The block runs on
any token layout: dense ``(B, L, d)``, or the packed ``(T, d)`` / padded ``(B, M, d)``
layouts a :class:`~chunkformer.plan.ChunkPlan` produces. Modulation is computed per
sample on ``(B, 6d)`` and repeated per token only afterwards.

Both model families share one forward contract so sampling code is interchangeable::

    out = model(x, t, y)                                  # (B, out_channels, *grid)
    out, info = model(x, t, y, rho=0.2, return_info=True) # info: ratio loss, router, kept
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .._typing import Bool, Float, Int, Tensor, typechecked, value_checks_enabled
from ..attention import Backend, Sdpa, chunk_attention, dense_attention
from ..caching import cached_backbone, skipped_last
from ..grid import conv_nd, sincos_table
from ..plan import ChunkPlan
from ..routing import RouterOutput
from ..scaffold import FinalLayer
from .checkpoint import capture_config

__all__ = [
    "DiT",
    "DiTBlock",
    "Attention",
    "Mlp",
    "TimestepEmbedder",
    "LabelEmbedder",
    "ForwardInfo",
    "timestep_embedding",
    "block_input",
    "init_backbone_weights",
]


# ---------------------------------------------------------------------------- embedders
def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps ``(B,)`` -> ``(B, dim)``, ``[cos, sin]``.

    Frequencies ``max_period ** (-k / (half - freq_shift))``: DiT uses ``freq_shift=0``,
    diffusers' ``DiTTransformer2DModel`` ``1``.
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """``t`` -> sinusoidal features -> ``Linear -> SiLU -> Linear`` -> ``(B, d)``."""

    def __init__(self, dim: int, frequency_dim: int = 256, freq_shift: float = 0.0,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        self.frequency_dim, self.freq_shift = frequency_dim, freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, dim, device=device, dtype=dtype),
            nn.SiLU(),
            nn.Linear(dim, dim, device=device, dtype=dtype),
        )

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t, self.frequency_dim, freq_shift=self.freq_shift).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)  # (B, d)


class LabelEmbedder(nn.Module):
    """Class labels -> ``(B, d)``; with ``dropout > 0`` an extra *null* class (index
    ``num_classes``) replaces dropped labels (for classifier-free guidance)."""

    def __init__(self, num_classes: int, dim: int, dropout: float = 0.1, *, device=None, dtype=None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (use 1 for an unconditional model), got {num_classes}")
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + int(dropout > 0), dim, device=device, dtype=dtype)

    @property
    def null_class(self) -> int | None:
        """Index of the null (unconditional) label, or ``None`` if the model has none."""
        return self.num_classes if self.dropout > 0 else None

    def forward(self, y: Tensor | None, batch: int, device: torch.device, drop: Tensor | None = None) -> Tensor:
        """``drop``: optional ``(B,)`` bool mask of labels to replace by the null class; by default
        a random ``dropout`` fraction is replaced in training mode."""
        if y is None:  # unconditional call: null label if there is one, else class 0
            y = torch.full((batch,), self.null_class or 0, device=device, dtype=torch.long)
        elif drop is not None or (self.training and self.dropout > 0):
            if self.null_class is None:
                raise ValueError("label dropout needs a null class: build the model with class_dropout_prob > 0")
            if drop is None:
                drop = torch.rand(y.shape[0], device=y.device) < self.dropout
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)  # (B, d)


# ---------------------------------------------------------------------------- the block
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head self-attention on dense tokens or on any :class:`ChunkPlan` layout."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: Backend = "auto",
                 *, device=None, dtype=None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor, plan: ChunkPlan | None = None, key_bias: Tensor | None = None) -> Tensor:
        """``key_bias``: optional per-key logit offset (token merging's proportional attention)."""
        return self.attend(x, plan, key_bias, None)

    def attend(self, x: Tensor, plan: ChunkPlan | None, key_bias: Tensor | None, sdpa: Sdpa | None) -> Tensor:
        """:meth:`forward` with ``sdpa`` (``(q, k, v, mask) -> out`` on ``(B, H, M, dh)``; ``None``:
        :func:`~chunkformer.attention.masked_sdpa`) for the attention of each sample."""
        q, k, v = rearrange(self.qkv(x), "... (three h d) -> three ... h d", three=3, h=self.num_heads)
        if plan is None:
            out = dense_attention(q, k, v, key_bias, sdpa=sdpa)  # (B, L, H, dh)
        else:
            out = chunk_attention(q, k, v, plan, self.backend, key_bias, sdpa=sdpa)  # (T, H, dh) | (B, M, H, dh)
        return self.proj(rearrange(out, "... h d -> ... (h d)"))


class Mlp(nn.Module):
    """``Linear -> GELU(tanh) -> Linear``."""

    def __init__(self, dim: int, hidden: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: ``x += gate * f(modulate(norm(x)))`` for attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, backend: Backend = "auto",
                 mlp_norm_eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **fk)
        self.attn = Attention(dim, num_heads, backend=backend, **fk)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps, **fk)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **fk)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, **fk))

    def forward(self, x: Tensor, c: Tensor, plan: ChunkPlan | None = None) -> Tensor:
        """``x``: ``(B, L, d)`` dense, or ``plan.chunk`` layout; ``c``: ``(B, d)``."""
        ada = self.adaLN_modulation(c)  # (B, 6d), per sample
        if plan is not None and plan.mode == "packed":
            ada = torch.repeat_interleave(ada, plan.lengths, dim=0, output_size=x.shape[0])  # (T, 6d)
        else:
            ada = ada[:, None]  # (B, 1, 6d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), plan)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def block_input(block: nn.Module, h: Tensor, c: Tensor) -> Tensor:
    """What an adaLN block's attention sees: ``modulate(norm1(h))``, ``h`` ``(B, L, d)``, ``c`` ``(B, d)``
    (step caching's change signal; any block with ``adaLN_modulation`` and ``norm1``)."""
    shift, scale = block.adaLN_modulation(c).chunk(6, dim=-1)[:2]
    return modulate(block.norm1(h), shift[:, None], scale[:, None])


# ---------------------------------------------------------------------------- outputs
@dataclass
class ForwardInfo:
    """What ``model(..., return_info=True)`` returns beside the output.

    Attributes:
        ratio_loss: scalar ratio loss (0 for a plain DiT); add ``ratio_weight *`` it to the loss.
        kept: ``(B,)`` tokens the backbone saw per sample.
        tokens: backbone tokens per sample without chunking (``L`` of the patch grid).
        router: the :class:`RouterOutput` (``None`` for a plain DiT).
        plan: the :class:`ChunkPlan` (``None`` for a plain DiT).
        block_outputs: each backbone block's output in ``plan.chunk`` layout, when asked for
            (``block_outputs=True`` on a wrapped model; upcycling distils them).
        merged: ``(blocks, B)`` tokens token merging folded away in each block
            (:mod:`chunkformer.merging`; ``None`` without it).
        cached: the backbone was skipped and its cached residual reused
            (:class:`~chunkformer.caching.StepCache`).
    """

    ratio_loss: Tensor
    kept: Tensor
    tokens: int
    router: RouterOutput | None = None
    plan: ChunkPlan | None = None
    block_outputs: list | None = None
    merged: Tensor | None = None
    cached: bool = False

    @property
    def kept_fraction(self) -> Tensor:
        return self.kept.float() / self.tokens


# ---------------------------------------------------------------------------- the model
def as_grid(size: "int | tuple[int, ...] | list[int]") -> tuple[int, ...]:
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)


class LabelledModel(nn.Module):
    """Label facts of a model with a :class:`LabelEmbedder` at ``y_embedder`` (DiT and DC-DiT).

    ``num_timesteps``: the model timesteps ``t`` accepted, ``[0, num_timesteps)`` (DDPM's index scale; a flow's
    ``t * 999`` falls in it too); set it to the diffusion's ``T`` for another length.
    """

    num_timesteps: int = 1000

    @property
    def null_class(self) -> int | None:
        return self.y_embedder.null_class

    @property
    def num_classes(self) -> int:
        return self.y_embedder.num_classes

    @property
    def label_dropout(self) -> float:
        """Probability that a label is replaced by the null class in training."""
        return self.y_embedder.dropout


class DiT(LabelledModel):
    """Diffusion transformer (Peebles & Xie) on an N-D latent grid, patch size ``P`` per axis.

    Args:
        input_size: latent grid size (int for square, or a tuple, e.g. ``(32, 48)``).
        patch_size: ``P`` (2, 4, 8).
        in_channels: latent channels.
        hidden_size, depth, num_heads, mlp_ratio: backbone shape.
        class_dropout_prob: label dropout for classifier-free guidance (adds a null class).
        num_classes: label count (1 for unconditional).
        learn_sigma: predict the variance too (``out_channels = 2 * in_channels``).
        attn_backend: see :mod:`chunkformer.attention`.
        freq_shift, mlp_norm_eps: timestep-frequency shift and the MLP LayerNorm's eps; the
            defaults are DiT's, ``1`` and ``1e-5`` reproduce diffusers' ``DiTTransformer2DModel``
            exactly (set by :func:`~chunkformer.models.interop.from_diffusers`).
    """

    supports_chunking = False
    step_cache = None  # a StepCache installs itself here while sampling

    def __init__(
        self,
        input_size: int | tuple[int, ...] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        attn_backend: Backend = "auto",
        freq_shift: float = 0.0,
        mlp_norm_eps: float = 1e-6,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.config = capture_config(locals())
        fk = {"device": device, "dtype": dtype}
        self.grid = as_grid(input_size)
        self.ndim = len(self.grid)
        if any(s % patch_size for s in self.grid):
            raise ValueError(f"input_size {self.grid} must be divisible by patch_size={patch_size}")
        self.patch_size, self.in_channels = patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size

        self.x_embedder = conv_nd(self.ndim, in_channels, hidden_size, patch_size, stride=patch_size, **fk)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=freq_shift, **fk)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, **fk)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, attn_backend, mlp_norm_eps, **fk) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size**self.ndim * self.out_channels, hidden_size, **fk)
        register_position_table(self, tuple(s // patch_size for s in self.grid), device)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_backbone_weights(self)
        w = self.x_embedder.weight  # patch embedding initialised like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for layer in (self.final_layer.modulation, self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor, grid: tuple[int, ...]) -> Tensor:
        """``(B, L, P^n C)`` -> ``(B, C, *grid)`` for any grid rank, square or not."""
        names = ["g1", "g2", "g3"][: len(grid)]
        patches = ["p1", "p2", "p3"][: len(grid)]
        src = f"b ({' '.join(names)}) ({' '.join(patches)} c)"
        dst = "b c " + " ".join(f"({n} {p})" for n, p in zip(names, patches))
        sizes = {n: s // self.patch_size for n, s in zip(names, grid)}
        sizes.update({p: self.patch_size for p in patches})
        return rearrange(x, f"{src} -> {dst}", **sizes)

    def run_backbone(self, h: Tensor, c: Tensor, plan: ChunkPlan | None = None, keep: list | None = None) -> Tensor:
        """Every block on ``h`` (dense ``(B, L, d)``, or a plan's layout); each output appended to ``keep`` if given."""
        for block in self.blocks:
            h = block(h, c, plan)
            if keep is not None:
                keep.append(h)
        return h

    def block_input(self, tokens: Tensor, c: Tensor) -> Tensor:
        """Block 0's attention input for ``(B, L, d)`` tokens (step caching's change signal)."""
        return block_input(self.blocks[0], tokens, c)

    def embed(self, x: Tensor, t: Tensor, y: Tensor | None, label_drop: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
        """Shared by DiT and wrappers: patch tokens ``(B, L, d)`` (with position) and ``c`` ``(B, d)``."""
        h = self.x_embedder(x).flatten(2).transpose(1, 2)  # (B, L, d)
        patch_grid = tuple(s // self.patch_size for s in x.shape[2:])
        h = h + position_table(self, patch_grid).to(h.dtype)  # (L, d) broadcast over the batch
        c = self.t_embedder(t) + self.y_embedder(y, x.shape[0], x.device, label_drop)  # (B, d)
        return h, c

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
        """``x``: ``(B, C, *grid)`` noisy latents, ``t``: ``(B,)`` timesteps, ``y``: ``(B,)`` labels.

        ``label_drop``: ``(B,)`` bool, labels to replace by the null class (CFG training); by
        default a random ``class_dropout_prob`` fraction in training mode.
        """
        _check_input(self, x, t, y)
        if rho is not None and not (isinstance(rho, (int, float)) and rho == 0):
            raise ValueError("a plain DiT keeps every token: rho must be None or 0 (use a DC-DiT for budgets)")
        h, c = self.embed(x, t, y, label_drop)  # (B, L, d), (B, d)
        h = cached_backbone(self, h, c, None, h)
        out = self.unpatchify(self.final_layer(h, c), x.shape[2:])  # (B, out, *grid)
        if not return_info:
            return out
        B, L = h.shape[:2]
        kept = torch.full((B,), L, device=x.device, dtype=torch.long)
        return out, ForwardInfo(ratio_loss=h.new_zeros(()).float(), kept=kept, tokens=L,
                                cached=skipped_last(self))


def register_position_table(model: nn.Module, grid: tuple[int, ...], device=None) -> None:
    """Give ``model`` its ``(L, hidden_size)`` sin-cos table over ``grid`` as a buffer ``pos_table`` (not saved:
    it is a function of the config). Computed once: inside a compiled step a table computed per call is
    inlined into its consumer, which then evaluates sines and cosines for every element of the batch."""
    model.pos_grid = tuple(grid)
    model.register_buffer("pos_table", sincos_table(grid, model.hidden_size, device=device), persistent=False)


def position_table(model: nn.Module, grid: tuple[int, ...]) -> Tensor:
    """``(L, d)`` sin-cos table over ``grid``: ``model.pos_table`` for the grid it was built for, else computed."""
    if tuple(grid) == model.pos_grid:
        return model.pos_table
    return sincos_table(grid, model.hidden_size, device=model.pos_table.device)


def _check_input(model: nn.Module, x: Tensor, t: Tensor | None = None, y: Tensor | None = None,
                 rho: "float | Tensor | None" = None) -> None:
    """Refuse inputs a model cannot take, with the same message whether ``CHUNKFORMER_TYPECHECK`` is on or off.

    Shapes and dtypes of ``x`` ``(B, C, *grid)``, ``t`` ``(B,)``, ``y`` ``(B,)`` integer and ``rho`` (a number, or a
    float tensor ``()`` / ``(B,)``) are always checked (no device read). The ranges, ``t`` in
    ``[0, model.num_timesteps)`` and ``y`` in ``[0, num_classes]`` (``num_classes`` is the null label, where the
    model has one), cost one device-to-host read together and are skipped inside ``value_checks(False)``.
    """
    if x.ndim != model.ndim + 2:
        raise ValueError(
            f"x must be (batch, {model.in_channels}, *grid) with a rank-{model.ndim} grid, got {tuple(x.shape)}"
        )
    if x.shape[1] != model.in_channels:
        raise ValueError(f"x has {x.shape[1]} channels but the model has in_channels={model.in_channels}")
    P = getattr(model, "patch_size", 1)
    if any(s % P for s in x.shape[2:]):
        raise ValueError(f"grid {tuple(x.shape[2:])} must be divisible by patch_size={P}")
    B = x.shape[0]
    if t is not None and (not torch.is_tensor(t) or t.shape != (B,) or t.dtype == torch.bool or t.is_complex()):
        got = f"{tuple(t.shape)} {t.dtype}" if torch.is_tensor(t) else type(t).__name__
        raise ValueError(f"t must be a ({B},) int or float tensor of timesteps (one per sample of x), got {got}")
    if y is not None and (not torch.is_tensor(y) or y.shape != (B,) or y.dtype.is_floating_point
                          or y.dtype in (torch.bool, torch.uint8) or y.is_complex()):
        got = f"{tuple(y.shape)} {y.dtype}" if torch.is_tensor(y) else type(y).__name__
        raise ValueError(f"y must be a ({B},) integer tensor of class labels (int64), got {got}")
    if rho is not None:
        from ..budget import check_rho

        check_rho(rho, batch=B, ranges=False)  # the router reads a tensor's range (once)
    if not value_checks_enabled() or (t is None and y is None) or x.is_meta:  # meta tensors hold no values
        return
    T = getattr(model, "num_timesteps", None)
    top = model.num_classes if model.null_class is not None else model.num_classes - 1
    checks = []
    if t is not None and T is not None:
        checks.append(((t < 0) | (t >= T)).any())
    if y is not None:
        checks.append(((y < 0) | (y > top)).any())
    if not checks or not bool(torch.stack(checks).any()):  # one device read for both ranges
        return
    if t is not None and T is not None and bool(checks[0]):
        raise ValueError(f"t must lie in [0, {T}) (the diffusion's model timesteps, model.num_timesteps={T}), got "
                         f"values in [{float(t.min())}, {float(t.max())}]")
    null = f"; {model.num_classes} is the null label" if model.null_class is not None else ""
    raise ValueError(f"y must lie in [0, {top}] (class labels of a {model.num_classes}-class model{null}), got "
                     f"values in [{int(y.min())}, {int(y.max())}]")


# ---------------------------------------------------------------------------- init
def init_backbone_weights(model: nn.Module) -> None:
    """DiT's initialisation for embedders and blocks: xavier linears, N(0, 0.02) embeddings,
    zero adaLN modulation (each block starts as the identity). The conv scaffold keeps
    its own init (see :mod:`chunkformer.scaffold`)."""
    for module in [getattr(model, "t_embedder", None), getattr(model, "y_embedder", None), *model.blocks]:
        if module is None:
            continue
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                nn.init.xavier_uniform_(sub.weight)
                if sub.bias is not None:
                    nn.init.zeros_(sub.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
