"""Where a sampling step's GPU time goes, kernel class by kernel class, for DiT-XL/2 and DC-DiT-XL.

    python benchmarks/step_profile.py --size 512 --rho 0.4 --out benchmarks/results/step_profile_512_rho04_h100.json
    python benchmarks/step_profile.py --tiny                                   # CPU smoke run

The same models and budget rule as ``step_speed.py`` (compiled, bf16 autocast, fixed capacity
``L / 4 * (1 - rho)`` rounded up to a multiple of 8, the router biased to keep everything):
DiT-XL/2, DC-DiT-XL with masked fixed plans, and DC-DiT-XL with ``fill_capacity=True``
(full plans, attention unmasked). Each is profiled over ``--reps`` steps; GPU kernel time per
step is summed into classes by kernel name (attention, GEMM, convolution, Triton-fused
elementwise / reductions, sort, copies and other), and the top kernels where the two DC-DiT
variants differ most are listed, so a row of ``step_speed.py`` that misses its FLOP
prediction can be traced to the kernels that cost more than their FLOPs.

``--serving``: the serving configuration instead (every model's weights cast to bf16 once; DC-DiT
filled, with its fp32 router and de-chunk and then with both under the autocast, ``bf16
routing``), the listed kernels being those where the two routing precisions differ most.
"""

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chunkformer as cf  # noqa: E402
from step_speed import (add_attention_kernel_arguments, bucket, install_attention_kernel, save_result,  # noqa: E402
                        short_attention_setting, step_ms)  # benchmarks/ is on the path as a script

CLASSES = (  # first match wins; names as CUDA, cuDNN, cuBLAS and Triton report them (Triton names list
    ("triton fused", r"^triton_"),  # the fused aten ops, "convolution" among them: they go first)
    ("attention", r"fmha|flash|attention|sdpa|_attn"),
    ("convolution", r"fprop|conv|dgrad|wgrad|implicit_gemm"),
    ("gemm", r"gemm|nvjet|cutlass|gemv|matmul"),
    ("sort / select", r"sort|topk|radix|scan"),
    ("copy / cast", r"copy|elementwise|cat|index|gather|scatter|fill"),
)


def kernel_class(name: str) -> str:
    for cls, pattern in CLASSES:
        if re.search(pattern, name, re.IGNORECASE):
            return cls
    return "other"


def profile_step(fn, reps: int, *args, per_call: str | None = None
                 ) -> tuple[float, dict[str, float], dict[str, float], dict[str, list[float]]]:
    """(wall ms per step, GPU ms per step by class, GPU ms per step by kernel, and for each kernel whose name
    matches the regex ``per_call`` its calls' GPU ms in the last profiled step, in launch order)."""
    wall = step_ms(fn, reps, *args)  # also warms up (and compiles)
    by_kernel, gpu_events = kernel_ms(fn, reps, *args)
    by_class: dict[str, float] = defaultdict(float)
    for k, v in by_kernel.items():
        by_class[kernel_class(k)] += v
    return wall, dict(by_class), by_kernel, last_step_calls(gpu_events, per_call, reps) if per_call else {}


def kernel_ms(fn, reps: int, *args) -> tuple[dict[str, float], list]:
    """GPU ms per call of ``fn(*args)`` by kernel name, over ``reps`` profiled calls, and the profiler's
    kernel events in launch order (also ``block_tokens.py``'s)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn(*args)
        torch.cuda.synchronize()
    by_kernel: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.self_device_time_total > 0:
            by_kernel[e.key] += e.self_device_time_total / 1e3 / reps
    return dict(by_kernel), [e for e in prof.events() if e.device_type.name == "CUDA"]


def last_step_calls(events, pattern: str, reps: int) -> dict[str, list[float]]:
    """GPU ms of each call, in launch order, of the kernels whose names match ``pattern`` in the last of
    ``reps`` profiled steps (``events``: the profiler's kernel events, with ``name`` and
    ``device_time_total`` in us; every step launches the same kernels)."""
    matched = [e for e in events if re.search(pattern, e.name)]
    calls: dict[str, list[float]] = defaultdict(list)
    for e in matched[len(matched) - len(matched) // reps:]:
        calls[e.name].append(e.device_time_total / 1e3)
    return dict(calls)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, choices=(256, 512), default=256)
    ap.add_argument("--rho", type=float, default=0.4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="small models on the CPU, eager (a smoke run)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--scaffold", action="store_true",
                    help="also profile the scaffold alone (filled, no blocks) and list its heaviest kernels")
    ap.add_argument("--per-call", default=None, metavar="REGEX",
                    help="also list, for each model, every call of the kernels whose names match REGEX in one step "
                         "(count, min / median / max ms): a kernel slower in one model than its twin in another shows "
                         "whether every call is slow or some")
    ap.add_argument("--serving", action="store_true",
                    help="bf16 weights everywhere; DC-DiT filled with fp32 and with bf16 routing (instead of masked / filled)")
    add_attention_kernel_arguments(ap)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not 0.0 <= args.rho < 1.0:
        ap.error(f"--rho must be in [0, 1), got {args.rho}")
    if args.per_call is not None:
        try:
            re.compile(args.per_call)
        except re.error as e:
            ap.error(f"--per-call must be a regular expression ({e}), got {args.per_call!r}")
    attention_kernel, restore_attention = install_attention_kernel(ap, args)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        ap.error("profiling needs a CUDA device; use --tiny for a CPU smoke run")
    device = torch.device("cuda" if cuda else "cpu")
    latent, batch = args.size // 8, {256: 64, 512: 16}[args.size]
    sizes = {}
    if args.tiny:
        latent, batch, args.reps, sizes = 8, 2, 1, dict(hidden_size=64, depth=2, num_heads=2)
    L = latent * latent
    capacity = bucket(L / 4 * (1 - args.rho))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)

    def dcdit(fill: bool, **kw):
        torch.manual_seed(0)
        m = cf.create_model("DC-DiT-XL", input_size=latent, plan_mode="fixed", capacity=capacity,
                            fill_capacity=fill, **{**sizes, **kw}).to(device).eval()
        torch.nn.init.constant_(m.router.scorer[-1].bias, 30.0)  # keep everything; capacity is the budget
        return m

    torch.manual_seed(0)
    dit = cf.create_model("DiT-XL/2", input_size=latent, **sizes).to(device).eval()
    rho = f"rho={args.rho:g}"
    if args.serving:  # FP32Module keeps the fp32 router / de-chunk residual weights fp32 through the cast
        models = {"DiT-XL/2, bf16 weights": dit.to(torch.bfloat16),
                  f"DC-DiT-XL {rho} filled, bf16 weights": dcdit(True).to(torch.bfloat16),
                  f"DC-DiT-XL {rho} filled, bf16 weights + routing": dcdit(True, fp32_router_dechunk=False).to(
                      torch.bfloat16)}
    else:
        models = {"DiT-XL/2": dit, f"DC-DiT-XL {rho}": dcdit(False), f"DC-DiT-XL {rho} filled": dcdit(True)}
    scaffold = "scaffold only, filled" + (", bf16 weights + routing" if args.serving else "")
    if args.scaffold:  # embed, encoder, router, chunk, pack, de-chunk, decoder, final layer: no blocks
        models[scaffold] = (dcdit(True, depth=0, fp32_router_dechunk=False).to(torch.bfloat16) if args.serving
                            else dcdit(True, depth=0))
    results = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda or args.serving)  # bf16 weights need it
    with torch.no_grad(), autocast:
        for name, m in models.items():
            fn = torch.compile(m) if cuda else m
            if cuda:
                wall, by_class, by_kernel, calls = profile_step(fn, args.reps, x, t, y, per_call=args.per_call)
            else:
                wall, by_class, by_kernel, calls = step_ms(fn, args.reps, x, t, y), {}, {}, {}
            results[name] = {"ms": wall, "gpu_ms": sum(by_class.values()), "by_class": by_class,
                             "by_kernel": by_kernel, "gflops": cf.count_flops(m, x, t, y).per_sample / 1e9}
            if args.per_call is not None:
                results[name]["per_call"] = calls
            print(f"{name}: {wall:.2f} ms", flush=True)

    names = list(results)
    classes = sorted({c for r in results.values() for c in r["by_class"]},
                     key=lambda c: -results[names[-1]]["by_class"].get(c, 0.0))
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\n{card}, torch {torch.__version__}, {args.size}px, batch {batch}, capacity {capacity} "
          f"(rho {args.rho:g}), {'torch.compile' if cuda else 'eager'}, bf16 autocast; GPU ms per step"
          f"{'; attention up to %d keys: Triton %s' % (args.attention_max_tokens, args.attention_kernel) if attention_kernel else ''}"
          f"{'; SDPA only (--no-short-attention)' if args.no_short_attention else ''}")
    print(f"{'class':<18}" + "".join(f"{n[-24:]:>26}" for n in names))
    for c in classes:
        print(f"{c:<18}" + "".join(f"{results[n]['by_class'].get(c, 0.0):>26.2f}" for n in names))
    print(f"{'GPU total':<18}" + "".join(f"{results[n]['gpu_ms']:>26.2f}" for n in names))
    print(f"{'wall':<18}" + "".join(f"{results[n]['ms']:>26.2f}" for n in names))
    print(f"{'GFLOPs / sample':<18}" + "".join(f"{results[n]['gflops']:>26.1f}" for n in names))
    for n in names:  # which attention kernel each model ran, and what it cost
        attention = {k: v for k, v in results[n]["by_kernel"].items() if kernel_class(k) == "attention"}
        if attention:
            print(f"attention in {n}: " + "; ".join(f"{v:.2f} ms {k[:60]}" for k, v in
                                                      sorted(attention.items(), key=lambda kv: -kv[1])))
    masked, filled = (results[n]["by_kernel"] for n in names[1:3])  # --serving: fp32 / bf16 routing
    a, b = ("fp32 routing", "bf16 routing") if args.serving else ("masked", "filled")
    diff = sorted(set(masked) | set(filled), key=lambda k: -abs(filled.get(k, 0.0) - masked.get(k, 0.0)))
    top = [{"kernel": k, "masked_ms": masked.get(k, 0.0), "filled_ms": filled.get(k, 0.0)} for k in diff[: args.top]]
    if top:
        print(f"\nkernels where {b} and {a} differ most (ms per step): {a} / {b}")
        for r in top:
            print(f"{r['masked_ms']:>8.3f} {r['filled_ms']:>8.3f}  {r['kernel'][:110]}")
    if args.per_call is not None:
        print(f"\ncalls per step of the kernels matching {args.per_call!r}: count, min / median / max ms")
        for n in names:
            for k, ms in sorted(results[n].get("per_call", {}).items()):
                ms = sorted(ms)
                print(f"  {n[:40]:<40} {len(ms):>4}  {ms[0]:.4f} / {ms[len(ms) // 2]:.4f} / {ms[-1]:.4f}  {k[:70]}")
    if args.scaffold:
        kernels = sorted(results[scaffold]["by_kernel"].items(), key=lambda kv: -kv[1])
        print("\nthe scaffold's heaviest kernels (ms per step, class):")
        for k, v in kernels[: 2 * args.top]:
            print(f"{v:>8.3f}  {kernel_class(k):<14}{k[:100]}")
    for r in results.values():  # keep the JSON small: the top kernels per model only
        r["by_kernel"] = dict(sorted(r["by_kernel"].items(), key=lambda kv: -kv[1])[: 3 * args.top])
    if restore_attention is not None:
        restore_attention()
    return save_result(args.out, card, size=args.size, batch=batch, rho=args.rho, capacity=capacity,
                       serving=args.serving, models=results, attention_kernel=attention_kernel,
                       short_attention=short_attention_setting(args),
                       **({"bf16_vs_fp32_routing": top} if args.serving else {"filled_vs_masked": top}))


if __name__ == "__main__":
    main()
