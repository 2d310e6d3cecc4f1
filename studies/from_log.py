"""Rebuild an arm's JSON from the console output of a GPU call that ended before the arm wrote it.

    python studies/from_log.py studies/results/raw/s0-dcdit.log --seed 0 --arm dcdit \\
        --samples 2000 --out studies/results/s0-dcdit.json

``mnist_study.py`` prints one line per trained arm (``[arm] N steps, X TFLOPs, Y min``) and one per
sample set (``  name: T TFLOPs/img, kept K%, FID F``); the log keeps those lines verbatim. The
record says where it came from (``source``); sets whose line was never printed are simply absent.
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies.mnist_study import ARMS  # noqa: E402
from studies.score import record_fid  # noqa: E402

ARM_LINE = re.compile(r"^\[(?P<arm>[\w.-]+)\] (?P<steps>\d+) steps, (?P<tflops>[\d.]+) TFLOPs, (?P<min>[\d.]+) min$")
SET_LINE = re.compile(r"^  (?P<name>[\w.-]+): (?P<tflops>[\d.]+) TFLOPs/img, kept (?P<kept>[\d.]+)%"
                      r"(?:, FID (?P<fid>[\d.]+))?$")
DEVICE_LINE = re.compile(r"^NVIDIA [\w ]+$")


def parse(text: str, arm: str) -> dict:
    """The arm's training line and its sample-set lines (the first block after ``[arm] ... steps``)."""
    record: dict = {"arm": arm, "sets": {}, "snapshots": {}}
    inside = False
    sets = {s.name: s for s in ARMS[arm].sets}
    for line in text.splitlines():
        if DEVICE_LINE.match(line):
            record["device"] = line.strip()
        m = ARM_LINE.match(line)
        if m:
            inside = m["arm"] == arm
            if inside:
                record.update(train_steps=int(m["steps"]), train_tflops=float(m["tflops"]),
                              train_seconds=60 * float(m["min"]))
            continue
        m = SET_LINE.match(line)
        if inside and m and m["name"] in sets and m["name"] not in record["sets"]:
            entry = {**vars(sets[m["name"]]), "sampler": "ddim", "ema": True,
                     "tflops_per_image": float(m["tflops"]), "kept_fraction": float(m["kept"]) / 100}
            if m["fid"]:
                entry["fid"] = float(m["fid"])
            record["sets"][m["name"]] = entry
    if "train_steps" not in record:
        raise ValueError(f"no '[{arm}] N steps, X TFLOPs, Y min' line in the log")
    return record


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", type=Path)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--arm", required=True, choices=sorted(ARMS))
    ap.add_argument("--samples", type=int, required=True, help="samples per set in that run (--samples)")
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--command", default="", help="the study command of that call")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    record = {"seed": args.seed, "torch": "2.11 (GPU image)", "command": args.command,
              "source": f"console log {args.log.name} (the call ended before the arm's JSON was written)",
              **parse(args.log.read_text(), args.arm)}
    for s in record["sets"].values():
        s.update(steps=args.sample_steps, num_samples=args.samples, seed=args.seed)
        if "fid" in s:
            record_fid(s, s["fid"], args.samples)
    args.out.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
