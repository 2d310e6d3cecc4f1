"""Backend agreement on CUDA and step times of DC-DiT against DiT at the paper's sizes.

    python benchmarks/step_time.py --out benchmarks/results/step_time.json            # GPU
    python benchmarks/step_time.py --tiny                                               # CPU smoke run

Part 1 checks that the packed attention backends (sdpa, math, flex, and flash when installed)
give the same forward outputs and gradients on CUDA. Part 2 times a full training step
(forward + backward, bf16 autocast) of DiT-XL/2 and DC-DiT-XL at 256px (batch 64) for
several tail-drop fractions, with the router's keep bias set so that about a quarter of the
tokens pass (as the trained model does), and reports measured and FLOP-predicted speed-ups
from one run on one card.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chunkformer as cf  # noqa: E402
from chunkformer.attention import chunk_attention  # noqa: E402


def backend_agreement(device) -> dict:
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    report = {"card": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "command": " ".join(["python"] + sys.argv)}
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
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
