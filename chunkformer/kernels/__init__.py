"""GPU fast paths for sampling, applied to a built model and removed again.

    import chunkformer as cf
    from chunkformer import kernels

    model = cf.create_model("DC-DiT-XL").cuda().eval()
    kernels.apply(model)              # {"norms": 13, "taps": 1, "gemm": 4, "gelu": 28, "attention": 28}
    ...                               # sample (compiled or eager), as before
    kernels.remove(model)             # the plain model again

:func:`apply` swaps the class of each layer it speeds up for a subclass that computes the same function
through a faster route on a GPU, and :func:`remove` swaps it back (as tomesd patches a diffusion model):
the parameters, buffers and state-dict keys stay those of the plain model, and outputs agree to bf16
rounding. The fast paths and their plain-PyTorch counterparts:

===============  ===========================================================  ================================
name             fast path (sampling on CUDA: no grad)                        plain layer
===============  ===========================================================  ================================
``norms``        Triton GroupNorm statistics + normalising pass with the      ``nn.GroupNorm`` + SiLU,
                 conditioning, conv bias and SiLU folded in (compiled);       ``RMSNorm`` after the last
                 the encoder's residual sum inside its RMSNorm                 ResBlock
``taps``         a narrowing 3x3 conv as one GEMM of its taps + a Triton      ``nn.Conv2d`` (cuDNN)
                 shifted sum (on for ``TAPS_FASTER`` by default)
``gemm``         a 1x1 conv on a channels-last grid as one GEMM               ``nn.Conv2d`` (cuDNN)
``gelu``         the MLP's GELU in fc1's GEMM epilogue                         ``Linear -> GELU -> Linear``
``attention``    a Triton attention forward for short unmasked sequences;     ``F.scaled_dot_product_attention``
                 with ``set_prefix_attention(True)``, a compiled training
                 step's key-masked attention through FlexAttention (a block
                 mask from the kept lengths: ``prefix_attention``)
===============  ===========================================================  ================================

Every fast path checks its conditions at each call and otherwise runs the plain layer's computation, so
a patched model still trains (with grad it takes torch's paths) and runs on the CPU. The switches below
(``set_*``) change a patched model's choices; :func:`set_short_attention`, :func:`set_prefix_attention` and
:func:`set_fp32_router_dechunk` are this package's only process-wide / policy switches.
"""

import warnings

from torch import nn

from ..models.dit import Attention as PlainAttention
from ..models.dit import Mlp as PlainMlp
from ..precision import RMSNorm as PlainRMSNorm
from ..routing import Router
from ..scaffold import ChunkEncoder as PlainChunkEncoder
from ..scaffold import DeChunkDecoder
from ..scaffold import ResBlock as PlainResBlock
from .gelu import Mlp as KernelMlp
from .norms import GroupNorm as KernelGroupNorm
from .norms import RMSNorm as KernelRMSNorm
from .prefix_attention import set_prefix_attention
from .scaffold import ChunkEncoder as KernelChunkEncoder
from .scaffold import ResBlock as KernelResBlock
from .short_attention import Attention as KernelAttention
from .short_attention import set_short_attention
from .tapconv import TAPS_FASTER, PointwiseConv2d, TapConv2d

__all__ = [
    "FAST_PATHS",
    "apply",
    "remove",
    "applied",
    "set_norm_kernels",
    "set_taps_narrowing",
    "set_fused_gelu",
    "set_short_attention",
    "set_prefix_attention",
    "set_fp32_router_dechunk",
]

FAST_PATHS: tuple[str, ...] = ("norms", "taps", "gemm", "gelu", "attention")

# the per-instance settings apply() and the set_* switches write; remove() deletes them
_SETTINGS = ("use_kernel", "fused_silu")


def _swap(module: nn.Module, cls: type) -> None:
    module.__class__ = cls


def _scaffold_modules(model: nn.Module):
    """Every submodule of a chunkformer scaffold (encoder, decoder, router) in ``model``, each once."""
    seen = set()
    for root in model.modules():
        if isinstance(root, (PlainChunkEncoder, DeChunkDecoder, Router)):
            for m in root.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    yield m


def apply(
    model: nn.Module,
    *,
    norms: bool = True,
    taps: bool | None = None,
    gemm: bool = True,
    gelu: bool = True,
    attention: bool = True,
    force: bool = False,
) -> dict[str, int]:
    """Swap ``model``'s layers for their GPU fast paths in place; returns how many layers each path took.

    ``taps=None`` takes the taps path only for the conv shapes in ``TAPS_FASTER`` (``True``: every
    narrowing 3x3 conv; ``False``: none). Every fast path runs on CUDA only: on a model with no parameter on
    CUDA this warns and changes nothing (returns ``{}``), unless ``force`` (tests, Triton's interpreter).
    Calling it again first removes the earlier patch. Apply it after ``model.to("cuda")`` (a class swap
    survives ``.to()``, ``state_dict()`` and ``load_state_dict()``)."""
    if not force and not any(p.is_cuda for p in model.parameters()):
        warnings.warn(
            "chunkformer.kernels.apply: the model has no parameter on CUDA and every fast path here runs on "
            "CUDA only, so nothing was applied; move the model to the GPU first (force=True swaps the layers anyway)",
            stacklevel=2,
        )
        return {}
    remove(model)
    counts = dict.fromkeys(FAST_PATHS, 0)
    for m in list(_scaffold_modules(model)):
        kind = type(m)
        if norms and kind is nn.GroupNorm:
            _swap(m, KernelGroupNorm)
            counts["norms"] += 1
        elif norms and kind is PlainResBlock:
            _swap(m, KernelResBlock)
        elif norms and kind is PlainChunkEncoder:
            _swap(m, KernelChunkEncoder)
            if type(m.norm) is PlainRMSNorm:
                _swap(m.norm, KernelRMSNorm)
                counts["norms"] += 1
        elif gemm and PointwiseConv2d.fits(m):
            _swap(m, PointwiseConv2d)
            counts["gemm"] += 1
    for m in model.modules():
        if isinstance(m, PlainResBlock) and TapConv2d.fits(m.conv1) and m.conv1.in_channels > m.conv1.out_channels:  # noqa: E501
            shape = (m.conv1.in_channels, m.conv1.out_channels)
            on = shape in TAPS_FASTER if taps is None else bool(taps)
            if on:
                _swap(m.conv1, TapConv2d)
                counts["taps"] += 1
        if norms and isinstance(m, Router) and m.kind == "predictability":
            norm, act = m.scorer[1], m.scorer[2]
            if isinstance(norm, KernelGroupNorm) and type(act) is nn.SiLU:
                norm.fused_silu = True  # the SiLU runs inside the norm's normalising pass
                _swap(act, _FusedAway)
        if gelu and type(m) is PlainMlp:
            _swap(m, KernelMlp)
            counts["gelu"] += 1
        if attention and type(m) is PlainAttention:
            _swap(m, KernelAttention)
            counts["attention"] += 1
    return {k: v for k, v in counts.items() if v}


class _FusedAway(nn.SiLU):
    """An activation that the layer before it applies (the identity); :func:`remove` makes it ``nn.SiLU`` again."""

    plain_class = nn.SiLU

    def forward(self, x):
        return x


def remove(model: nn.Module) -> int:
    """Undo :func:`apply`: every swapped layer of ``model`` gets its plain class back (and loses the settings
    the ``set_*`` switches gave it). Returns the number of layers restored; 0 for a model never patched."""
    restored = 0
    for m in model.modules():
        plain = getattr(type(m), "plain_class", None)
        if plain is not None and type(m).__module__.startswith(__name__):
            _swap(m, plain)
            for key in _SETTINGS:
                m.__dict__.pop(key, None)
            restored += 1
    return restored


def applied(model: nn.Module) -> dict[str, int]:
    """How many layers of ``model`` run each fast path now (what :func:`apply` returned)."""
    counts = dict.fromkeys(FAST_PATHS, 0)
    for m in model.modules():
        if isinstance(m, (KernelGroupNorm, KernelRMSNorm)):
            counts["norms"] += 1
        elif isinstance(m, TapConv2d):
            counts["taps"] += 1
        elif isinstance(m, PointwiseConv2d):
            counts["gemm"] += 1
        elif isinstance(m, KernelMlp):
            counts["gelu"] += 1
        elif isinstance(m, KernelAttention):
            counts["attention"] += 1
    return {k: v for k, v in counts.items() if v}


def _set(model: nn.Module, classes: tuple[type, ...], enabled: bool, what: str) -> int:
    layers = [m for m in model.modules() if isinstance(m, classes)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no {what}: call chunkformer.kernels.apply(model) first "
                         "(on a model with that layer)")
    for m in layers:
        m.use_kernel = bool(enabled)
    return len(layers)


def set_norm_kernels(model: nn.Module, enabled: bool) -> int:
    """Turn the Triton norm paths of a patched ``model`` on or off (its GroupNorms and the encoder's residual
    RMSNorm). Returns the number of norms set; raises if ``model`` has none.

        import chunkformer as cf, chunkformer.kernels as kernels
        model = cf.create_model("DC-DiT-S", input_size=16, depth=1)
        kernels.apply(model, force=True)
        assert kernels.set_norm_kernels(model, False) == 10  # 9 GroupNorms (scaffold, router), 1 RMSNorm
    """
    return _set(model, (KernelGroupNorm, KernelRMSNorm), enabled, "kernel GroupNorm or RMSNorm")


def set_taps_narrowing(model: nn.Module, enabled: bool | None) -> int:
    """Choose the path of every narrowing 3x3 conv in a patched ``model`` (the decoder's first): ``True`` the
    taps when sampling on a GPU, ``False`` cuDNN, ``None`` the default (taps for ``TAPS_FASTER``).
    Swaps the convs as :func:`apply` does. Returns the number of convs set; raises if ``model`` has none."""
    convs = [m.conv1 for m in model.modules() if isinstance(m, PlainResBlock)
             and (isinstance(m.conv1, TapConv2d) or TapConv2d.fits(m.conv1))
             and m.conv1.in_channels > m.conv1.out_channels]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no narrowing 3x3 conv: only 2-D scaffolds with a narrowing "
                         "ResBlock (DC-DiT's decoder) have one")
    for conv in convs:
        _swap(conv, TapConv2d)
        default = (conv.in_channels, conv.out_channels) in TAPS_FASTER
        conv.use_kernel = default if enabled is None else bool(enabled)
    return len(convs)


def set_fused_gelu(model: nn.Module, enabled: bool) -> int:
    """Choose where every patched MLP in ``model`` runs its GELU when sampling on a GPU in half precision:
    ``True`` in fc1's GEMM epilogue, ``False`` as its own pass. Returns the number of MLPs set."""
    return _set(model, (KernelMlp,), enabled, "kernel Mlp")


def set_fp32_router_dechunk(model: nn.Module, enabled: bool) -> int:
    """Run every router and de-chunk in ``model`` in fp32 with autocast off (``True``, DC-DiT's policy)
    or under the caller's autocast (``False``: bf16 GEMMs; ``p`` moves by about bf16's rounding). What
    ``fp32_router_dechunk=`` sets at construction, for a model already built or loaded; a captured ``config``
    is updated to match. Weights stay fp32 either way. Returns the number of layers switched; raises if
    ``model`` has none.

        import chunkformer as cf
        from chunkformer.kernels import set_fp32_router_dechunk
        model = cf.create_model("DC-DiT-S", input_size=16, depth=1)
        assert set_fp32_router_dechunk(model, False) == 2 and model.config["fp32_router_dechunk"] is False
    """
    layers = [m for m in model.modules() if isinstance(m, (Router, DeChunkDecoder))]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Router or DeChunkDecoder: only DC-DiT models and "
                         "chunkformer.wrap(...) models route and de-chunk")
    for layer in layers:
        layer.fp32 = bool(enabled)
    for m in model.modules():
        config = getattr(m, "config", None)
        if isinstance(config, dict) and "fp32_router_dechunk" in config:
            config["fp32_router_dechunk"] = bool(enabled)
    return len(layers)
