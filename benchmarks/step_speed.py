"""How much faster is one sampling step of DC-DiT-XL than one of DiT-XL/2, at rho 0 / 0.2 / 0.4 and Lite-CFG?

    python benchmarks/step_speed.py --size 256      # GPU, about 5 min: writes results/step_speed_256_serving_<card>.json
    python benchmarks/step_speed.py --size 512
    python benchmarks/step_speed.py --size 256 --compile-option inplace_buffers=False   # another compile setting
    python benchmarks/step_speed.py --size 256 --original /path/to/DiT   # also time the original DiT-XL/2 code
    python benchmarks/step_speed.py --tiny          # CPU smoke run (small models, eager, nothing written)

One forward pass (a sampling step, no grad, bf16 autocast) of each model at the same batch (64 at 256px,
16 at 512px), both through ``torch.compile`` with the same settings. DC-DiT-XL runs in fixed-capacity mode
with its router biased to keep every token, so the budget decides the kept count: a quarter of the latent
grid times ``1 - rho``, rounded up to a multiple of 8 (one compiled graph per budget). Lite-CFG is a
conditional pass at rho 0 plus an unconditional pass at rho 0.9, against DiT-XL/2's two full passes. The
scaffold row is DC-DiT-XL without blocks (embed, encoder, router, chunk, de-chunk, decoder, final layer).

``--config serving`` (the default) is how ``recipes.sample --precision bf16 --bf16-routing --capacity N
--fill --compile`` samples: bf16 weights, router and de-chunk under the bf16 autocast, filled plans (every
sample keeps exactly the capacity; attention needs no mask). ``--config default`` keeps fp32 weights under
the autocast, the fp32 router and de-chunk, and masked plans. ``--no-fast-paths`` runs every model on plain
PyTorch ops only (``common.fast_paths(model, on=False)``).

Every row is compiled and warmed first, then timed in ``--rounds`` interleaved rounds (each row reports its
median round, so drift over the run falls on all rows alike). On a GPU every row is also replayed from a
CUDA graph, which times the GPU alone (``gpu_ms``).

``--original PATH`` (or ``$CHUNKFORMER_ORIGINAL_DIT``) names a local checkout of the original DiT code
(facebookresearch/DiT; nothing is downloaded, and its code is imported from there at run time, never
copied here). Its ``models.py`` needs timm and numpy, installed or under ``PATH/_vendor`` (``pip install
--target PATH/_vendor timm``). The run then adds the rows "original DiT-XL/2" (its ``DiT_models["DiT-XL/2"]``,
``forward(x, t, y)``) and "original DiT-XL/2 CFG" (its ``forward_with_cfg`` on the doubled batch, the
conditional and the null labels, as its sampler calls it), in the same configuration as DiT-XL/2's rows
(weight dtype, bf16 autocast, ``torch.compile`` settings, rounds and CUDA graphs; chunkformer's fast paths
are not put on it), and every other row records its speed-up over them (``speedup_over_original``; CFG
rows against the original's CFG row). With ``--tiny`` it builds the checkout's ``DiT`` class at the smoke
run's widths instead. Prints, per row: kept tokens per sample, ms per step
(host clock), GFLOPs per sample, speed-up over DiT-XL/2 (CFG rows against DiT-XL/2 CFG), the speed-up its
FLOPs predict and their ratio; on a GPU the same on the GPU's clock; then the scaffold's share of each step's
time against its share of the FLOPs.
"""

import argparse
import os
import statistics
from pathlib import Path

import torch

from common import bucket, capture_graph, card_name, checkout_commit, fast_paths, load_original_dit, \
    parse_compile_options, replay_ms, router_precision, save_result, step_ms

import chunkformer as cf
from chunkformer.flops import FlopCounter

RHOS = (0.0, 0.2, 0.4)
LITE_CFG_UNCONDITIONAL_RHO = 0.9
ORIGINAL = {"DiT-XL/2": "original DiT-XL/2", "DiT-XL/2 CFG": "original DiT-XL/2 CFG"}  # baseline -> original's row
ORIGINAL_CFG_SCALE = 4.0  # any scale costs the same


def config_name(size: int, config: str, options: dict, fast: bool) -> str:
    """The configuration part of the result file's name: ``256_serving``, ``256_serving_inplace_buffers-False``."""
    parts = [str(size), config, *(f"{k}-{v}" for k, v in sorted(options.items()))]
    return "_".join(parts + ([] if fast else ["no-fast-paths"]))


def add_speedups(rows: list[dict]) -> None:
    """Each row's speed-up over its baseline row (``row["base"]``), the FLOP-predicted speed-up and their ratio;
    on the GPU's clock too where both rows have ``gpu_ms``."""
    by_name = {r["row"]: r for r in rows}
    for r in rows:
        ref = by_name[r["base"]]
        r["baseline_ms"] = ref["ms"]
        r["measured_speedup"] = ref["ms"] / r["ms"]
        r["flop_speedup"] = ref["flops"] / r["flops"]
        r["fraction_of_flop_speedup"] = r["measured_speedup"] / r["flop_speedup"]
        if "gpu_ms" in r and "gpu_ms" in ref:
            r["baseline_gpu_ms"] = ref["gpu_ms"]
            r["gpu_speedup"] = ref["gpu_ms"] / r["gpu_ms"]
            r["gpu_fraction_of_flop_speedup"] = r["gpu_speedup"] / r["flop_speedup"]


def add_original_speedups(rows: list[dict]) -> None:
    """Each row's speed-up over the original DiT code's row of its baseline (``ORIGINAL``): ``original_ms``,
    ``speedup_over_original``, the FLOP-predicted ``flop_speedup_over_original``, and on the GPU's clock
    ``gpu_speedup_over_original`` where both rows have ``gpu_ms``. Changes nothing in a run without them."""
    by_name = {r["row"]: r for r in rows}
    for r in rows:
        ref = by_name.get(ORIGINAL.get(r["base"], ""))
        if ref is None or r["row"] in ORIGINAL.values():
            continue
        r["original_base"], r["original_ms"] = ref["row"], ref["ms"]
        r["speedup_over_original"] = ref["ms"] / r["ms"]
        r["flop_speedup_over_original"] = ref["flops"] / r["flops"]
        if "gpu_ms" in r and "gpu_ms" in ref:
            r["original_gpu_ms"] = ref["gpu_ms"]
            r["gpu_speedup_over_original"] = ref["gpu_ms"] / r["gpu_ms"]


def scaffold_shares(rows: list[dict], flop_shares: dict[float, float], clock: str) -> dict[str, dict]:
    """The scaffold row's time share of each rho row's step against its FLOP share of that step:
    ``{"0.2": {"time_share", "flop_share", "ratio"}}`` for every rho where both rows have ``clock``."""
    by_name = {r["row"]: r for r in rows}
    scaffold = by_name.get("DC-DiT-XL scaffold only", {})
    out = {}
    for rho, flop_share in flop_shares.items():
        step = by_name.get(f"DC-DiT-XL rho={rho:g}", {})
        if clock in scaffold and clock in step:
            share = scaffold[clock] / step[clock]
            out[f"{rho:g}"] = {"time_share": share, "flop_share": flop_share, "ratio": share / flop_share}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, choices=(256, 512), default=256, help="image size (latent = size / 8)")
    ap.add_argument("--config", choices=("serving", "default"), default="serving",
                    help="serving: bf16 weights and routing, filled plans; default: fp32 weights and routing, masked plans")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 at 256px, 16 at 512px")
    ap.add_argument("--reps", type=int, default=40, help="timed steps per row, spread over the rounds")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    ap.add_argument("--no-compile", action="store_true", help="time the models eager")
    ap.add_argument("--compile-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a torch.compile inductor option for every model, e.g. inplace_buffers=False; repeatable")
    ap.add_argument("--no-fast-paths", action="store_true", help="plain PyTorch ops only (common.fast_paths off)")
    ap.add_argument("--original", type=Path, default=os.environ.get("CHUNKFORMER_ORIGINAL_DIT") or None,
                    metavar="PATH", help="a local checkout of the original DiT code (facebookresearch/DiT), default "
                    "$CHUNKFORMER_ORIGINAL_DIT: adds its DiT-XL/2 rows")
    ap.add_argument("--tiny", action="store_true", help="small models on the CPU, eager (a smoke run; writes nothing)")
    ap.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/<name>.json)")
    args = ap.parse_args(argv)
    options = parse_compile_options(args.compile_option)
    original_code = load_original_dit(args.original) if args.original is not None else None
    compile_ = not (args.no_compile or args.tiny)
    serving = args.config == "serving"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch._dynamo.config.recompile_limit = 64  # one compiled entry per (model, capacity)
    latent = args.size // 8
    batch = args.batch or {256: 64, 512: 16}[args.size]
    sizes, reps = {}, args.reps
    if args.tiny:
        batch, latent, reps, sizes = 2, 16, 2 * args.rounds, dict(hidden_size=64, depth=2, num_heads=2)
    L = latent * latent
    caps = {rho: bucket(L / 4 * (1 - rho)) for rho in RHOS}
    u_cap = bucket(L / 4 * (1 - LITE_CFG_UNCONDITIONAL_RHO))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)

    def build(name: str, **kw) -> torch.nn.Module:
        """A seeded registry model in the run's configuration (DC-DiT: keeps every token, the capacity cuts)."""
        torch.manual_seed(0)
        m = cf.create_model(name, input_size=latent, **{**sizes, **kw}).to(device).eval()
        if name.startswith("DC"):
            torch.nn.init.constant_(m.router.scorer[-1].bias, 30.0)  # keep everything: the capacity is the budget
            router_precision(m, fp32=not serving)
        fast_paths(m, on=not args.no_fast_paths)
        return m.to(torch.bfloat16) if serving else m

    def build_original() -> torch.nn.Module:
        """The original code's DiT-XL/2 (at the smoke run's widths with ``--tiny``), seeded, in the run's weight dtype."""
        torch.manual_seed(0)
        if args.tiny:
            m = original_code.DiT(input_size=latent, num_classes=1000, **sizes)
        else:
            m = original_code.DiT_models["DiT-XL/2"](input_size=latent, num_classes=1000)
        m = m.to(device).eval()
        return m.to(torch.bfloat16) if serving else m

    def compiled(m):
        """``m`` (a module or a function) through ``torch.compile`` with the run's options, or ``m`` itself when eager."""
        return (torch.compile(m, options=options) if options else torch.compile(m)) if compile_ else m

    dit = build("DiT-XL/2")
    dc = build("DC-DiT-XL", plan_mode="fixed", capacity=caps[0.0], fill_capacity=serving)
    scaffold = build("DC-DiT-XL", plan_mode="fixed", capacity=caps[0.0], fill_capacity=serving, depth=0)
    null = torch.full_like(y, dit.null_class)
    dit_fn, dc_fn, scaffold_fn = compiled(dit), compiled(dc), compiled(scaffold)
    if original_code is not None:
        original = build_original()
        original_fn, original_cfg_fn = compiled(original), compiled(original.forward_with_cfg)
        x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])  # the original's CFG batch

    def at(capacity: int, labels=None):
        """A step of DC-DiT-XL at ``capacity`` tokens per sample (one compiled graph per capacity)."""
        def step():
            dc.set_plan(capacity=capacity)
            return dc_fn(x, t, y if labels is None else labels)
        return step

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or serving)
    with torch.no_grad(), autocast:
        dit_flops = cf.count_flops(dit, x, t, y).per_sample
        dc_flops, flop_shares = {}, {}
        for rho, cap in [*caps.items(), (LITE_CFG_UNCONDITIONAL_RHO, u_cap)]:
            dc.set_plan(capacity=cap)
            report = cf.count_flops(dc, x, t, null if rho == LITE_CFG_UNCONDITIONAL_RHO else y)
            dc_flops[rho] = report.per_sample
            blocks = sum(v for k, v in report.by_component.items() if k.startswith("backbone"))
            flop_shares[rho] = 1 - blocks / report.total
        dc.set_plan(capacity=caps[0.0])
        # (row, step, FLOPs per sample, kept tokens per sample, baseline row)
        cases = [("DiT-XL/2", lambda: dit_fn(x, t, y), dit_flops, L // 4, "DiT-XL/2"),
                 ("DiT-XL/2 CFG", lambda: (dit_fn(x, t, y), dit_fn(x, t, null)), 2 * dit_flops, L // 4, "DiT-XL/2 CFG")]
        if original_code is not None:
            with FlopCounter(original) as count:
                original(x, t, y)
            with FlopCounter(original) as count_cfg:
                original.forward_with_cfg(x2, t2, y2, ORIGINAL_CFG_SCALE)
            cases += [("original DiT-XL/2", lambda: original_fn(x, t, y), count.total / batch, L // 4, "DiT-XL/2"),
                      ("original DiT-XL/2 CFG", lambda: original_cfg_fn(x2, t2, y2, ORIGINAL_CFG_SCALE),
                       count_cfg.total / batch, L // 4, "DiT-XL/2 CFG")]
        cases += [(f"DC-DiT-XL rho={rho:g}", at(cap), dc_flops[rho], cap, "DiT-XL/2") for rho, cap in caps.items()]
        cond, unc = at(caps[0.0]), at(u_cap, null)
        cases.append(("DC-DiT-XL Lite-CFG (0 / 0.9)", lambda: (cond(), unc()),
                      dc_flops[0.0] + dc_flops[LITE_CFG_UNCONDITIONAL_RHO], caps[0.0], "DiT-XL/2 CFG"))
        cases.append(("DC-DiT-XL scaffold only", lambda: scaffold_fn(x, t, y), dc_flops[0.0] * flop_shares[0.0],
                      caps[0.0], "DiT-XL/2"))
        for name, fn, *_ in cases:
            step_ms(fn, 1)  # compiles
            print(f"compiled: {name}", flush=True)
        per_round = max(reps // args.rounds, 1)
        times: dict[str, list[float]] = {name: [] for name, *_ in cases}
        for _ in range(args.rounds):
            for name, fn, *_ in cases:
                times[name].append(step_ms(fn, per_round))
        gpu_times: dict[str, list[float]] = {}
        if device.type == "cuda":
            graphs = {name: capture_graph(fn, 4) for name, fn, *_ in cases}
            gpu_times = {name: [] for name in graphs}
            for _ in range(args.rounds):
                for name, graph in graphs.items():
                    gpu_times[name].append(replay_ms(graph, 4, replays=2))
            del graphs
    rows = [{"row": name, "ms": statistics.median(times[name]), "ms_rounds": times[name], "flops": flops,
             "kept": kept, "base": base,
             **({"gpu_ms": statistics.median(gpu_times[name]), "gpu_ms_rounds": gpu_times[name]}
                if name in gpu_times else {})}
            for name, _, flops, kept, base in cases]
    add_speedups(rows)
    add_original_speedups(rows)
    shares = {clock: scaffold_shares(rows, {r: flop_shares[r] for r in RHOS}, clock) for clock in ("ms", "gpu_ms")}

    card = card_name() if device.type == "cuda" else "cpu"
    on_gpu = device.type == "cuda"
    print(f"\n{card}, torch {torch.__version__}, {args.size}px (latent {latent}x{latent}), batch {batch}, "
          f"{'torch.compile' if compile_ else 'eager'}{f' {options}' if options else ''}, {args.config} configuration"
          f"{', fast paths off' if args.no_fast_paths else ''}; median of {args.rounds} interleaved rounds")
    print(f"{'row':<32}{'kept':>6}{'ms':>9}{'GFLOPs':>9}{'speed-up':>10}{'FLOP pred':>10}{'ratio':>7}"
          + (f"{'GPU ms':>9}{'speed-up':>10}{'ratio':>7}" if on_gpu else ""))
    for r in rows:
        gpu = (f"{r['gpu_ms']:>9.2f}{r['gpu_speedup']:>10.2f}{r['gpu_fraction_of_flop_speedup']:>7.2f}"
               if "gpu_speedup" in r else "")
        print(f"{r['row']:<32}{r['kept']:>6}{r['ms']:>9.2f}{r['flops'] / 1e9:>9.1f}{r['measured_speedup']:>10.2f}"
              f"{r['flop_speedup']:>10.2f}{r['fraction_of_flop_speedup']:>7.2f}{gpu}")
    against = [r for r in rows if "speedup_over_original" in r]
    if against:
        print("against the original DiT-XL/2 code (CFG rows against its CFG row): " + "; ".join(
            f"{r['row']} {r['speedup_over_original']:.2f}x"
            + (f" (GPU {r['gpu_speedup_over_original']:.2f}x)" if "gpu_speedup_over_original" in r else "")
            for r in against))
    for clock, by_rho in shares.items():
        if by_rho:
            print(f"scaffold, {'GPU' if clock == 'gpu_ms' else 'host'} clock: " + "; ".join(
                f"rho={rho} {v['time_share']:.1%} of the step for {v['flop_share']:.1%} of its FLOPs ({v['ratio']:.2f}x)"
                for rho, v in by_rho.items()))
    return save_result("step_speed", config_name(args.size, args.config, options, not args.no_fast_paths), card,
                       out=args.out, write=not args.tiny, size=args.size, batch=batch, compiled=compile_,
                       compile_options=options, fast_paths=not args.no_fast_paths, rounds=args.rounds,
                       rows=rows, scaffold_flop_shares_by_rho={f"{r:g}": flop_shares[r] for r in RHOS},
                       scaffold_shares_by_rho=shares["ms"], scaffold_gpu_shares_by_rho=shares["gpu_ms"],
                       original=None if args.original is None else str(args.original),
                       original_commit=None if args.original is None else checkout_commit(args.original))


if __name__ == "__main__":
    main()
