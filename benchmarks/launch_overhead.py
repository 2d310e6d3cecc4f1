"""Host time per call: the scaffold's Triton custom ops, and the compiled scaffold at batch 1.

    python benchmarks/launch_overhead.py --out benchmarks/results/launch_overhead_h100.json

A compiled DC-DiT step is bound by the GPU: the host launches the next kernels while the GPU runs the
current ones, and host time per call is hidden. The scaffold timed alone (``step_speed.py``'s "scaffold
only" row, ``scaffold_compile.py``) runs about 5 ms of GPU work in some 80 kernels, so there the host can
fall behind, and each Triton kernel of our own is launched from Python through a custom op. This measures:

* **per op**: host microseconds per call of each of chunkformer's Triton kernels launched directly
  (``launch_*``), through its op called eagerly (``torch.ops.chunkformer.*``: the dispatcher and the op's
  Python on top; until session 16 an opaque custom op, which compiled code called the same way), and, for
  scale, of an inductor-compiled pointwise function; on inputs so small that the GPU never holds the host
  back, timed on the host clock without a sync inside the loop;
* **per scaffold**: wall ms per call of the compiled scaffold (``scaffold_compile.py``'s variants) at
  batch 1, where its GPU time is small: close to its host time. ``--cudagraphs`` adds the default under
  ``mode="reduce-overhead"`` (one CUDA graph replay per call: the GPU time alone).
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from chunkformer import norms  # noqa: E402
from scaffold_compile import VARIANTS, serving_scaffold  # noqa: E402
from step_speed import save_result  # noqa: E402


def host_us(fn, reps: int = 2000) -> float:
    """Host microseconds per call of ``fn()`` (median of 5 loops), the GPU synced only around each loop."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    loops = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        loops.append((time.perf_counter() - start) / reps * 1e6)
        torch.cuda.synchronize()
    return statistics.median(loops)


def op_rows(dev) -> list[dict]:
    x = torch.randn(1, 64, 4, 4, device=dev, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    centre, scale = torch.randn(1, 64, device=dev), torch.randn(1, 64, device=dev)
    a, b = (torch.randn(1, 16, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
    w = None
    taps = torch.randn(1, 4, 4, 9, 64, device=dev, dtype=torch.bfloat16)
    pointwise = torch.compile(lambda t: t * 2 + 1)
    ops = torch.ops.chunkformer
    timed = {
        "channel_moments: launch": lambda: norms.launch_channel_moments(x),
        "channel_moments: op, eager": lambda: ops.channel_moments(x),
        "scale_shift: launch": lambda: norms.launch_scale_shift(x, centre, scale, None, True),
        "scale_shift: op, eager": lambda: ops.scale_shift(x, centre, scale, None, True),
        "add_rms_norm: launch": lambda: norms.launch_add_rms_norm(a, b, w, 1e-5, None),
        "add_rms_norm: op, eager": lambda: ops.add_rms_norm(a, b, w, 1e-5, None),
        "tap_sum: op, eager": lambda: ops.tap_sum(taps, None),
        "inductor pointwise kernel (compiled function)": lambda: pointwise(x),
        "torch.empty": lambda: torch.empty(1, 64, device=dev),
    }
    rows = []
    with torch.no_grad():
        for name, fn in timed.items():
            rows.append({"op": name, "host_us": host_us(fn)})
            print(f"{name:48s} {rows[-1]['host_us']:7.1f} us", flush=True)
    return rows


def scaffold_rows(dev, names: list[str], cudagraphs: bool, reps: int) -> list[dict]:
    torch._dynamo.config.recompile_limit = 64
    model, inputs = serving_scaffold(256, dev, batch=1)
    rows = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fns = {}
        for name in names:
            settings, patch = VARIANTS[name]
            fns[name] = torch.compile(model if patch is None else patch(copy.deepcopy(model)), **settings)
        if cudagraphs:
            fns["default, CUDA graphs (reduce-overhead)"] = torch.compile(copy.deepcopy(model), mode="reduce-overhead")
        for name, fn in fns.items():
            rows.append({"variant": name, "host_ms": host_us(lambda fn=fn: fn(*inputs), reps) / 1e3})
            print(f"{name:48s} {rows[-1]['host_ms']:7.3f} ms per call at batch 1", flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="default,session 15 library (before)",
                    help=f"comma-separated scaffold variants, from {list(VARIANTS)}")
    ap.add_argument("--cudagraphs", action="store_true")
    ap.add_argument("--reps", type=int, default=200, help="calls per timed loop of the scaffold")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("this benchmark times host launches of CUDA kernels: run it on a GPU")
    dev = torch.device("cuda")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}: host time per call")
    ops = op_rows(dev)
    scaffolds = scaffold_rows(dev, names, args.cudagraphs, args.reps)
    return save_result(args.out, card, ops=ops, scaffolds=scaffolds)


if __name__ == "__main__":
    main()
