"""How much of a FID difference is sampling noise: a bootstrap over the generated samples.

    python studies/bootstrap.py --a DiT-S/2=W/s0/dit/base.npz --b DC-DiT-S=W/s0/dcdit/base.npz \\
        --samples 2000 --resamples 100 --out studies/results/bootstrap-s0.json

Inception features of the first ``--samples`` images of each set are computed once (cached beside
the ``.npz``); each resample draws that many feature rows with replacement from each set and
recomputes both FIDs against the fixed reference statistics (the 5000 digits). The JSON holds the
point estimates, the resampled differences' 2.5 / 50 / 97.5 percentiles and the share of resamples
in which ``a`` scores worse than ``b``. This covers the finite-sample noise of the FID estimate,
not the variation between training seeds.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chunkformer.fid import feature_stats, fid_features, frechet_distance, reference_stats  # noqa: E402


def features(path: Path, n: int, device: str | None) -> np.ndarray:
    cache = path.with_suffix(f".features{n}.npy")
    if cache.is_file():
        return np.load(cache)
    images = np.load(path)["samples"][:n]
    if len(images) < n:
        raise ValueError(f"{path} holds {len(images)} samples, fewer than --samples {n}")
    feats = fid_features(images, device=device, progress=True)
    np.save(cache, feats)
    return feats


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="NAME=path.npz")
    ap.add_argument("--b", required=True, help="NAME=path.npz")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--resamples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    (name_a, path_a), (name_b, path_b) = (s.split("=", 1) for s in (args.a, args.b))
    fa, fb = (features(Path(p), args.samples, args.device) for p in (path_a, path_b))
    mu_r, sigma_r = reference_stats("mnist", device=args.device)

    def fid(f: np.ndarray) -> float:
        return frechet_distance(*feature_stats(f), mu_r, sigma_r)

    rng = np.random.default_rng(args.seed)
    point = (fid(fa), fid(fb))
    diffs = []
    for i in range(args.resamples):
        ia, ib = (rng.integers(0, len(f), len(f)) for f in (fa, fb))
        diffs.append(fid(fa[ia]) - fid(fb[ib]))
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{args.resamples} resamples", file=sys.stderr, flush=True)
    diffs = np.array(diffs)
    result = {"a": name_a, "b": name_b, "a_path": path_a, "b_path": path_b, "samples": args.samples,
              "resamples": args.resamples, "seed": args.seed, "fid_a": point[0], "fid_b": point[1],
              "difference": point[0] - point[1],
              "difference_percentiles": dict(zip(("2.5", "50", "97.5"), np.percentile(diffs, [2.5, 50, 97.5]).tolist())),
              "share_a_worse": float((diffs > 0).mean()),
              "command": "python " + " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("command",)}, indent=1))
    return result


if __name__ == "__main__":
    main()
