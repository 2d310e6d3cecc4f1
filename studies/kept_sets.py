"""Which kept set does a trained DC-DiT's diffusion loss prefer? Its router's own, or the strokes, the background or a
random set of the same size per sample.

    python studies/kept_sets.py RUN_DIR [--images 512] [--out kept_sets.json]

``RUN_DIR`` is a recipe run folder (``final/`` holds the EMA weights, ``config.json`` the recipe), e.g. one that
``studies/router_seeds.py`` trained. For held-out digits at ``t`` in 25, 100, 300, 500 and 800, the model predicts
the noise four times: with its router's own kept set, and with that set replaced by the same number of tokens per
sample taken strokes first, background first, or at random (the first and last token kept as always). Prints and
writes the epsilon MSE of each, with the kept fraction and the share of stroke pixels kept. A model trained to one
side does best with its own set: the difference to the other side's set says how strongly training holds it there.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chunkformer as cf  # noqa: E402
from chunkformer.data import load_mnist_digits  # noqa: E402
from chunkformer.diffusion import create_diffusion  # noqa: E402
from chunkformer.routing import RouterOutput  # noqa: E402

POLICIES = ("own", "strokes", "background", "random")
TIMESTEPS = (25, 100, 300, 500, 800)


def forced_mask(own: torch.Tensor, strokes: torch.Tensor, policy: str, seed: int = 1) -> torch.Tensor:
    """``(B, L)`` mask keeping as many tokens per sample as ``own``: strokes first, background first or at random
    (ties broken at random), always with the first and last token."""
    noise = torch.rand(own.shape, generator=torch.Generator().manual_seed(seed)).to(own.device)
    prior = {"strokes": strokes.float(), "background": (~strokes).float(), "random": torch.zeros_like(noise)}[policy]
    score = prior + 0.5 * noise
    score[:, 0] = score[:, -1] = 10.0
    rank = score.argsort(1, descending=True).argsort(1)  # each token's place in the order
    return rank < own.sum(1, keepdim=True)


@torch.no_grad()
def compare(model, diffusion, x0: torch.Tensor, y: torch.Tensor, timesteps=TIMESTEPS) -> dict:
    """``{t: {policy: {"mse", "kept", "stroke_kept"}}}`` over digits ``x0 (N, 1, H, W)`` with labels ``y``."""
    strokes = (x0.flatten(1) > 0).to(x0.device)  # pixel above half intensity in [-1, 1]
    router, policy = model.router, {"name": "own"}
    route = router.forward

    def forward(x, grid, rho=0.0):
        out = route(x, grid, rho)
        if policy["name"] == "own":
            return out
        mask = forced_mask(out.mask, strokes, policy["name"])
        p = torch.where(mask, 0.9, 0.1).to(out.probs)  # confident either way: the smoothing barely mixes
        return RouterOutput(probs=p, mask=mask, natural_mask=mask, confidence=torch.where(mask, p, 1 - p),
                            grid=out.grid, batch_size=out.batch_size)

    router.forward = forward
    rows = {}
    try:
        for t in timesteps:
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t)).to(x0.device)
            tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
            x_t, _ = diffusion.q_sample(x0, tt, eps)
            rows[t] = {}
            for name in POLICIES:
                policy["name"] = name
                out, info = model(x_t, diffusion.model_timesteps(tt), y, return_info=True)
                kept = info.router.mask.float()
                rows[t][name] = {"mse": float((out[:, :x0.shape[1]] - eps).square().mean()),
                                 "kept": float(kept.mean()),
                                 "stroke_kept": float((kept * strokes).sum() / strokes.sum().clamp_min(1))}
    finally:
        del router.forward  # the class's forward again
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a recipe run folder with final/ and config.json")
    ap.add_argument("--images", type=int, default=512, help="held-out digits (the last ones of the 5000)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (args.run / "final").is_dir() or not (args.run / "config.json").is_file():
        ap.error(f"{args.run} is not a run folder: it needs final/ (the weights) and config.json (the recipe)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = cf.create_model(str(args.run / "final")).to(device).eval()
    if not getattr(model, "supports_chunking", False):
        ap.error(f"{args.run} holds a model without a router ({type(model).__name__}): nothing to compare")
    d = json.loads((args.run / "config.json").read_text())["diffusion"]
    diffusion = create_diffusion(d["kind"], num_timesteps=d["num_timesteps"], schedule=d["schedule"],
                                 learn_sigma=model.out_channels != model.in_channels)
    x0, y = load_mnist_digits()
    rows = compare(model, diffusion, x0[-args.images:].to(device), y[-args.images:].to(device))
    print("| t | " + " | ".join(f"{p} MSE (kept, strokes kept)" for p in POLICIES) + " |")
    print("|---|" + "---|" * len(POLICIES))
    for t, r in rows.items():
        print(f"| {t} | " + " | ".join(f"{r[p]['mse']:.4f} ({r[p]['kept']:.0%}, {r[p]['stroke_kept']:.0%})"
                                       for p in POLICIES) + " |")
    result = {"run": str(args.run), "images": args.images, "by_t": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
