"""A 3x3 conv as an implicit GEMM in Triton, its tiles loaded by TMA: can it beat cuDNN on the scaffold's shapes?

    python benchmarks/implicit_conv.py --out benchmarks/results/implicit_conv_h100.json    # CUDA, a few minutes
    TRITON_INTERPRET=1 python benchmarks/implicit_conv.py --tiny                            # CPU, fp32: correctness only

cuDNN runs the scaffold's ``3x3 288 -> 288`` convs at about 600 TFLOP/s on an H100 and the widening ``288 -> 1152``
at about 520, where its GEMMs reach 750 (``scaffold_ops_h100.json``). The candidate: a program per
``(BLOCK_M cells, BLOCK_N outputs)`` tile walks the nine taps and the input channels in ``BLOCK_K`` slices. The
input tile of a tap is a ``(rows, W, BLOCK_K)`` box of the channels-last input at the tap's offset, loaded by TMA,
which fills the cells outside the grid (and channels past ``C``) with zeros: no padded copy, no masks. The
weights are ``(9, C, N)``, a ``(BLOCK_K, BLOCK_N)`` box per step. Each configuration is timed from CUDA graphs
against cuDNN on the same tensors, with its largest error against fp64.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from step_speed import graph_ms, save_result  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402


@triton.jit
def _conv3x3_kernel(x_desc, w_desc, out_desc, bias_ptr, H, W, C, N,
                    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """Program (cell tile, output tile): ``ROWS x WIDTH`` cells of one image (``WIDTH == W``) by ``BLOCK_N`` outputs."""
    BLOCK_M: tl.constexpr = ROWS * WIDTH
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    tiles_per_image = H // ROWS
    img, i0 = pid_m // tiles_per_image, (pid_m % tiles_per_image) * ROWS
    n0 = pid_n * BLOCK_N
    k_steps = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in tl.range(0, 9 * k_steps, num_stages=STAGES):
        tap, k0 = it // k_steps, (it % k_steps) * BLOCK_K
        dy, dx = tap // 3 - 1, tap % 3 - 1
        a = x_desc.load([img, i0 + dy, dx, k0]).reshape(BLOCK_M, BLOCK_K)  # zeros outside the grid
        b = w_desc.load([tap, k0, n0]).reshape(BLOCK_K, BLOCK_N)
        acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        ns = n0 + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + ns, mask=ns < N, other=0.0).to(tl.float32)[None, :]
    out_desc.store([pid_m * BLOCK_M, n0], acc.to(out_desc.dtype))


def conv3x3(x: torch.Tensor, w9: torch.Tensor, bias: torch.Tensor | None, tiles: tuple[int, int, int, int, int]) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` channels-last, ``w9`` ``(9, C, N)`` -> ``(B, N, H, W)`` channels-last."""
    rows, block_n, block_k, stages, warps = tiles
    B, C, H, W = x.shape
    N = w9.shape[-1]
    out = torch.empty(B, H, W, N, device=x.device, dtype=x.dtype)
    x_desc = TensorDescriptor.from_tensor(x.permute(0, 2, 3, 1), [1, rows, W, block_k])
    w_desc = TensorDescriptor.from_tensor(w9, [1, block_k, block_n])
    out_desc = TensorDescriptor.from_tensor(out.view(B * H * W, N), [rows * W, block_n])
    grid = (B * (H // rows), triton.cdiv(N, block_n))
    _conv3x3_kernel[grid](x_desc, w_desc, out_desc, bias if bias is not None else out, H, W, C, N,
                          HAS_BIAS=bias is not None, ROWS=rows, WIDTH=W, BLOCK_N=block_n, BLOCK_K=block_k,
                          STAGES=stages, num_warps=warps)
    return out.permute(0, 3, 1, 2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--shapes", default="288x288,288x1152,1152x288", help="cin x cout pairs")
    ap.add_argument("--reps", type=int, default=30, help="calls per CUDA graph")
    ap.add_argument("--all-tilings", action="store_true",
                    help="4 warps too (a first H100 sweep found 8 as fast or faster, and 4 warps spilling at N 256)")
    ap.add_argument("--tiny", action="store_true", help="small shapes, one tiling each, untimed (a correctness run)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, S = (2, 8) if args.tiny else (args.batch, args.grid)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.tiny:
        shapes = [(32, 32), (32, 64), (64, 16)]
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    dtype = torch.float32 if args.tiny else torch.bfloat16  # Triton's interpreter mis-reads bf16 through descriptors
    print(f"{card}, torch {torch.__version__}, triton {triton.__version__}, batch {B}, grid {S}x{S}, "
          f"{str(dtype).removeprefix('torch.')} channels-last")
    if dev.type == "cuda":  # scratch for descriptors made on the device (the recorded run had it; host ones do not need it)
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for cin, cout in shapes:
        x = torch.randn(B, cin, S, S, generator=g, device=dev).to(dtype).to(memory_format=torch.channels_last)
        w = (torch.randn(cout, cin, 3, 3, generator=g, device=dev) * cin**-0.5 / 3).to(dtype)
        bias = torch.randn(cout, generator=g, device=dev).to(dtype)
        w9 = w.permute(2, 3, 1, 0).reshape(9, cin, cout).contiguous()
        ref = F.conv2d(x.double(), w.double(), bias.double(), padding=1)
        ref_nb = ref - bias.double()[:, None, None]
        flops = 2 * B * S * S * cin * cout * 9
        w_cl = w.to(memory_format=torch.channels_last)  # as a compiled model holds them: NCHW weights cost cuDNN a transform
        forms = {"cuDNN": lambda: F.conv2d(x, w_cl, bias, padding=1),
                 "cuDNN, NCHW weights": lambda: F.conv2d(x, w, bias, padding=1),
                 "cuDNN, no bias (the scaffold adds it in the next norm)": lambda: F.conv2d(x, w_cl, None, padding=1)}
        if args.tiny:
            tilings = [(2, 16, 16, 2, 4)]
        else:
            tilings = [t for t in itertools.product([2, 4, 8], [64, 128, 256], [32, 64], [3, 4], [4, 8] if args.all_tilings else [8])
                       if t[0] * S in (128, 256) and t[1] <= max(64, triton.next_power_of_2(cout))
                       and not (t[0] * S == 256 and t[1] == 256)]
        for t in tilings:
            forms["triton rows %d, N %d, K %d, stages %d, warps %d" % t] = (lambda t=t: conv3x3(x, w9, bias, t))
        for form, fn in forms.items():
            try:
                out = fn()
                ms = float("nan") if args.tiny or dev.type != "cuda" else graph_ms(fn, args.reps)
                want = ref_nb if "no bias" in form else ref
                err = float((out.double() - want).abs().max() / want.abs().max())
                rows.append({"shape": f"{cin}->{cout}", "form": form, "ms": ms, "tflops": flops / ms / 1e9, "rel_err": err})
            except Exception as e:  # noqa: BLE001 - a tiling that does not compile or fit is a row, not a crash
                rows.append({"shape": f"{cin}->{cout}", "form": form, "ms": float("nan"), "tflops": float("nan"),
                             "rel_err": float("nan"), "error": f"{type(e).__name__}: {str(e)[:160]}"})
            r = rows[-1]
            print(f"{r['shape']:<12}{form:<46}{r['ms']:>8.4f} ms {r['tflops']:>6.0f} TFLOP/s  err {r['rel_err']:.1e}"
                  + (f"  {r['error']}" if "error" in r else ""), flush=True)
    print("\nbest per shape:")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape]
        base = next(r for r in mine if r["form"].startswith("cuDNN, no bias"))  # as the compiled scaffold calls it
        best = min((r for r in mine if r["form"].startswith("triton") and r["ms"] == r["ms"]), key=lambda r: r["ms"], default=None)
        if best:
            print(f"{shape:<12} cuDNN without bias {base['ms']:.4f} ms, {best['form']} {best['ms']:.4f} ms "
                  f"({base['ms'] / best['ms']:.2f}x)")
    return save_result(args.out, card, batch=B, grid=S, rows=rows)


if __name__ == "__main__":
    main()
