"""Unmasked attention at DC-DiT-XL's kept lengths: SDPA's kernels against chunkformer's Triton kernel.

    python benchmarks/short_attention.py --out benchmarks/results/short_attention_h100.json

At the step benchmark's token counts (16 heads of 72; batch 64 at 160 / 208 / 256 tokens, batch 16
at 616 / 824 / 1024) this times one attention call as the model makes it: q, k, v are views of a
fused ``(B, L, 3, H, dh)`` projection and the result must reach the output projection as a
contiguous ``(B, L, H * dh)``. Rows: SDPA's default choice (cuDNN on an H100) with the transpose
copy after it, the same without the copy, FlexAttention compiled (no mask), and
:func:`chunkformer.triton_attention.flash_forward` at each tile configuration in ``CONFIGS`` plus
its default. "ideal" scales the longest length's SDPA time by the FLOPs (``L^2``), the time
attention would take if it shrank with the budget. Errors are max |diff| against fp32 SDPA.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chunkformer.triton_attention import KernelConfig, default_config, flash_forward  # noqa: E402

SHAPES = ((64, 160), (64, 208), (64, 256), (16, 616), (16, 824), (16, 1024))
CONFIGS = [KernelConfig(bm, bn, w, st, split) for split in (True, False)
           for bm, bn, w, st in ((64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3), (128, 64, 4, 2), (128, 64, 4, 3),
                                 (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 4, 3))]


def ms(fn, reps=200) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _name(cfg: KernelConfig) -> str:
    return f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}{'' if cfg.split else ' pad'}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dev, H, D = torch.device("cuda"), args.heads, args.head_dim
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {H} heads of {D}")
    rows = []
    for B, L in SHAPES:
        qkv = torch.randn(B, L, 3, H, D, device=dev, dtype=torch.bfloat16)
        q, k, v = qkv.unbind(2)  # (B, L, H, dh) views, as the model's rearrange gives them
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float()).transpose(1, 2)

        def sdpa_copy():
            return rearrange(F.scaled_dot_product_attention(qt, kt, vt), "b h l d -> b l (h d)").contiguous()

        row = {"batch": B, "tokens": L, "sdpa + copy": ms(sdpa_copy),
               "sdpa": ms(lambda: F.scaled_dot_product_attention(qt, kt, vt))}
        if not args.no_flex:
            try:
                row["flex"] = ms(lambda: flex(qt, kt, vt))
            except Exception as e:  # noqa: BLE001
                print("flex:", type(e).__name__, str(e)[:200])
                row["flex"] = float("nan")
        row["sdpa_err"] = float((F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).float() - ref).abs().max())
        triton_rows = {}
        for cfg in CONFIGS + [default_config(L, D)]:
            name = _name(cfg)
            if name in triton_rows:
                continue
            try:
                out = flash_forward(q, k, v, cfg)
                err = float((out.float() - ref).abs().max())
                triton_rows[name] = {"ms": ms(lambda: flash_forward(q, k, v, cfg)), "err": err}
            except Exception as e:  # noqa: BLE001
                print(f"{name}: {type(e).__name__} {str(e)[:200]}")
        d = default_config(L, D)
        try:  # the custom op inside a compiled graph (what the models run)
            compiled = torch.compile(lambda a, b_, c: rearrange(flash_forward(a, b_, c), "b l h d -> b l (h d)"))
            row["compiled_err"] = float((compiled(q, k, v).float() - rearrange(ref, "b l h d -> b l (h d)")).abs().max())
            row["triton compiled"] = ms(lambda: compiled(q, k, v))
        except Exception as e:  # noqa: BLE001
            print("compiled:", type(e).__name__, str(e)[:300])
        row["triton"] = triton_rows
        row["triton default"] = _name(d)
        best = min(triton_rows, key=lambda n: triton_rows[n]["ms"]) if triton_rows else None
        row["triton best"] = best
        rows.append(row)
        cells = "  ".join(f"{n}: {r['ms']:.4f} ({r['err']:.1e})" for n, r in triton_rows.items())
        print(f"B={B} L={L}: sdpa+copy {row['sdpa + copy']:.4f} sdpa {row['sdpa']:.4f} flex {row.get('flex', 0):.4f} "
              f"err {row['sdpa_err']:.1e} | {cells}", flush=True)
    for B in sorted({b for b, _ in SHAPES}):
        longest = max((r for r in rows if r["batch"] == B), key=lambda r: r["tokens"])
        for r in rows:
            if r["batch"] == B:
                r["ideal"] = longest["sdpa + copy"] * (r["tokens"] / longest["tokens"]) ** 2
    print(f"\n{'shape':<14}{'ideal':>8}{'sdpa+copy':>11}{'flex':>8}{'triton dflt':>12}{'triton best':>12}  best config")
    for r in rows:
        t = r["triton"]
        dflt = t.get(r["triton default"], {}).get("ms", float("nan"))
        best = t[r["triton best"]]["ms"] if r["triton best"] else float("nan")
        shape = "B={batch} L={tokens}".format(**r)
        print(f"{shape:<14}{r['ideal']:>8.4f}{r['sdpa + copy']:>11.4f}{r.get('flex', float('nan')):>8.4f}"
              f"{dflt:>12.4f}{best:>12.4f}  {r['triton best']}  (compiled default {r.get('triton compiled', float('nan')):.4f})")
    if args.out:
        from step_speed import save_result

        save_result(args.out, torch.cuda.get_device_name(), heads=H, head_dim=D, rows=rows)


if __name__ == "__main__":
    main()
