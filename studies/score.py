"""FID for a study run brought back from the GPU, on the CPU; the result joins studies/results/.

    python studies/score.py /path/to/pair-s0                    # FID of each <model>.npz vs the 5000 digits
    python studies/score.py /path/to/pair-s0 --limit 1000       # quicker, noisier

Runs ``recipes.evaluate`` (offline Inception-v3, reference features of the 5000 built-in digits
cached after the first run; about 7.6 images/s on 2 cores) on every ``<model>.npz`` beside
``summary.json``, adds ``fid`` and the evaluation settings to each model's entry, and writes
``studies/results/<run folder name>.json`` (``--results`` to put it elsewhere).
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from recipes.evaluate import main as evaluate  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the folder studies/mnist_pair.py wrote (summary.json, <model>.npz)")
    ap.add_argument("--reference", default="mnist")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--results", type=Path, default=ROOT / "studies" / "results")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    summary = json.loads((args.run / "summary.json").read_text())
    for name, entry in summary["models"].items():
        extra = [] if args.limit is None else ["--limit", str(args.limit)]
        extra += [] if args.cache_dir is None else ["--cache-dir", args.cache_dir]
        extra += [] if args.device is None else ["--device", args.device]
        result = evaluate(["--samples", str(args.run / f"{name}.npz"), "--reference", args.reference,
                           "--out", str(args.run / f"{name}.fid.json"), *extra])
        entry["fid"] = result["fid"]
        entry["evaluation"] = {k: result[k] for k in ("num_samples", "reference", "evaluation") if k in result}
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{args.run.name}.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
