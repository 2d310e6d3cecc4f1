"""Does GELU in fc1's GEMM epilogue beat fc1 then inductor's GELU pass? DiT-XL's MLP input layer, bf16.

    python benchmarks/gelu_epilogue.py --out benchmarks/results/gelu_epilogue_h100.json   # GPU, ~1 min
    python benchmarks/gelu_epilogue.py --tiny                                             # CPU smoke run

A DiT block's MLP is ``fc2(gelu_tanh(fc1(x)))``. Compiled, inductor runs fc1 as a cuBLAS GEMM and the GELU
as a Triton pass over its ``(tokens, 4d)`` output: a read and a write of the block's largest tensor, about
9% of a DiT-XL/2 sampling step on an H100. ``torch._addmm_activation(bias, x, W.t(), use_gelu=True)`` asks
cuBLASLt for the GEMM with bias and tanh-GELU in its epilogue, and inductor keeps it as one extern call.
This script times, for each token count, fc1 + GELU both ways (compiled, from CUDA graphs) and their
largest difference against an fp32 reference.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chunkformer.models.dit import gelu_linear  # noqa: E402
from step_speed import graph_ms, save_result, step_ms  # noqa: E402


def separate(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


epilogue = gelu_linear  # the library's fused form: torch._addmm_activation(b, x, w.t(), use_gelu=True) on CUDA


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="10240,13312,16384", metavar="INTS",
                    help="GEMM rows (batch x tokens), comma-separated: 64 x 160 / 208 / 256 by default")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU, eager (a smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        rows = [int(s) for s in args.tokens.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--tokens takes comma-separated integers, got {args.tokens!r}")
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        ap.error("this benchmark needs a CUDA device; use --tiny for a CPU smoke run")
    device = torch.device("cuda" if cuda else "cpu")
    dim, hidden = (1152, 4608) if not args.tiny else (64, 256)
    if args.tiny:
        rows = [32, 48]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(hidden, dim, generator=g) * dim ** -0.5).to(device, torch.bfloat16)
    b = (torch.randn(hidden, generator=g) * 0.1).to(device, torch.bfloat16)
    results = []
    with torch.no_grad():
        for m in rows:
            x = torch.randn(m, dim, generator=g).to(device, torch.bfloat16)
            ref = separate(x.double(), w.double(), b.double())
            row = {"rows": m}
            for name, fn in (("separate", separate), ("epilogue", epilogue)):
                f = torch.compile(fn) if cuda else fn
                out = f(x, w, b)
                row[f"{name}_err"] = (out.double() - ref).abs().max().item()
                row[f"{name}_ms"] = graph_ms(lambda: f(x, w, b), args.reps) if cuda else step_ms(f, args.reps, x, w, b)
            row["speedup"] = row["separate_ms"] / row["epilogue_ms"]
            results.append(row)
            print(f"{m} rows: {row['separate_ms']:.4f} / {row['epilogue_ms']:.4f} ms", flush=True)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\n{card}, torch {torch.__version__}, fc1 {dim} -> {hidden} + tanh-GELU, bf16, "
          f"{'compiled, CUDA-graph clock' if cuda else 'eager'}; ms per call")
    print(f"{'rows':>7}{'separate':>10}{'epilogue':>10}{'speed-up':>10}{'err sep':>10}{'err epi':>10}")
    for r in results:
        print(f"{r['rows']:>7}{r['separate_ms']:>10.4f}{r['epilogue_ms']:>10.4f}{r['speedup']:>10.2f}"
              f"{r['separate_err']:>10.1e}{r['epilogue_err']:>10.1e}")
    return save_result(args.out, card, dim=dim, hidden=hidden, rows=results)


if __name__ == "__main__":
    main()
