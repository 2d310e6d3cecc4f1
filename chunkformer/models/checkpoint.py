"""Model configs and checkpoints: config-capturing constructors, safetensors + JSON on disk.

    save_pretrained(model, "runs/dcdit-s")          # model.safetensors + config.json
    model = create_model("runs/dcdit-s")             # rebuilt from config.json, weights loaded

State dicts saved from ``torch.compile`` (``_orig_mod.``) or DDP/FSDP (``module.``)
wrappers load cleanly: :func:`clean_state_dict` strips those prefixes.

Nothing here runs code from a file: weights are safetensors, and ``torch.save`` files are read
with ``torch.load(weights_only=True)`` only (tensors, numbers, strings, lists, dicts), so a pickle
that asks for anything else is refused (:class:`UnsafeCheckpointError`). Every folder written here
records the sha256 of each file in ``manifest.json``; loading verifies it when present and names
the damaged file (:class:`CorruptCheckpointError`).
"""

import hashlib
import inspect
import json
import os
import pickle
from pathlib import Path

import torch
from torch import nn

__all__ = ["capture_config", "clean_state_dict", "save_pretrained", "save_weights", "load_weights", "CONFIG_NAME",
           "WEIGHTS_NAME", "MANIFEST_NAME", "CorruptCheckpointError", "UnsafeCheckpointError", "load_torch_file",
           "load_safetensors_file", "sha256_file", "write_manifest", "verify_manifest"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
EMA_NAME = "ema.safetensors"  # in a training checkpoint folder (recipes.checkpoints), preferred by load_weights


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is damaged: its bytes differ from the sha256 recorded when it was written,
    it is missing from its folder, or it cannot be parsed."""


class UnsafeCheckpointError(ValueError):
    """A pickled ``torch.save`` file that asks to import or call something besides tensors and containers."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: str | Path, names: list[str]) -> Path:
    """Record the sha256 and size of ``directory/name`` for each name in ``directory/manifest.json``, atomically."""
    directory = Path(directory)
    files = {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size} for n in sorted(names)}
    tmp = directory / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"hash": "sha256", "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(directory / MANIFEST_NAME)
    return directory / MANIFEST_NAME


def verify_manifest(directory: str | Path, names: list[str] | None = None, *, required: bool = False) -> bool:
    """Check ``names`` (default: every file listed) against ``directory/manifest.json``.

    Returns ``False`` when there is no manifest (and ``required`` is off), ``True`` when every file matches;
    raises :class:`CorruptCheckpointError` naming the first file that is missing or differs.
    """
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        if required:
            raise CorruptCheckpointError(f"{directory} has no {MANIFEST_NAME}: the checkpoint is incomplete (a write "
                                         "that did not finish?) and cannot be verified. Use an earlier checkpoint.")
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{manifest} is damaged ({err}); the files beside it cannot be verified. "
                                     "Use an earlier checkpoint or copy this one again.") from None
    for name in names if names is not None else list(files):
        path = directory / name
        if name not in files:
            continue  # not written with this folder (e.g. a file added by hand): nothing to check against
        if not path.is_file():
            raise CorruptCheckpointError(f"{path} is listed in {manifest} but missing. Copy the whole folder again "
                                         "or use an earlier checkpoint.")
        if sha256_file(path) != files[name]["sha256"]:
            raise CorruptCheckpointError(
                f"{path} is damaged: its sha256 differs from the one recorded in {manifest} when it was written "
                f"({path.stat().st_size} bytes now, {files[name]['bytes']} then). Copy it again from where it came "
                "from, or use an earlier checkpoint (train.resume=auto skips damaged ones).")
    return True


def _numpy_array_globals() -> list:
    """The allow-list beyond torch's own: what a pickled numpy array of numbers needs (a training checkpoint's
    ``np.random.get_state()``). Rebuilding an array runs no code of the file's choosing."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    names = ("UInt32DType", "Int32DType", "Int64DType", "UInt64DType", "Float32DType", "Float64DType", "BoolDType")
    return allowed + [getattr(dtypes, n) for n in names if dtypes is not None and hasattr(dtypes, n)]


def load_torch_file(path: str | Path, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only.

    Beyond torch's allow-list only numpy arrays of numbers are rebuilt (an RNG state). A pickle that asks for
    any other global (a ``__reduce__`` payload, custom classes) is
    refused with :class:`UnsafeCheckpointError` before anything of it runs; an unreadable file raises
    :class:`CorruptCheckpointError`. Both name the file and what to do.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [x.strip() for x in str(err).splitlines() if x.strip()]
        detail = [x for x in lines if not x.startswith(("Weights only load failed", "Please file an issue",
                                                         "Check the documentation"))]
        reason = next((x for x in detail if "global" in x.lower()), detail[0] if detail else "unreadable pickle")
        if "global" not in reason.lower():  # not a refused import: a damaged or foreign file
            raise CorruptCheckpointError(f"{path}: not a readable torch.save {what} ({reason}). The file is damaged "
                                         "or not a checkpoint; copy it again or use another.") from None
        raise UnsafeCheckpointError(
            f"{path}: refused to load this pickled {what}: it asks to import or run code ({reason}). chunkformer "
            "reads .pt/.pth files with torch.load(weights_only=True) only (tensors, numbers, strings, lists, "
            "dicts), because unpickling anything else can execute code. Ask its source for the weights as a "
            "safetensors file (safetensors.torch.save_file or cf.save_pretrained), or for a .pt that holds only "
            "a dict of tensors.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CorruptCheckpointError(f"{path}: not a readable torch.save {what} ({detail}). The file is truncated, "
                                     "damaged or not a checkpoint; copy it again or use another.") from None


def load_safetensors_file(path: str | Path, *, verify: bool = True) -> dict:
    """``safetensors.torch.load_file`` after checking ``path`` against the manifest beside it (when one lists it;
    ``verify=False`` when the caller has); a file that does not parse raises :class:`CorruptCheckpointError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if verify:
        verify_manifest(path.parent, [path.name])
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({err}). The file is truncated or "
                                     "damaged; copy it again or use another.") from None
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
    (directory / MANIFEST_NAME).unlink(missing_ok=True)  # a manifest never describes other weights
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(_unshared(state), str(tmp), metadata={"format": "pt"})
    _fsync_file(tmp)
    _chmod_like_umask(tmp)
    tmp.replace(directory / WEIGHTS_NAME)  # atomic: never a half-written checkpoint
    write_manifest(directory, [WEIGHTS_NAME])
    return directory


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _chmod_like_umask(path: Path) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` would (safetensors' writer may not follow the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _unshared(state: dict) -> dict:
    """Clone tensors that share storage with an earlier one (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for key, value in state.items():
        ptr = (value.untyped_storage().data_ptr(), value.device) if value.numel() else None
        out[key] = value.clone() if ptr in seen else value
        if ptr is not None:
            seen.add(ptr)
    return out


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (``model.config``) into ``directory``."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    if not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no .config; save_pretrained needs a chunkformer model")
    directory = save_weights(model, directory)
    (directory / MANIFEST_NAME).unlink()
    (directory / CONFIG_NAME).write_text(json.dumps(model.config, indent=2))
    write_manifest(directory, [WEIGHTS_NAME, CONFIG_NAME])
    return directory


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load a ``.safetensors`` or ``torch.save`` state dict (wrapper prefixes stripped) into ``model``.

    ``path`` may be a file, a ``save_pretrained`` folder, or a training checkpoint folder
    (``results/<run>/checkpoints/step-NNNNNNN``, whose EMA weights are loaded). Files are checked against
    the folder's ``manifest.json`` when there is one; ``.pt`` files load with ``weights_only=True`` only.
    """
    path = Path(path)
    if path.is_dir():
        path = path / (EMA_NAME if (path / EMA_NAME).is_file() else WEIGHTS_NAME)
    if path.suffix == ".safetensors":
        state = load_safetensors_file(path)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        state = load_torch_file(path, "state dict")
        for key in ("ema", "model", "state_dict"):  # training checkpoints: prefer EMA weights
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    model.load_state_dict(clean_state_dict(state), strict=strict)
    return model
