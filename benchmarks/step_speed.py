"""Sampling-step speed of DC-DiT-XL against DiT-XL/2, both compiled, at the paper's operating points.

    python benchmarks/step_speed.py --size 256 --out benchmarks/results/step_speed_256.json   # GPU, ~5 min
    python benchmarks/step_speed.py --size 512 --out benchmarks/results/step_speed_512.json
    python benchmarks/step_speed.py --tiny                                                     # CPU smoke run

One forward pass (a sampling step, no grad, bf16 autocast) of each model at the same batch
(64 at 256px, 16 at 512px), both through ``torch.compile`` with the same settings and the
default attention backend. DC-DiT runs in fixed-capacity mode: the router is biased to keep
every token and the capacity is the budget, ``L / 4 * (1 - rho)`` tokens per sample rounded up
to a multiple of 8,
so the kept fraction is held at 25% of the grid (times ``1 - rho``) instead of being left
to an untrained router. Each budget is one bucket, one compiled graph.

Rows: rho 0 / 0.2 / 0.4; Lite-CFG (a conditional pass at rho 0 plus an unconditional pass
at rho 0.9, against DiT's two passes); and the scaffold alone (the same DC-DiT with no
blocks), whose time share is set against its FLOP share of the rho-0 step (on a GPU also against each
operating point's step, on the GPU's clock). On a GPU every DiT-XL/2 and fixed-rho DC-DiT row is also
replayed from a CUDA graph in interleaved rounds of its own, and its speed-up read on the GPU's clock
(``gpu_ms``, ``gpu_speedup`` in the JSON). ``--cudagraphs``
adds both models at rho 0 compiled with ``mode="reduce-overhead"`` (CUDA graphs; GPU only),
each against DiT-XL/2 compiled the same way. ``--fill-capacity`` adds rho 0 / 0.2 / 0.4 rows of
DC-DiT with ``fill_capacity=True`` ("filled"): the same weights and tokens (the router keeps
all, the capacity cuts), but the plan is full by construction, so attention runs without a key
mask; measured in the same run as the masked rows. Columns: ms
per step, FLOPs per sample (``count_flops``), measured and FLOP-predicted speed-up over
DiT-XL/2, and their ratio (the fraction of the FLOP savings the clock sees).

``--bf16-routing`` adds the same rows (filled, with ``--fill-capacity``), the Lite-CFG pair and the
scaffold alone with ``fp32_router_dechunk=False``: router and de-chunk under the bf16 autocast
instead of DC-DiT's fp32 (the release's flag of that name), to show what that policy costs.

Every row is compiled and warmed first, then all are timed in ``--rounds`` interleaved rounds and
each reports its median round: single back-to-back timings of the same step moved by up to 5%
between runs on an H100, and drift over a run must not fall on the rows timed last. A round of a short
row (the scaffold alone) makes more calls, so that it lasts about as long as the slowest row's (up to 8x
``--reps / --rounds``; ``calls_per_round`` in the JSON).
``--cudnn-benchmark`` lets cuDNN time its algorithms for every convolution shape (all models);
its heuristic choice for the scaffold's 3x3 ``1152 -> 288`` conv runs at about 370 TFLOP/s on an
H100, against about 580 for the ``288 -> 288`` ones (``scaffold_ops.py``).

``--cudnn-narrowing`` adds the cuDNN twin of every DC-DiT row and scaffold: the decoder's narrowing
conv through cuDNN (``cf.set_taps_narrowing(model, False)``) instead of the GEMM of its taps that
DC-DiT-XL samples with by default, so one process times both paths on one card.

``--paths NAMES`` adds every DC-DiT row and scaffold again through each named compute path of
``scaffold_compile.py`` (the same weights through other kernels: ``1x1 as GEMMs``, ``widening conv
split``, ``residual in its GEMM``, ``all three paths``, ``merge summed in bf16 (before)``, ...), each
against the same DiT-XL/2. A path compiled inside a context (``wide persistent reductions``, ``position
table per call (before)``) changes DiT-XL/2's graph too, so it also adds a DiT-XL/2 row compiled in it.

``--attention-kernel NAME`` runs every model's unmasked, gradient-free attention over at most
``--attention-max-tokens`` keys (default 256) through one of ``short_attention.py``'s Triton candidates
(``whole head``, ``key blocks``; tiles from ``--attention-tiles``, e.g. ``64,1,4,2``), DiT-XL/2 and
DC-DiT-XL alike, so the whole table compares models with the same attention. Compare it with a run
without the flag on the same machine. ``--no-short-attention`` turns off the library's own short-attention
kernel (``chunkformer.short_attention``: by default it takes unmasked no-grad attention of 129-192 keys at
head dim 72, the rho-0.4 rows at 256px), for an SDPA-only run to compare with.

``--bf16-weights`` adds DiT-XL/2 (plain and CFG) and every DC-DiT variant's rho / Lite-CFG rows
with their weights cast to bf16 once (``model.to(torch.bfloat16)``; DC-DiT's fp32 router and
de-chunk residual stay fp32), under the same autocast, each DC-DiT row against the bf16-weight
DiT-XL/2: autocast otherwise re-casts every fp32 weight at every step, about 4 GB of memory
traffic per DiT-XL step whatever the token count. ``--bf16-weights-only`` keeps only those rows (no
fp32-weight DiT-XL/2 either; the scaffold too is cast), for a run that compiles fewer graphs. ``--rows REGEX`` keeps only the DC-DiT rows it
matches (and the DiT-XL/2 baselines), so only they compile: an XL graph takes about half a minute.
``--inductor KEY=VALUE`` (repeatable) sets ``torch._inductor.config.KEY`` before anything
compiles, for every model alike (``triton.autotune_pointwise=False``, ``coordinate_descent_tuning=True``).
``--ab-options KEY=VALUE`` (repeatable) builds every row a second time, each model compiled with
``torch.compile(options={KEY: VALUE, ...})``: those rows end in ``[KEY=VALUE]`` and are set against
the DiT-XL/2 compiled the same way, so one process times an inductor setting against the default on
the same card (with ``--rows``: twice the graphs of the rows it keeps).
``--norm-kernels`` profiles each DiT-XL/2 and fixed-rho DC-DiT row after the timing rounds and keeps its LayerNorm
kernels' GPU ms (``layer_norm_kernels``): on an H100 the in-place one runs 1.4x slower in some processes, and this
says which rows of the run drew that (docs/performance-log.md, "Session 24").
``--unfused-gelu`` builds every row a second time with the MLP's GELU as its own op after fc1
(``cf.set_fused_gelu(model, False)``, DiT-XL/2 and DC-DiT-XL alike; rows ending in ``[GELU unfused]``),
so one process shows what the GEMM-epilogue GELU (the default when sampling on a GPU) does to each model.
"""

import argparse
import contextlib
import json
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chunkformer as cf  # noqa: E402
from recipes.sampling import inductor_setting, parse_compile_options  # noqa: E402


def bucket(tokens: float, multiple: int = 8) -> int:
    """A budget bucket: the token count rounded up to a multiple of 8 (GEMM- and attention-friendly)."""
    return max(multiple, -(-round(tokens) // multiple) * multiple)


RECORDED_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_CACHE_DIR")  # settings that change what a run measures


def save_result(out: Path | None, card: str, **fields) -> dict:
    """A benchmark's JSON record: the card, torch version and command line (prefixed with any of
    ``RECORDED_ENV`` that is set), then ``fields``; written to ``out`` when given (every script in
    benchmarks/ ends with this)."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in RECORDED_ENV if os.environ.get(k)]
    command = " ".join([*env, "python", shlex.join(sys.argv)])
    result = {"card": card, "torch": torch.__version__, "command": command, **fields}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return result


def parse_settings(settings: list[str], flag: str) -> dict:
    """``KEY=VALUE`` items (a dotted ``torch._inductor.config`` name, a Python literal) -> ``{KEY: VALUE}``; exits
    with the reason for a bad one (``recipes.sample --compile-option`` parses the same way)."""
    try:
        return parse_compile_options(settings, flag)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def set_inductor_config(settings: list[str]) -> dict:
    """Apply ``KEY=VALUE`` settings (``triton.autotune_pointwise=False``) to ``torch._inductor.config``."""
    applied = parse_settings(settings, "--inductor")
    for key, value in applied.items():
        setattr(*inductor_setting(key), value)
    return applied


def add_speedups(rows: list[dict], base: dict[str, dict]) -> None:
    """Set each row's speed-up over its DiT-XL/2 baseline (``base[row["base"]]``, ``"plain"`` if it names
    none), the FLOP-predicted one and their ratio; on the GPU's clock too where both rows have ``gpu_ms``."""
    for r in rows:
        ref = base[r.get("base", "plain")]
        r["measured_speedup"] = ref["ms"] / r["ms"]
        r["flop_speedup"] = ref["flops"] / r["flops"]
        r["fraction_of_flop_speedup"] = r["measured_speedup"] / r["flop_speedup"]
        if "gpu_ms" in r and "gpu_ms" in ref:
            r["gpu_speedup"] = ref["gpu_ms"] / r["gpu_ms"]
            r["gpu_fraction_of_flop_speedup"] = r["gpu_speedup"] / r["flop_speedup"]


def scaffold_shares(by_name: dict, scaffold_row: str, step_rows: dict[float, str], flop_shares: dict[float, float],
                    clock: str = "gpu_ms") -> dict[str, dict]:
    """The scaffold's time share of each step against its FLOP share there: ``{"0.2": {"time_share", "flop_share",
    "ratio"}}`` for every ``rho`` whose step row and the scaffold row both have ``clock`` (rows as ``main`` makes them)."""
    out = {}
    scaffold = by_name.get(scaffold_row, {})
    for rho, row in step_rows.items():
        step = by_name.get(row, {})
        if clock in scaffold and clock in step and rho in flop_shares:
            time_share = scaffold[clock] / step[clock]
            out[f"{rho:g}"] = {"time_share": time_share, "flop_share": flop_shares[rho],
                               "ratio": time_share / flop_shares[rho]}
    return out


def cuda_ms(fn, reps: int, *args, warmup: int = 5) -> float:
    """GPU ms per call of ``fn(*args)`` between two CUDA events, after ``warmup`` calls (a kernel benchmark's
    clock; ``step_ms`` times whole steps on the host clock, CPU included)."""
    for _ in range(warmup):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def capture_graph(fn, reps: int, *args) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``reps`` calls of ``fn(*args)``, captured after three warm-up calls on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn(*args)
    graph.replay()
    return graph


def replay_ms(graph: "torch.cuda.CUDAGraph", reps: int, replays: int = 5) -> float:
    """GPU ms per call of a graph of ``reps`` calls, over ``replays`` replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * reps)


def graph_ms(fn, reps: int, *args) -> float:
    """GPU ms per call of ``fn(*args)`` replayed from a CUDA graph of ``reps`` calls: no host time in it
    (``cuda_ms`` of a kernel that runs for tens of microseconds mostly times the host launching it: a
    single GroupNorm, one attention call)."""
    return replay_ms(capture_graph(fn, reps, *args), reps)


def model_row(name: str) -> bool:
    """Whether a row is a DiT-XL/2 or fixed-rho DC-DiT-XL step: not the scaffold alone, not a ``--cudagraphs`` row
    (a CUDA graph already)."""
    return name.startswith(("DiT-XL/2", "DC-DiT-XL rho=")) and "CUDA graphs" not in name


def layer_norm_kernels(cases: list, reps: int = 3, min_ms: float = 0.1) -> dict[str, dict[str, float]]:
    """``{row: {kernel: GPU ms a step}}`` of the LayerNorm kernels of ``min_ms`` or more in each DiT-XL/2 and
    fixed-rho DC-DiT-XL row of ``cases`` (``(name, fn, ...)`` with ``fn()`` one step), over ``reps`` profiled
    steps. On an H100 one of them, the in-place residual update, runs 1.4x slower in some processes
    (docs/performance-log.md, "Session 24"): this says which rows drew that."""
    from block_tokens import role  # noqa: PLC0415  (both import this module)
    from step_profile import kernel_ms  # noqa: PLC0415

    out = {}
    for name, fn, *_ in cases:
        if model_row(name):
            found = kernel_ms(fn, reps)[0]
            out[name] = {k: v for k, v in sorted(found.items()) if role(k) == "layer norm" and v >= min_ms}
    return out


def step_ms(fn, reps: int, *args) -> float:
    for _ in range(3):
        fn(*args)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    sync()
    return 1e3 * (time.perf_counter() - start) / reps


def add_attention_kernel_arguments(ap: argparse.ArgumentParser) -> None:
    """``--attention-kernel``, ``--attention-max-tokens``, ``--attention-tiles`` (also ``step_profile.py``'s)."""
    ap.add_argument("--attention-kernel", default=None, metavar="NAME",
                    help="every model's unmasked no-grad attention through this Triton candidate of short_attention.py "
                         "('whole head', 'key blocks' or 'key blocks, tails'), where it has at most --attention-max-tokens keys (GPU)")
    ap.add_argument("--attention-max-tokens", type=int, default=256)
    ap.add_argument("--attention-tiles", default=None, metavar="INTS",
                    help="the candidate's tiles: 'block_m,grid_m,warps,stages' (whole head) or "
                         "'block_m,block_n,warps,stages' (key blocks); default: its own")
    ap.add_argument("--no-short-attention", action="store_true",
                    help="SDPA for every attention: turn off chunkformer.short_attention (by default its kernel takes "
                         "the unmasked no-grad attention inside its WINS: 129-192 keys at head dim 72)")


def install_attention_kernel(ap: argparse.ArgumentParser, args) -> tuple[dict | None, object]:
    """Route attention through ``--attention-kernel`` if given: ``(the setting as recorded, restore function or
    None)``; a bad name or tile list is a usage error. Applies ``--no-short-attention`` first."""
    cf.set_short_attention(not args.no_short_attention)
    if not args.attention_kernel:
        return None, None
    import short_attention

    if args.attention_kernel not in short_attention.KERNEL_OPS:
        ap.error(f"--attention-kernel: {args.attention_kernel!r} is not one of {sorted(short_attention.KERNEL_OPS)}")
    tiles = None
    if args.attention_tiles:
        ints = [int(n) for n in args.attention_tiles.split(",")]
        if len(ints) != 4:
            ap.error(f"--attention-tiles takes four integers, got {args.attention_tiles!r}")
        tiles = (short_attention.WholeHeadConfig if args.attention_kernel == "whole head"
                 else short_attention.KernelConfig)(*ints)
    restore = short_attention.use_in_models(args.attention_kernel, args.attention_max_tokens, tiles)
    return {"kernel": args.attention_kernel, "max_tokens": args.attention_max_tokens,
            "tiles": None if tiles is None else str(tiles)}, restore


def short_attention_setting(args) -> dict | bool:
    """What the result file records of the library's short-attention kernel: its windows, or False if off."""
    return False if args.no_short_attention else {str(d): list(w) for d, w in cf.short_attention.WINS.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, choices=(256, 512), default=256, help="image size (latent = size / 8)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="small models on the CPU (a smoke run)")
    ap.add_argument("--cudagraphs", action="store_true", help="also time both models under CUDA graphs (GPU)")
    ap.add_argument("--fill-capacity", action="store_true",
                    help="add rows of DC-DiT with fill_capacity=True (full plans, attention without a mask)")
    ap.add_argument("--bf16-routing", action="store_true",
                    help="add rows with fp32_router_dechunk=False (router and de-chunk under bf16 autocast)")
    ap.add_argument("--no-masked", action="store_true",
                    help="skip the masked DC-DiT rows (fewer graphs to compile; needs another variant)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    ap.add_argument("--norm-kernels", action="store_true",
                    help="after timing, profile each DiT-XL/2 and fixed-rho DC-DiT row and keep its LayerNorm kernels' "
                         "GPU ms a step: which rows drew the slow in-place kernel of an H100 process (GPU)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark = True for every model (cuDNN times its algorithms)")
    ap.add_argument("--cudnn-narrowing", action="store_true",
                    help="also every DC-DiT row with the decoder's narrowing conv through cuDNN (taps_narrowing=False)")
    ap.add_argument("--paths", default="", metavar="NAMES",
                    help="also every DC-DiT row and scaffold through each of these compute paths (comma-separated "
                         "names of scaffold_compile.py's path variants, e.g. '1x1 as GEMMs,all three paths')")
    ap.add_argument("--bf16-weights", action="store_true",
                    help="cast every model's weights to bf16 once (fp32 router / de-chunk stay fp32), then autocast")
    ap.add_argument("--bf16-weights-only", action="store_true",
                    help="--bf16-weights without the fp32-weight rows (DiT-XL/2 included): fewer graphs to compile")
    ap.add_argument("--ab-options", action="append", default=[], metavar="KEY=VALUE",
                    help="also build every row again compiled with torch.compile(options={KEY: VALUE}) (repeatable: one "
                         "options dict), each against the DiT-XL/2 compiled the same way: an A/B in one process")
    ap.add_argument("--unfused-gelu", action="store_true",
                    help="also build every row again with the MLP's GELU as its own op (cf.set_fused_gelu(model, "
                         "False)) instead of in fc1's GEMM epilogue, each against a DiT-XL/2 built the same way")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY = VALUE (a Python literal) for every model; repeatable")
    ap.add_argument("--rows", default=None, metavar="REGEX",
                    help="time only the DC-DiT rows whose name matches (DiT-XL/2 rows always run); nothing else compiles")
    add_attention_kernel_arguments(ap)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.bf16_weights = args.bf16_weights or args.bf16_weights_only
    attention_kernel, restore_attention = install_attention_kernel(ap, args)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    inductor = set_inductor_config(args.inductor)
    # every DC-DiT variant shares DCDiT.forward's code object, and each (model, capacity) is one more compiled
    # entry of it: past dynamo's default limit of 8 the rest would silently run eager
    torch._dynamo.config.recompile_limit = 64
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latent = args.size // 8
    batch = args.batch or {256: 64, 512: 16}[args.size]
    sizes = dict(hidden_size=64, depth=2, num_heads=2) if args.tiny else {}
    if args.tiny:
        batch, latent, args.reps = 2, 16, 2
    L = latent * latent
    ab = parse_settings(args.ab_options, "--ab-options")
    # contexts: the paths compiled inside a context of scaffold_compile.py, with settings of their own (else
    # dynamo would hand a twin the graph it compiled for an equal model outside it)
    paths, contexts, context_options = {}, {}, {}
    if args.paths:
        from scaffold_compile import VARIANTS as scaffold_variants  # imported here: it imports this module
        from scaffold_compile import CONTEXTS

        for name in (n.strip() for n in args.paths.split(",") if n.strip()):
            patch = scaffold_variants.get(name, (None, None))[1]
            if patch is None:
                ap.error(f"--paths: {name!r} is not one of scaffold_compile.py's compute paths "
                         f"{[n for n, (_, p) in scaffold_variants.items() if p is not None]}")
            paths[name] = patch
            if name in CONTEXTS:
                contexts[name] = CONTEXTS[name]
                context_options[name] = scaffold_variants[name][0]["options"]  # settings of its own
    if (ab or args.unfused_gelu) and args.cudagraphs:
        ap.error("--ab-options / --unfused-gelu and --cudagraphs: run them separately")
    if ab and args.unfused_gelu:
        ap.error("--ab-options and --unfused-gelu: run them separately (each builds every row a second time)")

    def compile_(m, options=None):
        if args.no_compile:
            return m
        return torch.compile(m, options=options) if options else torch.compile(m)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or args.bf16_weights)
    if args.cudagraphs and args.bf16_weights:
        ap.error("--cudagraphs and --bf16-weights: run them separately")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    def _dit(fuse_gelu=True):
        torch.manual_seed(0)
        m = cf.create_model("DiT-XL/2", input_size=latent, **sizes).to(device).eval()
        if not fuse_gelu:
            cf.set_fused_gelu(m, False)
        return m

    dit = _dit()

    def dcdit(depth=None, fill=False, fp32=True, weights=torch.float32, taps=True, path=None, fuse_gelu=True):
        torch.manual_seed(0)
        kw = dict(sizes, depth=depth) if depth is not None else sizes
        m = cf.create_model("DC-DiT-XL", input_size=latent, plan_mode="fixed", capacity=L // 4,
                            fill_capacity=fill, fp32_router_dechunk=fp32, **kw).to(device).eval()
        torch.nn.init.constant_(m.router.scorer[-1].bias, 30.0)  # keep everything; capacity is the budget
        if not taps:  # the decoder's narrowing conv through cuDNN instead of its taps GEMM + shifted sum
            cf.set_taps_narrowing(m, False)
        if path is not None:  # the same weights through other kernels (scaffold_compile.py)
            paths[path](m)
        if not fuse_gelu and m.blocks:  # the scaffold alone has no MLP
            cf.set_fused_gelu(m, False)
        return m.to(weights)

    cases = []  # (row, step function, FLOPs per sample, kept, baseline): timed together at the end

    def at(model_fn, model, capacity, labels=None):
        """A step of ``model`` at ``capacity`` (a module attribute: one compiled graph per value)."""
        def step():
            model.capacity = capacity
            return model_fn(x, t, y if labels is None else labels)
        return step

    # DC-DiT variants, each a model of its own (same weights): masked fixed plans (the default), filled
    # plans (fill_capacity: no attention mask), and the release's fp32_router_dechunk=False
    variants = [] if args.no_masked else [("", {})]
    variants += [(" filled", dict(fill=True))] if args.fill_capacity else []
    if args.bf16_routing:
        variants.append((" filled, bf16 routing" if args.fill_capacity else " bf16 routing",
                         dict(fill=args.fill_capacity, fp32=False)))
    if not variants:
        ap.error("--no-masked leaves no DC-DiT rows: add --fill-capacity and/or --bf16-routing")
    if args.cudnn_narrowing:
        variants += [(f"{suffix}, cuDNN narrowing conv", dict(kw, taps=False)) for suffix, kw in variants]
    variants += [(f"{suffix}, {path}", dict(kw, path=path)) for path in paths for suffix, kw in variants
                 if "cuDNN" not in suffix]
    if args.bf16_weights:  # FP32Module keeps DC-DiT's router / de-chunk residual fp32 through .to(bfloat16)
        variants = ([] if args.bf16_weights_only else variants) + [
            (f"{suffix}, bf16 weights", dict(kw, weights=torch.bfloat16)) for suffix, kw in variants]
    caps = {rho: bucket(L / 4 * (1 - rho)) for rho in (0.0, 0.2, 0.4)}
    u_cap = bucket(L / 4 * 0.1)  # Lite-CFG: conditional at rho 0, unconditional at rho 0.9
    null = torch.full_like(y, dit.null_class)

    def add_cases(opts: dict | None, tag: str, fuse_gelu: bool = True) -> dict:
        """Every row compiled with ``opts`` and the MLP's GELU fused or not (``tag`` ends each row name and
        baseline key); returns the DC models."""
        dit_fn = compile_(dit if not opts and fuse_gelu else _dit(fuse_gelu), opts)
        if not args.bf16_weights_only:
            cases.append(("DiT-XL/2" + tag, lambda: dit_fn(x, t, y), dit_flops, L // 4, "plain" + tag))
            cases.append(("DiT-XL/2 CFG" + tag, lambda: (dit_fn(x, t, y), dit_fn(x, t, null)), 2 * dit_flops, L // 4,
                          "cfg" + tag))
        if args.bf16_weights:
            dit16_fn = compile_(_dit(fuse_gelu).to(torch.bfloat16), opts)
            cases.append(("DiT-XL/2, bf16 weights" + tag, lambda: dit16_fn(x, t, y), dit_flops, L // 4, "bf16w-plain" + tag))
            cases.append(("DiT-XL/2 CFG, bf16 weights" + tag, lambda: (dit16_fn(x, t, y), dit16_fn(x, t, null)),
                          2 * dit_flops, L // 4, "bf16w-cfg" + tag))
        models, flops_of = {}, {}  # flops_of[(suffix, rho)]: a --paths row counts its twin's (same math; the
        for suffix, kw in variants:  # residual-in-GEMM path calls no nn.Linear for the counter to see)
            m = models[suffix] = dcdit(**kw, fuse_gelu=fuse_gelu)
            m_fn = compile_(m, {**(opts or {}), **context_options.get(kw.get("path"), {})} or None)
            b16 = "bf16w-" if "bf16 weights" in suffix else ""  # its DiT-XL/2 baseline
            twin = suffix.replace(f", {kw['path']}", "") if kw.get("path") else None

            def flops(key, labels=y):
                if twin is None:
                    flops_of[suffix, key] = cf.count_flops(m, x, t, labels).per_sample
                return flops_of[twin or suffix, key]

            for rho, cap in caps.items():
                m.capacity = cap
                cases.append((f"DC-DiT-XL rho={rho:g}{suffix}{tag}", at(m_fn, m, cap),
                              flops(rho), cap, b16 + "plain" + tag))
            if "bf16 routing" not in suffix or "bf16 weights" in suffix:  # DiT: the same two passes at full length
                m.capacity = caps[0.0]
                f_cond = flops(0.0)
                m.capacity = u_cap
                f_unc = flops("unconditional", null)
                cond, unc = at(m_fn, m, caps[0.0]), at(m_fn, m, u_cap, null)
                cases.append((f"DC-DiT-XL Lite-CFG (0 / 0.9){suffix}{tag}", lambda c=cond, u=unc: (c(), u()),
                              f_cond + f_unc, caps[0.0], b16 + "cfg" + tag))
            m.capacity = caps[0.0]
        # the scaffold alone (embed, encoder, router, chunk, pack, de-chunk, decoder, final layer): its FLOP share
        # of the first variant's rho-0 step (each model is left at capacity caps[0]), and its time share of that step
        first = models[variants[0][0]]
        counted = caps if not tag else {0.0: caps[0.0]}  # a twin's rows have the same FLOPs: rho 0 only
        for rho, cap in sorted(counted.items(), reverse=True):  # rho 0 last: the model is left at caps[0]
            first.capacity = cap
            report = cf.count_flops(first, x, t, y)
            blocks = sum(v for k, v in report.by_component.items() if k.startswith("backbone"))
            if not tag:
                flop_shares[rho] = 1 - blocks / report.total
        scaffold_flops = report.per_sample * (1 - blocks / report.total)  # of the rho-0 step
        w16 = dict(weights=torch.bfloat16) if args.bf16_weights_only else {}
        scaffolds = [("DC-DiT-XL scaffold only", dcdit(depth=0, **w16))]
        if args.bf16_routing:
            scaffolds.append(("DC-DiT-XL scaffold only, bf16 routing", dcdit(depth=0, fp32=False, **w16)))
        if args.cudnn_narrowing:
            scaffolds += [(name + ", cuDNN narrowing conv", dcdit(depth=0, fp32="bf16" not in name, taps=False, **w16))
                          for name, _ in list(scaffolds)]
        scaffolds += [(f"{name}, {path}", dcdit(depth=0, fp32="bf16" not in name, path=path, **w16))
                      for path in paths for name, _ in list(scaffolds) if "cuDNN" not in name]
        for name, sc in scaffolds:
            path = next((c for c in contexts if name.endswith(", " + c)), None)
            sc_opts = {**(opts or {}), **context_options.get(path, {})} or None
            name += (", bf16 weights" if w16 else "") + tag
            cases.append((name, lambda f=compile_(sc, sc_opts): f(x, t, y), scaffold_flops,
                          caps[0.0], ("bf16w-plain" if w16 else "plain") + tag))
        return models

    flop_shares = {}  # rho -> the scaffold's FLOP share of that step (the first variant's), set by add_cases
    with torch.no_grad(), autocast:
        dit_flops = cf.count_flops(dit, x, t, y).per_sample
        ab_tag = " [" + ", ".join(f"{k}={v!r}" for k, v in ab.items()) + "]" if ab else ""
        ab_tag = " [GELU unfused]" if args.unfused_gelu else ab_tag
        models = add_cases(None, "")
        if ab:
            add_cases(ab, ab_tag)
        elif args.unfused_gelu:
            add_cases(None, ab_tag, fuse_gelu=False)
        scaffold_share_flops = flop_shares[0.0]
        dc = models[variants[0][0]]
        if args.cudagraphs and device.type == "cuda":  # static shapes in fixed mode: one graph per capacity
            dc.capacity = caps[0.0]
            graphed = {name: torch.compile(m, mode="reduce-overhead") for name, m in (("dit", dit), ("dc", dc))}
            cases.append(("DiT-XL/2 CUDA graphs", lambda: graphed["dit"](x, t, y).clone(), cases[0][2], L // 4, "graphs"))
            cases.append(("DC-DiT-XL rho=0 CUDA graphs", lambda: graphed["dc"](x, t, y).clone(),  # replays overwrite
                          cases[2][2], caps[0.0], "graphs"))
        # every case compiled and warm first, then timed in interleaved rounds (median per case), so clock
        # and thermal drift over the run falls on all rows alike instead of on whichever runs last
        if args.rows:  # only these DC-DiT rows (and every DiT-XL/2 baseline): fewer graphs to compile
            cases = [c for c in cases if c[0].startswith("DiT-XL/2") or re.search(args.rows, c[0])]
        b16 = "bf16w-" if args.bf16_weights else ""
        for path in contexts:  # a context changes DiT-XL/2's graph too (its norms, its position table): its twin
            dit_twin = compile_(_dit().to(torch.bfloat16) if args.bf16_weights else _dit(), context_options[path])
            cases.append((f"DiT-XL/2{', bf16 weights' if b16 else ''}, {path}", lambda f=dit_twin: f(x, t, y),
                          dit_flops, L // 4, b16 + "plain"))
        for case in cases:
            context = next((contexts[name] for name in contexts if case[0].endswith(name) or f", {name}," in case[0]),
                           contextlib.nullcontext)
            with context():
                step_ms(case[1], 1)  # compiles
            print(f"compiled: {case[0]}", flush=True)
        per_round = max(args.reps // args.rounds, 1)
        # each case's round lasts about as long as the slowest case's (up to 8x the calls): timed over a few
        # calls, a short row (the scaffold alone) was at the mercy of host hiccups (session 17, 512px on an
        # H100: scaffold rounds of 5.6 to 12.4 ms, five calls each)
        guess = {case[0]: step_ms(case[1], 2) for case in cases}
        calls = {name: min(8 * per_round, max(per_round, round(per_round * max(guess.values()) / ms)))
                 for name, ms in guess.items()}
        times = {case[0]: [] for case in cases}
        for _ in range(args.rounds):
            for name, fn, *_ in cases:
                times[name].append(step_ms(fn, calls[name]))
        # The scaffold alone, every fixed-rho DC-DiT row and every DiT-XL/2 row also on the GPU's clock, replayed
        # from CUDA graphs in interleaved rounds of their own. A row's host time carries the GPU's idle gaps
        # between launches, which a step with more short kernels has more of; alone, the scaffold is a 5 ms step
        # of short kernels whose host time can show through (session 20, H100: rounds of 5.1 and 6.0-6.8 ms in
        # one run). The --cudagraphs rows are CUDA graphs already.
        gpu_times: dict[str, list[float]] = {}
        norms: dict[str, dict[str, float]] = {}  # --norm-kernels: each model row's LayerNorm kernels
        if device.type == "cuda":
            graphs = {}
            for name, fn, *_ in cases:
                if "scaffold only" in name or model_row(name):
                    try:
                        graphs[name] = capture_graph(fn, 4)
                    except Exception as e:  # noqa: BLE001 - a row that cannot be captured keeps its host clock only
                        print(f"{name}: no CUDA-graph time ({type(e).__name__}: {str(e)[:120]})")
            gpu_times = {name: [] for name in graphs}
            for _ in range(args.rounds):
                for name, graph in graphs.items():
                    gpu_times[name].append(replay_ms(graph, 4, replays=2))
            del graphs
            if args.norm_kernels:
                norms = layer_norm_kernels(cases)
        rows = [{"row": name, "ms": statistics.median(times[name]), "ms_rounds": times[name], "flops": flops,
                 "kept": kept, "calls_per_round": calls[name],
                 **({"gpu_ms": statistics.median(gpu_times[name]), "gpu_ms_rounds": gpu_times[name]}
                    if name in gpu_times else {}),
                 **({"layer_norm_kernels": norms[name]} if name in norms else {}),
                 **({"base": base} if base != "plain" else {})}
                for name, _, flops, kept, base in cases]

    by_name = {r["row"]: r for r in rows}
    base = {key + tag: by_name.get(row + tag) for tag in ("", ab_tag) for key, row in (
        ("plain", "DiT-XL/2"), ("cfg", "DiT-XL/2 CFG"), ("bf16w-plain", "DiT-XL/2, bf16 weights"),
        ("bf16w-cfg", "DiT-XL/2 CFG, bf16 weights"))}
    base["graphs"] = by_name.get("DiT-XL/2 CUDA graphs")
    add_speedups(rows, base)

    def share(scaffold_row: str, step_row: str, clock: str = "ms") -> float | None:
        """Time share of the scaffold in a rho-0 step, on the host's clock (``ms``) or the GPU's (``gpu_ms``)."""
        if clock not in by_name.get(scaffold_row, {}) or clock not in by_name.get(step_row, {}):
            return None
        return by_name[scaffold_row][clock] / by_name[step_row][clock]
    w16 = ", bf16 weights" if args.bf16_weights_only else ""
    time_share = share(f"DC-DiT-XL scaffold only{w16}", f"DC-DiT-XL rho=0{variants[0][0]}")  # None if --rows dropped either
    low = [suffix for suffix, _ in variants if "bf16 routing" in suffix]
    low_share = share(f"DC-DiT-XL scaffold only, bf16 routing{w16}", f"DC-DiT-XL rho=0{low[0]}") if low else None
    gpu_share = share(f"DC-DiT-XL scaffold only{w16}", f"DC-DiT-XL rho=0{variants[0][0]}", "gpu_ms")
    low_gpu_share = (share(f"DC-DiT-XL scaffold only, bf16 routing{w16}", f"DC-DiT-XL rho=0{low[0]}", "gpu_ms")
                     if low else None)
    # the scaffold's GPU-clock share of the step at each operating point (rho 0 above is the strictest: its
    # backbone is the longest, so the scaffold's FLOP share is the smallest)
    gpu_shares_by_rho = {
        label: scaffold_shares(by_name, f"DC-DiT-XL scaffold only{extra}{w16}",
                               {rho: f"DC-DiT-XL rho={rho:g}{suffix}" for rho in caps}, flop_shares)
        for label, extra, suffix in (("", "", variants[0][0]), ("bf16 routing", ", bf16 routing", low[0] if low else None))
        if suffix is not None}
    gpu_shares_by_rho = {k: v for k, v in gpu_shares_by_rho.items() if v}
    ab_shares = {}  # the same two shares among the --ab-options / --unfused-gelu rows
    if ab_tag:
        ab_shares = {"scaffold_time_share": share(f"DC-DiT-XL scaffold only{w16}{ab_tag}",
                                                  f"DC-DiT-XL rho=0{variants[0][0]}{ab_tag}"),
                     "scaffold_time_share_bf16_routing": share(f"DC-DiT-XL scaffold only, bf16 routing{w16}{ab_tag}",
                                                               f"DC-DiT-XL rho=0{low[0]}{ab_tag}") if low else None}
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{card}, torch {torch.__version__}, {args.size}px (latent {latent}x{latent}), batch {batch}, "
          f"{'eager' if args.no_compile else 'torch.compile'}, bf16 autocast"
          f"{', cudnn.benchmark' if args.cudnn_benchmark else ''}"
          f"{''.join(f', inductor {k}={v!r}' for k, v in inductor.items())}"
          f"{f'; rows ending in {ab_tag.strip()} compiled with those options' if ab else ''}"
          f"{f'; rows ending in {ab_tag.strip()} with the GELU as its own op' if args.unfused_gelu else ''}"
          f"; median of {args.rounds} interleaved rounds"
          f"{'; filled: fill_capacity=True, attention unmasked' if args.fill_capacity else ''}"
          f"{'; attention up to %d keys: Triton %s' % (args.attention_max_tokens, args.attention_kernel) if attention_kernel else ''}"
          f"{'; SDPA only (--no-short-attention)' if args.no_short_attention else ''}")
    clock = any("gpu_speedup" in r for r in rows)  # then also each row on the GPU's clock
    print(f"{'row':<50}{'kept':>6}{'ms':>9}{'GFLOPs':>9}{'speed-up':>10}{'FLOP pred':>10}{'ratio':>7}"
          + (f"{'GPU ms':>9}{'speed-up':>10}{'ratio':>7}" if clock else ""))
    for r in rows:
        on_gpu = (f"{r['gpu_ms']:>9.2f}{r['gpu_speedup']:>10.2f}{r['gpu_fraction_of_flop_speedup']:>7.2f}"
                  if "gpu_speedup" in r else "")
        print(f"{r['row']:<50}{r['kept']:>6}{r['ms']:>9.2f}{r['flops'] / 1e9:>9.1f}{r['measured_speedup']:>10.2f}"
              f"{r['flop_speedup']:>10.2f}{r['fraction_of_flop_speedup']:>7.2f}{on_gpu}")
    for r in rows:
        if r.get("layer_norm_kernels"):
            print(f"LayerNorm kernels, {r['row']}: " + ", ".join(f"{v:.2f}" for v in r["layer_norm_kernels"].values())
                  + " ms a step")
    if time_share is not None:
        print(f"scaffold: {time_share:.1%} of the rho=0{variants[0][0]} step's time for {scaffold_share_flops:.1%} of "
              f"its FLOPs ({time_share / scaffold_share_flops:.2f}x its share)")
    if low_share is not None:
        print(f"scaffold with bf16 routing: {low_share:.1%} of the rho=0{low[0]} step's time "
              f"({low_share / scaffold_share_flops:.2f}x its share)")
    for label, value in (("scaffold", gpu_share), ("scaffold with bf16 routing", low_gpu_share)):
        if value is not None:
            print(f"{label}, GPU clock (CUDA graphs of the scaffold and of the rho=0 step): {value:.1%} of the step "
                  f"({value / scaffold_share_flops:.2f}x its share)")
    for label, by_rho in gpu_shares_by_rho.items():
        print(f"scaffold{' with ' + label if label else ''}, GPU clock, at each operating point: " + "; ".join(
            f"rho={rho} {v['time_share']:.1%} of the step for {v['flop_share']:.1%} of its FLOPs ({v['ratio']:.2f}x)"
            for rho, v in by_rho.items()))
    for key, value in ab_shares.items():
        if value is not None:
            print(f"{ab_tag.strip()} {key.replace('_', ' ')}: {value:.1%} ({value / scaffold_share_flops:.2f}x its share)")
    if restore_attention is not None:
        restore_attention()
    return save_result(args.out, card, size=args.size, batch=batch, compiled=not args.no_compile,
                       fill_capacity=args.fill_capacity, cudnn_benchmark=args.cudnn_benchmark, rounds=args.rounds,
                       masked=not args.no_masked, rows=rows, scaffold_time_share=time_share,
                       scaffold_flop_share=scaffold_share_flops, bf16_routing=args.bf16_routing,
                       scaffold_time_share_bf16_routing=low_share, scaffold_gpu_share=gpu_share,
                       scaffold_gpu_share_bf16_routing=low_gpu_share, scaffold_flop_shares_by_rho={f"{r:g}": v for r, v in flop_shares.items()},
                       scaffold_gpu_shares_by_rho=gpu_shares_by_rho, bf16_weights=args.bf16_weights,
                       inductor_config=inductor, ab_options=ab, ab_tag=ab_tag, ab_shares=ab_shares,
                       unfused_gelu=args.unfused_gelu,
                       attention_kernel=attention_kernel, short_attention=short_attention_setting(args))


if __name__ == "__main__":
    main()
