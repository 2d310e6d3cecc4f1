"""Training checkpoints: everything a resume needs, without pickle, written atomically, verified on load.

A checkpoint is a folder ``step-NNNNNNN/``:

- ``model.safetensors`` / ``ema.safetensors``: the training and EMA weights (state-dict keys, so
  ``cf.load_weights(model, "…/step-NNNNNNN")`` loads the EMA weights directly);
- ``opt.safetensors``: the optimiser's tensors (AdamW moments and step counts);
- ``rng.safetensors``: the torch CPU / CUDA generator states (uint8) and numpy's MT19937 key;
- ``state.json``: everything else (step, data position, recipe, scheduler, optimiser ``param_groups``,
  python's RNG state), with ``{"__tensor__": [file, key]}`` where a tensor was;
- ``manifest.json``: the sha256 and size of every file above.

It is written into ``.step-NNNNNNN.tmp/``, every file flushed to disk, then the folder is renamed to its
final name: a process killed mid-write leaves the previous checkpoints untouched and only a dot-folder
behind, which the loader ignores and the next save removes. Loading checks every file against the
manifest (:class:`~chunkformer.models.checkpoint.CorruptCheckpointError` names the damaged file) and
never unpickles anything. Older ``step-NNNNNNN.pt`` files still load, with ``torch.load(weights_only=True)``
and an allow-list of the numpy types of the RNG state only (no hash to check: they have no manifest).
Samplers prefer the ``ema`` weights.
"""

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from chunkformer.models.checkpoint import (
    MANIFEST_NAME,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    _chmod_like_umask,
    _fsync_dir,
    _fsync_file,
    _unshared,
    load_safetensors_file,
    load_torch_file,
    verify_manifest,
    write_manifest,
)

__all__ = ["save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint", "checkpoint_step",
           "is_checkpoint", "set_aside_after", "rng_state", "set_rng_state", "CorruptCheckpointError",
           "UnsafeCheckpointError", "STATE_NAME"]

_NAME = re.compile(r"^step-(\d+)(\.pt)?$")
STATE_NAME = "state.json"
FORMAT = "chunkformer-training-checkpoint"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------------------- encoding
def _encode(obj, top: str, path: list[str], tensors: dict):
    """JSON-ready ``obj``; tensors (and numpy arrays) go to ``tensors[top][key]`` with a marker left behind."""
    if isinstance(obj, torch.Tensor):
        key = "/".join(path) or "value"
        tensors.setdefault(top, {})[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": [top, key]}
    if isinstance(obj, np.ndarray):
        key = "/".join(path) or "value"
        tensors.setdefault(top, {})[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui"
                                                            else np.ascontiguousarray(obj))
        return {"__ndarray__": [top, key, obj.dtype.str]}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, top, [*path, str(i)], tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, top, [*path, str(i)], tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, top, [*path, k], tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, top, [*path, "key"], tensors), _encode(v, top, [*path, str(k)], tensors)]
                              for k, v in obj.items()]}
    raise TypeError(f"cannot store {type(obj).__name__} at {top}/{'/'.join(path)} in a checkpoint "
                    "(tensors, arrays, numbers, strings, lists, tuples and dicts only)")


def _decode(obj, files: dict):
    if isinstance(obj, list):
        return [_decode(v, files) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        top, key = obj["__tensor__"]
        return files[top][key]
    if "__ndarray__" in obj:
        top, key, dtype = obj["__ndarray__"]
        return files[top][key].numpy().astype(np.dtype(dtype))
    if "__tuple__" in obj:
        return tuple(_decode(v, files) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, files): _decode(v, files) for k, v in obj["__items__"]}
    return {k: _decode(v, files) for k, v in obj.items()}


# ---------------------------------------------------------------------------- writing
def _remove(path: Path) -> None:
    """Delete a checkpoint all at once: renamed to a dot-name first (atomic), so a process killed mid-delete
    leaves no half-deleted ``step-*`` folder behind, only a dot-folder the next save removes."""
    if path.is_dir() and not path.is_symlink():
        if not path.name.startswith("."):
            doomed = path.with_name(f".{path.name}.deleting")
            os.replace(path, doomed)
            path = doomed
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_checkpoint(state: dict, folder: str | Path, step: int, *, keep: int = 2) -> Path:
    """Write ``folder/step-NNNNNNN/`` atomically; then delete older checkpoints beyond the newest ``keep``.

    Pruning only looks at checkpoints of a *lower* step than this one: the checkpoint just written and
    anything newer are never deleted (``keep <= 0`` keeps all).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step-*"):  # left by a writer killed mid-save (one writer per run folder)
        _remove(stale)
    name = f"step-{step:07d}"
    final, tmp = folder / name, folder / f".{name}.tmp"
    tmp.mkdir()
    tensors: dict[str, dict] = {}
    meta = {k: _encode(v, k, [], tensors) for k, v in state.items()}
    names = []
    for top, group in tensors.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", top):
            raise ValueError(f"checkpoint entry {top!r}: use letters, digits and '_' (it names a file)")
        save_file(_unshared(group), str(tmp / f"{top}.safetensors"))
        _chmod_like_umask(tmp / f"{top}.safetensors")
        _fsync_file(tmp / f"{top}.safetensors")
        names.append(f"{top}.safetensors")
    with open(tmp / STATE_NAME, "w") as f:
        json.dump({"format": FORMAT, "version": 1, "state": meta}, f)
        f.flush()
        os.fsync(f.fileno())
    names.append(STATE_NAME)
    write_manifest(tmp, names)
    _fsync_dir(tmp)
    old = folder / f".{name}.old"
    if final.exists():  # the same step again (e.g. a failure right after a periodic save): replace it
        os.replace(final, old)
    os.replace(tmp, final)  # the whole checkpoint appears at once
    _fsync_dir(folder)
    _remove(old)
    if keep > 0:
        older = [p for p in list_checkpoints(folder) if checkpoint_step(p) < step]
        for stale in older[: max(0, len(older) - (keep - 1))]:
            _remove(stale)
    return final


# ---------------------------------------------------------------------------- reading
def checkpoint_step(path: str | Path) -> int:
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint name (step-NNNNNNN or step-NNNNNNN.pt)")
    return int(m.group(1))


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder (``state.json`` inside) or a legacy ``.pt`` file."""
    path = Path(path)
    if path.is_dir():
        return (path / STATE_NAME).is_file() or bool(_NAME.match(path.name))
    return path.is_file() and path.suffix in (".pt", ".pth")


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoints directly in ``folder`` (``step-NNNNNNN/`` and legacy ``step-NNNNNNN.pt``), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p.is_dir(), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for *_, p in sorted(found)]


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The state dict saved by :func:`save_checkpoint` (every file verified against its manifest first),
    or that of a legacy ``step-*.pt`` (``weights_only=True`` with the numpy RNG types allowed, nothing else).

    Raises ``CorruptCheckpointError`` for a damaged or incomplete checkpoint and ``UnsafeCheckpointError``
    for a pickle that asks to run code; both name the file and say what to do.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if not (path / STATE_NAME).is_file() and not (path / MANIFEST_NAME).is_file():
            raise CorruptCheckpointError(f"{path} is not a training checkpoint (no {STATE_NAME}): pass a "
                                         "checkpoints/step-NNNNNNN folder or its run folder")
        verify_manifest(path, required=True)  # every file, before any is read
        try:
            meta = json.loads((path / STATE_NAME).read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            listed = json.loads((path / MANIFEST_NAME).read_text())["files"]
            files = {name[: -len(".safetensors")]: load_safetensors_file(path / name, verify=False)
                     for name in sorted(listed) if name.endswith(".safetensors")}
            state = _decode(meta["state"], files)
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptCheckpointError(f"{path}: cannot read the checkpoint ({err}); use an earlier one") from None
    else:
        state = load_torch_file(path, "training checkpoint")  # weights_only=True, numpy arrays of numbers only
        if not isinstance(state, dict) or "model" not in state:
            raise CorruptCheckpointError(f"{path}: a torch.save file but not a training checkpoint (no 'model' "
                                         "entry); load plain weights with cf.load_weights instead")
    if map_location not in (None, "cpu"):
        state = _to(state, torch.device(map_location))
    return state


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def latest_checkpoint(folder: str | Path, *, log=print) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``folder`` that loads and verifies, with its contents.

    Damaged, incomplete or refused ones are skipped, each with a warning through ``log`` naming the file and why.
    """
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except Exception as err:  # a damaged file: fall back to the previous one, loudly
            log(f"warning: skipping checkpoint {path}: {err}")
    return None


def set_aside_after(folder: str | Path, step: int) -> tuple[Path, list[Path]] | None:
    """Move every checkpoint in ``folder`` newer than ``step`` into ``folder/abandoned-after-step-N/``.

    A run that continues from ``step`` (an older checkpoint, or a fresh start at 0) is a new branch: the later
    checkpoints belong to another history, so they are kept but out of the way of pruning and ``resume=auto``.
    Returns the folder and what moved, or ``None`` when nothing was newer.
    """
    folder = Path(folder)
    later = [p for p in list_checkpoints(folder) if checkpoint_step(p) > step]
    if not later:
        return None
    dest = folder / f"abandoned-after-step-{step}"
    n = 2
    while dest.exists():
        dest = folder / f"abandoned-after-step-{step}-{n}"
        n += 1
    dest.mkdir()
    for p in later:
        os.replace(p, dest / p.name)
    _fsync_dir(folder)
    return dest, [dest / p.name for p in later]
