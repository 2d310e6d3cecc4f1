"""Does a LayerNorm kernel's speed depend on where its buffers lie in the GPU's memory?

    python benchmarks/norm_placement.py --out benchmarks/results/norm_placement_h100.json   # GPU, ~3 min
    python benchmarks/norm_placement.py --tiny                                              # CPU smoke run

Session 23 found one kernel per DiT block, the second fused residual-add + LayerNorm + modulate, running
1.4x slower in some fresh processes than in others, in DiT-XL/2 as in DC-DiT-XL, with the same source and
launch config in each (``process_spread.py``; docs/performance-log.md, "Session 23"). This script asks whether
placement decides it, within one process. It compiles one model of the serving configuration once, then
runs ``--trials`` trials. Each trial empties the caching allocator and holds a spacer of a random number of
2 MiB pages, so that the step's buffers are mapped afresh, at other addresses. Then it profiles the step
and sums each LayerNorm kernel's GPU time. If a kernel's time moves between trials as it moved between
processes, the buffers' placement is the cause. If it stays put while the processes differed, the cause
is fixed when the process starts. ``--code`` writes the inductor source of those kernels, to read what the
slow one reads and writes.
"""

import argparse
import random
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_tokens import new_code, role  # noqa: E402
from process_spread import serving_models  # noqa: E402
from step_profile import kernel_ms  # noqa: E402
from step_speed import save_result, step_ms  # noqa: E402

PAGE = 2 << 20  # the caching allocator rounds large blocks to 2 MiB


def kernel_source(code: str, names: list[str]) -> str:
    """The ``@triton.jit`` functions called ``names`` in inductor output ``code`` (each up to the next
    top-level statement)."""
    found = []
    for name in names:
        m = re.search(rf"^@triton\.jit\ndef {re.escape(name)}\(.*?(?=^\S)", code, re.MULTILINE | re.DOTALL)
        if m:
            found.append(m.group(0))
    return "\n".join(found)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("DiT-XL/2", "DC-DiT-XL"), default="DiT-XL/2")
    ap.add_argument("--rho", type=float, default=0.2, help="DC-DiT-XL's operating point")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--max-pages", type=int, default=512, help="largest spacer, in 2 MiB pages")
    ap.add_argument("--reps", type=int, default=5, help="profiled steps per trial")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="small models on the CPU, eager (a smoke run)")
    ap.add_argument("--code", type=Path, default=None, help="write the LayerNorm kernels' inductor source here")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.trials < 2:
        ap.error(f"--trials must be >= 2 to compare placements, got {args.trials}")
    if not 0.0 <= args.rho < 1.0:
        ap.error(f"--rho must be in [0, 1), got {args.rho}")
    if not torch.cuda.is_available() and not args.tiny:
        ap.error("profiling needs a CUDA device; use --tiny for a CPU smoke run")
    cuda = not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    (x, t, y), models = serving_models(args.rho, args.tiny, device)
    _, model, tokens = next(m for m in models if m[0] == args.model)
    del models
    rng = random.Random(args.seed)
    seen: set[str] = set()
    new_code(seen)  # inductor modules loaded before this model's: not its code
    trials = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        fn = torch.compile(model) if cuda else model
        step_ms(fn, 1, x, t, y)  # compiles
        code = new_code(seen)
        for i in range(args.trials):
            pages = 0 if i == 0 else rng.randrange(1, args.max_pages + 1)
            if cuda:
                torch.cuda.empty_cache()
            spacer = torch.empty(pages * PAGE, dtype=torch.uint8, device=device)
            ms = step_ms(fn, args.reps, x, t, y)  # maps the step's buffers after the spacer, then times it
            norms = {}
            if cuda:
                norms = {k: v for k, v in kernel_ms(fn, args.reps, x, t, y)[0].items() if role(k) == "layer norm"}
            trials.append({"spacer_pages": pages, "ms": ms, "layer_norm_kernels": norms})
            print(f"trial {i}: spacer {pages * PAGE >> 20} MiB, {ms:.2f} ms", flush=True)
            del spacer
    kernels = sorted({k for tr in trials for k, v in tr["layer_norm_kernels"].items() if v >= 0.1})
    spread = {k: {"min": min(ms), "max": max(ms), "max_over_min": max(ms) / min(ms)}
              for k in kernels for ms in [[tr["layer_norm_kernels"].get(k, float("nan")) for tr in trials]]}
    if args.code is not None:
        args.code.parent.mkdir(parents=True, exist_ok=True)
        args.code.write_text(kernel_source(code, kernels) or code)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    short = {k: re.sub(r".*_(\d+)$", r"#\1", k) if k.startswith("triton_") else k for k in kernels}
    print(f"\n{card}, torch {torch.__version__}, {args.model}"
          f"{f' rho {args.rho:g}' if args.model == 'DC-DiT-XL' else ''}, {tokens} tokens, serving configuration; "
          "each trial after an emptied allocator and a spacer; GPU ms per step of each LayerNorm kernel")
    print(f"{'trial':>5}{'spacer MiB':>11}{'step ms':>9}" + "".join(f"{short[k]:>14}" for k in kernels))
    for i, tr in enumerate(trials):
        print(f"{i:>5}{tr['spacer_pages'] * PAGE >> 20:>11}{tr['ms']:>9.2f}"
              + "".join(f"{tr['layer_norm_kernels'].get(k, float('nan')):>14.3f}" for k in kernels))
    for k in kernels:
        print(f"{k}: {spread[k]['min']:.3f}-{spread[k]['max']:.3f} ms ({spread[k]['max_over_min']:.2f}x)")
    return save_result(args.out, card, model=args.model, rho=args.rho if args.model == "DC-DiT-XL" else None,
                       tokens=tokens, reps=args.reps, trials=trials, spread=spread,
                       step_ms_median=statistics.median(tr["ms"] for tr in trials))


if __name__ == "__main__":
    main()
