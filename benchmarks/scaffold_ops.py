"""The scaffold's operations one by one on a GPU, each in the forms it could take: which is fastest, and how exact.

    python benchmarks/scaffold_ops.py --out benchmarks/results/scaffold_ops_h100.json      # CUDA

Shapes are DC-DiT-XL's at 256px by default (batch 64, a 32x32 grid, d = 1152, width d/4 = 288, 256
kept tokens); the 512px scaffold has the same number of grid cells (16 x 64 x 64). ``--dim 384
--batch 256`` gives the MNIST study's DC-DiT-S (32x32 pixels, d = 384, width 96). Activations are
bf16 and channels-last, as the compiled model holds them. Each row times one operation in a
few equivalent forms and gives each form's largest relative error against an fp64 reference,
so a faster form that loses precision shows it:

* the 3x3 embed ``4 -> 288``: cuDNN conv vs unfold + GEMM;
* the 3x3 convs at block widths, with cuDNN's benchmark mode, and the narrowing ``1152 -> 288`` also as
  four ``288 -> 288`` convs over input-channel groups, summed (the same sum in another order; with the
  slices pre-made, and taken in the call as a model would), as one GEMM of the nine taps on the token
  view followed by their shifted sum, and through inductor's max-autotune conv templates;
* 1x1 convs ``288 -> 1152`` / ``1152 -> 288`` (ResBlock skips): cuDNN conv vs GEMM on the token view;
* the fp32 router's 1x1 ``1152 -> 288`` and 3x3 ``288 -> 288``: TF32 conv (PyTorch's default for
  cuDNN), fp32 GEMM (FFMA: PyTorch's default for matmul), bf16;
* the de-chunk's Gaussian smoothing ``(B, M, M) @ (B, M, d)`` in fp32: FFMA, TF32, and three bf16
  products with fp32 output (``hi @ hi + hi @ lo + lo @ hi``, if ``bmm(..., out_dtype=)`` exists).
"""

import argparse
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from step_speed import save_result, step_ms  # noqa: E402


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def op_flops(op: str, batch: int, grid: int) -> float | None:
    """FLOPs of one call of a row's operation, read from its label ("3x3 288->1152", "(256x256)@(256x1152)")."""
    conv = re.search(r"(\d)x\d (\d+)->(\d+)", op)
    if conv:
        k, cin, cout = (int(v) for v in conv.groups())
        return 2.0 * batch * grid * grid * cin * cout * k * k
    bmm = re.search(r"\((\d+)x(\d+)\)@\((\d+)x(\d+)\)", op)
    if bmm:
        m, k, _, n = (int(v) for v in bmm.groups())
        return 2.0 * batch * m * k * n
    return None  # normalisations: memory-bound, no FLOP rate


def tuned(fn):
    """``fn`` run with ``torch.backends.cudnn.benchmark = True`` (cuDNN times its algorithms per shape)."""
    def run():
        torch.backends.cudnn.benchmark = True
        try:
            return fn()
        finally:
            torch.backends.cudnn.benchmark = False
    return run


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 -> (hi, lo) in bf16 with hi + lo ~ x to about 2^-16 relative."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU (a smoke run)")
    ap.add_argument("--dim", type=int, default=1152, help="token width d (the scaffold's width is d/4)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--grid", type=int, default=32, help="grid side (cells per sample: grid^2; a quarter kept)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        ap.error("this benchmark times CUDA kernels; --tiny runs small shapes on the CPU")
    dev, bf = torch.device("cpu" if args.tiny else "cuda"), torch.bfloat16
    B, S, d = args.batch, args.grid, args.dim
    w, M = d // 4, S * S // 4
    if args.tiny:
        B, S, d, w, M, args.reps = 2, 8, 64, 32, 16, 1
    cl = torch.channels_last
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dtype=bf, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    rows = []

    def row(op: str, forms: dict, ref: torch.Tensor):
        for form, fn in forms.items():
            try:
                out = fn()
                rows.append({"op": op, "form": form, "ms": step_ms(fn, args.reps),
                             "rel_err": rel_err(out.reshape(ref.shape), ref)})  # forms return ref's layout
            except (RuntimeError, TypeError, NotImplementedError) as e:
                rows.append({"op": op, "form": form, "ms": float("nan"), "rel_err": float("nan"),
                             "error": f"{type(e).__name__}: {str(e)[:120]}"})
            r = rows[-1]
            flops = op_flops(op, B, S)
            r["tflops"] = flops / r["ms"] / 1e9 if flops and r["ms"] == r["ms"] else None
            print(f"{op:<36}{form:<44}{r['ms']:>8.3f}{r['rel_err']:>11.2e}" + (f"  {r['error']}" if "error" in r else ""),
                  flush=True)

    card = "cpu" if args.tiny else torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}")
    print(f"{'operation':<36}{'form':<44}{'ms':>8}{'rel err':>11}  (TFLOP/s in the JSON)")
    with torch.no_grad():
        # the 3x3 embed 4 -> 288 on the latents
        x = randn(B, 4, S, S)
        wt = randn(w, 4, 3, 3, scale=0.1)
        ref = F.conv2d(x.double(), wt.double(), padding=1)
        x_cl = x.contiguous(memory_format=cl)
        w2 = wt.reshape(w, -1)
        row(f"embed 3x3 4->{w}", {
            "cudnn conv (NCHW in)": lambda: F.conv2d(x, wt, padding=1),
            "cudnn conv (channels-last)": lambda: F.conv2d(x_cl, wt, padding=1),
            "cudnn conv (channels-last), benchmark mode": tuned(lambda: F.conv2d(x_cl, wt, padding=1)),
            "unfold + GEMM": lambda: (F.unfold(x, 3, padding=1).transpose(1, 2) @ w2.t()).transpose(1, 2).reshape(B, w, S, S),
        }, ref)
        # 1x1 skips, both directions
        for cin, cout in ((w, d), (d, w)):
            h = randn(B, cin, S, S).contiguous(memory_format=cl)
            wt = randn(cout, cin, 1, 1, scale=cin ** -0.5)
            ref = F.conv2d(h.double(), wt.double())
            tokens = h.permute(0, 2, 3, 1)  # (B, S, S, cin) view of the channels-last storage
            row(f"1x1 {cin}->{cout}", {
                "cudnn conv": lambda h=h, wt=wt: F.conv2d(h, wt),
                "GEMM on the token view": lambda tokens=tokens, wt=wt: F.linear(tokens, wt.flatten(1)).permute(0, 3, 1, 2),
            }, ref)
        # bf16 3x3 convs at the block widths (the FLOP-heavy reference)
        for cin, cout in ((w, w), (w, d), (d, w)):
            h = randn(B, cin, S, S).contiguous(memory_format=cl)
            wt = randn(cout, cin, 3, 3, scale=(9 * cin) ** -0.5).contiguous(memory_format=cl)
            ref = F.conv2d(h.double(), wt.double(), padding=1)
            conv = lambda h=h, wt=wt: F.conv2d(h, wt, padding=1)  # noqa: E731
            forms = {"cudnn conv": conv, "cudnn conv, benchmark mode": tuned(conv)}
            if cin > cout:  # the narrowing conv as cin / cout convs of cout -> cout over input-channel groups, summed
                parts = [(h[:, i:i + cout].contiguous(memory_format=cl), wt[:, i:i + cout].contiguous(memory_format=cl))
                         for i in range(0, cin, cout)]
                forms["input-channel groups, summed in fp32"] = lambda parts=parts: sum(
                    F.conv2d(a, b, padding=1).float() for a, b in parts)
                # as a model would run it: slices of the one activation taken in the call
                wparts = [p[1] for p in parts]
                sliced = lambda h=h, wparts=wparts: sum(  # noqa: E731
                    F.conv2d(h[:, i * cout:(i + 1) * cout], wp, padding=1).float() for i, wp in enumerate(wparts))
                forms["input-channel groups, sliced in the call"] = sliced
                # 9 tap products in one GEMM on the token view, then the shifted sum of the taps
                w_taps = wt.permute(2, 3, 0, 1).reshape(9 * cout, cin).contiguous()  # (9 cout, cin), tap-major

                def taps(h=h, w_taps=w_taps):
                    t = F.linear(h.permute(0, 2, 3, 1), w_taps).unflatten(-1, (9, cout))  # (B, S, S, 9, cout)
                    t = F.pad(t, (0, 0, 0, 0, 1, 1, 1, 1))  # zero rows / columns around the grid
                    out = sum(t[:, a:a + S, b:b + S, 3 * a + b].float() for a in range(3) for b in range(3))
                    return out.permute(0, 3, 1, 2)
                forms["9 tap GEMM + shifted sum, eager"] = taps
                if dev.type == "cuda":
                    forms["9 tap GEMM + shifted sum, compiled"] = torch.compile(taps)
                    forms["input-channel groups, sliced, compiled"] = torch.compile(sliced)
                    forms["inductor max-autotune conv"] = torch.compile(
                        lambda h=h, wt=wt: F.conv2d(h, wt, padding=1), mode="max-autotune-no-cudagraphs")
            row(f"3x3 {cin}->{cout} bf16", forms, ref)
        # the fp32 router: 1x1 d -> d/4 on the tokens, 3x3 d/4 -> d/4
        tok = randn(B, S * S, d)  # bf16 encoder output
        wt = randn(w, d, scale=d ** -0.5, dtype=torch.float32)
        ref = tok.double() @ wt.double().t()
        hi, lo = split(wt)
        hilo = torch.cat([hi, lo])  # (2 w, d)

        def tf32_linear():
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return F.linear(tok.float(), wt)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
        row(f"router 1x1 {d}->{w} (fp32)", {
            "fp32 GEMM (FFMA)": lambda: F.linear(tok.float(), wt),
            "TF32 GEMM": tf32_linear,
            "TF32 cudnn 1x1 conv": lambda: F.conv2d(tok.float().transpose(1, 2).reshape(B, d, S, S),
                                                     wt[..., None, None]).flatten(2).transpose(1, 2),
            "bf16 GEMM (bf16 out)": lambda: F.linear(tok, wt.to(bf)),
            "2 bf16 GEMMs, split weight, fp32 out": lambda: (torch.mm(tok.flatten(0, 1), hi.t(), out_dtype=torch.float32)
                                                            + torch.mm(tok.flatten(0, 1), lo.t(), out_dtype=torch.float32)),
            "1 bf16 GEMM on [hi; lo], fp32 out, halves summed": lambda: (
                lambda o: o[:, :w] + o[:, w:])(torch.mm(tok.flatten(0, 1), hilo.t(), out_dtype=torch.float32)),
        }, ref.flatten(0, 1))
        z = randn(B, w, S, S, dtype=torch.float32).contiguous(memory_format=cl)
        wt = randn(w, w, 3, 3, scale=(9 * w) ** -0.5, dtype=torch.float32).contiguous(memory_format=cl)
        ref = F.conv2d(z.double(), wt.double(), padding=1)
        row(f"router 3x3 {w}->{w} (fp32)", {
            "TF32 cudnn conv": lambda: F.conv2d(z, wt, padding=1),
            "TF32 cudnn conv, benchmark mode": tuned(lambda: F.conv2d(z, wt, padding=1)),
            "bf16 cudnn conv": lambda: F.conv2d(z.to(bf), wt.to(bf), padding=1),
        }, ref)
        # the de-chunk's smoothing over the M kept tokens
        pos = torch.stack([torch.randperm(S * S, generator=g, device=dev)[:M].sort().values for _ in range(B)])
        rc = torch.stack([pos // S, pos % S], -1).float()
        k = torch.exp(-torch.cdist(rc, rc) ** 2 / 2)
        kw = k / k.sum(-1, keepdim=True)  # (B, M, M) row-normalised
        yv = randn(B, M, d).float()
        ref = kw.double() @ yv.double()
        (khi, klo), (yhi, ylo) = split(kw), split(yv)

        def tf32_bmm():
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return torch.bmm(kw, yv)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
        row(f"smoothing bmm ({M}x{M})@({M}x{d})", {
            "fp32 (FFMA)": lambda: torch.bmm(kw, yv),
            "TF32": tf32_bmm,
            "3 bf16 bmm, fp32 out": lambda: (torch.bmm(khi, yhi, out_dtype=torch.float32)
                                             + torch.bmm(khi, ylo, out_dtype=torch.float32)
                                             + torch.bmm(klo, yhi, out_dtype=torch.float32)),
            "2 bf16 bmm (y bf16), fp32 out": lambda: (torch.bmm(khi, yhi, out_dtype=torch.float32)
                                                      + torch.bmm(klo, yhi, out_dtype=torch.float32)),
        }, ref)
        # GroupNorm + SiLU at the block width (channels-last), eager and compiled
        h = randn(B, w, S, S).contiguous(memory_format=cl)
        gn = torch.nn.GroupNorm(32, w).to(dev)
        gn.weight.data.normal_(1, 0.1, generator=g) if dev.type == "cuda" else gn.weight.data.normal_(1, 0.1)
        ref = F.silu(F.group_norm(h.double(), 32, gn.weight.double(), gn.bias.double()))
        gn_silu = lambda h: F.silu(gn(h.float()).to(h.dtype))  # noqa: E731  (fp32 affine, as under autocast)
        compiled = torch.compile(gn_silu) if dev.type == "cuda" else gn_silu
        row(f"GroupNorm(32, {w}) + SiLU", {"eager": lambda: gn_silu(h), "compiled": lambda: compiled(h)}, ref)

    return save_result(args.out, card, batch=B, grid=S, dim=d, width=w, kept=M, rows=rows)


if __name__ == "__main__":
    main()
