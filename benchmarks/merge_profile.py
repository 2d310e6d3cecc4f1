"""Where token merging spends its time: host syncs and the top kernels of one merged forward.

    python benchmarks/merge_profile.py            # CUDA; DiT-XL/2 and DC-DiT-XL at 256px, batch 32
"""

import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chunkformer as cf  # noqa: E402


def forward_ms(model, x, t, y, reps=10):
    for _ in range(3):
        model(x, t, y)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        model(x, t, y)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / reps


@torch.no_grad()
def main():
    dev = torch.device("cuda")
    x = torch.randn(32, 4, 32, 32, device=dev)
    t = torch.full((32,), 500, device=dev)
    y = torch.randint(0, 1000, (32,), device=dev)
    for name in ("DiT-XL/2", "DC-DiT-XL"):
        model = cf.create_model(name, input_size=32).to(dev).eval()
        if model.supports_chunking:
            torch.nn.init.constant_(model.router.scorer[-1].bias, -1.2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            base = forward_ms(model, x, t, y)
            cf.merging.apply(model, ratio=0.5)
            merged = forward_ms(model, x, t, y)
            cf.merging.apply(model, ratio=0.5, compile=True)
            compiled = forward_ms(model, x, t, y)
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model(x, t, y)
            torch.cuda.set_sync_debug_mode(0)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(x, t, y)
                torch.cuda.synchronize()
        print(f"\n{name}: forward {base:.1f} ms, merged 0.5 {merged:.1f} ms, with compiled indices {compiled:.1f} ms; "
              f"host syncs in one merged forward: {len(caught)}")
        sites = {}
        for w in caught:
            key = f"{Path(w.filename).name}:{w.lineno}"
            sites[key] = sites.get(key, 0) + 1
        for msg, n in sorted(sites.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {n:4d} x {msg}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=40))


if __name__ == "__main__":
    main()
