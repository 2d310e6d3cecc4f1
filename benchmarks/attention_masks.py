"""Padded attention on a GPU: what a key-padding mask costs, and the kernels that avoid the cost.

    python benchmarks/attention_masks.py            # CUDA, bf16, DC-DiT-XL shapes

Fixed-capacity and padded plans give every sample ``M`` slots of which the first
``lengths[b]`` are real. SDPA with a boolean mask cannot use the flash kernel; this times the
alternatives at the shapes of DC-DiT-XL at 256px (batch 64, 16 heads of 72, M = 256) and
512px (batch 16, M = 1024): plain SDPA without a mask (the speed of light), SDPA with the
mask, FlexAttention with a length mask (compiled), SDPA's cuDNN backend with the mask, and
PyTorch's own varlen flash kernel over the slots with ``seqused_k = lengths``
(``aten._flash_attention_forward``; inference only) and over truly packed tokens
(``torch.nn.attention.varlen.varlen_attn``).

A second table times full plans (``fill_capacity=True``: no mask at all) at the step benchmark's
slot counts (rho 0 / 0.2 / 0.4 at both sizes) under each SDPA backend, against the masked call,
to show which kernel the default choice lands on and whether an odd slot count costs.

    python benchmarks/attention_masks.py --out benchmarks/results/attention_masks_h100.json
"""

import argparse
import sys
from pathlib import Path

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def ms(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / reps


def unmasked_backends() -> list[dict]:
    """Full-plan attention (no mask) per SDPA backend at the step benchmark's slot counts, ms per call."""
    dev = torch.device("cuda")
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    rows = []
    print(f"\n{'full plan':<16}{'default':>9}" + "".join(f"{k:>11}" for k in backends) + f"{'bool mask':>11}  (ms per call)")
    for B, M in ((64, 256), (64, 208), (64, 160), (64, 192), (16, 1024), (16, 824), (16, 616), (16, 640)):
        q, k, v = (torch.randn(B, 16, M, 72, device=dev, dtype=torch.bfloat16) for _ in range(3))
        mask = torch.ones(B, 1, 1, M, device=dev, dtype=torch.bool)
        row = {"batch": B, "slots": M, "default": ms(lambda: F.scaled_dot_product_attention(q, k, v))}
        for name, kernel in backends.items():
            try:
                with sdpa_kernel([kernel]):
                    row[name] = ms(lambda: F.scaled_dot_product_attention(q, k, v))
            except RuntimeError:
                row[name] = float("nan")
        row["bool mask"] = ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        rows.append(row)
        print(f"{f'B={B} M={M}':<16}{row['default']:>9.3f}" + "".join(f"{row[k]:>11.3f}" for k in backends)
              + f"{row['bool mask']:>11.3f}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    flex = torch.compile(flex_attention)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'shape':<22}{'no mask':>9}{'bool mask':>11}{'flex':>8}{'cudnn':>8}{'varlen slots':>14}"
          f"{'varlen packed':>15}  (ms per call)")
    masked = []
    for B, M in ((64, 256), (16, 1024)):
        q, k, v = (torch.randn(B, 16, M, 72, device=dev, dtype=torch.bfloat16) for _ in range(3))
        lengths = torch.randint(M * 3 // 4, M + 1, (B,), device=dev)
        valid = torch.arange(M, device=dev) < lengths[:, None]
        mask = valid[:, None, None, :]
        row = {"no mask": ms(lambda: F.scaled_dot_product_attention(q, k, v)),
               "bool mask": ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))}

        def keep(b, h, q_idx, kv_idx):
            return kv_idx < lengths[b]
        block = create_block_mask(keep, B, None, M, M, device=dev)
        row["flex"] = ms(lambda: flex(q, k, v, block_mask=block))
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                row["cudnn"] = ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        except RuntimeError as e:
            row["cudnn"] = float("nan")
            print("cudnn:", str(e)[:100])
        try:
            from torch.nn.attention.varlen import varlen_attn

            flat = [t.transpose(1, 2).reshape(B * M, 16, 72) for t in (q, k, v)]
            cu = (torch.arange(B + 1, device=dev) * M).int()
            used = lengths.int()
            def slots():
                return torch.ops.aten._flash_attention_forward(*flat, cu, cu, M, M, 0.0, False, False,
                                                               seqused_k=used)[0]
            out = slots()
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B * M, 16, 72)
            err = float((out - ref).abs().max())
            row["varlen slots"] = ms(slots)
            cu_p = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int()
            T = int(lengths.sum())
            packed = [t[:T] for t in flat]
            row["varlen packed"] = ms(lambda: varlen_attn(*packed, cu_p, cu_p, M, M))
        except Exception as e:  # noqa: BLE001
            err = float("nan")
            row["varlen slots"] = row["varlen packed"] = float("nan")
            print("varlen:", type(e).__name__, str(e)[:200])
        print(f"{f'B={B} M={M}':<22}" + "".join(f"{row[k]:>{w}.3f}" for k, w in
                                               (("no mask", 9), ("bool mask", 11), ("flex", 8), ("cudnn", 8),
                                                ("varlen slots", 14), ("varlen packed", 15)))
              + f"   varlen max|diff| vs mask: {err:.3g}")
        masked.append({"batch": B, "slots": M, **row, "varlen_max_abs_diff": err})
    full = unmasked_backends()
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from step_speed import save_result

        save_result(args.out, torch.cuda.get_device_name(), masked=masked, full_plans=full)


if __name__ == "__main__":
    main()
