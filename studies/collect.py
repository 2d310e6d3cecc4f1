"""Bring a GPU call's study results into the repo: JSON records, figures, training curves, run metrics.

    python studies/collect.py /path/to/results.tgz        # what studies/gpu_call.sh returns as $OUT/results.tgz
    python studies/collect.py /path/to/unpacked/folder    # or the folder it unpacks to

Copies ``s<seed>-<arm>.json`` to ``studies/results/`` (a record holding only an ``error`` is reported
and skipped, so it never replaces a good one), each figure it names to
``docs/img/results/s<seed>-<arm>-<key>.png`` (the record's ``figures`` then name those files),
``curves/*.jsonl`` to ``studies/results/curves/`` and ``runs/*-metrics.json`` to
``studies/results/runs/``. Then run ``python studies/report.py``.
"""

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def collect(source: Path, results: Path = ROOT / "studies" / "results",
            img: Path = ROOT / "docs" / "img" / "results") -> dict:
    """Copy what ``source`` (a folder) holds; returns ``{"records": [...], "skipped": {name: error}, ...}``."""
    done: dict = {"records": [], "skipped": {}, "figures": [], "curves": [], "runs": []}
    img.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("s*-*.json")):
        record = json.loads(path.read_text())
        if "error" in record and not record.get("sets"):
            done["skipped"][path.name] = str(record["error"]).splitlines()[0][:200]
            continue
        stem = f"s{record['seed']}-{record['arm']}"
        figures = {}
        for key, name in (record.get("figures") or {}).items():
            found = source / name
            if not found.is_file():  # already renamed by an earlier collect, or left behind
                figures[key] = name
                continue
            figures[key] = f"{stem}-{key}.png"
            shutil.copyfile(found, img / figures[key])
            done["figures"].append(figures[key])
        if figures:
            record["figures"] = figures
        (results / f"{stem}.json").write_text(json.dumps(record, indent=1))
        done["records"].append(f"{stem}.json")
    for folder, pattern in (("curves", "s*-*.jsonl"), ("runs", "s*-*-metrics.json")):
        (results / folder).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / folder).glob(pattern)):
            shutil.copyfile(path, results / folder / path.name)
            done[folder].append(path.name)
    return done


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="results.tgz from studies/gpu_call.sh, or the folder it unpacks to")
    ap.add_argument("--results", type=Path, default=ROOT / "studies" / "results")
    ap.add_argument("--img", type=Path, default=ROOT / "docs" / "img" / "results")
    args = ap.parse_args(argv)
    if not args.source.exists():
        ap.error(f"{args.source} does not exist: give the results.tgz a study call brought back, or its folder")
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if source.is_file():
            if not tarfile.is_tarfile(source):
                ap.error(f"{source} is neither a folder nor a tar archive")
            with tarfile.open(source) as tar:
                tar.extractall(tmp, filter="data")
            source = Path(tmp)
        done = collect(source, args.results, args.img)
    for name, error in done["skipped"].items():
        print(f"skipped {name}: {error}", file=sys.stderr)
    print(f"records: {', '.join(done['records']) or 'none'}; {len(done['figures'])} figures, "
          f"{len(done['curves'])} curves, {len(done['runs'])} run metrics")
    return done


if __name__ == "__main__":
    main()
