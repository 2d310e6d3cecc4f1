"""De-chunk smoothing: the windowed (normalised convolution) form against the dense (B, M, M) kernel.

    python benchmarks/smoothing.py --device cuda --out benchmarks/results/smoothing_h100.json
    python benchmarks/smoothing.py --device cuda --compile --out benchmarks/results/smoothing_compiled_h100.json
    python benchmarks/smoothing.py --tiny                                   # CPU smoke run

For each grid (32x32 batch 64, 64x64 batch 16, 128x128 batch 4; about a quarter of the tokens
kept, DC-DiT-XL's width d = 1152, fp32 as the de-chunk runs): median milliseconds of
:func:`~chunkformer.smooth_dense` and :func:`~chunkformer.smooth_windowed`, what ``"auto"``
picks, the peak memory each allocates beyond its inputs (CUDA), and the relative error of the
windowed form against the dense one at sigma 1, 2 and 4 (max |windowed - dense| over max |dense|,
kept slots only, float64 on a smaller batch). Eager by default; ``--compile`` times both forms
through ``torch.compile`` (one graph per grid), as a compiled sampling step runs them.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chunkformer import ChunkPlan, smooth_dense, smooth_windowed  # noqa: E402
from chunkformer.dechunk import resolve_smoothing  # noqa: E402
from step_speed import save_result  # noqa: E402  (benchmarks/ is on the path when run as a script)

CASES = [((32, 32), 64), ((64, 64), 16), ((128, 128), 4)]  # (grid, batch)


def inputs(grid, batch, dim, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = math.prod(grid)
    probs = torch.rand(batch, L, generator=g)
    mask = probs > 0.75
    mask[:, 0] = True
    plan = ChunkPlan.from_mask(mask.to(device), probs.to(device), grid=grid, mode="padded")
    h = torch.randn(*plan.positions.shape, dim, generator=g).to(device, dtype)
    p = torch.take_along_dim(probs.to(device, dtype), plan.positions, 1).clamp(1e-4, 1 - 1e-4)
    return h, p, plan


def timed(fn, device, repeats):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="time both forms through torch.compile")
    ap.add_argument("--tiny", action="store_true", help="small grids and width on the CPU (a smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cases, dim = CASES, args.dim
    if args.tiny:
        cases, dim, args.repeats = [((8, 8), 2), ((16, 16), 1)], 8, 2
    rows = []
    with torch.no_grad():
        for grid, batch in cases:
            h, p, plan = inputs(grid, batch, dim, device, torch.float32)
            M, L = plan.positions.shape[1], math.prod(grid)
            wrap = torch.compile if args.compile else (lambda f: f)
            dense_fn, win_fn = wrap(smooth_dense), wrap(smooth_windowed)
            dense_ms, dense_mib = timed(lambda: dense_fn(h, p, plan, 1.0), device, args.repeats)
            win_ms, win_mib = timed(lambda: win_fn(h, p, plan, 1.0), device, args.repeats)
            errors = {}
            for sigma in (1.0, 2.0, 4.0):  # float64, two samples, 64 channels: the error, not the speed
                h64, p64, plan64 = inputs(grid, 2, 64, device, torch.float64, seed=1)
                dense = smooth_dense(h64, p64, plan64, sigma)
                v = plan64.valid
                err = (smooth_windowed(h64, p64, plan64, sigma) - dense)[v].abs().max() / dense[v].abs().max()
                errors[f"{sigma:g}"] = err.item()
            rows.append({"grid": "x".join(map(str, grid)), "batch": batch, "kept_width": M,
                         "auto": resolve_smoothing("auto", M, L, device), "dense_ms": dense_ms, "windowed_ms": win_ms,
                         "speedup": dense_ms / win_ms, "dense_peak_mib": dense_mib, "windowed_peak_mib": win_mib,
                         "relative_error": errors})
            print(f"{rows[-1]['grid']}: dense {dense_ms:.3f} ms, windowed {win_ms:.3f} ms", flush=True)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{card}, torch {torch.__version__}, d = {dim}, fp32, {'compiled' if args.compile else 'eager'}, about 25% kept")
    print("| grid | batch | M | auto | dense ms | windowed ms | speed-up | dense MiB | windowed MiB "
          "| rel. error sigma 1 / 2 / 4 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = [f"{v:.0f}" if v is not None else "-" for v in (r["dense_peak_mib"], r["windowed_peak_mib"])]
        errs = " / ".join(f"{e:.1e}" for e in r["relative_error"].values())
        print(f"| {r['grid']} | {r['batch']} | {r['kept_width']} | {r['auto']} | {r['dense_ms']:.3f} "
              f"| {r['windowed_ms']:.3f} | {r['speedup']:.1f}x | {mib[0]} | {mib[1]} | {errs} |")
    return save_result(args.out, card, dim=dim, compiled=args.compile, rows=rows)


if __name__ == "__main__":
    main()
