"""Does a compiled sampling step cost the same in every process, and does the allocator setting change it?

    python benchmarks/process_spread.py --out benchmarks/results/process_spread_256_rho0.2_h100.json   # GPU, ~8 min
    python benchmarks/process_spread.py --tiny                                                          # CPU smoke run

Session 21 found the same compiled GELU and LayerNorm kernels of the 256px rho-0.2 step costing up to 1.55x
more in some processes than in others (docs/performance-log.md, "Session 21"), and guessed that the memory of
their large buffers was mapped in small pieces after compiling had fragmented the GPU's memory. This script
tests that: for each ``--settings`` value of ``PYTORCH_CUDA_ALLOC_CONF`` (``default`` leaves it unset) it
starts ``--processes`` fresh Python processes. Each compiles DiT-XL/2 and DC-DiT-XL at ``--rho`` in the
serving configuration (bf16 weights, bf16 routing, filled fixed-capacity plan; the router keeps every
token and the capacity is the budget, as in ``step_speed.py``) with an inductor cache of its own (so every
process autotunes, as a first run does), then profiles both and sums the kernels by ``block_tokens.py``'s
roles. The table has one row per process: each model's wall ms, its LayerNorm + modulate and GELU ms, and
the DC step's LayerNorm time against its token share of DiT's (1.00 = it scales). If the spread between a
setting's processes shrinks under ``expandable_segments:True``, the guess holds. (Session 23: it does not.)
Each process also keeps every LayerNorm kernel's time and the launch config inductor's autotuning chose for
it (from the ``.best_config`` files in its cache), so a second table shows which kernel moves between
processes and whether its config did. Since session 24 each process keeps every kernel's time too, and a third
table lists the kernels that move by more than 10% between processes or that some process does not launch (a
cuBLAS or cuDNN algorithm chosen differently, say): what else changes when the LayerNorm kernel turns slow; and
a hash of each LayerNorm kernel's PTX (line info left out), to tell a different compile from the same code running
slower. ``--inductor KEY=VALUE`` compiles both models in every process under an inductor setting (session 24:
``inplace_buffers=False``, to see whether the slow kernel's in-place update of the residual stream draws the state).
"""

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chunkformer as cf  # noqa: E402
from block_tokens import role  # noqa: E402
from step_profile import kernel_ms  # noqa: E402
from step_speed import bucket, parse_settings, save_result, set_inductor_config, step_ms  # noqa: E402


def chosen_configs(cache: str | None, needle: str = "layer_norm") -> dict[str, list[dict]]:
    """The launch configs that inductor's autotuning chose (its ``.best_config`` files in the inductor cache
    ``cache``) for each Triton kernel whose name holds ``needle``: ``{kernel name: [config, ...]}``, a list
    because two graphs may each name a kernel alike."""
    found: dict[str, list[dict]] = defaultdict(list)
    for best in sorted(Path(cache).rglob("*.best_config")) if cache else ():
        for src in sorted(best.parent.glob("*.py")):
            name = re.search(r"def (triton_\w+)\(", src.read_text())
            if name and needle in name.group(1):
                found[name.group(1)].append(json.loads(best.read_text()))
    return dict(found)


def ptx_code(ptx: str) -> str:
    """A kernel's PTX without what names the process: the ``.file`` / ``.loc`` line info and the debug sections at
    the end (which spell out the cache's temporary path). Two processes that compiled the same code give equal text."""
    lines = ptx.splitlines()
    end = next((i for i, line in enumerate(lines) if line.lstrip().startswith(".section")), len(lines))
    return "\n".join(line for line in lines[:end] if not line.lstrip().startswith((".file", ".loc", "//")))


def code_hashes(cache: str | None, needle: str = "layer_norm") -> dict[str, list[str]]:
    """The first 12 hex digits of the sha256 of :func:`ptx_code` of each kernel compiled into the inductor cache
    ``cache`` (Triton's cache lies inside it) whose name holds ``needle``: ``{kernel name: sorted hashes}``, several
    where graphs of two models each have a kernel of that name. Equal hashes in a slow and a fast process mean the
    same code ran at two speeds."""
    found: dict[str, list[str]] = defaultdict(list)
    for ptx in sorted(Path(cache).rglob("*.ptx")) if cache else ():
        if needle in ptx.stem:
            found[ptx.stem].append(hashlib.sha256(ptx_code(ptx.read_text()).encode()).hexdigest()[:12])
    return {k: sorted(v) for k, v in found.items()}


def moving_kernels(rows: list[dict], min_ms: float = 0.05, ratio: float = 1.1) -> list[dict]:
    """Kernels of ``min_ms`` GPU ms a step or more (in some process) whose time differs by more than ``ratio``
    between the processes of ``rows``, or that some process does not launch at all: ``{"model", "kernel",
    "ms": [per process, None where absent]}``, largest spread first. Runs before session 24 kept no kernel list."""
    out = []
    for model in dict.fromkeys(m for r in rows for m in r["models"]):
        lists = [r["models"][model].get("kernels") for r in rows]
        if any(k is None for k in lists):
            continue
        for kernel in sorted(set().union(*lists)):
            ms = [k.get(kernel) for k in lists]
            present = [v for v in ms if v is not None]
            if max(present) >= min_ms and (None in ms or max(present) > ratio * min(present)):
                out.append({"model": model, "kernel": kernel, "ms": ms})
    spread = lambda e: float("inf") if None in e["ms"] else max(e["ms"]) / min(e["ms"])  # noqa: E731
    return sorted(out, key=spread, reverse=True)


def config_text(config: dict) -> str:
    """A launch config as ``R0_BLOCK=32, XBLOCK=16, num_stages=1, num_warps=4``: its block sizes and launch
    counts, without the cache's bookkeeping fields."""
    return ", ".join(f"{k}={config[k]}" for k in sorted(config) if k.isupper() or k.startswith("num_"))


def serving_models(rho: float, tiny: bool, device: torch.device):
    """256px inputs ``(x, t, y)`` at batch 64 and ``[(name, model, tokens)]``: DiT-XL/2 and DC-DiT-XL at ``rho``
    in the serving configuration, bf16 weights, on ``device`` (``tiny``: width 64, depth 2, an 8x8 latent)."""
    latent, batch, sizes = (32, 64, {}) if not tiny else (8, 2, dict(hidden_size=64, depth=2, num_heads=2))
    L = latent * latent
    capacity = bucket(L / 4 * (1 - rho))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t, y = (torch.randint(0, 1000, (batch,), generator=g).to(device) for _ in range(2))
    torch.manual_seed(0)
    dit = cf.create_model("DiT-XL/2", input_size=latent, **sizes)
    torch.manual_seed(0)
    dc = cf.create_model("DC-DiT-XL", input_size=latent, plan_mode="fixed", capacity=capacity, fill_capacity=True,
                         fp32_router_dechunk=False, **sizes)
    torch.nn.init.constant_(dc.router.scorer[-1].bias, 30.0)  # keep everything; the capacity is the budget
    models = [(name, m.to(device).eval().to(torch.bfloat16), tokens)
              for name, m, tokens in (("DiT-XL/2", dit, L // 4), ("DC-DiT-XL", dc, capacity))]
    return (x, t, y), models


def worker(rho: float, reps: int, tiny: bool, inductor: list[str] = ()) -> dict:
    """Compile and profile both models in this process: ``{model: {"ms", "tokens", "roles": {role: ms}}}``, and
    ``"alloc_conf"``, the ``PYTORCH_CUDA_ALLOC_CONF`` it ran under."""
    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    set_inductor_config(list(inductor))  # both models compile under the same settings
    (x, t, y), models = serving_models(rho, tiny, device)
    out = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for name, model, tokens in models:
            fn = torch.compile(model) if cuda else model
            ms = step_ms(fn, reps, x, t, y)  # also compiles and warms up
            roles: dict[str, float] = defaultdict(float)
            norms, kernels = {}, {}  # LayerNorm kernel -> GPU ms; every kernel -> GPU ms
            if cuda:
                kernels = kernel_ms(fn, reps, x, t, y)[0]
                for kernel, v in kernels.items():
                    roles[role(kernel)] += v
                    if role(kernel) == "layer norm":
                        norms[kernel] = v
            out[name] = {"ms": ms, "tokens": tokens, "roles": dict(roles), "layer_norm_kernels": norms,
                         "kernels": {k: round(v, 4) for k, v in kernels.items()}}
    out["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")  # what this process ran under
    out["layer_norm_configs"] = chosen_configs(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    out["layer_norm_ptx"] = code_hashes(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    return out


def run_worker(setting: str, args) -> dict:
    """One fresh process under ``setting`` with an inductor cache of its own; its worker's dict."""
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    if setting != "default":
        env["PYTORCH_CUDA_ALLOC_CONF"] = setting
    with tempfile.TemporaryDirectory() as cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        cmd = [sys.executable, __file__, "--worker", "--rho", str(args.rho), "--reps", str(args.reps)]
        cmd += [f"--inductor={item}" for item in args.inductor]
        res = subprocess.run(cmd + (["--tiny"] if args.tiny else []), env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"a worker under {setting!r} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rho", type=float, default=0.2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--processes", type=int, default=2, help="fresh processes per setting")
    ap.add_argument("--settings", default="default,expandable_segments:True",
                    help="comma-separated PYTORCH_CUDA_ALLOC_CONF values, 'default' for unset")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY in every process before it compiles (repeatable), "
                         "e.g. inplace_buffers=False")
    ap.add_argument("--tiny", action="store_true", help="small models on the CPU, eager (a smoke run)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not 0.0 <= args.rho < 1.0:
        ap.error(f"--rho must be in [0, 1), got {args.rho}")
    if args.processes < 1:
        ap.error(f"--processes must be >= 1, got {args.processes}")
    inductor = parse_settings(args.inductor, "--inductor")  # checked here; each worker applies them to itself
    if args.worker:
        print(json.dumps(worker(args.rho, args.reps, args.tiny, args.inductor)))
        return {}
    if not torch.cuda.is_available() and not args.tiny:
        ap.error("profiling needs a CUDA device; use --tiny for a CPU smoke run")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    rows = []
    for setting in settings:
        for i in range(args.processes):
            models = run_worker(setting, args)
            dit, dc = models["DiT-XL/2"], models["DC-DiT-XL"]
            share = dc["tokens"] / dit["tokens"]

            def vs_share(r: str) -> float:
                ref = dit["roles"].get(r, 0.0) * share
                return dc["roles"].get(r, 0.0) / ref if ref else float("nan")

            alloc_conf, configs = models.pop("alloc_conf"), models.pop("layer_norm_configs", {})
            ptx = models.pop("layer_norm_ptx", {})
            rows.append({"setting": setting, "process": i, "alloc_conf": alloc_conf, "models": models,
                         "layer_norm_configs": configs, "layer_norm_ptx": ptx,
                         "speedup": dit["ms"] / dc["ms"], "layer_norm_vs_share": vs_share("layer norm"),
                         "gelu_vs_share": vs_share("gelu")})
            print(f"{setting} #{i}: DiT-XL/2 {dit['ms']:.2f} ms, DC-DiT-XL {dc['ms']:.2f} ms", flush=True)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu"
    print(f"\n{card}, torch {torch.__version__}, {'tiny models' if args.tiny else '256px, batch 64'}, rho {args.rho:g}, "
          "serving configuration, "
          f"a fresh process and inductor cache per row; ms per step (LayerNorm + modulate, GELU: GPU ms)")
    print(f"{'PYTORCH_CUDA_ALLOC_CONF':<30}{'#':>3}{'DiT ms':>9}{'DiT LN':>8}{'DiT GELU':>9}{'DC ms':>9}{'DC LN':>8}"
          f"{'DC GELU':>9}{'LN/share':>9}{'speed-up':>9}")
    for r in rows:
        dit, dc = r["models"]["DiT-XL/2"], r["models"]["DC-DiT-XL"]
        print(f"{r['setting']:<30}{r['process']:>3}{dit['ms']:>9.2f}{dit['roles'].get('layer norm', 0):>8.2f}"
              f"{dit['roles'].get('gelu', 0):>9.2f}{dc['ms']:>9.2f}{dc['roles'].get('layer norm', 0):>8.2f}"
              f"{dc['roles'].get('gelu', 0):>9.2f}{r['layer_norm_vs_share']:>9.2f}{r['speedup']:>9.2f}")
    print("\nLayerNorm kernels: GPU ms per step in each process, and the launch config autotuning chose there")
    for r in rows:
        for model, m in r["models"].items():
            for kernel, v in sorted(m.get("layer_norm_kernels", {}).items()):
                cfgs = "; ".join(config_text(c) for c in r["layer_norm_configs"].get(kernel, []))
                codes = ",".join(r["layer_norm_ptx"].get(kernel, [])) or "-"
                print(f"  {r['setting']} #{r['process']} {model:<10} {v:7.3f}  {kernel[-60:]}  [{cfgs or 'none recorded'}]"
                      f"  PTX {codes}")
    moving = moving_kernels(rows)
    print("\nKernels of 0.05 ms a step or more that move by over 10% between processes, or are absent from some:")
    for e in moving:
        print(f"  {e['model']:<10} " + " ".join("    -" if v is None else f"{v:6.3f}" for v in e["ms"]) + f"  {e['kernel'][:90]}")
    spread = {}
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting]
        spread[setting] = {"speedup_min": min(r["speedup"] for r in mine), "speedup_max": max(r["speedup"] for r in mine),
                           "speedup_median": statistics.median(r["speedup"] for r in mine)}
        print(f"{setting}: speed-up {spread[setting]['speedup_min']:.3f}-{spread[setting]['speedup_max']:.3f} "
              f"over {len(mine)} processes")
    return save_result(args.out, card, rho=args.rho, reps=args.reps, processes=args.processes, settings=settings,
                       inductor=inductor, rows=rows, spread=spread, moving_kernels=moving)


if __name__ == "__main__":
    main()
