"""Do the attention backends agree, and how long does an eager training step of DC-DiT-XL take per rho?

    python benchmarks/step_time.py            # GPU: writes results/step_time_256_<card>.json
    python benchmarks/step_time.py --tiny     # CPU smoke run (nothing written)

Part 1 checks that the packed attention backends (sdpa, math, flex, and flash when installed)
give the same forward outputs and gradients on CUDA. Part 2 times a full training step
(forward + backward, bf16 autocast) of DiT-XL/2 and DC-DiT-XL at 256px (batch 64) for
several tail-drop fractions, with the router's keep bias set so that about a quarter of the
tokens pass (as the trained model does). Prints the backends' largest differences from the math
backend (GPU), then one row per model and rho: kept tokens, ms per step, GFLOPs per sample, and
the measured and FLOP-predicted speed-ups over DiT-XL/2.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from common import card_name, save_result

import chunkformer as cf
from chunkformer.attention import chunk_attention


def backend_agreement(device) -> dict:
    """Largest output and gradient differences of each packed attention backend from the math backend."""
    torch.manual_seed(0)
    mask = torch.rand(8, 1024, device=device) < 0.25
    mask[:, 0] = True
    plan = cf.ChunkPlan.from_mask(mask, grid=(32, 32))
    T = int(mask.sum())
    base = [torch.randn(T, 16, 72, device=device, dtype=torch.bfloat16) for _ in range(3)]
    results, ref_out, ref_grads = {}, None, None
    backends = ["math", "sdpa", "flex"] + (["flash"] if cf.attention._HAS_FLASH else [])
    for b in backends:
        q, k, v = (t.clone().requires_grad_(True) for t in base)
        out = chunk_attention(q, k, v, plan, backend=b)
        out.float().square().sum().backward()
        grads = [q.grad.float(), k.grad.float(), v.grad.float()]
        if ref_out is None:
            ref_out, ref_grads = out.float(), grads
        results[b] = {
            "max_abs_out_diff_vs_math": float((out.float() - ref_out).abs().max()),
            "max_rel_grad_diff_vs_math": max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, ref_grads)),
        }
    return results


def time_step(model, x, t, y, steps=10, warmup=3, **kw) -> float:
    """Host-clock ms per training step (forward, backward, AdamW) over ``steps`` steps after ``warmup``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.is_cuda)
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            out = model(x, t, y, **kw)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/<name>.json)")
    p.add_argument("--tiny", action="store_true", help="small models on the CPU (a smoke run; writes nothing)")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    report = {}
    if device.type == "cuda":
        report["backends"] = backend_agreement(device)
        print("backend agreement:", json.dumps(report["backends"], indent=1))
    size = {"hidden_size": 64, "depth": 2, "num_heads": 2} if args.tiny else {}
    B = 4 if args.tiny else args.batch
    x = torch.randn(B, 4, 32, 32, device=device)
    t = torch.randint(0, 1000, (B,), device=device)
    y = torch.randint(0, 1000, (B,), device=device)
    rows = []
    dit = cf.create_model("DiT-XL/2", **size).to(device)
    with torch.no_grad():
        dit_flops = cf.count_flops(dit, x, t, y).per_sample
    dit_ms = time_step(dit, x, t, y)
    rows.append({"model": "DiT-XL/2", "rho": None, "ms": dit_ms, "gflops_per_sample": dit_flops / 1e9, "kept": 256})
    del dit
    for backend in (["auto", "sdpa"] if device.type == "cuda" else ["sdpa"]):
        dc = cf.create_model("DC-DiT-XL", attn_backend=backend, **size).to(device)
        torch.nn.init.constant_(dc.router.scorer[-1].bias, 0.0)
        torch.nn.init.normal_(dc.router.scorer[-1].weight, std=0.5)
        for rho in (0.0, 0.2, 0.4):
            with torch.no_grad():
                rep = cf.count_flops(dc, x, t, y, rho=rho)
            ms = time_step(dc, x, t, y, rho=rho)
            rows.append({"model": f"DC-DiT-XL[{backend}]", "rho": rho, "ms": ms, "gflops_per_sample": rep.per_sample / 1e9,
                         "kept": float(rep.kept.float().mean()), "scaffold_share": 1 - (rep.by_component["backbone attention"]
                         + rep.by_component["backbone MLP"] + rep.by_component["backbone modulation"]) / rep.total})
        del dc
    for r in rows:
        r["measured_speedup_vs_dit"] = dit_ms / r["ms"]
        r["flop_predicted_speedup_vs_dit"] = dit_flops / 1e9 / r["gflops_per_sample"]
    report["rows"] = rows
    print(f"\n{'model':<22}{'rho':>5}{'kept':>8}{'ms/step':>10}{'GFLOPs':>9}{'speedup':>9}{'FLOP pred':>10}")
    for r in rows:
        print(f"{r['model']:<22}{str(r['rho']):>5}{r['kept']:>8.1f}{r['ms']:>10.1f}{r['gflops_per_sample']:>9.1f}"
              f"{r['measured_speedup_vs_dit']:>9.2f}{r['flop_predicted_speedup_vs_dit']:>10.2f}")
    card = card_name() if device.type == "cuda" else "cpu"
    return save_result("step_time", "256", card, out=args.out, write=not args.tiny, **report)


if __name__ == "__main__":
    main()
