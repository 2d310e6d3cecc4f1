"""Does one DiT block at L tokens cost L / 256 of the block at 256? Kernel by kernel, compiled.

    python benchmarks/block_tokens.py --out benchmarks/results/block_tokens_h100.json      # GPU, ~2 min
    python benchmarks/block_tokens.py --code-dir /tmp/code                                 # also keep inductor's code
    python benchmarks/block_tokens.py --tiny                                               # CPU smoke run

A DC-DiT backbone is a DiT backbone run on fewer tokens, so a step at ``rho`` can only reach its FLOP
prediction if every kernel of a block scales with the token count. This script compiles one
DiT-XL-sized block (bf16 weights, bf16 autocast, no grad; batch 64) at each token count, times it on
the GPU's clock (a CUDA graph of calls) and sums its kernels by role (GEMM, attention, LayerNorm +
modulate, GELU, other). For each role it prints the cost per token against the 256-token block's: 1.00
is proportional, 1.5 means that role costs half as much again per token as at 256. ``--code-dir`` writes
each token count's inductor output code, to see which layout or fusion a slow kernel was given.
``--unfused-gelu`` runs the MLP's GELU as its own pass (the library's path before session 21).
"""

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chunkformer.models.dit import DiTBlock  # noqa: E402
from step_profile import kernel_ms  # noqa: E402
from step_speed import graph_ms, save_result, step_ms  # noqa: E402

ROLES = (  # first match wins, on the kernel names inductor, cuBLAS and cuDNN give (a GEMM with the GELU in its
    ("attention", r"fmha|flash|attention|sdpa|_attn"),  # epilogue is a GEMM: the fused path has no GELU kernel)
    ("gemm", r"gemm|nvjet|cutlass|gemv|matmul"),
    ("gelu", r"gelu"),
    ("layer norm", r"layer_norm|rms_norm"),
)


def role(kernel: str) -> str:
    return next((name for name, pattern in ROLES if re.search(pattern, kernel, re.IGNORECASE)), "other")


def new_code(seen: set[str]) -> str:
    """Source of the inductor output modules loaded since ``seen`` was last updated."""
    from torch._inductor.codecache import PyCodeCache

    text = []
    for mod in list(PyCodeCache.modules):
        path = getattr(mod, "__file__", None)
        if path and path not in seen:
            seen.add(path)
            text.append(f"# ---- {path}\n" + Path(path).read_text())
    return "\n".join(text)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="160,192,200,208,216,224,240,256", metavar="INTS",
                    help="token counts, comma-separated; the largest is the reference")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20, help="calls per CUDA graph and per profile")
    ap.add_argument("--code-dir", type=Path, default=None, help="write inductor's output code here, one file per count")
    ap.add_argument("--unfused-gelu", action="store_true",
                    help="the MLP's GELU as its own pass after fc1 (Mlp.fuse_gelu = False; before session 21)")
    ap.add_argument("--tiny", action="store_true", help="a small block on the CPU, eager (a smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        counts = sorted({int(s) for s in args.tokens.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--tokens takes comma-separated integers, got {args.tokens!r}")
    if not counts or counts[0] < 1:
        ap.error(f"--tokens needs positive counts, got {args.tokens!r}")
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        ap.error("this benchmark needs a CUDA device; use --tiny for a CPU smoke run")
    device = torch.device("cuda" if cuda else "cpu")
    dim, heads, batch = (1152, 16, args.batch) if not args.tiny else (64, 2, 2)
    torch.manual_seed(0)
    block = DiTBlock(dim, heads).to(device).eval()
    for p in block.parameters():  # adaLN-Zero's gates start at zero; a live block is what gets timed
        torch.nn.init.normal_(p, std=0.02)
    block = block.to(torch.bfloat16)
    block.mlp.fuse_gelu = not args.unfused_gelu
    seen: set[str] = set()
    if args.code_dir is not None:
        args.code_dir.mkdir(parents=True, exist_ok=True)
        new_code(seen)
    rows = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for n in counts:
            x = torch.randn(batch, n, dim, device=device, dtype=torch.bfloat16)
            c = torch.randn(batch, dim, device=device, dtype=torch.bfloat16)
            torch._dynamo.reset()  # one static graph per count, as one capacity bucket compiles
            fn = torch.compile(block) if cuda else block
            step_ms(fn, 1, x, c)  # compiles
            if args.code_dir is not None:
                (args.code_dir / f"block_{n}.py").write_text(new_code(seen))
            if cuda:
                ms = graph_ms(lambda: fn(x, c), args.reps)
                kernels, _ = kernel_ms(fn, args.reps, x, c)
            else:
                ms, kernels = step_ms(fn, args.reps, x, c), {}
            roles: dict[str, float] = defaultdict(float)
            for k, v in kernels.items():
                roles[role(k)] += v
            rows.append({"tokens": n, "ms": ms, "roles": dict(roles),
                         "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])})
            print(f"{n} tokens: {ms:.3f} ms", flush=True)
    ref = rows[-1]
    names = [r for r, _ in ROLES] + ["other"]
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\n{card}, torch {torch.__version__}, one DiT block (d={dim}, {heads} heads), batch {batch}, bf16, "
          f"{'compiled' if cuda else 'eager'}; ms per call, and per token against {ref['tokens']} tokens (1.00 = proportional)")
    print(f"{'tokens':>7}{'ms':>9}{'per token':>11}" + "".join(f"{n:>12}" for n in names))
    for r in rows:
        scale = ref["tokens"] / r["tokens"]
        rel = [r["roles"].get(n, 0.0) / ref["roles"][n] * scale if ref["roles"].get(n) else float("nan") for n in names]
        r["per_token_vs_ref"] = r["ms"] / ref["ms"] * scale
        r["roles_per_token_vs_ref"] = dict(zip(names, rel))
        print(f"{r['tokens']:>7}{r['ms']:>9.3f}{r['per_token_vs_ref']:>11.2f}" + "".join(f"{v:>12.2f}" for v in rel))
    return save_result(args.out, card, batch=batch, dim=dim, heads=heads, fused_gelu=not args.unfused_gelu,
                       reference_tokens=ref["tokens"], rows=rows)


if __name__ == "__main__":
    main()
