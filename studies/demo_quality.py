"""How often a trained digits run's samples read as the digit asked for, per guidance scale.

    python studies/demo_quality.py --run results/tiny-cpu-DC-DiT-tiny --guidance 1,1.5,2,3 --num 200

Loads a run folder's newest weights (or one of its ``checkpoints/step-NNNNNNN`` folders; EMA weights) and its config,
draws ``--num`` samples per guidance scale (a tenth of them per class, the recipe's sampler and
steps unless given) and prints the fraction the run's digit classifier (:mod:`recipes.label_agreement`)
assigns to their conditioning label, beside its accuracy on held-out real digits.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chunkformer.viz import save_image_grid  # noqa: E402
from recipes.data import to_display  # noqa: E402
from recipes.label_agreement import classifier_for_run, label_agreement  # noqa: E402
from recipes.sample import load_for_sampling  # noqa: E402
from recipes.sampling import generate  # noqa: E402


def run_folder(path: str | Path) -> Path:
    """The run folder of ``path``: a run folder itself, or the one above ``<run>/checkpoints/step-NNNNNNN``
    (folder or legacy ``.pt``), where the run's digit classifier is cached."""
    path = Path(path)
    return path.parent.parent if path.parent.name == "checkpoints" else path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--guidance", default="1,1.5,2,3")
    p.add_argument("--num", type=int, default=200, help="samples per scale, a multiple of 10")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="folder for one PNG grid per scale (a class per row)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, diffusion, cfg, _ = load_for_sampling(args.run, ema=True, device="cpu")
    clf, ceiling = classifier_for_run(run_folder(args.run))
    steps = args.steps or cfg.diffusion.sample_steps
    for g in map(float, args.guidance.split(",")):
        out = generate(model, diffusion, num=args.num, shape=(model.in_channels, *model.grid), num_classes=10,
                       device="cpu", seed=args.seed, sampler=cfg.diffusion.sampler, steps=steps, guidance=g,
                       labels=torch.arange(10).repeat_interleave(args.num // 10))
        images = to_display(out["samples"], cfg.data.pixel_unshuffle).clamp(-1, 1)
        if args.out:
            save_image_grid(images, Path(args.out) / f"guidance-{g:g}.png", nrow=args.num // 10)
        print(f"guidance {g:<4} {cfg.diffusion.sampler} {steps} steps: label agreement "
              f"{label_agreement(clf, images, out['labels']):.3f} "
              f"(classifier on held-out digits {ceiling:.3f})",
              flush=True)


if __name__ == "__main__":
    main()
