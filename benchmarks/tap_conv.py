"""The decoder's narrowing 3x3 conv: cuDNN against a GEMM of its taps plus a Triton shifted sum.

    python benchmarks/tap_conv.py --out benchmarks/results/tap_conv_h100.json

DC-DiT's decoder opens with a 3x3 conv from ``d`` to ``d / 4`` channels (XL: ``1152 -> 288``)
on the full grid, and cuDNN runs it at about 360 TFLOP/s on an H100, against about 600 for the
scaffold's other convs (``scaffold_ops.py``). ``chunkformer.tapconv.conv3x3_taps`` computes
it as one ``cin -> 9 * cout`` GEMM per cell and a Triton kernel that adds the nine shifted taps
in fp32. Rows per shape (bf16, channels-last, no grad): cuDNN, the taps form eager and compiled,
and its two parts alone (the GEMM; the shifted sum at each tile configuration in ``TILES``).
Columns: ms per call, TFLOP/s of the convolution's FLOPs, max relative error against fp64.

``--profile`` adds the kernels of the compiled taps form at each shape and of DC-DiT-XL's compiled
scaffold alone (256px, bf16 weights and routing, filled) with the taps path and with cuDNN, each
model's heaviest kernels listed: where a compiled graph spends what the eager form does not.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from chunkformer import tapconv  # noqa: E402
from step_speed import cuda_ms, save_result  # noqa: E402

SHAPES = ((64, 1152, 288, 32), (16, 1152, 288, 64), (64, 1024, 256, 32))  # (batch, cin, cout, grid side)
TILES = ((32, 32, 4), (32, 64, 4), (16, 32, 2), (64, 32, 4), (16, 64, 4), (32, 32, 8), (8, 32, 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", action="store_true", help="also list the kernels of the compiled forms")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error(
            "this benchmark times CUDA kernels: run it on a GPU (tests/test_tapconv.py checks them on the CPU)"
        )
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, bf16 channels-last, no grad")
    rows, profiles = [], {}
    with torch.no_grad():
        for B, cin, cout, side in SHAPES:
            x = (
                torch.randn(B, cin, side, side, device=dev)
                .to(torch.bfloat16)
                .contiguous(memory_format=torch.channels_last)
            )
            w = (torch.randn(cout, cin, 3, 3, device=dev) / (3 * cin**0.5)).to(torch.bfloat16)
            bias = torch.randn(cout, device=dev).to(torch.bfloat16)
            ref = F.conv2d(x.double(), w.double(), bias.double(), padding=1)
            flops = 2 * B * side * side * cin * cout * 9
            taps = torch.nn.functional.linear(x.permute(0, 2, 3, 1), tapconv.tap_weights(w)).unflatten(
                -1, (9, cout)
            )
            out = torch.empty(B, side, side, cout, device=dev, dtype=torch.bfloat16)
            forms = {
                "cuDNN conv": lambda: F.conv2d(x, w, bias, padding=1),
                "taps GEMM + Triton sum": lambda: tapconv.conv3x3_taps(x, w, bias),
                "taps GEMM + Triton sum, compiled": torch.compile(lambda: tapconv.conv3x3_taps(x, w, bias)),
                "taps GEMM alone": lambda: F.linear(x.permute(0, 2, 3, 1), tapconv.tap_weights(w)),
                "shifted sum alone, default tiles": lambda: tapconv.launch_tap_sum(taps, bias, out),
            }
            for tiles in TILES:
                forms[f"shifted sum alone, tiles {tiles}"] = lambda tiles=tiles: tapconv.launch_tap_sum(
                    taps, bias, out, tiles
                )
            for name, fn in forms.items():
                res = fn()
                err = None
                if res.shape == ref.shape:
                    err = float((res.double() - ref).abs().max() / ref.abs().max())
                elif name.startswith("shifted"):
                    cmp = tapconv.tap_sum_reference(taps, bias).permute(0, 2, 3, 1)
                    err = float((res.double() - cmp.double()).abs().max() / cmp.double().abs().max())
                t = cuda_ms(fn, 50)
                row = {
                    "shape": [B, cin, cout, side],
                    "form": name,
                    "ms": t,
                    "tflops": flops / t / 1e9,
                    "rel_err": err,
                }
                rows.append(row)
                print(
                    f"{B}x{cin}->{cout} {side}x{side}  {name:<40} {t:8.4f} ms {row['tflops']:6.0f} TFLOP/s  "
                    f"err {err if err is None else f'{err:.1e}'}",
                    flush=True,
                )
            if args.profile:
                profiles[f"taps compiled {B}x{cin}->{cout} {side}x{side}"] = kernels(
                    forms["taps GEMM + Triton sum, compiled"]
                )
        if args.profile:
            profiles.update(scaffold_kernels(dev))
    for name, ks in profiles.items():
        print(f"\n{name}: GPU ms per call by kernel")
        for k, v in list(ks.items())[:14]:
            print(f"{v:8.3f}  {k[:110]}")
    save_result(args.out, card, rows=rows, **({"profiles": profiles} if profiles else {}))


def kernels(fn, reps: int = 10) -> dict[str, float]:
    """GPU ms per call of each kernel ``fn`` launches, heaviest first (top 30), then ``"(all N launches)"``: the
    sum over every kernel (set against the call's GPU time, the rest is idle time between kernels)."""
    from torch.profiler import ProfilerActivity, profile

    cuda_ms(fn, 3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    per = {e.key: e.self_device_time_total / 1e3 / reps for e in events}
    launches = round(sum(e.count for e in events) / reps)
    return dict(sorted(per.items(), key=lambda kv: -kv[1])[:30]) | {f"(all {launches} launches)": sum(per.values())}


def scaffold_kernels(dev) -> dict[str, dict[str, float]]:
    """DC-DiT-XL's scaffold alone at 256px (batch 64), compiled, with the taps path and with cuDNN."""
    import chunkformer as cf
    from scaffold_compile import serving_scaffold

    out = {}
    for taps in (True, False):
        m, inputs = serving_scaffold(256, dev)
        if not taps:
            cf.set_taps_narrowing(m, False)
        fn = torch.compile(m)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out[f"scaffold only, {'taps' if taps else 'cuDNN'} narrowing conv"] = kernels(
                lambda fn=fn: fn(*inputs)
            )
    return out


if __name__ == "__main__":
    main()
