"""Where the DC-DiT scaffold spends its time on a GPU: stage by stage, and what each de-chunk form costs.

    python benchmarks/scaffold_profile.py --size 256 --out benchmarks/results/scaffold_profile_256_h100.json
    python benchmarks/scaffold_profile.py --tiny                                     # CPU smoke run

The scaffold is DC-DiT-XL with no blocks (fixed capacity L/4, the router biased to keep
everything, bf16 autocast, batch 64 at 256px / 16 at 512px, each row compiled on its own).
Rows are cumulative stages: conditioning + encoder; + router; the whole scaffold (plan, pack,
de-chunk, decoder, final layer) with each smoothing form of the de-chunk (``auto``, the
default, then ``windowed``, ``dense`` and ``none``). Differences between rows give each stage's time. The FLOP
columns come from ``count_flops`` on the same callables, so a stage whose time share is far
above its FLOP share is the one to work on. Last, the top CUDA kernels of the whole scaffold
(CUDA only).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chunkformer as cf  # noqa: E402
from step_speed import save_result, step_ms  # noqa: E402  (benchmarks/ is on the path when run as a script)
from chunkformer.dechunk import resolve_smoothing  # noqa: E402
from chunkformer.flops import FlopCounter  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, choices=(256, 512), default=256)
    ap.add_argument("--tiny", action="store_true", help="small model on the CPU, eager (a smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latent, B = args.size // 8, {256: 64, 512: 16}[args.size]
    sizes, reps = {}, 20
    if args.tiny:
        latent, B, reps, sizes = 8, 2, 1, dict(hidden_size=64, num_heads=2)
    L = latent * latent
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, latent, latent, generator=g).to(dev)
    t = torch.randint(0, 1000, (B,), generator=g).to(dev)
    y = torch.randint(0, 1000, (B,), generator=g).to(dev)
    torch.manual_seed(0)
    m = cf.create_model("DC-DiT-XL", input_size=latent, depth=0, plan_mode="fixed", capacity=L // 4, **sizes)
    m = m.to(dev).eval()
    torch.nn.init.constant_(m.router.scorer[-1].bias, 30.0)  # keep everything; capacity is the budget
    grid = (latent, latent)
    compile_ = (lambda f: f) if args.tiny or dev.type != "cuda" else torch.compile

    def encoder(x, t, y):
        c = m.t_embedder(t) + m.y_embedder(y, x.shape[0], x.device, None)
        return m.encoder(x, c)

    def router(x, t, y):
        return m.router(encoder(x, t, y), grid, rho=0.0).probs

    rows = []
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    with torch.no_grad(), autocast:
        auto = resolve_smoothing("auto", L // 4, L, dev)
        for name, fn, smoothing in (("conditioning + encoder", encoder, "auto"),
                                    ("+ router", router, "auto"),
                                    (f"whole scaffold (auto: {auto} de-chunk)", m, "auto"),
                                    ("whole scaffold (windowed de-chunk)", m, "windowed"),
                                    ("whole scaffold (dense de-chunk)", m, "dense"),
                                    ("whole scaffold (no smoothing)", m, "none")):
            m.decoder.smoothing = smoothing
            torch._dynamo.reset()
            t_ms = step_ms(compile_(fn), reps, x, t, y)
            with FlopCounter(m) as counter:
                fn(x, t, y)
            flops = counter.total / B
            rows.append({"row": name, "ms": t_ms, "gflops_per_sample": flops / 1e9})
            print(f"{name}: {t_ms:.2f} ms", flush=True)
        m.decoder.smoothing = "auto"
        kernels = []
        if dev.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            torch._dynamo.reset()
            fn = torch.compile(m)
            step_ms(fn, 2, x, t, y)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn(x, t, y)
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            kernels = [{"kernel": e.key[:120], "ms": e.self_device_time_total / 1e3, "calls": e.count}
                       for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]]
    whole = rows[2]
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"\nscaffold of DC-DiT-XL, {args.size}px (latent {latent}x{latent}), batch {B}, "
          f"{'eager' if compile_ is not torch.compile else 'each row compiled'}, bf16 autocast, {card}, torch {torch.__version__}")
    print(f"{'row':<40}{'ms':>8}{'GFLOPs/img':>12}{'time share':>12}{'FLOP share':>12}")
    for r in rows:
        r["time_share"], r["flop_share"] = r["ms"] / whole["ms"], r["gflops_per_sample"] / whole["gflops_per_sample"]
        print(f"{r['row']:<40}{r['ms']:>8.2f}{r['gflops_per_sample']:>12.2f}{r['time_share']:>12.0%}{r['flop_share']:>12.0%}")
    if kernels:
        total = sum(e.self_device_time_total for e in events) / 1e3
        print(f"\ntop CUDA kernels of the whole scaffold ({total:.2f} ms of kernels in all):")
        for k in kernels:
            print(f"  {k['ms']:7.3f} ms  x{k['calls']:<3} {k['kernel'][:100]}")
    return save_result(args.out, card, size=args.size, batch=B, rows=rows, top_kernels=kernels)


if __name__ == "__main__":
    main()
