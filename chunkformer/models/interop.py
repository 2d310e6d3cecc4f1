"""Checkpoint interop: other releases' state dicts in and out of chunkformer's models.

=====================================  ======================================  =====================
layout                                 into chunkformer                        back out
=====================================  ======================================  =====================
original DiT release (and forks)       :func:`from_original_dit` -> ``DiT``    :func:`to_original_dit`
diffusers ``DiTTransformer2DModel``    :func:`from_diffusers` -> ``DiT``       :func:`to_diffusers`
authors' DC-DiT release (``hnet.*``)   :func:`from_reference_dcdit` -> ``DCDiT``
=====================================  ======================================  =====================

Each ``from_*`` takes a state dict (or a local path: ``.pt``/``.pth``/``.safetensors``, or a
diffusers folder with ``config.json``) and returns a ready model whose outputs match the
source model's (tested to float32 rounding; the DC-DiT release runs attention in bf16, so
against it the match is to bf16 rounding). Nothing is downloaded. Head counts are not stored
in weights: they come from the registered sizes (``MODEL_SIZES``) unless given.

    dit = from_original_dit("DiT-XL-2-256x256.pt")                  # a local file
    state = to_original_dit(dit)                                     # and back, same keys
"""

import json
import math
import re
from pathlib import Path

import torch

from ..grid import sincos_table
from .checkpoint import load_safetensors_file, load_torch_file
from .dcdit import DCDiT
from .dit import DiT

__all__ = [
    "from_original_dit",
    "to_original_dit",
    "from_diffusers",
    "to_diffusers",
    "from_reference_dcdit",
    "reference_dcdit_key_map",
    "reference_dcdit_config",
    "load_state_dict",
]


def load_state_dict(source) -> dict:
    """A state dict from a dict, a ``.safetensors`` file, or a ``torch.save`` file (EMA preferred)."""
    if isinstance(source, dict):
        state = source
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pt")) + sorted(path.glob("*.bin"))
            if not files:
                raise FileNotFoundError(f"no .safetensors / .pt / .bin weights in {path}")
            path = files[0]
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (interop loads local files only)")
        if path.suffix == ".safetensors":
            state = load_safetensors_file(path)  # checked against a manifest.json beside it, when there is one
        else:  # weights_only=True: a pickle that asks to import or run code is refused, never executed
            state = load_torch_file(path, "state dict")
    for key in ("ema", "model", "state_dict"):  # training checkpoints
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def _heads(hidden: int, num_heads: int | None) -> int:
    if num_heads is not None:
        return num_heads
    from .registry import MODEL_SIZES

    for shape in MODEL_SIZES.values():
        if shape["hidden_size"] == hidden:
            return shape["num_heads"]
    raise ValueError(f"hidden size {hidden} is not a registered size: pass num_heads=")


def _depth(state: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not ids:
        raise KeyError(f"no keys start with {prefix!r}: not this layout")
    return max(ids) + 1


def _check_sincos(table: torch.Tensor, patch_grid: tuple[int, ...], what: str) -> None:
    ref = sincos_table(patch_grid, table.shape[-1])
    if not torch.allclose(table.reshape(ref.shape).float(), ref, atol=1e-4):
        raise ValueError(
            f"{what} is not the standard sin-cos table over {patch_grid}: chunkformer computes positions "
            "from coordinates and cannot load a learned table"
        )


def _require(state: dict, keys: list[str], layout: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"not a {layout} state dict: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")


# ---------------------------------------------------------------------------- original DiT
def from_original_dit(source, *, num_heads: int | None = None, **overrides) -> DiT:
    """A chunkformer ``DiT`` from an original-DiT-layout state dict (DiT, SiT, fast-DiT, ...)."""
    state = load_state_dict(source)
    _require(state, ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                     "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"], "original-DiT")
    w = state["x_embedder.proj.weight"]  # (d, C, P, P)
    hidden, in_ch, P = w.shape[0], w.shape[1], w.shape[2]
    ndim = w.ndim - 2
    L = state["pos_embed"].shape[1]
    side = round(L ** (1 / ndim))
    out = state["final_layer.linear.weight"].shape[0] // P**ndim
    config = dict(
        input_size=[side * P] * ndim, patch_size=P, in_channels=in_ch, hidden_size=hidden,
        depth=_depth(state, "blocks."), num_heads=_heads(hidden, num_heads),
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1, class_dropout_prob=0.1,
        learn_sigma=out == 2 * in_ch,
    )
    config.update(overrides)
    _check_sincos(state["pos_embed"], (side,) * ndim, "pos_embed")
    model = DiT(**config)
    renamed = {}
    for k, v in state.items():
        if k == "pos_embed":
            continue
        k = k.replace("x_embedder.proj.", "x_embedder.").replace("final_layer.adaLN_modulation.1.",
                                                                    "final_layer.modulation.")
        renamed[k] = v
    model.load_state_dict(renamed)
    return model


def to_original_dit(model: DiT) -> dict:
    """``model``'s weights under the original DiT release's key names (``pos_embed`` included)."""
    state = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^x_embedder\.", "x_embedder.proj.", k).replace("final_layer.modulation.",
                                                                     "final_layer.adaLN_modulation.1.")
        state[k] = v.detach().clone()
    patch_grid = tuple(s // model.patch_size for s in model.grid)
    state["pos_embed"] = sincos_table(patch_grid, model.hidden_size)[None]
    return state


# ---------------------------------------------------------------------------- diffusers
def _diffusers_source(source):
    """(state, config) from a DiTTransformer2DModel, a folder, or a (state, config) pair."""
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        return source.state_dict(), dict(source.config)
    if isinstance(source, tuple):
        return load_state_dict(source[0]), dict(source[1])
    path = Path(source)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers model folder (no config.json)")
    return load_state_dict(path), json.loads((path / "config.json").read_text())


_DIFFUSERS_BLOCK = {  # ours -> diffusers, inside block i
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_DIFFUSERS_TOP = {
    "x_embedder": "pos_embed.proj",
    "final_layer.modulation": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_DIFFUSERS_EMB = {  # ours -> diffusers, inside block i's norm1.emb
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
    "y_embedder.embedding_table": "class_embedder.embedding_table",
}


def from_diffusers(source, *, per_block_embedders: str = "error") -> DiT:
    """A chunkformer ``DiT`` from diffusers' ``DiTTransformer2DModel`` (model, folder, or (state, config)).

    diffusers gives every block its own timestep / label embedder; converted DiT checkpoints hold
    identical copies, which become chunkformer's single ``t_embedder`` / ``y_embedder``. If the
    copies differ (a model trained in diffusers), ``per_block_embedders="first"`` keeps block 0's
    (the output then differs from diffusers'); the default raises.
    """
    state, cfg = _diffusers_source(source)
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or not cfg.get("attention_bias", True):
        raise ValueError("only DiTTransformer2DModel with norm_type='ada_norm_zero' and attention biases converts")
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    in_ch = cfg.get("in_channels", 4)
    out_ch = cfg.get("out_channels") or in_ch
    table = state["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]
    depth = _depth(state, "transformer_blocks.")
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"out_channels={out_ch} must be in_channels or 2 * in_channels (learned sigma)")
    model = DiT(
        input_size=cfg["sample_size"], patch_size=cfg["patch_size"], in_channels=in_ch, hidden_size=hidden,
        depth=depth, num_heads=cfg["num_attention_heads"], num_classes=cfg["num_embeds_ada_norm"],
        class_dropout_prob=0.1 if table.shape[0] > cfg["num_embeds_ada_norm"] else 0.0,
        learn_sigma=out_ch == 2 * in_ch, freq_shift=1.0, mlp_norm_eps=cfg.get("norm_eps", 1e-5),
    )
    ours = {}
    for k in model.state_dict():
        src = _to_diffusers_key(k)
        if isinstance(src, tuple):  # fused qkv
            ours[k] = torch.cat([state[s] for s in src])
        else:
            ours[k] = state[src]
    for i in range(1, depth):
        for mine, theirs in _DIFFUSERS_EMB.items():
            for suffix in (("weight",) if "embedding" in mine else ("weight", "bias")):
                a = state[f"transformer_blocks.0.norm1.emb.{theirs}.{suffix}"]
                b = state[f"transformer_blocks.{i}.norm1.emb.{theirs}.{suffix}"]
                if not torch.equal(a, b) and per_block_embedders == "error":
                    raise ValueError(
                        f"block {i}'s timestep/label embedder differs from block 0's: chunkformer's DiT has one. "
                        "Pass per_block_embedders='first' to keep block 0's (outputs will differ from diffusers'), "
                        "or wrap the diffusers model with chunkformer.wrap instead"
                    )
    model.load_state_dict(ours)
    return model


def _to_diffusers_key(key: str):
    """Our key -> diffusers key (a tuple of three for the fused qkv)."""
    m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m:
        i, name, kind = m.groups()
        if name == "attn.qkv":
            return tuple(f"transformer_blocks.{i}.attn1.to_{x}.{kind}" for x in "qkv")
        return f"transformer_blocks.{i}.{_DIFFUSERS_BLOCK[name]}.{kind}"
    name, kind = key.rsplit(".", 1)
    if name in _DIFFUSERS_EMB:
        return f"transformer_blocks.0.norm1.emb.{_DIFFUSERS_EMB[name]}.{kind}"
    return f"{_DIFFUSERS_TOP[name]}.{kind}"


def to_diffusers(model: DiT) -> tuple[dict, dict]:
    """``(config, state_dict)`` for diffusers' ``DiTTransformer2DModel(**config)``.

    The embedders are copied into every block. Exact only for a
    ``DiT`` with ``freq_shift=1`` and ``mlp_norm_eps = config["norm_eps"]`` (as ``from_diffusers``
    builds); other DiTs convert with diffusers' slightly different timestep frequencies.
    """
    if model.ndim != 2 or model.grid[0] != model.grid[1]:
        raise ValueError(f"diffusers' DiTTransformer2DModel is square 2D; this DiT's grid is {model.grid}")
    heads = model.blocks[0].attn.num_heads
    config = {
        "num_attention_heads": heads, "attention_head_dim": model.hidden_size // heads,
        "in_channels": model.in_channels, "out_channels": model.out_channels, "num_layers": len(model.blocks),
        "sample_size": model.grid[0], "patch_size": model.patch_size, "num_embeds_ada_norm": model.y_embedder.num_classes,
        "norm_eps": model.blocks[0].norm2.eps,
    }
    state = {}
    d = model.hidden_size
    for k, v in model.state_dict().items():
        dst = _to_diffusers_key(k)
        if isinstance(dst, tuple):
            for name, part in zip(dst, v.split(d)):
                state[name] = part.clone()
        elif dst.startswith("transformer_blocks.0.norm1.emb."):
            for i in range(len(model.blocks)):
                state[dst.replace("transformer_blocks.0.", f"transformer_blocks.{i}.")] = v.clone()
        else:
            state[dst] = v.clone()
    return config, state  # diffusers rebuilds its position table (a non-persistent buffer)


# ---------------------------------------------------------------------------- the authors' DC-DiT release
def reference_dcdit_key_map(keys) -> dict[str, str]:
    """Release key -> chunkformer ``DCDiT`` key, for every key but ``pos_embed`` (recomputed)."""
    rules = [
        (r"^x_embedder\.proj\.", "encoder.embed."),
        (r"^hnet\.(encoder|decoder)\.layers\.(\d+)\.cond_proj\.1\.", r"\1.blocks.\2.cond."),
        (r"^hnet\.(encoder|decoder)\.layers\.(\d+)\.skip_proj\.", r"\1.blocks.\2.skip."),
        (r"^hnet\.(encoder|decoder)\.layers\.", r"\1.blocks."),
        (r"^hnet\.(encoder|decoder)\.rmsnorm\.", r"\1.norm."),
        (r"^hnet\.main_network\.main_network\.layers\.", "blocks."),
        (r"^hnet\.main_network\.main_network\.rmsnorm\.", "norm."),
        (r"^hnet\.routing_module\.context_predictor\.", "router.predictor."),
        (r"^hnet\.routing_module\.residual_scorer\.", "router.scorer."),
        (r"^hnet\.routing_module\.", "router."),
        (r"^hnet\.residual_proj\.", "decoder.residual."),
        (r"^final_layer\.adaLN_modulation\.1\.", "decoder.final.modulation."),
        (r"^final_layer\.linear\.", "decoder.final.linear."),
        (r"^(t_embedder|y_embedder)\.", r"\1."),
    ]
    out = {}
    for key in keys:
        if key == "pos_embed":
            continue
        for pattern, repl in rules:
            if re.match(pattern, key):
                out[key] = re.sub(pattern, repl, key)
                break
        else:
            raise KeyError(f"unexpected key {key!r} in a DC-DiT release state dict")
    return out


def reference_dcdit_config(shapes: dict, *, num_heads: int | None = None, sigma: float = 1.0) -> dict:
    """``DCDiT`` keyword arguments for a release state dict, from its key -> shape map alone."""
    _require(shapes, ["x_embedder.proj.weight", "pos_embed", "hnet.routing_module.proj.weight",
                      "hnet.residual_proj.weight", "final_layer.linear.weight"], "DC-DiT release")
    if any(k.startswith("hnet.main_network.main_network.main_network") for k in shapes):
        raise ValueError("multi-stage (nested) DC-DiT checkpoints are not supported: one chunking stage only")
    width, in_ch = tuple(shapes["x_embedder.proj.weight"])[:2]  # (width, C, 3, 3)
    hidden = tuple(shapes["t_embedder.mlp.2.weight"])[0]
    route = tuple(shapes["hnet.residual_proj.weight"])[0]
    if route != hidden:
        raise ValueError(f"the release's routed width ({route}) differs from the backbone width ({hidden}); "
                         "chunkformer's DCDiT routes at the backbone width")
    side = math.isqrt(tuple(shapes["pos_embed"])[1])
    out = tuple(shapes["final_layer.linear.weight"])[0]
    return dict(
        input_size=side, in_channels=in_ch, hidden_size=hidden,
        depth=_depth(shapes, "hnet.main_network.main_network.layers."), num_heads=_heads(hidden, num_heads),
        num_classes=tuple(shapes["y_embedder.embedding_table.weight"])[0] - 1, class_dropout_prob=0.1,
        learn_sigma=out == 2 * in_ch, router="predictability",
        encoder_depth=_depth(shapes, "hnet.encoder.layers."), decoder_depth=_depth(shapes, "hnet.decoder.layers."),
        scaffold_width=width, sigma=sigma, smoothing="dense",
    )


def from_reference_dcdit(source, *, num_heads: int | None = None, sigma: float = 1.0, **overrides) -> DCDiT:
    """A chunkformer ``DCDiT`` from a state dict of the authors' release (AMD-AGI/DynamicChunkingDiT).

    Single-stage (one chunking level) 2D models with the spatial-predictability router, as the
    release's configs build. ``sigma``: the release's ``dechunk_kernel_sigma`` (not in the weights).
    Smoothing defaults to the dense form the release uses (``smoothing="windowed"`` is the
    linear-cost equivalent up to its truncation).
    """
    state = load_state_dict(source)
    config = reference_dcdit_config({k: v.shape for k, v in state.items()}, num_heads=num_heads, sigma=sigma)
    config.update(overrides)
    side = config["input_size"]
    _check_sincos(state["pos_embed"], (side, side), "pos_embed")
    model = DCDiT(**config)
    mapping = reference_dcdit_key_map(state)
    model.load_state_dict({mapping[k]: v for k, v in state.items() if k in mapping})
    return model
