"""FLOP counting in the DC-DiT paper's convention, from the tokens actually kept.

    report = count_flops(model, x, t, y, rho=0.4)
    report.total, report.per_sample, report.by_component["backbone attention"]
    report.tflops_per_image(steps=250)                       # a 250-step sampling run
    sampling_tflops(model, x, t, y, steps=250, guidance="lite")

Convention (what is counted, what is not):

* A multiply-add is 2 FLOPs. Every ``nn.Linear`` counts ``2 * rows * in * out`` and every
  convolution ``2 * out.numel() * in / groups * prod(kernel)``, with the shapes that ran
  (a packed backbone runs on ``T = sum_b M_b`` rows, not ``B * L``). Biases are not counted.
* Attention scores and mixing count ``H * sum_b M_b^2 * (4 d_head + 3)`` per layer: the
  paper's formula over each sample's *kept* length ``M_b`` (padding slots are not counted).
* De-chunk counts the residual projection ``2 L d^2`` and the smoothing's multiply-adds:
  the windowed form ``2 (d + 1) L S`` per grid axis of length ``S`` (one banded matmul per
  axis, zeros included as executed; about ``2 (d + 1) L (32 + 2 r^2 / 32)`` on axes cut into
  32-cell tiles), the dense form ``2 M^2 d``, per sample, for the form that
  ran (``"auto"`` resolved by :func:`~chunkformer.dechunk.resolve_smoothing`).
* Token merging (:mod:`chunkformer.merging`) counts its similarity search, ``2 M D d`` per
  sample and block (``D`` destination slots), under ``"merging"``; the blocks' own FLOPs fall
  with the tokens they run on.
* Not counted: normalisations, activations, residual adds, modulation arithmetic, index
  computations (sorting, gathers, nearest-token search) and embedding look-ups.

Against the paper's DiT rows (256px, 250 steps, no CFG) this convention lands 0.4-0.6%
above the published TFLOPs (DiT-XL/2: 59.33 vs 59.00); the paper's exact inclusion rules
are not published, and no constant here is tuned to close the gap. See docs/flops.md.
"""

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from . import attention as _attention
from .dechunk import blur_macs, resolve_smoothing, window_radius
from .scaffold import DeChunkDecoder

__all__ = ["FlopReport", "FlopCounter", "count_flops", "sampling_tflops", "COMPONENTS"]

_UNSET = object()

COMPONENTS: tuple[str, ...] = (
    "embed",
    "conditioning",
    "encoder",
    "router",
    "chunk",
    "backbone attention",
    "backbone MLP",
    "backbone modulation",
    "de-chunk",
    "decoder",
    "final layer",
    "merging",
    "other",
)


@dataclass
class FlopReport:
    """FLOPs of one forward pass.

    Attributes:
        total: FLOPs of the whole batch.
        per_sample: ``total / batch``.
        by_component: FLOPs per component (keys: :data:`COMPONENTS`).
        batch: samples in the forward pass.
        kept: ``(B,)`` tokens the backbone saw per sample (``None`` if unknown).
    """

    total: float
    per_sample: float
    by_component: dict[str, float] = field(default_factory=dict)
    batch: int = 1
    kept: torch.Tensor | None = None

    def tflops_per_image(self, steps: int = 250, *, cfg: bool = False) -> float:
        """TFLOPs per generated image for ``steps`` forward passes like this one (x2 with CFG)."""
        return self.per_sample * steps * (2 if cfg else 1) / 1e12

    def table(self) -> str:
        """The per-component breakdown as aligned text (GFLOPs per sample and share)."""
        rows = [f"{'component':<22}{'GFLOPs/sample':>15}{'share':>8}"]
        for name in COMPONENTS:
            value = self.by_component.get(name, 0.0)
            if value or name in ("chunk",):
                share = value / self.total if self.total else 0.0
                rows.append(f"{name:<22}{value / self.batch / 1e9:>15.3f}{share:>8.1%}")
        rows.append(f"{'total':<22}{self.per_sample / 1e9:>15.3f}{1:>8.0%}")
        return "\n".join(rows)


def _component(name: str) -> str:
    """Map a module's qualified name to a FLOP component (chunkformer, wrapped and diffusers names)."""
    parts = name.split(".")
    if parts[0] == "backbone":  # chunkformer.wrap: the adapter holds the blocks and embedders
        parts = parts[1:] or [""]
        name = ".".join(parts)
    head = parts[0]
    if head in ("x_embedder", "pos_embed") or name.startswith("encoder.embed"):
        return "embed"
    if head in ("t_embedder", "y_embedder", "cond_adaptor"):
        return "conditioning"
    if head == "encoder":
        return "encoder"
    if head == "router":
        return "router"
    if head in ("blocks", "transformer_blocks"):
        if "emb" in parts:  # diffusers: each block embeds (t, y) itself
            return "conditioning"
        if any(p.startswith("attn") for p in parts):
            return "backbone attention"
        if "mlp" in parts or "ff" in parts:
            return "backbone MLP"
        return "backbone modulation"
    if head in ("final_layer", "proj_out_1", "proj_out_2") or name.startswith("decoder.final"):
        return "final layer"
    if name.startswith("decoder.residual"):
        return "de-chunk"
    if head == "decoder":
        return "decoder"
    return "other"


def _linear_flops(module: nn.Linear, inputs, output) -> float:
    rows = output.numel() // module.out_features
    return 2.0 * rows * module.in_features * module.out_features


def _conv_flops(module: nn.modules.conv._ConvNd, inputs, output) -> float:
    kernel = math.prod(module.kernel_size)
    return 2.0 * output.numel() * (module.in_channels // module.groups) * kernel


def _attention_flops(heads: int, d_head: int, sum_sq: float) -> float:
    """Scores and mixing: ``H * sum_b M_b^2 * (4 d_head + 3)``."""
    return heads * sum_sq * (4 * d_head + 3)


def _foreign_attention_heads(module: nn.Module) -> int | None:
    """Head count of a timm-style (``qkv``, ``num_heads``) or diffusers (``to_q``, ``heads``)
    attention module whose forward does not go through :mod:`chunkformer.attention`."""
    if isinstance(module, _attention_modules()):
        return None
    if isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "num_heads", None), int):
        return module.num_heads
    if isinstance(getattr(module, "to_q", None), nn.Linear) and isinstance(getattr(module, "heads", None), int):
        return module.heads
    return None


def _attention_modules() -> tuple:
    from .models.dit import Attention

    return (Attention,)


def _dechunk_flops(module: DeChunkDecoder, args, kwargs, output) -> float:
    """Smoothing (the residual projection is an nn.Linear, counted by its own hook)."""
    plan = (args[1] if len(args) > 1 else kwargs["chunked"]).plan
    B, L, d = plan.order.shape[0], plan.num_tokens, module.dim
    flops = 0.0
    dtype = torch.float32 if module.fp32 else args[0].dtype  # the de-chunk's precision (DeChunkDecoder.merge)
    smoothing = resolve_smoothing(module.smoothing, plan.positions.shape[1], L, plan.positions.device, dtype)
    if smoothing == "none" or module.sigma <= 0:
        return flops
    if smoothing == "dense":
        return flops + 2.0 * float((plan.lengths.double() ** 2).sum()) * d
    # per grid axis of S cells, one banded (S, S) matmul over B (d + 1) L / S rows, or tile by tile
    radius = window_radius(module.sigma, module.truncate)
    device = plan.positions.device
    return flops + sum(2.0 * B * (d + 1) * L * blur_macs(size, radius, device) for size in plan.grid)


class FlopCounter:
    """Accumulate FLOPs (this module's convention) over every forward of ``model`` in a ``with`` block.

        with FlopCounter(model) as counter:
            samples = diffusion.sample(model_fn, shape)      # any number of forwards, CFG included
        counter.total / shape[0]                             # FLOPs per generated image
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tally: dict[str, float] = defaultdict(float)
        self._handles: list = []

    def _add(self, comp: str, value: float) -> None:
        self.tally[comp] += value

    def __enter__(self) -> "FlopCounter":
        # fast paths (chunkformer.kernels: layers with a use_kernel switch) may call a conv or a linear layer's
        # weights without its module, past these hooks: counted on the plain path, which has the same FLOPs
        self._fast = [(m, m.__dict__.get("use_kernel", _UNSET)) for m in self.model.modules()
                      if hasattr(m, "use_kernel")]
        for m, _ in self._fast:
            m.use_kernel = False
        for name, module in self.model.named_modules():
            comp = _component(name)
            if isinstance(module, nn.Linear):
                fn = _linear_flops
            elif isinstance(module, nn.modules.conv._ConvNd):
                fn = _conv_flops
            else:
                fn = None
            if fn is not None:
                self._handles.append(module.register_forward_hook(
                    lambda m, a, o, fn=fn, comp=comp: self._add(comp, fn(m, a, o))))
            heads = _foreign_attention_heads(module)
            if heads is not None:  # dense attention inside someone else's module: count from its input
                self._handles.append(module.register_forward_hook(
                    lambda m, a, k, o, heads=heads: self._add_dense_attention(heads, a, k), with_kwargs=True))
            if hasattr(module, "last_flops") and getattr(module, "takes_plan", False):  # token merging's search
                self._handles.append(module.register_forward_hook(
                    lambda m, a, o: self._add("merging", m.last_flops)))
            if isinstance(module, DeChunkDecoder):
                self._handles.append(module.register_forward_hook(
                    lambda m, a, k, o: self._add("de-chunk", _dechunk_flops(m, a, k, o)), with_kwargs=True))
        _attention._observers.append(self._observe_attention)  # chunkformer's attention calls
        return self

    def _observe_attention(self, heads: int, d_head: int, sum_sq: float) -> None:
        self._add("backbone attention", _attention_flops(heads, d_head, sum_sq))

    def _add_dense_attention(self, heads: int, args, kwargs) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        B, N, d = x.shape[0], x.shape[-2], x.shape[-1]
        self._add("backbone attention", _attention_flops(heads, d // heads, float(B * N**2)))

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m, setting in self._fast:  # back to the instance's own setting, or to its class's
            if setting is _UNSET:
                del m.use_kernel
            else:
                m.use_kernel = setting
        if self._observe_attention in _attention._observers:
            _attention._observers.remove(self._observe_attention)

    @property
    def by_component(self) -> dict[str, float]:
        return {name: float(self.tally.get(name, 0.0)) for name in COMPONENTS}

    @property
    def total(self) -> float:
        return sum(self.tally.values())


@torch.no_grad()
def count_flops(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                **forward_kwargs) -> FlopReport:
    """Run ``model(x, t, y, **forward_kwargs)`` once and count its FLOPs (see module docstring).

    Works on the ``meta`` device for models without data-dependent routing (plain DiTs),
    so paper-sized rows cost no memory.
    """
    with FlopCounter(model) as counter:
        result = model(x, t, y, return_info=True, **forward_kwargs)
    info = result[1] if isinstance(result, tuple) else None
    B = x.shape[0]
    return FlopReport(total=counter.total, per_sample=counter.total / B, by_component=counter.by_component,
                      batch=B, kept=info.kept if info is not None else None)


def sampling_tflops(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    steps: int = 250,
    guidance: str = "none",
    rho: float = 0.0,
    uncond_rho: float = 0.9,
) -> float:
    """TFLOPs per image of a ``steps``-step sampling run, from one representative forward.

    ``guidance``: ``"none"``; ``"cfg"`` (conditional and unconditional passes at ``rho``);
    or ``"lite"`` (Lite-CFG: the unconditional pass at ``uncond_rho``). The kept counts of
    a DC-DiT depend on ``x`` and ``t``: pass the states of a real trajectory for exact figures.
    """
    if guidance not in ("none", "cfg", "lite"):
        raise ValueError(f"guidance must be 'none', 'cfg' or 'lite', got {guidance!r}")
    kwargs = {"rho": rho} if getattr(model, "supports_chunking", False) else {}
    cond = count_flops(model, x, t, y, **kwargs).per_sample
    if guidance == "none":
        return cond * steps / 1e12
    null = getattr(model, "null_class", None)
    y_null = None if y is None or null is None else torch.full_like(y, null)
    if guidance == "lite" and getattr(model, "supports_chunking", False):
        kwargs = {"rho": uncond_rho}
    uncond = count_flops(model, x, t, y_null, **kwargs).per_sample
    return (cond + uncond) * steps / 1e12
