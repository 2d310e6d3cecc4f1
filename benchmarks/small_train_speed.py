"""Why DC-DiT-S trains slower per FLOP than DiT-S/2 on 32x32 digits: one variant per suspect.

    python benchmarks/small_train_speed.py --out benchmarks/results/small_train_speed_h200.json   # GPU, ~3 min
    python benchmarks/small_train_speed.py --tiny                                                 # CPU smoke run

The fidelity study (docs/results.md) trains at the `mnist-*-s` recipes' size: 32x32x1 pixels,
width 384, 12 blocks, batch 256, bf16 autocast, eager. There DC-DiT-S ran 2.3x slower per
training FLOP than DiT-S/2 on an H200. Each row here is one training step (forward, backward,
fused AdamW) of one variant, so the table says which part costs the time: the plan layout
(packed / padded / fixed capacity), the value checks (host syncs), the FLOP counter's hooks,
and torch.compile. The router is biased to keep every token and a tail drop of 0.75 leaves a
quarter of the grid (256 tokens, DiT-S/2's count); fixed capacity is 256. Rows marked "~" give
each sample its own budget (kept counts spread around 256 with a standard deviation of 64, as a
trained router's are): without flash-attn the packed path attends over the batch padded to its
longest sample, so the spread costs time that the FLOP count (real tokens only) does not see;
the "varlen" rows run the same batches through ``attn_backend="varlen"`` (no padding; what
``"auto"`` picks on a GPU without flash-attn), the others through ``"sdpa"``.
Columns: steps/s, measured speed-up over eager DiT-S/2, the FLOP-predicted one, host syncs per step
(on the CPU the unfused AdamW adds one per parameter tensor).
"""

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import small_train_table  # noqa: E402  (benchmarks/ is on the path when run as a script)
from step_speed import save_result  # noqa: E402
from train_speed import time_steps  # noqa: E402

import chunkformer as cf  # noqa: E402

VARIANTS = [  # (row, model, plan_mode, value checks, FLOP counter, compile); "~" = unequal lengths
    ("DiT-S/2", "DiT-S/2", None, True, False, False),
    ("DiT-S/2 + FLOP counter", "DiT-S/2", None, True, True, False),
    ("DiT-S/2 compiled", "DiT-S/2", None, True, False, True),
    ("DC-DiT-S packed", "DC-DiT-S", "packed", True, False, False),
    ("DC-DiT-S packed + FLOP counter", "DC-DiT-S", "packed", True, True, False),
    ("DC-DiT-S packed, no value checks", "DC-DiT-S", "packed", False, False, False),
    ("DC-DiT-S padded", "DC-DiT-S", "padded", True, False, False),
    ("DC-DiT-S packed ~", "DC-DiT-S", "packed", True, False, False),
    ("DC-DiT-S padded ~", "DC-DiT-S", "padded", True, False, False),
    ("DC-DiT-S packed varlen", "DC-DiT-S", "packed", True, False, False),  # CUDA only
    ("DC-DiT-S packed varlen ~", "DC-DiT-S", "packed", True, False, False),  # CUDA only
    ("DC-DiT-S fixed", "DC-DiT-S", "fixed", False, False, False),
    ("DC-DiT-S fixed compiled", "DC-DiT-S", "fixed", False, False, True),
]


def kernel_profile(step, row: str, steps: int = 3) -> dict:
    """GPU kernel time and kernel launches per step (torch.profiler); prints the top kernels.

    If the kernels' busy time is well under the step's wall time, the step is bound by the host
    (Python, dispatch, launches, syncs), not by the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.self_device_time_total for e in events) / steps
    launches = sum(e.count for e in events) / steps
    print(f"\n{row}: {busy_us / 1e3:.2f} ms of GPU kernels, {launches:.0f} kernels per step; top kernels:")
    top = [{"kernel": e.key[:120], "ms": e.self_device_time_total / steps / 1e3, "calls": e.count // steps}
           for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]]
    for k in top:
        print(f"  {k['ms']:7.3f} ms  x{k['calls']:<4} {k['kernel'][:90]}")
    return {"gpu_kernel_ms": busy_us / 1e3, "kernels_per_step": launches, "top_kernels": top}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="toy sizes, no compile: a CPU smoke run")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profile", default="DiT-S/2,DC-DiT-S packed,DC-DiT-S padded",
                    help="rows whose GPU kernel time per step is measured with torch.profiler (CUDA only), "
                         "and whose top kernels are printed")
    args = ap.parse_args(argv)
    profiled = set(args.profile.split(",")) if args.profile else set()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    batch, steps = (4, 2) if args.tiny else (args.batch, args.steps)
    sizes = dict(depth=2, hidden_size=64, num_heads=2) if args.tiny else {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 32, 32, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    rows = []
    for row, name, mode, checks, counter, compiled in VARIANTS:
        if args.tiny and (compiled or "varlen" in row):
            continue
        torch.manual_seed(0)
        extra = {} if mode is None else {"plan_mode": mode, **({"capacity": 256} if mode == "fixed" else {})}
        if mode is not None:  # pinned: "auto" would pick varlen on a GPU for every packed row
            extra["attn_backend"] = "varlen" if "varlen" in row else "sdpa"
        model = cf.create_model(name, input_size=32, in_channels=1, num_classes=10, **sizes, **extra).to(device)
        kw = {}
        if model.supports_chunking:
            torch.nn.init.constant_(model.router.scorer[-1].bias, 30.0)  # keep all, then the budget decides
            kw = {} if mode == "fixed" else {"rho": 0.75}
            if "~" in row:  # per-sample budgets: kept ~ N(L/4, (L/16)^2), clipped to [L/16, L/2]
                L = 32 * 32
                kept = (torch.randn(batch, generator=g) * L / 16 + L / 4).clamp(L / 16, L / 2)
                kw = {"rho": (1 - kept / L).to(device)}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # (the varlen kernels need bf16)
            flops = cf.count_flops(model.eval(), x, t, y, **kw).per_sample * 3
        model.train()
        run = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda), \
                    (cf.flops.FlopCounter(model) if counter else nullcontext()):
                out, info = run(x, t, y, return_info=True, **kw)
                loss = out.float().square().mean() + 0.03 * info.ratio_loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with cf.value_checks(checks):
            seconds, _ = time_steps(step, steps, cuda)
            with cf.count_host_syncs() as syncs:
                step()
        rows.append({"row": row, "steps_per_s": steps / seconds,
                     "train_gflops_per_sample": flops / 1e9, "host_syncs": syncs.total})
        if cuda and row in profiled:
            rows[-1].update(kernel_profile(step, row))
        if cuda:
            torch.cuda.empty_cache()
    base = rows[0]
    for r in rows:
        r["measured_speedup"] = r["steps_per_s"] / base["steps_per_s"]
        r["flop_speedup"] = base["train_gflops_per_sample"] / r["train_gflops_per_sample"]
    card = torch.cuda.get_device_name() if cuda else "cpu"
    result = save_result(args.out, card, batch=batch, rows=rows)
    print("\n" + small_train_table(result))
    return result


if __name__ == "__main__":
    main()
