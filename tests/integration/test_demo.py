"""The built-in MNIST digits and the example that trains on them."""

import importlib.util
from pathlib import Path

import pytest
import torch

from chunkformer.data import MNISTDigits, load_mnist_digits, mnist_digits_path

DEMO = Path(__file__).resolve().parents[2] / "examples" / "mnist_demo.py"


def _require_digits():
    try:
        mnist_digits_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def digits():
    _require_digits()
    return load_mnist_digits()


def test_load_mnist_digits(digits):
    images, labels = digits
    assert images.shape == (5000, 1, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert images.min() == -1 and images.max() == 1
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 500))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (images[:, 0, border] == -1).all()  # the 2-pixel padding is background
    assert (images[:, 0, 2:30, 2:30] > 0).any(dim=(1, 2)).all()  # every digit has strokes


def test_dataset_and_errors(digits, tmp_path):
    ds = MNISTDigits()
    x, y = ds[7]
    assert len(ds) == 5000 and x.shape == (1, 32, 32) and torch.equal(x, digits[0][7]) and y == digits[1][7]
    with pytest.raises(FileNotFoundError, match="mnist_5k"):
        load_mnist_digits(tmp_path / "missing_mnist_5k.csv.gz")


def test_mnist_demo_smoke():
    _require_digits()
    spec = importlib.util.spec_from_file_location("mnist_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = demo.main(["--steps", "2", "--batch", "4"])
    kept = torch.tensor(out["kept"])  # (timesteps, 8)
    assert kept.shape == (len(out["timesteps"]), 8)
    assert ((kept >= 2) & (kept <= 1024)).all()
    for density in out["stroke_density"] + out["background_density"]:
        assert 0.0 <= density <= 1.0


def test_mnist_demo_router_keeps_strokes_not_background():
    """A short run of the example (a tiny model, 100 steps of 16 digits) must already route the detail:
    at t = 0.1 it keeps stroke pixels more densely than background (an inverted router does the opposite)."""
    _require_digits()
    spec = importlib.util.spec_from_file_location("mnist_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = demo.main(["--steps", "100", "--batch", "16", "--dim", "32", "--log-every", "100"])
    assert out["timesteps"][0] == 0.1
    stroke, background = out["stroke_density"][0], out["background_density"][0]
    assert stroke > 2 * background and stroke > 0.3, (stroke, background)
