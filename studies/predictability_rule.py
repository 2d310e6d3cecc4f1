"""How well could a fixed predictability rule segment the digits? The bar a learned router is measured against.

    python studies/predictability_rule.py [--images 2000] [--out predictability_rule.json]

For each built-in digit (1 x 32 x 32 in [-1, 1]), optionally with Gaussian noise of standard deviation ``sigma``
added, every pixel is scored by how badly its 3x3 neighbours' mean predicts it (``|x - mean3x3(x)|``, replicate
padding; :func:`chunkformer.routing.unpredictability`), and the top ``fraction`` of pixels per image is kept:
what a router whose keep probability rises with the unpredictability of the token would keep, on pixels
instead of learned features. Prints and writes, per
``sigma`` and ``fraction``, the share of stroke pixels (above half intensity) and of background pixels kept, and
their ratio: the density of strokes against background that the study's router statistics report at t = 25.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chunkformer.data import load_mnist_digits  # noqa: E402
from chunkformer.routing import unpredictability  # noqa: E402

SIGMAS = (0.0, 0.1)  # clean, and about the noise of t = 25 on the study's schedule
FRACTIONS = (0.18, 0.25, 0.31)  # the trained routers' kept fractions and the compiled arm's capacity


def densities(score: torch.Tensor, strokes: torch.Tensor, fraction: float) -> tuple[float, float]:
    """Keep the top ``fraction`` of each image's pixels by ``score``; the share of ``strokes`` and of the rest kept."""
    flat, s = score.flatten(1), strokes.flatten(1).float()
    keep = torch.zeros_like(flat).scatter(1, flat.topk(max(1, round(fraction * flat.shape[1])), dim=1).indices, 1.0)
    return float((keep * s).sum() / s.sum()), float((keep * (1 - s)).sum() / (1 - s).sum())


def measure(images: torch.Tensor, sigmas=SIGMAS, fractions=FRACTIONS, seed: int = 0) -> list[dict]:
    """One row per ``(sigma, fraction)``: stroke and background densities of the rule's kept set and their ratio."""
    strokes, g, rows = images > 0, torch.Generator().manual_seed(seed), []
    for sigma in sigmas:
        score = unpredictability(images + sigma * torch.randn(images.shape, generator=g), images.shape[2:])
        for fraction in fractions:
            stroke, background = densities(score, strokes, fraction)
            rows.append({"sigma": sigma, "fraction": fraction, "stroke_density": stroke,
                         "background_density": background, "ratio": stroke / max(background, 1e-9)})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="built-in digits to score (the first ones)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.images < 1:
        ap.error(f"--images must be >= 1, got {args.images}")
    images, _ = load_mnist_digits()
    rows = measure(images[: args.images].float())
    print(f"{'sigma':>6}{'kept':>7}{'strokes':>9}{'background':>12}{'ratio':>7}")
    for r in rows:
        print(f"{r['sigma']:>6.2f}{r['fraction']:>7.0%}{r['stroke_density']:>9.2f}{r['background_density']:>12.2f}"
              f"{r['ratio']:>7.1f}")
    result = {"images": min(args.images, len(images)), "rows": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
