"""The elastic Pareto curve: FID against TFLOPs per image across budgets, from evaluation JSONs.

    for rho in 0 0.2 0.4 0.6; do
        python -m recipes.sample --ckpt RUN --num-samples 5000 --rho $rho --out evals/rho$rho
        python -m recipes.evaluate --samples evals/rho$rho.npz
    done
    python -m recipes.pareto evals/*.fid.json --out pareto.png

Points are grouped into one curve per checkpoint (or per ``--label-by`` field of the
sampling settings) and labelled with their ``rho`` (and ``uncond_rho`` for Lite-CFG).
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

from chunkformer.viz import plot_pareto

__all__ = ["main", "collect"]


def collect(paths: list[str], label_by: str = "checkpoint") -> dict[str, list[tuple[float, float, str]]]:
    """``{curve: [(tflops_per_image, fid, label), ...]}`` from ``recipes.evaluate`` JSON files."""
    curves: dict[str, list] = defaultdict(list)
    for path in paths:
        result = json.loads(Path(path).read_text())
        sampling = result.get("sampling", {})
        if result.get("tflops_per_image") is None or result.get("fid") is None:
            raise ValueError(f"{path} lacks fid / tflops_per_image: was it written by recipes.evaluate "
                             "from samples of recipes.sample?")
        label = f"rho={sampling.get('rho', 0):g}"
        if sampling.get("uncond_rho") is not None:
            label += f", u={sampling['uncond_rho']:g}"
        curve = str(sampling.get(label_by, "samples"))
        curves[Path(curve).parent.parent.name if label_by == "checkpoint" and "/" in curve else curve].append(
            (float(result["tflops_per_image"]), float(result["fid"]), label))
    return dict(curves)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m recipes.pareto", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="*.fid.json files written by recipes.evaluate")
    p.add_argument("--out", default="pareto.png")
    p.add_argument("--label-by", default="checkpoint", help="sampling setting that separates curves")
    p.add_argument("--title", default="elastic inference: FID vs TFLOPs per image")
    args = p.parse_args(argv)
    curves = collect(args.results, args.label_by)
    path = plot_pareto(curves, args.out, title=args.title)
    for name, points in curves.items():
        print(name + ": " + ", ".join(f"{lab} {tf:.3g} TFLOPs FID {fid:.2f}" for tf, fid, lab in sorted(points)))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
