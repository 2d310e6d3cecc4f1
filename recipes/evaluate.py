"""FID of a sample set, offline, with every setting written next to the number.

    python -m recipes.evaluate --samples samples/run-rho0.2.npz        # vs the 5000 built-in digits
    python -m recipes.evaluate --samples S.npz --reference ref.npz --out results.json --limit 1000

``--samples`` is the ``.npz`` that ``recipes.sample`` writes (``samples``: uint8 ``(N, H, W, C)``;
``arr_0`` is accepted too). The sampling settings beside it (same stem, ``.json``) are copied
into the result: ``kept_fraction`` and ``tflops_per_image`` at the top level, all of them under
``sampling``. ``--reference`` is ``mnist`` (the built-in digits, features cached after the first
run, which takes about 11 minutes on a 2-core CPU) or an ``.npz`` of ``mu``/``sigma``,
``features`` or uint8 ``samples``. The result goes to ``--out`` (default: ``<samples stem>.fid.json``);
one summary line is printed. See docs/evaluation.md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from chunkformer import fid

__all__ = ["main", "load_samples", "COPIED_FIELDS"]

COPIED_FIELDS = ("kept_fraction", "tflops_per_image")  # from the sampling JSON to the top level


def load_samples(path: str | Path, limit: int | None = None) -> np.ndarray:
    """uint8 images ``(N, H, W[, C])`` from an ``.npz`` (``samples`` or ``arr_0``), the first ``limit``."""
    with np.load(path) as f:
        key = "samples" if "samples" in f.files else "arr_0" if "arr_0" in f.files else None
        if key is None:
            raise KeyError(
                f"{path} holds {sorted(f.files)}; expected uint8 images under 'samples' or 'arr_0'"
            )
        samples = f[key]
    if limit is not None:
        if limit < 2:
            raise ValueError(f"--limit must be >= 2 (FID needs a covariance), got {limit}")
        samples = samples[:limit]
    return samples


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m recipes.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--samples", required=True, help=".npz with uint8 'samples' (N, H, W, C)")
    p.add_argument("--reference", default="mnist", help="'mnist' (the 5000 built-in digits) or a .npz")
    p.add_argument("--out", default="", help="result JSON (default: <samples stem>.fid.json)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception forward pass")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--cache-dir", default=None, help="default: $CHUNKFORMER_CACHE or ~/.cache/chunkformer")
    args = p.parse_args(argv)

    # 1. Inputs: samples and the sampling settings beside them
    samples_path = Path(args.samples)
    samples = load_samples(samples_path, args.limit)
    settings_path = samples_path.with_suffix(".json")
    sampling = json.loads(settings_path.read_text()) if settings_path.is_file() else None

    # 2. Features and statistics (progress bars only on a terminal)
    progress = sys.stderr.isatty()
    device = torch.device(args.device) if args.device else None
    start = time.perf_counter()
    features = fid.fid_features(
        samples, batch_size=args.batch_size, device=device, progress=progress, cache_dir=args.cache_dir
    )
    ref_mu, ref_sigma = fid.reference_stats(
        args.reference, args.cache_dir, batch_size=args.batch_size, device=device, progress=progress
    )
    score = fid.frechet_distance(*fid.feature_stats(features), ref_mu, ref_sigma)
    seconds = time.perf_counter() - start

    # 3. Result: the number, what it was measured on, and every setting
    result = {
        "fid": score,
        "num_samples": int(features.shape[0]),
        "reference": args.reference,
        "samples": str(samples_path),
        "sample_shape": list(samples.shape[1:]),
        "limit": args.limit,
    }
    for key in COPIED_FIELDS:
        if sampling is not None and key in sampling:
            result[key] = sampling[key]
    result["evaluation"] = {
        **fid.evaluation_settings(),
        "batch_size": args.batch_size,
        "device": str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
        "seconds": round(seconds, 2),
    }
    result["sampling"] = sampling
    out = Path(args.out) if args.out else samples_path.with_name(samples_path.stem + ".fid.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    extras = "".join(
        f" | {name} {result[key]:.4g}"
        for key, name in (("kept_fraction", "kept"), ("tflops_per_image", "TFLOPs/img"))
        if isinstance(result.get(key), (int, float))
    )
    n = result["num_samples"]
    print(f"FID {score:.3f} | {n} samples vs {args.reference}{extras} | {seconds:.0f}s | -> {out}")
    return result


if __name__ == "__main__":
    main()
