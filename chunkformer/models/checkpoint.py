"""Model configs and checkpoints: config-capturing constructors, safetensors + JSON on disk.

    save_pretrained(model, "runs/dcdit-s")          # model.safetensors + config.json
    model = create_model("runs/dcdit-s")             # rebuilt from config.json, weights loaded

State dicts saved from ``torch.compile`` (``_orig_mod.``) or DDP/FSDP (``module.``)
wrappers load cleanly: :func:`clean_state_dict` strips those prefixes.
"""

import inspect
import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["capture_config", "clean_state_dict", "save_pretrained", "save_weights", "load_weights", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def capture_config(init_locals: dict) -> dict:
    """The constructor's keyword arguments (from ``locals()``), JSON-ready; device/dtype dropped."""
    cls = init_locals["__class__"] if "__class__" in init_locals else type(init_locals["self"])
    params = inspect.signature(cls.__init__).parameters
    config = {}
    for name in params:
        if name in ("self", "device", "dtype") or name not in init_locals:
            continue
        value = init_locals[name]
        config[name] = list(value) if isinstance(value, tuple) else value
    return {"class": cls.__name__, **config}


def clean_state_dict(state_dict: dict) -> dict:
    """Strip ``torch.compile`` / DDP wrapper prefixes from every key (at any depth)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def save_weights(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` (wrapper prefixes stripped) into ``directory``, atomically.

    Any module: wrapped / upcycled models rebuild from their recipe, then :func:`load_weights`.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in clean_state_dict(model.state_dict()).items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS_NAME)  # atomic: never a half-written checkpoint
    return directory


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (``model.config``) into ``directory``."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    if not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no .config; save_pretrained needs a chunkformer model")
    directory = save_weights(model, directory)
    (directory / CONFIG_NAME).write_text(json.dumps(model.config, indent=2))
    return directory


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load a ``.safetensors`` or ``torch.save`` state dict (wrapper prefixes stripped) into ``model``."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("ema", "model", "state_dict"):  # training checkpoints: prefer EMA weights
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    model.load_state_dict(clean_state_dict(state), strict=strict)
    return model
