"""``chunkformer.wrap``: dynamic chunking around a DiT you already have.

    import torch, chunkformer as cf
    dit = cf.create_model("DiT-S/2", input_size=16, in_channels=4, num_classes=10, depth=2)
    model = cf.wrap(dit, target_ratio=4)                  # owns dit's blocks (shared)
    out, info = model(torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2]), return_info=True)
    assert out.shape == (2, 8, 16, 16) and cf.unwrap(model) is dit

The wrapped model is a DC-DiT whose backbone is the given model's blocks: a P = 1 conv
encoder (:class:`~chunkformer.scaffold.ChunkEncoder`), a :class:`~chunkformer.routing.Router`,
the backbone on the kept tokens (positions at their original coordinates, in the backbone's
patch units), and a :class:`~chunkformer.scaffold.DeChunkDecoder`. The backbone's patch
embedding, position table and output layer are not used. Nothing in the given model is
patched: ``unwrap`` hands it back as it was (its blocks are shared unless ``share_blocks=False``).
"""

import copy
import functools
import math

import torch
from torch import nn

from ._typing import Tensor
from .adapters import BackboneAdapter, find_adapter
from .dechunk import Smoothing
from .grid import grid_coords
from .models.dcdit import ChunkPipeline
from .plan import ChunkPlan
from .routing import GateGrad, RouterInit, RouterKind

__all__ = ["ChunkWrapper", "wrap", "unwrap", "summary"]


class ChunkWrapper(ChunkPipeline):
    """The DC-DiT pipeline (:class:`~chunkformer.models.dcdit.ChunkPipeline`) around a foreign
    backbone, driven through an adapter; build it with :func:`wrap`.

    Submodules: ``backbone`` (the adapter, holding the shared blocks and embedders),
    ``cond_adaptor`` (a LayerNorm on the scaffold's conditioning, or identity), ``encoder``,
    ``router``, ``norm`` (RMSNorm on the backbone's output), ``decoder``; ``budget`` holds the ratio-loss / tail-drop settings.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: BackboneAdapter,
        *,
        target_ratio: float = 4.0,
        router: RouterKind | None = None,
        encoder_depth: int = 2,
        decoder_depth: int = 2,
        scaffold_width: int | None = None,
        sigma: float | None = None,
        smoothing: Smoothing = "auto",
        plan_mode: str = "auto",
        capacity: int | None = None,
        cond_adaptor: bool = True,
        coord_scale: float | None = None,
        grid: tuple[int, ...] | None = None,
        out_channels: int | None = None,
        fill_capacity: bool = False,
        fp32_router_dechunk: bool = True,
        router_init: RouterInit = "oriented",
        gate_grad: GateGrad = "selected",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.__dict__["_original"] = model  # not a submodule: state_dict holds the blocks once, via backbone
        self.backbone = adapter
        grid = tuple(grid or adapter.grid or ())
        if not grid:
            raise ValueError("the adapter does not know the backbone's latent grid: pass wrap(..., grid=(H, W))")
        self.coord_scale = 1.0 / adapter.patch_size if coord_scale is None else coord_scale
        d = adapter.hidden_size
        self.cond_adaptor = nn.LayerNorm(d, eps=1e-6, device=device, dtype=dtype) if cond_adaptor else nn.Identity()
        self.build_scaffold(
            in_channels=adapter.in_channels, hidden_size=d, out_channels=out_channels or adapter.out_channels,
            grid=grid, target_ratio=target_ratio, router=router, encoder_depth=encoder_depth,
            decoder_depth=decoder_depth, scaffold_width=scaffold_width, sigma=sigma, smoothing=smoothing,
            plan_mode=plan_mode, capacity=capacity, fill_capacity=fill_capacity,
            fp32_router_dechunk=fp32_router_dechunk, router_init=router_init, gate_grad=gate_grad,
            device=device, dtype=dtype,
        )

    @property
    def attention_known(self) -> bool:
        return self.backbone.attention_known

    def _backbone_name(self) -> str:
        return f"the {self.backbone.name!r} adapter"

    @property
    def null_class(self) -> int | None:
        return self.backbone.null_class

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def label_dropout(self) -> float:
        return self.backbone.class_dropout

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.blocks

    def condition(self, t: Tensor, y: Tensor | None, label_drop: Tensor | None = None):
        """``(Conditioning, c)``: the backbone's conditioning and the scaffold's ``(B, d)`` vector."""
        cond = self.backbone.condition(t, y, label_drop)
        return cond, self.cond_adaptor(cond.vector)

    def position_table(self, grid: tuple[int, ...], device: torch.device) -> Tensor:
        """``(L, d)``: the backbone's position embedding at every P = 1 cell, in backbone-patch units."""
        return self.backbone.position_embedding(grid_coords(grid, device=device) * self.coord_scale)

    def run_backbone(self, h: Tensor, cond, plan: ChunkPlan | None, keep: list | None = None) -> Tensor:
        for i in range(len(self.backbone.blocks)):
            h = self._block(i, functools.partial(self.backbone.run_block, i), h, cond, plan)
            if keep is not None:
                keep.append(h)
        return h

    def block_input(self, tokens: Tensor, cond) -> Tensor:
        return self.backbone.block_input(tokens, cond)

    def extra_repr(self) -> str:
        return f"adapter={self.backbone.name!r}, " + self.plan_repr() + f", coord_scale={self.coord_scale:g}"


def wrap(
    model: nn.Module,
    target_ratio: float = 4.0,
    *,
    router: RouterKind | None = None,
    adapter: "str | type[BackboneAdapter] | BackboneAdapter | None" = None,
    share_blocks: bool = True,
    freeze_embedders: bool = False,
    **kwargs,
) -> ChunkWrapper:
    """Turn a DiT into a DC-DiT that runs its blocks on dynamically chunked tokens.

    Args:
        model: chunkformer's ``DiT``, an original-DiT-layout model, diffusers'
            ``DiTTransformer2DModel``, or anything a custom :class:`BackboneAdapter` drives.
        target_ratio: ``N``: the ratio loss aims at keeping ``1/N`` of the tokens.
        router: ``"predictability"`` (default), ``"cosine"``, ``"cosine1d"``, ``"random"``.
        adapter: a registered name (``"chunkformer"``, ``"dit"``, ``"diffusers"``), an adapter
            class or instance; default: found by structure.
        share_blocks: the wrapper uses the model's blocks themselves (training it trains them);
            ``False`` deep-copies the model first.
        freeze_embedders: freeze the backbone's timestep / label embedders (upcycling).
        **kwargs: :class:`ChunkWrapper` options: ``encoder_depth``, ``decoder_depth``,
            ``scaffold_width``, ``sigma``, ``smoothing``, ``plan_mode`` (``"auto"``: packed where the
            attention is known, else padded with real tokens), ``capacity``, ``fill_capacity``
            (fixed mode: exactly ``capacity`` tokens per sample, attention unmasked),
            ``fp32_router_dechunk`` (default on; ``False``: router and de-chunk in the caller's
            precision, as the release's flag of that name), ``router_init`` / ``gate_grad`` (the
            router's ``init`` / ``gate_grad``: ``"release"`` / ``"selected"`` as the paper), ``cond_adaptor``
            (LayerNorm on the scaffold's conditioning, default on), ``coord_scale`` (default
            ``1 / patch_size``: positions in the backbone's patch units), ``grid``,
            ``out_channels``, ``device``, ``dtype``.

    Raises:
        UnsupportedModelError: no adapter fits; the message names what each one missed.
    """
    if isinstance(model, ChunkWrapper):
        raise TypeError("this model is already wrapped; chunkformer.unwrap(model) returns the original")
    if getattr(model, "supports_chunking", False):
        raise TypeError(f"{type(model).__name__} already chunks its tokens; wrap a plain DiT")
    original = model
    if not share_blocks:
        model = copy.deepcopy(model)
    found = find_adapter(model, adapter)
    if "device" not in kwargs:  # the scaffold lives where the backbone lives
        p = next(model.parameters(), None)
        if p is not None:
            kwargs["device"] = p.device
    wrapped = ChunkWrapper(original, found, target_ratio=target_ratio, router=router, **kwargs)
    if freeze_embedders:
        for module in found.embedders():
            module.requires_grad_(False)
    wrapped.wrap_config = {"adapter": found.name, "target_ratio": target_ratio, "router": router,
                           "share_blocks": share_blocks, "freeze_embedders": freeze_embedders,
                           **{k: v for k, v in kwargs.items() if k not in ("device", "dtype")}}
    return wrapped


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The model given to :func:`wrap`, as it was (no hooks or patches were ever added).

    With ``share_blocks=True`` (default) its blocks are the wrapper's, so training the wrapper
    changed them; with ``share_blocks=False`` it is untouched.
    """
    wrapped = getattr(wrapped, "module", wrapped)
    wrapped = getattr(wrapped, "_orig_mod", wrapped)
    if not isinstance(wrapped, ChunkWrapper):
        raise TypeError(f"expected a model returned by chunkformer.wrap, got {type(wrapped).__name__}")
    return wrapped._original


def _count(params) -> int:
    return sum(p.numel() for p in params)


@torch.no_grad()
def summary(wrapped: ChunkWrapper, x: Tensor | None = None, t: Tensor | None = None, y: Tensor | None = None,
            *, rho: float = 0.0, print_fn=print) -> dict:
    """Print (and return) what was wrapped, the parameters added, and, given an input, the
    kept tokens and the wrapped model's FLOPs against the original's on the same input: a multiple
    with the reasons when it costs more, the saving when it costs less (``flops_ratio`` = wrapped /
    original, ``flops_saved`` = ``1 - flops_ratio``)."""
    from .flops import FlopCounter, count_flops

    b = wrapped.backbone
    shared = {id(p) for p in b.parameters()}
    added = [p for p in wrapped.parameters() if id(p) not in shared]
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    info = {
        "model": type(wrapped._original).__name__,
        "adapter": b.name,
        "blocks": len(b.blocks),
        "hidden_size": b.hidden_size,
        "patch_size": b.patch_size,
        "attention": "packed varlen" if wrapped.plan_mode == "packed" else f"{wrapped.plan_mode} (pad = real tokens)",
        "backbone_params": _count(b.parameters()),
        "added_params": _count(added),
        "trainable_params": _count(trainable),
    }
    lines = [
        f"chunkformer.wrap({info['model']}) via the {b.name!r} adapter: {info['blocks']} blocks, d={b.hidden_size}, "
        f"backbone patch {b.patch_size} -> chunked P=1 grid {wrapped.grid}",
        f"  attention: {info['attention']}",
        f"  parameters: backbone {info['backbone_params'] / 1e6:.2f}M (shared), added {info['added_params'] / 1e6:.2f}M "
        f"(encoder, router, decoder, adaptor), trainable {info['trainable_params'] / 1e6:.2f}M",
    ]
    if x is not None:
        if t is None:
            t = torch.full((x.shape[0],), 500, device=x.device)
        was_training = wrapped.training
        wrapped.eval()
        try:
            report = count_flops(wrapped, x, t, y, rho=rho)
            with FlopCounter(wrapped._original) as base:
                b.call_original(wrapped._original, x, t, y)
        finally:
            wrapped.train(was_training)
        tokens = math.prod(x.shape[2:])
        kept = report.kept.float() / tokens
        base_per_sample = base.total / x.shape[0]
        ratio = report.per_sample / base_per_sample  # wrapped FLOPs over the original's, same input
        info.update(kept_fraction=float(kept.mean()), gflops=report.per_sample / 1e9,
                    original_gflops=base_per_sample / 1e9, flops_ratio=ratio, flops_saved=1 - ratio)
        lines.append(f"  on {tuple(x.shape)} at rho={rho}: kept {kept.mean():.1%} of {tokens} "
                     f"P=1 tokens ({info['gflops']:.3f} GFLOPs/sample)")
        lines.extend(_cost_lines(wrapped, report, info, tokens))
    if print_fn is not None:
        print_fn("\n".join(lines))
    return info


def _cost_lines(wrapped: ChunkWrapper, report, info: dict, tokens: int) -> list[str]:
    """The wrapped model's FLOPs against the original's, in words; why, when the wrapped model costs more."""
    ratio, kept = info["flops_ratio"], info["kept_fraction"]
    head = f"  original model: {info['original_gflops']:.3f} GFLOPs/sample -> "
    if ratio <= 1:
        return [head + f"{1 - ratio:.1%} fewer FLOPs than the original ({1 / ratio:.2f}x less) "
                       f"at this kept fraction ({kept:.1%})"]
    p, target = wrapped.backbone.patch_size, 1 / wrapped.budget.target_ratio
    patches = tokens // p ** len(wrapped.grid)
    backbone = sum(v for k, v in report.by_component.items() if k.startswith("backbone")) / report.batch
    scaffold = report.per_sample - backbone
    lines = [head + f"{ratio:.2f}x the FLOPs of the original at this kept fraction ({kept:.1%})",
             f"  why more: the P=1 scaffold (encoder, router, de-chunk, decoder, conditioning) runs on all {tokens} "
             f"tokens: {scaffold / 1e9:.3f} GFLOPs, {scaffold / report.per_sample:.0%} of the wrapped model's, whatever "
             f"the router keeps (it weighs less against a deeper backbone than these {len(wrapped.blocks)} blocks)"]
    if kept * tokens > patches:
        lines.append(f"  and the backbone runs on {kept * tokens:.0f} kept tokens per sample where the original runs on "
                     f"{patches} patches of {p}x{p} (fewer only below {patches / tokens:.0%} kept)")
    if kept > target:
        lines.append(f"  the router keeps more than its target 1/N = {target:.0%}, as an untrained router does: "
                     "training with the ratio loss pulls it there, and rho tail-drops more at inference")
    return lines
