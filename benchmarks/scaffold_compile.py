"""DC-DiT-XL's scaffold alone under inductor's compile settings: which one runs it fastest.

    python benchmarks/scaffold_compile.py --out benchmarks/results/scaffold_compile_256_h100.json
    python benchmarks/scaffold_compile.py --size 512 --variants default,coordinate-descent

The scaffold (embed, encoder, router, chunk, de-chunk, decoder, final layer: DC-DiT-XL with no
blocks) in the serving configuration (bf16 weights and routing, filled fixed-capacity plan of a
quarter of the grid), compiled once per variant of ``VARIANTS``:

* ``default``: ``torch.compile(model)``, what ``step_speed.py`` and the sampling recipe run;
* ``coordinate-descent``: inductor tunes each Triton kernel's block sizes and warps by local search;
* ``combo-kernels``: independent small kernels launched as one;
* ``pointwise-autotune``: more configurations timed for each pointwise and reduction kernel;
* ``max-autotune``: ``mode="max-autotune-no-cudagraphs"``, GEMM and conv templates timed against
  cuBLAS and cuDNN (more than 9 minutes of compiling on an H100);
* ``multi-kernel``: every reduction compiled both persistent (one read of each row) and looped,
  the faster picked when it first runs; by default a reduction over more than 1024 elements, such
  as a norm over ``d = 1152`` channels, is looped and reads its input twice.

Every variant is compiled and warmed, then all are timed in interleaved rounds (median round).
Columns: compile seconds (first call), GPU ms per call, ratio to ``default`` and the largest
difference of its output from ``default``'s (the zero-initialised layers get random weights, so
the output depends on every op). The scaffold is the part of the step whose time
exceeds its FLOP share (``step_speed.py``), and most of that excess is memory-bound Triton
kernels (``tap_conv.py --profile``), which is what these settings tune.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import chunkformer as cf  # noqa: E402
from step_speed import cuda_ms, save_result  # noqa: E402

VARIANTS = {  # name -> torch.compile keyword arguments
    "default": {},
    "coordinate-descent": {"options": {"coordinate_descent_tuning": True}},
    "combo-kernels": {"options": {"combo_kernels": True}},
    "pointwise-autotune": {"options": {"max_autotune_pointwise": True}},
    "max-autotune": {"mode": "max-autotune-no-cudagraphs"},
    "multi-kernel": {"options": {"triton.multi_kernel": 1}},
    "multi-kernel + coordinate-descent": {"options": {"triton.multi_kernel": 1, "coordinate_descent_tuning": True}},
}


def serving_scaffold(size: int, device: torch.device, batch: int | None = None):
    """DC-DiT-XL with no blocks at ``size`` px (batch 64 at 256, 16 at 512), bf16 weights and routing,
    filled plan of ``L / 4`` tokens, every token kept by the router; returns ``(model, (x, t, y))``."""
    side = size // 8
    batch = batch or (64 if size == 256 else 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, side, side, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    torch.manual_seed(0)
    model = cf.create_model(
        "DC-DiT-XL", input_size=side, depth=0, plan_mode="fixed", capacity=side * side // 4,
        fill_capacity=True, fp32_router_dechunk=False,
    ).to(device).eval()
    torch.nn.init.constant_(model.router.scorer[-1].bias, 30.0)  # keep everything: the capacity decides
    with torch.no_grad():  # zero-init layers (final layer, residual, modulations) would make the output 0
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    return model.to(torch.bfloat16), (x, t, y)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, choices=(256, 512), default=256)
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "max-autotune"),
                    help=f"comma-separated, from {list(VARIANTS)} (default: all but max-autotune, which compiles "
                         "for longer than a 10-minute GPU call)")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also list each variant's heaviest kernels")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    if "default" not in names:
        names.insert(0, "default")  # the baseline of every ratio
    if not torch.cuda.is_available():
        ap.error("this benchmark times compiled CUDA graphs: run it on a GPU")
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name()
    torch._dynamo.config.recompile_limit = 64  # one graph per variant, all on DCDiT.forward
    model, inputs = serving_scaffold(args.size, dev)
    compiled, compile_s, outputs = {}, {}, {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for name in names:
            fn = torch.compile(model, **VARIANTS[name])
            start = time.perf_counter()
            outputs[name] = fn(*inputs).float()
            torch.cuda.synchronize()
            compile_s[name] = time.perf_counter() - start
            compiled[name] = fn
            print(f"compiled: {name} ({compile_s[name]:.0f} s)", flush=True)
        times = {name: [] for name in names}
        for _ in range(args.rounds):  # interleaved: drift falls on every variant alike
            for name in names:
                times[name].append(cuda_ms(compiled[name], args.reps, *inputs))
        profiles = {}
        if args.profile:
            from tap_conv import kernels

            profiles = {name: kernels(lambda fn=compiled[name]: fn(*inputs)) for name in names}
    base = statistics.median(times["default"])
    rows = []
    for name in names:
        ms = statistics.median(times[name])
        diff = (outputs[name] - outputs["default"]).abs().max().item()
        rows.append({"variant": name, "compile_s": compile_s[name], "ms": ms, "vs_default": base / ms,
                     "max_abs_diff": diff, "rounds": times[name]})
    head = (f"{card}, torch {torch.__version__}, DC-DiT-XL scaffold only, {args.size}px, batch {inputs[0].shape[0]}, "
            "bf16 weights + routing, filled, median of interleaved rounds")
    print(f"\n{head}\n{'variant':34s} {'compile s':>9s} {'ms':>8s} {'speed-up':>8s} {'max |diff|':>10s}")
    for r in rows:
        print(f"{r['variant']:34s} {r['compile_s']:9.0f} {r['ms']:8.3f} {r['vs_default']:8.3f} {r['max_abs_diff']:10.2e}")
    for name, ks in profiles.items():
        print(f"\n{name}: GPU ms per call by kernel")
        for k, v in list(ks.items())[:12]:
            print(f"{v:8.3f}  {k[:100]}")
    return save_result(args.out, card, size=args.size, batch=inputs[0].shape[0], rows=rows,
                       **({"profiles": profiles} if profiles else {}))


if __name__ == "__main__":
    main()
