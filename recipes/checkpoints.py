"""Training checkpoints: everything a resume needs, written atomically.

A checkpoint is one ``torch.save`` dict: ``model``, ``ema``, ``opt``, ``sched``, ``step``,
``rng`` (torch CPU / CUDA, python, numpy), ``data`` (the data position) and ``config``
(the recipe as a dict). It is written to a temporary file in the same folder, flushed
to disk, then renamed over its final name: a process killed mid-write leaves the
previous checkpoints untouched and only a ``*.tmp`` file behind, which the loader ignores.
Samplers prefer the ``ema`` weights.
"""

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint", "rng_state",
           "set_rng_state"]

_NAME = re.compile(r"^step-(\d+)\.pt$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, folder: str | Path, step: int, *, keep: int = 2) -> Path:
    """Write ``folder/step-NNNNNNN.pt`` atomically and keep only the newest ``keep`` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}.pt"
    tmp = folder / f".step-{step:07d}.pt.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Finished checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=False)


def latest_checkpoint(folder: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``folder`` that loads, with its contents (corrupt ones are skipped)."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except Exception as err:  # a damaged file: fall back to the previous one, loudly
            print(f"warning: skipping unreadable checkpoint {path}: {err}")
    return None
