"""Where the DC-DiT scaffold spends its time on a GPU, and what cuDNN autotuning and channels-last change.

    python benchmarks/scaffold_profile.py --size 256        # CUDA

Times the scaffold alone (DC-DiT-XL with no blocks, fixed capacity L/4, compiled, bf16
autocast, batch 64 at 256px / 16 at 512px) under three settings, then prints the top CUDA
kernels of the baseline. The scaffold's FLOP share of the full rho=0 step is printed by
benchmarks/step_speed.py.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chunkformer as cf  # noqa: E402


def ms(fn, *args, reps=20):
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    dev = torch.device("cuda")
    latent = args.size // 8
    B = {256: 64, 512: 16}[args.size]
    L = latent * latent
    x = torch.randn(B, 4, latent, latent, device=dev)
    t = torch.randint(0, 1000, (B,), device=dev)
    y = torch.randint(0, 1000, (B,), device=dev)
    results = {}
    for name, channels_last, bench in (("baseline", False, False), ("cudnn.benchmark", False, True),
                                       ("channels_last + cudnn.benchmark", True, True)):
        torch.backends.cudnn.benchmark = bench
        torch.manual_seed(0)
        model = cf.create_model("DC-DiT-XL", input_size=latent, depth=0, plan_mode="fixed", capacity=L // 4)
        model = model.to(dev).eval()
        torch.nn.init.constant_(model.router.scorer[-1].bias, 30.0)
        xi = x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            xi = x.contiguous(memory_format=torch.channels_last)
        fn = torch.compile(model)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            results[name] = ms(fn, xi, t, y)
            if name == "baseline":
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn(xi, t, y)
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
        print(f"{name}: {results[name]:.2f} ms", flush=True)
    torch.backends.cudnn.benchmark = False
    print(f"\nscaffold only, {args.size}px, batch {B}, compiled, bf16 autocast ({torch.cuda.get_device_name()})")
    for k, v in results.items():
        print(f"  {k:<24}{v:8.2f} ms")
    print(table)


if __name__ == "__main__":
    main()
