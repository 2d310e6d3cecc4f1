"""The whole-head attention candidate at DC-DiT-XL's head dim, each configuration in a process of its own.

    python benchmarks/whole_head_isolated.py --out benchmarks/results/whole_head_isolated_h200.json

A kernel that faults loses the CUDA context, so ``short_attention.py --whole-head`` stops at the first
fault. This runs every configuration of ``CONFIGS`` in a fresh process, with Triton's Hopper products
(wgmma) and without them (``DISABLE_MMA_V3=1``: the Ampere ``mma.sync`` path), the values' product whole
(head dim padded to 128) or split (64 + 16 lanes), and records for each: ms per call against SDPA's in
the same process, the max error against fp32 SDPA, or the error that ended it. Batch 64, 16 heads of 72,
at 160 and 208 tokens. GPU only.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIGS = ("64 1 4 2", "64 0 4 1", "128 1 8 1", "32 0 4 1", "32 0 2 1")  # block_m grid_m warps stages
TOKENS = (160, 208)


def one(block_m: int, grid_m: int, warps: int, stages: int, split: int) -> dict:
    """In the child process: time one configuration at each length."""
    import torch
    import torch.nn.functional as F
    from short_attention import WholeHeadConfig, whole_head_forward
    from step_speed import cuda_ms

    cfg = WholeHeadConfig(block_m, grid_m, warps, stages, bool(split))
    out = {}
    for L in TOKENS:
        qkv = torch.randn(64, L, 3, 16, 72, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.unbind(2)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float()).transpose(1, 2)
        got = whole_head_forward(q, k, v, cfg)
        torch.cuda.synchronize()
        out[L] = {"ms": cuda_ms(lambda: whole_head_forward(q, k, v, cfg), 200, warmup=10),
                  "sdpa_ms": cuda_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
                                     .reshape(64, L, -1), 200, warmup=10),
                  "err": float((got.float() - ref).abs().max())}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=5, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    if args.child:
        print("RESULT " + json.dumps(one(*args.child)))
        return None
    import torch
    from step_speed import save_result

    rows = []
    for mma_v3 in (True, False):
        for split in (0, 1):
            for config in CONFIGS:
                env = {**os.environ, **({} if mma_v3 else {"DISABLE_MMA_V3": "1"})}
                run = subprocess.run([sys.executable, __file__, "--child", *config.split(), str(split)], env=env,
                                     capture_output=True, text=True, timeout=120)
                found = [line[7:] for line in run.stdout.splitlines() if line.startswith("RESULT ")]
                row = {"wgmma": mma_v3, "split_values": bool(split), "config": config,
                       "result": json.loads(found[0]) if found else None,
                       "error": None if found else (run.stderr.strip().splitlines() or ["?"])[-1][:200]}
                rows.append(row)
                cells = "; ".join(f"{L}: {r['ms']:.4f} ms (SDPA {r['sdpa_ms']:.4f}, err {r['err']:.1e})"
                                  for L, r in row["result"].items()) if found else "FAILED " + row["error"]
                print(f"wgmma={mma_v3!s:<5} split={split} {config}: {cells}", flush=True)
    return save_result(args.out, torch.cuda.get_device_name(), rows=rows)


if __name__ == "__main__":
    main()
