"""Convs as one GEMM over each cell's 3x3 neighbourhood (im2col), with the skip's input in the same GEMM.

    python benchmarks/cell_gemm.py --out benchmarks/results/cell_gemm_h100.json      # CUDA, about 2 minutes

The question: two of the scaffold's convs run well below what a GEMM of their FLOPs reaches on an H100. The
encoder's widening ``3x3 288 -> 1152`` takes 0.75 ms in cuDNN (about 520 TFLOP/s, where the scaffold's GEMMs
reach 750), and its ``1x1 288 -> 1152`` skip another GEMM; the ``3x3 4 -> 288`` embed moves 38 MB in 0.075 ms
(``scaffold_ops_h100.json``). Written as a GEMM over each cell's nine neighbours, padded with zeros, the
widening conv and the skip are one product:

    [n(inner)_1 .. n(inner)_9 | x] @ [W_1; ..; W_9; W_skip]     (B H W, 9 * 288 + 288) @ (2880, 1152)

at the price of writing and reading the ``(B H W, 2880)`` columns (330 MB at 256px). The embed's columns are
only 36 wide. Each form runs compiled (inductor writes the columns in one kernel; cuBLAS runs the GEMM) and
is timed from CUDA graphs, with its relative error against fp64. Shapes are DC-DiT-XL's at 256px (batch 64,
a 32x32 grid); the 512px scaffold has the same number of cells.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from step_speed import graph_ms, save_result  # noqa: E402


def neighbourhoods(g: torch.Tensor, extra: torch.Tensor | None = None, pad_to: int = 1) -> torch.Tensor:
    """``g`` ``(B, C, H, W)`` -> ``(B H W, 9 C [+ C_extra])``: each cell's 3x3 neighbours, raster order, zeros
    outside the grid, then ``extra``'s channels of the cell itself; zero columns up to a multiple of ``pad_to``."""
    B, C, H, W = g.shape
    p = F.pad(g.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, H + 2, W + 2, C)
    cols = [p[:, a : a + H, b : b + W] for a in range(3) for b in range(3)]
    if extra is not None:
        cols.append(extra.permute(0, 2, 3, 1))
    width = sum(c.shape[-1] for c in cols)
    if width % pad_to:
        cols.append(g.new_zeros(B, H, W, pad_to - width % pad_to))
    return torch.cat(cols, -1).reshape(B * H * W, -1)


def neighbourhood_weights(weight: torch.Tensor, skip: torch.Tensor | None = None, pad_to: int = 1) -> torch.Tensor:
    """3x3 weights ``(O, C, 3, 3)`` (and 1x1 ``skip`` ``(O, C_extra, 1, 1)``) -> ``(9 C [+ C_extra], O)``,
    rows in :func:`neighbourhoods`' column order."""
    rows = [rearrange(weight, "o c a b -> (a b c) o")]
    if skip is not None:
        rows.append(rearrange(skip, "o c 1 1 -> c o"))
    w = torch.cat(rows)
    if w.shape[0] % pad_to:
        w = torch.cat([w, w.new_zeros(pad_to - w.shape[0] % pad_to, w.shape[1])])
    return w


def to_grid(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """GEMM output ``(B H W, O)`` -> ``(B, O, H, W)`` over the same (channels-last) buffer."""
    B, _, H, W = like.shape
    return y.view(B, H, W, -1).permute(0, 3, 1, 2)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--dim", type=int, default=1152, help="token width d (the scaffold's width is d/4)")
    ap.add_argument("--in-channels", type=int, default=4)
    ap.add_argument("--reps", type=int, default=50, help="calls per CUDA graph")
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU, eager, untimed (a smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        ap.error("this benchmark times CUDA kernels; --tiny runs small shapes on the CPU")
    dev, bf, cl = torch.device("cpu" if args.tiny else "cuda"), torch.bfloat16, torch.channels_last
    B, S, d, cin = args.batch, args.grid, args.dim, args.in_channels
    if args.tiny:
        B, S, d = 2, 6, 64
    w = d // 4
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(bf)

    compile_ = (lambda f: f) if args.tiny else (lambda f: torch.compile(f, fullgraph=True, dynamic=False))
    inner, x = randn(B, w, S, S).to(memory_format=cl), randn(B, w, S, S).to(memory_format=cl)
    latent = randn(B, cin, S, S)  # NCHW, as the sampler hands it over
    w2, w_skip = randn(d, w, 3, 3, scale=w**-0.5 / 3), randn(d, w, 1, 1, scale=w**-0.5)
    w_embed = randn(w, cin, 3, 3, scale=cin**-0.5 / 3)
    w2_t, w2s_t = neighbourhood_weights(w2), neighbourhood_weights(w2, w_skip)
    we_t, we8_t = neighbourhood_weights(w_embed), neighbourhood_weights(w_embed, pad_to=8)

    widening_ref = (F.conv2d(inner.double(), w2.double(), padding=1) + F.conv2d(x.double(), w_skip.double()))
    embed_ref = F.conv2d(latent.double(), w_embed.double(), padding=1)
    latent_cl = latent.to(memory_format=cl)
    cases = {
        "widening 3x3 288->1152 + 1x1 skip": (widening_ref, 2 * B * S * S * d * w * 10, {
            "cuDNN conv + skip GEMM (the library's)": lambda: F.conv2d(inner, w2, padding=1)
            + to_grid(x.permute(0, 2, 3, 1).reshape(-1, w) @ w_skip.flatten(1).t(), x),
            "cuDNN conv + skip GEMM, outputs apart (timed without the add)": lambda: (
                F.conv2d(inner, w2, padding=1), x.permute(0, 2, 3, 1).reshape(-1, w) @ w_skip.flatten(1).t()),
            "neighbourhood GEMM, then skip GEMM": compile_(lambda: to_grid(neighbourhoods(inner) @ w2_t, inner)
                                                           + to_grid(x.permute(0, 2, 3, 1).reshape(-1, w) @ w_skip.flatten(1).t(), x)),
            "one neighbourhood GEMM with the skip's input": compile_(lambda: to_grid(neighbourhoods(inner, x) @ w2s_t, inner)),
            "four cuDNN convs of 288 outputs + skip GEMM": compile_(lambda: torch.cat(
                [F.conv2d(inner, wq, padding=1) for wq in w2.chunk(4)], 1).contiguous(memory_format=cl)
                + to_grid(x.permute(0, 2, 3, 1).reshape(-1, w) @ w_skip.flatten(1).t(), x)),
        }),
        "embed 3x3 4->288": (embed_ref, 2 * B * S * S * w * cin * 9, {
            "cuDNN conv on a channels-last copy (the library's)": compile_(
                lambda: F.conv2d(latent.contiguous(memory_format=cl), w_embed, padding=1)),
            "cuDNN conv, channels-last input given": lambda: F.conv2d(latent_cl, w_embed, padding=1),
            "neighbourhood GEMM, 36 columns": compile_(lambda: to_grid(neighbourhoods(latent) @ we_t, latent)),
            "neighbourhood GEMM, 40 columns": compile_(lambda: to_grid(neighbourhoods(latent, pad_to=8) @ we8_t, latent)),
        }),
    }
    card = "cpu" if args.tiny else torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, batch {B}, grid {S}x{S}, d {d}, bf16 channels-last")
    rows = []
    with torch.no_grad():
        for op, (ref, flops, forms) in cases.items():
            for form, fn in forms.items():
                out = fn()
                out = sum(o.reshape(ref.shape[0], ref.shape[2], ref.shape[3], -1).permute(0, 3, 1, 2)
                          if o.ndim == 2 else o for o in out) if isinstance(out, tuple) else out
                ms = float("nan") if args.tiny else graph_ms(fn, args.reps)
                rows.append({"op": op, "form": form, "ms": ms, "tflops": flops / ms / 1e9, "rel_err": rel_err(out, ref)})
                print(f"{op:<36}{form:<64}{ms:>8.4f} ms {rows[-1]['tflops']:>6.0f} TFLOP/s  err {rows[-1]['rel_err']:.1e}",
                      flush=True)
    return save_result(args.out, card, batch=B, grid=S, dim=d, reps=args.reps, rows=rows)


if __name__ == "__main__":
    main()
