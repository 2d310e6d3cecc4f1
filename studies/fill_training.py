"""Is training on plans filled to the capacity a free speed-up? DC-DiT-S (``mnist-dcdit-s``), one seed,
trained at a fixed capacity twice, with ``fill_capacity`` off and on; each model then denoises the same
digits in three plan layouts.

    python studies/fill_training.py 0 600 out/seed0.json train.precision=fp32 \\
        model.overrides.hidden_size=64 model.overrides.depth=2 model.overrides.num_heads=2 \\
        train.global_batch=32 train.cpu_threads=1          # the CPU runs in docs/recipes.md

Filled plans leave no padding slot, so the backbone's attention needs no key mask and runs on the fast
kernels (docs/performance.md, "Where a training step goes"). But a filled slot holds a token the router did
not choose. Both runs train ``steps`` steps at the compiled study arm's capacity (320 of the 1024 pixels;
``key=value`` overrides after the output path change it and the rest of the recipe) and log the training
loss. Each trained model (its weights, not the EMA) then predicts the noise of :data:`EVAL_IMAGES` fixed
digits at fixed timesteps and noise draws: with the router's own choice packed (what sampling uses by
default), with the fixed plan unfilled, and filled. The record holds each layout's mean squared error and
is written to the JSON file after each run.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chunkformer.data import load_mnist_digits  # noqa: E402
from recipes.config import apply_overrides, get_recipe  # noqa: E402
from recipes.sample import load_for_sampling  # noqa: E402
from recipes.train import train  # noqa: E402

EVAL_IMAGES = 1024
CAPACITY = 320  # the compiled arm's fixed capacity in studies/mnist_study.py


@torch.no_grad()
def denoising_error(model, diffusion, seed: int, batch: int = 256) -> dict[str, float]:
    """Noise-prediction MSE on the last :data:`EVAL_IMAGES` digits, packed, fixed and filled (same draws)."""
    x0, y = (v[-EVAL_IMAGES:] for v in load_mnist_digits())
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, diffusion.num_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t, _ = diffusion.q_sample(x0, t, noise)
    capacity, errors = model.capacity, {}
    for layout in ("packed", "fixed", "filled"):
        if layout == "packed":
            model.set_plan(mode="packed", capacity=None, fill=False)
        else:
            model.set_plan(mode="fixed", capacity=capacity, fill=layout == "filled")
        eps = torch.cat([model(x_t[i:i + batch], t[i:i + batch], y[i:i + batch])[:, :x0.shape[1]]
                         for i in range(0, len(x0), batch)])
        errors[layout] = (eps - noise).square().mean().item()
    return errors


def main(argv: list[str]) -> dict:
    seed, steps, out, extra = int(argv[0]), int(argv[1]), Path(argv[2]), argv[3:]
    record = {"seed": seed, "steps": steps, "overrides": extra, "eval_images": EVAL_IMAGES, "runs": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = out.parent / f"fill-runs-{seed}"
    for name in ("unfilled", "filled"):
        cfg = apply_overrides(get_recipe("mnist-dcdit-s"), [
            f"train.steps={steps}", f"train.seed={seed}", f"train.results_dir={runs}",
            f"train.run_name={name}", "train.log_every=25", "train.sample_every=0",
            "train.num_sample_images=10", f"train.ckpt_every={steps}",
            "model.overrides.plan_mode=fixed", f"model.overrides.capacity={CAPACITY}",
            f"model.overrides.fill_capacity={str(name == 'filled').lower()}", *extra])
        train(cfg)
        curve = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        model, diffusion, _, _ = load_for_sampling(str(runs / name), ema=False)
        record["runs"][name] = {"capacity": model.capacity,
                                "curve": [{"step": r["step"], "mse": r["mse"]} for r in curve if "mse" in r],
                                "denoising_mse": denoising_error(model.eval(), diffusion, seed)}
        out.write_text(json.dumps(record))
    print(json.dumps({k: {"denoising_mse": v["denoising_mse"]} for k, v in record["runs"].items()}))
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
