"""Nearest-kept plug-back index: separable exact transform against the brute-force reference.

    OMP_NUM_THREADS=1 python benchmarks/nearest.py                       # CPU (and CUDA if present)
    python benchmarks/nearest.py --device cuda --out benchmarks/results/nearest_h100.json

Times :func:`chunkformer.plan.nearest_kept` (rank-1/2 grids: row pass + blocked column
pass, ``O(B * L * H)``) against :func:`chunkformer.plan._nearest_kept_dense` (``(B, block, M)``
distance matrices, ``O(B * L * M)``) on plans keeping about a quarter of the tokens, checks
that both give the same indices, and prints one row per grid: median milliseconds of each,
the speed-up and, on CUDA, the peak memory each allocates beyond its inputs.
"""

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chunkformer import ChunkPlan  # noqa: E402
from chunkformer.plan import _nearest_kept_dense, nearest_kept  # noqa: E402

CASES = [((32, 32), 64), ((64, 64), 16), ((128, 128), 4)]  # (grid, batch)


def _time(fn, device, repeats: int) -> tuple[float, float | None]:
    """Median milliseconds of ``fn()`` and, on CUDA, its peak extra memory in MiB."""
    fn()  # warm-up
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2], peak


def run(device: torch.device, repeats: int, keep: float) -> list[dict]:
    rows = []
    for grid, B in CASES:
        L = grid[0] * grid[1]
        g = torch.Generator().manual_seed(0)
        mask = torch.rand(B, L, generator=g) < keep
        mask[:, 0] = True
        plan = ChunkPlan.from_mask(mask.to(device), grid=grid, mode="padded")
        dense = functools.partial(_nearest_kept_dense, plan.coords, plan.valid, grid)
        new = functools.partial(nearest_kept, plan.coords, plan.valid, grid)
        dense_ms, dense_mib = _time(dense, device, repeats)
        new_ms, new_mib = _time(new, device, repeats)
        equal = torch.equal(new(), dense())
        rows.append(dict(
            grid=list(grid), batch=B, width=plan.width, dense_ms=dense_ms, new_ms=new_ms,
            speedup=dense_ms / new_ms, dense_peak_mib=dense_mib, new_peak_mib=new_mib, equal=equal,
        ))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", action="append", help="cpu or cuda, repeatable (default: cpu, + cuda if any)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--keep", type=float, default=0.25, help="fraction of tokens kept")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    result = dict(torch=torch.__version__, python=platform.python_version(),
                  threads=torch.get_num_threads(), keep=args.keep, runs={})
    ok = True
    for name in devices:
        device = torch.device(name)
        if device.type == "cuda":
            dev_name = torch.cuda.get_device_name(device)
        else:
            dev_name = platform.processor() or platform.machine()
        rows = run(device, args.repeats, args.keep)
        result["runs"][name] = dict(device_name=dev_name, rows=rows)
        print(f"\n{name}: {dev_name} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
        mem = device.type == "cuda"
        head = f"{'grid':>9} {'batch':>5} {'M':>5} {'dense ms':>9} {'new ms':>8} {'speed-up':>8}"
        print(head + (f" {'dense MiB':>9} {'new MiB':>8}" if mem else "") + "  equal")
        for r in rows:
            line = (f"{'x'.join(map(str, r['grid'])):>9} {r['batch']:>5} {r['width']:>5} "
                    f"{r['dense_ms']:>9.2f} {r['new_ms']:>8.2f} {r['speedup']:>7.1f}x")
            if mem:
                line += f" {r['dense_peak_mib']:>9.1f} {r['new_peak_mib']:>8.1f}"
            print(line + f"  {r['equal']}")
            ok &= r["equal"]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    if not ok:
        sys.exit("nearest_kept differs from the dense reference")


if __name__ == "__main__":
    main()
