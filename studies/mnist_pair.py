"""One GPU run of the fidelity study: DiT-S/2 and DC-DiT-S trained at equal FLOPs, sampled, and the router measured.

    python studies/mnist_pair.py --seed 0 --tflops 2000 --out $OUT/pair-s0     # GPU: fits one 10-minute run
    python studies/mnist_pair.py --tiny --out /tmp/pair                        # CPU smoke run (the suite runs it)

For each of the presets ``mnist-dit-s`` and ``mnist-dcdit-s`` (32x32 digits, pixel space,
class-conditional, epsilon prediction, AdamW 2e-4, EMA; docs/recipes.md): train with
``train.max_tflops`` (equal training FLOPs, counted on every forward x3) or ``--minutes``
(equal wall-clock), then draw ``--samples`` images from the EMA with DDIM (``--sample-steps``
steps, no guidance) and save them as uint8 ``<model>.npz`` with the sampling settings in
``<model>.json``. The trained models stay on the GPU machine (too big to bring back), so the
router is measured here: for DC-DiT, over ``--probe`` real digits noised at 10 timesteps, the
kept fraction and the density of kept tokens on strokes (clean pixel above half intensity)
and on background, per timestep. Everything lands in ``--out``; ``summary.json`` holds the
numbers, ``studies/score.py`` adds FID on the CPU and ``studies/report.py`` writes
docs/results.md.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chunkformer as cf  # noqa: E402
from chunkformer.data import load_mnist_digits  # noqa: E402
from chunkformer.diffusion import create_diffusion  # noqa: E402
from recipes.config import apply_overrides, get_recipe, to_dict  # noqa: E402
from recipes.sample import to_uint8  # noqa: E402
from recipes.sampling import generate  # noqa: E402
from recipes.train import train  # noqa: E402

PAIR = (("DiT-S_2", "mnist-dit-s"), ("DC-DiT-S", "mnist-dcdit-s"))
TINY = ["model.overrides.hidden_size=32", "model.overrides.depth=1", "model.overrides.num_heads=2",
        "train.global_batch=8", "diffusion.sample_steps=2", "budget.group_size=4", "budget.warmup_steps=0",
        "train.num_sample_images=4", "train.log_every=2", "train.precision=fp32"]
PROBE_T = (25, 100, 200, 300, 400, 500, 600, 700, 800, 950)


@torch.no_grad()
def router_statistics(model, diffusion, images: torch.Tensor, labels: torch.Tensor, device, seed: int) -> dict:
    """Kept fraction and kept density on strokes / background per timestep, over ``images`` (N, 1, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in PROBE_T:
        kept = stroke_kept = stroke = bg_kept = bg = 0.0
        for start in range(0, len(images), 500):
            x0, y = images[start:start + 500].to(device), labels[start:start + 500].to(device)
            tt = torch.full((len(x0),), t, device=device, dtype=torch.long)
            x_t, _ = diffusion.q_sample(x0, tt, torch.randn(x0.shape, generator=g).to(device))
            _, info = model(x_t, diffusion.model_timesteps(tt), y, return_info=True)
            mask = info.router.mask.float()  # (B, L), L = 32 * 32
            strokes = (x0.flatten(1) > 0).float()  # pixel above half intensity in [-1, 1]
            kept += float(mask.sum())
            stroke_kept += float((mask * strokes).sum())
            stroke += float(strokes.sum())
            bg_kept += float((mask * (1 - strokes)).sum())
            bg += float((1 - strokes).sum())
        total = stroke + bg
        rows.append({"t": t, "kept_fraction": kept / total, "stroke_density": stroke_kept / max(stroke, 1.0),
                     "background_density": bg_kept / max(bg, 1.0)})
    return {"per_timestep": rows, "probe_images": len(images)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tflops", type=float, default=0.0, help="training TFLOPs per model (equal FLOPs)")
    ap.add_argument("--minutes", type=float, default=0.0, help="training minutes per model (equal wall-clock)")
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--probe", type=int, default=1000, help="real digits for the router statistics")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="toy sizes for a CPU smoke run")
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides (section.key=value), both models")
    args = ap.parse_args(argv)
    if args.tiny:
        args.samples, args.sample_steps, args.probe = min(args.samples, 16), 2, min(args.probe, 32)
        args.tflops = args.tflops or 1e-4
    if not (args.tflops > 0 or args.minutes > 0):
        ap.error("give --tflops (equal training FLOPs) or --minutes (equal wall-clock)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = load_mnist_digits()
    summary = {"seed": args.seed, "tflops_budget": args.tflops, "minutes_budget": args.minutes,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "command": "python " + " ".join(sys.argv), "models": {}}
    for name, preset in PAIR:
        overrides = [f"train.seed={args.seed}", "train.steps=100000000", f"train.results_dir={args.out / 'runs'}",
                     f"train.run_name={name}", "train.ckpt_every=100000000", "train.sample_every=0",
                     f"train.max_tflops={args.tflops}", f"train.max_minutes={args.minutes}", "train.count_flops=true",
                     *(TINY if args.tiny else []), *args.overrides]
        cfg = apply_overrides(get_recipe(preset), overrides)
        start = time.time()
        metrics = train(cfg)
        model = cf.create_model(str(Path(metrics["run_dir"]) / "final")).to(device).eval()
        diffusion = create_diffusion(cfg.diffusion.kind, num_timesteps=cfg.diffusion.num_timesteps,
                                     schedule=cfg.diffusion.schedule,
                                     learn_sigma=model.out_channels != model.in_channels)
        out = generate(model, diffusion, num=args.samples, shape=(model.in_channels, *model.grid),
                       num_classes=model.num_classes, device=device, seed=args.seed, sampler="ddim",
                       steps=args.sample_steps, batch_size=500)
        np.savez(args.out / f"{name}.npz", samples=to_uint8(out["samples"]), labels=out["labels"].numpy())
        sampling = {"sampler": "ddim", "steps": args.sample_steps, "guidance": 1.0, "ema": True,
                    "num_samples": args.samples, "seed": args.seed, "kept_fraction": out["kept_fraction"],
                    "tflops_per_image": out["tflops_per_image"], "kept_by_step": out["kept_by_step"]}
        (args.out / f"{name}.json").write_text(json.dumps(sampling, indent=1))
        entry = {"preset": preset, "recipe": to_dict(cfg), "train_steps": metrics["step"],
                 "train_tflops": metrics.get("train_tflops"), "train_seconds": metrics["wall_seconds"],
                 "sampling": sampling, "seconds": time.time() - start}
        if getattr(model, "supports_chunking", False):
            entry["router"] = router_statistics(model, diffusion, images[:args.probe], labels[:args.probe],
                                                device, args.seed)
        summary["models"][name] = entry
        print(f"{name}: {metrics['step']} steps, {entry['train_tflops']:.1f} TFLOPs, "
              f"{metrics['wall_seconds'] / 60:.1f} min; sampled {args.samples}", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
