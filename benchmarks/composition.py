"""How much do token merging and step caching save on top of chunking, alone and stacked?

    python benchmarks/composition.py --preset xl256       # GPU: writes results/composition_xl256_<card>.json
    python benchmarks/composition.py --preset xl256 --compile-merge
    python benchmarks/composition.py --preset tiny        # CPU: DiT-S/2 and DC-DiT-S, a few minutes
    python benchmarks/composition.py --preset tiny --smoke --steps 2 --batch 1 --reps 1 --out /tmp/c.json   # smoke run

Every row is one whole sampling run (DDIM, ``--steps`` steps, no guidance, the same noise and
labels) of a randomly initialised model; weights are perturbed away from the zero init so
that blocks are not identities. Rows: DiT; DC-DiT alone; DC-DiT + token merging at ratio
0.25 and 0.5; DC-DiT + step caching; DC-DiT + merging 0.5 + caching; and DiT + merging 0.5.
Columns: TFLOPs per image (FlopCounter over the whole run, so skipped steps count as skipped),
milliseconds per image, the measured and the FLOP-predicted speed-up over DiT, backbone
passes skipped, and how far each run's samples land from the un-accelerated DC-DiT's
(relative L2; random weights, so this only shows that the approximations stay small, not
image quality: docs/results.md measures FID on trained models). Prints one row per variant with
those columns.

The DC-DiT router's keep bias is calibrated (bisection on the noise at mid-trajectory) so that
about a quarter of the grid passes, the ``1/N`` a trained DC-DiT with ``N = 4`` keeps, and the
measured kept fraction over the run is printed. Everything runs
eager, in bf16 autocast on CUDA (fp32 on the CPU), with the default attention backend.
"""

import argparse
import time
from pathlib import Path

import torch

from common import save_result

import chunkformer as cf
from chunkformer.diffusion import create_diffusion
from chunkformer.diffusion.guidance import model_fn
from chunkformer.flops import FlopCounter

PRESETS = {
    # name: (DiT, DC-DiT, latent size, batch, steps, cache threshold)
    "tiny": ("DiT-S/2", "DC-DiT-S", 32, 4, 20, 0.1),
    "xl256": ("DiT-XL/2", "DC-DiT-XL", 32, 32, 50, 0.1),
    "xl512": ("DiT-XL/2", "DC-DiT-XL", 64, 8, 50, 0.1),
}


def build(name: str, size: int, device, seed: int = 0, **sizes):
    """A registry model for ``(B, 4, size, size)`` latents and 1000 classes, its weights perturbed off the zero init."""
    torch.manual_seed(seed)
    model = cf.create_model(name, input_size=size, in_channels=4, num_classes=1000, **sizes).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@torch.no_grad()
def calibrate(model, noise, y, target: float = 0.25) -> float:
    """Set the router's keep bias so that about ``target`` of the grid is kept at t = 500."""
    bias = model.router.scorer[-1].bias
    t = torch.full((noise.shape[0],), 500, device=noise.device)
    lo, hi = -20.0, 20.0
    for _ in range(25):
        mid = (lo + hi) / 2
        bias.fill_(mid)
        _, info = model(noise, t, y, return_info=True)
        lo, hi = (mid, hi) if float(info.kept_fraction.mean()) < target else (lo, mid)
    bias.fill_((lo + hi) / 2)
    return (lo + hi) / 2


@torch.no_grad()
def run(model, noise, y, steps, cache_threshold=None):
    """One DDIM sampling run from ``noise``: ``(samples (B, 4, H, W), mean kept fraction, steps the cache skipped)``."""
    diffusion = create_diffusion()
    kept = []
    fn = model_fn(model, y, on_info=lambda info: kept.append(info.kept_fraction.float().mean()))
    cache = cf.StepCache(model, cache_threshold) if cache_threshold is not None else None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=noise.is_cuda):
        x = diffusion.sample(fn, noise.shape, sampler="ddim", steps=steps, noise=noise, cache=cache)
    skipped = cache.skipped if cache is not None else 0
    return x.float(), float(torch.stack(kept).mean()), skipped


def timed(model, noise, y, steps, cache_threshold=None, reps=3):
    """Median seconds of ``reps`` sampling runs after one warm-up run."""
    run(model, noise, y, steps, cache_threshold)  # warm-up
    times = []
    for _ in range(reps):
        if noise.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(model, noise, y, steps, cache_threshold)
        if noise.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--smoke", action="store_true", help="the preset's models at toy width and depth (a fast CPU check)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--threshold", type=float, default=None, help="step-cache threshold")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile-merge", action="store_true", help="merging.apply(..., compile=True)")
    ap.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/<name>.json)")
    args = ap.parse_args(argv)
    dit_name, dc_name, size, batch, steps, threshold = PRESETS[args.preset]
    batch, steps = args.batch or batch, args.steps or steps
    threshold = args.threshold if args.threshold is not None else threshold
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, 4, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)

    sizes = dict(hidden_size=64, depth=2, num_heads=2) if args.smoke else {}
    dit, dc = build(dit_name, size, device, **sizes), build(dc_name, size, device, **sizes)
    calibrate(dc, noise, y)
    variants = [  # label, model, merge ratio, cache threshold
        (dit_name, dit, 0.0, None),
        (f"{dit_name} + merge 0.5", dit, 0.5, None),
        (dc_name, dc, 0.0, None),
        (f"{dc_name} + merge 0.25", dc, 0.25, None),
        (f"{dc_name} + merge 0.5", dc, 0.5, None),
        (f"{dc_name} + cache {threshold:g}", dc, 0.0, threshold),
        (f"{dc_name} + merge 0.5 + cache", dc, 0.5, threshold),
    ]
    rows, reference = [], None
    for label, model, ratio, cache in variants:
        if ratio:
            cf.merging.apply(model, ratio=ratio, seed=0, compile=args.compile_merge)
        with FlopCounter(model) as counter:
            sample, kept, skipped = run(model, noise, y, steps, cache)
        seconds = timed(model, noise, y, steps, cache, reps=args.reps)
        if label == dc_name:
            reference = sample
        rows.append({"variant": label, "tflops_per_image": counter.total / batch / 1e12,
                     "ms_per_image": 1e3 * seconds / batch, "kept_fraction": kept, "skipped_steps": skipped,
                     "merge_ratio": ratio, "cache_threshold": cache,
                     "_sample": sample})
        if ratio:
            cf.merging.remove(model)
        print(f"  {label}: {rows[-1]['ms_per_image']:.2f} ms/image", flush=True)
    base = rows[0]
    for r in rows:
        r["measured_speedup"] = base["ms_per_image"] / r["ms_per_image"]
        r["flop_speedup"] = base["tflops_per_image"] / r["tflops_per_image"]
        sample = r.pop("_sample")
        r["deviation_from_dcdit"] = (None if r["variant"].startswith(dit_name) else
                                     float((sample - reference).norm() / reference.norm()))
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{args.preset}: {card}, torch {torch.__version__}, batch {batch}, {steps} DDIM steps, latent {size}x{size}")
    print(f"{'variant':<34}{'TFLOPs/img':>11}{'ms/img':>9}{'speed-up':>9}{'FLOP pred':>10}{'kept':>6}{'skip':>6}{'dev':>8}")
    for r in rows:
        dev = "-" if r["deviation_from_dcdit"] is None else f"{r['deviation_from_dcdit']:.3f}"
        print(f"{r['variant']:<34}{r['tflops_per_image']:>11.3f}{r['ms_per_image']:>9.2f}{r['measured_speedup']:>9.2f}"
              f"{r['flop_speedup']:>10.2f}{r['kept_fraction']:>6.2f}{r['skipped_steps']:>6}{dev:>8}")
    config = args.preset + ("_compiled-merge" if args.compile_merge else "")
    return save_result("composition", config, card, out=args.out, preset=args.preset, compile_merge=args.compile_merge,
                       batch=batch, steps=steps, latent=size, rows=rows)


if __name__ == "__main__":
    main()
