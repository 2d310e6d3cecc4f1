"""How fast does DC-DiT train against DiT of the same width, and how much memory does it take?

    python benchmarks/train_speed.py --compile    # GPU, about 3 min: writes results/train_speed_256_compiled_<card>.json
    python benchmarks/train_speed.py              # eager (the recipes' packed plans): train_speed_256_eager_<card>.json
    python benchmarks/train_speed.py --tiny       # CPU smoke run (nothing written)

Training throughput (forward + backward + AdamW) and peak memory.

DC-DiT-B / DC-DiT-XL against DiT-B/2 / DiT-XL/2 at 256px (32x32 latents), batch 64, bf16
autocast, fused AdamW, eager (the recipes' training path: packed plans, default attention
backend). The DC-DiT router is biased to keep every token and a tail drop of 0.75 leaves a
quarter of the grid, the budget rule a trained DC-DiT with N = 4 follows, so both models see
256 tokens in the backbone. Columns: images/s, the measured and the FLOP-predicted speed-up
over the DiT of the same width (training FLOPs taken as 3x the forward's), and peak memory; one
printed row per model. ``--compile`` compiles both models, DC-DiT in fixed-capacity mode.
"""

import argparse
import time
from pathlib import Path

import torch

from common import card_name, save_result

import chunkformer as cf


def throughput(model, x, t, y, steps: int, **kw) -> tuple[float, float]:
    """(images per second, peak memory in GiB) of ``steps`` training steps after a warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.is_cuda)  # (a compiled model shares them)
    cuda = x.is_cuda

    def step():  # one training step
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out, info = model(x, t, y, return_info=True, **kw)
            loss = out.float().square().mean() + 0.03 * info.ratio_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, peak = time_steps(step, steps, cuda)
    return x.shape[0] * steps / seconds, peak


def time_steps(step, steps: int, cuda: bool, warmup: int = 3) -> tuple[float, float]:
    """(seconds for ``steps`` calls of ``step`` after ``warmup`` calls, peak memory in GiB or NaN off CUDA)."""
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile both models; DC-DiT in fixed-capacity mode (capacity L/4, static shapes)")
    ap.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/<name>.json)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latent, batch, steps = (16, 2, 2) if args.tiny else (32, args.batch, args.steps)
    sizes = dict(depth=2, hidden_size=64, num_heads=2) if args.tiny else {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    rows = []
    for width in ("B", "XL"):
        pair = {}
        for name in (f"DiT-{width}/2", f"DC-DiT-{width}"):
            torch.manual_seed(0)
            fixed = dict(plan_mode="fixed", capacity=latent * latent // 4) if args.compile and "DC" in name else {}
            model = cf.create_model(name, input_size=latent, **sizes, **fixed).to(device).train()
            kw = {}
            if model.supports_chunking:
                torch.nn.init.constant_(model.router.scorer[-1].bias, 30.0)  # keep all, then drop 3/4
                kw = {} if fixed else {"rho": 0.75}  # fixed mode: the capacity is the budget
            flops = cf.count_flops(model, x, t, y, **kw).per_sample * 3  # forward + backward
            ips, peak = throughput(torch.compile(model) if args.compile else model, x, t, y, steps, **kw)
            pair[name] = {"model": name, "images_per_s": ips, "train_gflops_per_image": flops / 1e9,
                          "peak_gib": peak}
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dit, dc = pair[f"DiT-{width}/2"], pair[f"DC-DiT-{width}"]
        for r in (dit, dc):
            r["measured_speedup"] = r["images_per_s"] / dit["images_per_s"]
            r["flop_speedup"] = dit["train_gflops_per_image"] / r["train_gflops_per_image"]
            rows.append(r)
    card = card_name() if device.type == "cuda" else "cpu"
    mode = "torch.compile, DC-DiT fixed capacity" if args.compile else "eager"
    print(f"\n{card}, torch {torch.__version__}, 256px (latent {latent}x{latent}), batch {batch}, {mode}, bf16 autocast")
    print(f"{'model':<12}{'img/s':>9}{'GFLOPs/img':>12}{'speed-up':>10}{'FLOP pred':>10}{'peak GiB':>10}")
    for r in rows:
        print(f"{r['model']:<12}{r['images_per_s']:>9.1f}{r['train_gflops_per_image']:>12.1f}"
              f"{r['measured_speedup']:>10.2f}{r['flop_speedup']:>10.2f}{r['peak_gib']:>10.2f}")
    config = f"{latent * 8}_{'compiled' if args.compile else 'eager'}"
    return save_result("train_speed", config, card, out=args.out, write=not args.tiny, batch=batch,
                       compiled=args.compile, rows=rows)


if __name__ == "__main__":
    main()
