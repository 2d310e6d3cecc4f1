"""Tables and the step-time plot of docs/performance.md (and its log), from the JSON files in benchmarks/results/.

    python benchmarks/report.py            # prints the markdown tables, writes docs/img/step_speed.png
"""

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _attention_kernel(spec: dict | None) -> str:
    """How a step run attended, when not through SDPA alone (``step_speed.py --attention-kernel``)."""
    if not spec:
        return ""
    return f"; attention up to {spec['max_tokens']} keys: Triton {spec['kernel']} ({spec['tiles'] or 'its default tiles'})"


def _short_attention(setting) -> str:
    """Whether a step run had chunkformer's short-attention kernel on (files before session 19 say nothing: off)."""
    if setting is None:
        return ""
    if not setting:
        return "; SDPA only"
    return "; short-attention kernel at " + ", ".join(f"dh {d}: {lo + 1}-{hi} keys" for d, (lo, hi) in setting.items())


def _table(caption: str | None, columns: list[str]) -> list[str]:
    """A markdown table's first lines: ``caption`` and a blank line (unless ``None``), the column names, and the
    separator row with one ``---`` per column."""
    return ([caption, ""] if caption is not None else []) + ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _note(data: dict) -> list[str]:
    """A table's closing note, from the run's ``note`` field (none if it has none)."""
    return ["", f"Note: {data['note']}."] if data.get("note") else []


def step_table(data: dict) -> str:
    caption = (f"{data['card']}, torch {data['torch']}, {data['size']}px, batch {data['batch']}, "
               f"{'torch.compile' if data['compiled'] else 'eager'}, bf16 autocast"
               f"{', median of %d interleaved rounds' % data['rounds'] if data.get('rounds') else ''}"
               f"{'; filled: fill_capacity=True, attention unmasked' if data.get('fill_capacity') else ''}"
               f"{_attention_kernel(data.get('attention_kernel'))}{_short_attention(data.get('short_attention'))} "
               f"(`{data['command']}`)")
    clock = any("gpu_speedup" in r for r in data["rows"])  # runs since session 23: the GPU's clock too
    lines = _table(caption, ["row", "tokens", "ms", "GFLOPs/sample", "speed-up", "FLOP-predicted", "measured / predicted"]
                   + (["GPU ms", "speed-up, GPU clock", "measured / predicted, GPU clock"] if clock else []))
    for r in data["rows"]:
        mark = " (see note)" if r.get("note") else ""
        on_gpu = "" if not clock else (f" {r['gpu_ms']:.2f} | {r['gpu_speedup']:.2f} | {r['gpu_fraction_of_flop_speedup']:.2f} |"
                                       if "gpu_speedup" in r else " - | - | - |")
        lines.append(f"| {r['row']}{mark} | {r['kept']} | {r['ms']:.2f} | {r['flops'] / 1e9:.1f} | {r['measured_speedup']:.2f} "
                     f"| {r['flop_speedup']:.2f} | {r['fraction_of_flop_speedup']:.2f} |{on_gpu}")
    lines.append("")
    norms = [r for r in data["rows"] if r.get("layer_norm_kernels")]  # --norm-kernels (session 24 on)
    if norms:
        lines += [*_table(None, ["row", "its LayerNorm kernels of 0.1 ms or more, GPU ms a step"]),
                  *(f"| {r['row']} | " + ", ".join(f"{v:.2f}" for v in r["layer_norm_kernels"].values()) + " |"
                    for r in norms), ""]
    lines += [f"Note on {r['row']}: {r['note']}.\n" for r in data["rows"] if r.get("note")]
    if data.get("note"):
        lines.append(f"Note: {data['note']}.\n")
    gpu = [(label, data.get(key)) for label, key in (("", "scaffold_gpu_share"),
                                                     (", bf16 routing", "scaffold_gpu_share_bf16_routing"))]
    gpu_lines = [f"Scaffold alone{label}, GPU clock (CUDA graphs of it and of the rho=0 step): {v:.1%} of the step "
                 f"({v / data['scaffold_flop_share']:.2f}x its share)." for label, v in gpu if v is not None]
    for label, by_rho in (data.get("scaffold_gpu_shares_by_rho") or {}).items():  # every operating point
        gpu_lines.append(f"Scaffold alone{', ' + label if label else ''}, GPU clock, against each step: " + "; ".join(
            f"rho={rho} {v['time_share']:.1%} for {v['flop_share']:.1%} of the FLOPs ({v['ratio']:.2f}x)"
            for rho, v in by_rho.items()) + ".")
    if data.get("scaffold_time_share") is None:  # --rows left the scaffold or the rho-0 row out
        low = data.get("scaffold_time_share_bf16_routing")
        if low is not None:  # a run of the bf16-routing rows only
            lines.append(f"Scaffold alone, bf16 routing: {low:.1%} of the rho=0 step's time for "
                         f"{data['scaffold_flop_share']:.1%} of its FLOPs ({low / data['scaffold_flop_share']:.2f}x its share).")
        return "\n".join(lines + gpu_lines)
    lines.append(f"Scaffold alone: {data['scaffold_time_share']:.1%} of the rho=0 step's time for "
                 f"{data['scaffold_flop_share']:.1%} of its FLOPs "
                 f"({data['scaffold_time_share'] / data['scaffold_flop_share']:.2f}x its share)"
                 + ("." if not data.get("scaffold_time_share_bf16_routing") else
                    f"; with bf16 routing {data['scaffold_time_share_bf16_routing']:.1%} "
                    f"({data['scaffold_time_share_bf16_routing'] / data['scaffold_flop_share']:.2f}x)."))
    return "\n".join(lines + gpu_lines)


def tie_budget(step: dict, attention: dict, blocks: int = 28) -> list[dict]:
    """What each fixed-rho DC-DiT row of a ``step_speed.py`` run would read over DiT-XL/2 without its two known
    excesses, on the GPU's clock (the host's where a row has none).

    * attention: SDPA's time a call at the row's keys (``short_attention.py``'s ``sdpa + copy``, same batch) minus its
      FLOP-scaled time (``ideal``), times ``blocks``. Left out (``None``) where the run's short-attention kernel takes
      the row's length, or ``attention`` has no row for it.
    * scaffold: the scaffold-only row's time minus its FLOP share of the step (``scaffold flops / step flops`` of the
      step's time, the share point 2 of issue 7 measures against).

    One dict per row: ``row``, ``kept``, ``dit_ms``, ``ms``, ``attention_ms`` and ``scaffold_ms`` (the excesses), and the
    speed-ups ``measured``, ``attention_at_flops``, ``scaffold_at_flops``, ``both`` and ``predicted``."""
    def clock(r):
        return r.get("gpu_ms") or r["ms"]
    rows = step["rows"]
    dit = next(r for r in rows if r["row"].startswith("DiT-XL/2") and "CFG" not in r["row"])
    scaffold = next((r for r in rows if "scaffold only" in r["row"]), None)
    window = (step.get("short_attention") or {}).values()
    calls = {(a["batch"], a["tokens"]): a for a in attention["rows"]}
    out = []
    for r in rows:
        if not re.search(r"rho=[\d.]+ filled", r["row"]) or r.get("base") != dit.get("base"):
            continue
        ms, a = clock(r), calls.get((step["batch"], r["kept"]))
        own_kernel = any(lo < r["kept"] <= hi for lo, hi in window)
        att = None if a is None or own_kernel else blocks * (a["sdpa + copy"] - a["ideal"])
        sc = None if scaffold is None else clock(scaffold) - ms * scaffold["flops"] / r["flops"]
        speed = lambda saved: clock(dit) / (ms - saved)  # noqa: E731
        out.append({"row": r["row"], "kept": r["kept"], "dit_ms": clock(dit), "ms": ms, "attention_ms": att,
                    "scaffold_ms": sc, "measured": speed(0.0),
                    "attention_at_flops": None if att is None else speed(att),
                    "scaffold_at_flops": None if sc is None else speed(sc),
                    "both": None if att is None or sc is None else speed(att + sc),
                    "predicted": dit["flops"] / r["flops"]})
    return out


def tie_budget_table(step: dict, attention: dict, step_name: str, attention_name: str) -> str:
    """:func:`tie_budget` as a markdown table: what the speed-ups over DiT-XL/2 are made of."""
    lines = _table(f"{step['card']}, {step['size']}px, batch {step['batch']}: each fixed-rho row's speed-up over DiT-XL/2 "
                   f"without attention's or the scaffold's excess over its FLOPs (`{step_name}`, attention from "
                   f"`{attention_name}`)",
                   ["row", "tokens", "ms", "attention over its FLOPs, ms", "scaffold over its FLOP share, ms",
                    "speed-up", "attention at its FLOPs", "scaffold at its FLOP share", "both", "FLOP-predicted"])
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for b in tie_budget(step, attention):
        lines.append(f"| {b['row']} | {b['kept']} | {b['ms']:.2f} | {num(b['attention_ms'], '.2f')} | "
                     f"{num(b['scaffold_ms'], '.2f')} | {b['measured']:.2f}x | {num(b['attention_at_flops'], '.2f')}x | "
                     f"{num(b['scaffold_at_flops'], '.2f')}x | {num(b['both'], '.2f')}x | {b['predicted']:.2f}x |")
    return "\n".join(lines).replace("| -x |", "| - |")


def ops_table(data: dict) -> str:
    """benchmarks/scaffold_ops.py: each scaffold operation in its equivalent forms."""
    lines = _table(f"{data['card']}, torch {data['torch']}, batch {data['batch']}, {data['grid']}x{data['grid']} grid, "
                   f"d = {data['dim']}, width {data['width']}, {data['kept']} kept (`{data['command']}`)",
                   ["operation", "form", "ms", "TFLOP/s", "relative error (vs fp64)"])
    from scaffold_ops import op_flops  # noqa: PLC0415  (benchmarks/ is on the path when run as a script)

    for r in data["rows"]:
        flops = op_flops(r["op"], data["batch"], data["grid"])
        tflops = f"{flops / r['ms'] / 1e9:.0f}" if flops and r["ms"] == r["ms"] else "-"
        lines.append(f"| {r['op']} | {r['form']} | {r['ms']:.3f} | {tflops} | {r['rel_err']:.1e} |")
    return "\n".join(lines)


def profile_table(data: dict) -> str:
    """benchmarks/step_profile.py: GPU time per step by kernel class."""
    names = list(data["models"])
    classes = sorted({c for m in data["models"].values() for c in m["by_class"]},
                     key=lambda c: -data["models"][names[-1]]["by_class"].get(c, 0.0))
    lines = _table(f"{data['card']}, torch {data['torch']}, {data['size']}px, batch {data['batch']}, capacity "
                   f"{data['capacity']} (rho {data['rho']:g}), GPU ms per step (`{data['command']}`)", ["kernel class", *names])
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(f"{data['models'][n]['by_class'].get(c, 0.0):.2f}" for n in names) + " |")
    for key, label in (("gpu_ms", "GPU total"), ("ms", "wall clock"), ("gflops", "GFLOPs / sample")):
        lines.append(f"| {label} | " + " | ".join(f"{data['models'][n][key]:.{1 if key == 'gflops' else 2}f}"
                                                   for n in names) + " |")
    for label, pattern in (("of which GELU", r"gelu"), ("of which LayerNorm + modulate", r"native_layer_norm")):
        sums = [sum(v for k, v in data["models"][n].get("by_kernel", {}).items() if re.search(pattern, k))
                for n in names]
        if any(sums):  # the backbone's token-wise kernels, to set against their token share (session 21)
            lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in sums) + " |")
    return "\n".join(lines + _note(data))


def full_plan_table(data: dict) -> str:
    """benchmarks/attention_masks.py: attention over full plans per SDPA backend."""
    lines = _table(f"{data['card']}, torch {data['torch']}, bf16, 16 heads of 72, ms per call (`{data['command']}`)",
                   ["batch x slots", "default (no mask)", "flash", "efficient", "cuDNN", "default with a bool mask"])
    for r in data["full_plans"]:
        lines.append(f"| {r['batch']} x {r['slots']} | {r['default']:.3f} | {r['flash']:.3f} | {r['efficient']:.3f} "
                     f"| {r['cudnn']:.3f} | {r['bool mask']:.3f} |")
    return "\n".join(lines)


def scaffold_table(data: dict) -> str:
    """benchmarks/scaffold_profile.py: cumulative stages of the scaffold, time share against FLOP share."""
    lines = _table(f"{data['card']}, torch {data['torch']}, {data['size']}px, batch {data['batch']}, each row compiled, "
                   f"bf16 autocast (`{data['command']}`)", ["row", "ms", "GFLOPs/sample", "time share", "FLOP share"])
    lines += [f"| {r['row']} | {r['ms']:.2f} | {r['gflops_per_sample']:.1f} | {r['time_share']:.0%} | {r['flop_share']:.0%} |"
              for r in data["rows"]]
    return "\n".join(lines)


def smoothing_table(data: dict) -> str:
    """benchmarks/smoothing.py: dense against windowed de-chunk smoothing."""
    mode = "compiled" if data.get("compiled") else "eager"
    lines = _table(f"{data['card']}, torch {data['torch']}, d = {data['dim']}, fp32, {mode}, about 25% kept "
                   f"(`{data['command']}`)", ["grid", "batch", "M", "auto picks", "dense ms", "windowed ms", "speed-up",
                                              "dense peak MiB", "windowed peak MiB", "relative error, sigma 1 / 2 / 4"])
    for r in data["rows"]:
        mib = [f"{v:.0f}" if v is not None else "-" for v in (r["dense_peak_mib"], r["windowed_peak_mib"])]
        errs = " / ".join(f"{e:.1e}" for e in r["relative_error"].values())
        lines.append(f"| {r['grid']} | {r['batch']} | {r['kept_width']} | {r['auto']} | {r['dense_ms']:.3f} "
                     f"| {r['windowed_ms']:.3f} | {r['speedup']:.1f}x | {mib[0]} | {mib[1]} | {errs} |")
    return "\n".join(lines)


def release_table(data: dict) -> str:
    """benchmarks/vs_release.py: the authors' release against ours and DiT-XL/2, one card, one run."""
    caption = (f"{data['card']}, torch {data['torch']}, {data['size']}px, batch {data['batch']}, bf16 autocast; release "
               f"eager (flash-attn stand-ins), ours and DiT-XL/2 compiled"
               f"{'; ours filled (fill_capacity=True)' if data.get('fill_capacity') else ''} (`{data['command']}`)")
    lines = _table(caption, ["row", "kept (release / ours)", "release ms", "ours ms", "ours / release", "DiT-XL/2 ms",
                             "release vs DiT-XL/2", "ours vs DiT-XL/2"])
    lines += [f"| {r['row']} | {r['release_kept']} / {r['ours_kept']} | {r['release_ms']:.2f} | {r['ours_ms']:.2f} "
              f"| {r['ours_over_release']:.2f}x | {r['dit_ms']:.2f} | {r['release_over_dit']:.2f}x "
              f"| {r['ours_over_dit']:.2f}x |" for r in data["rows"]]
    return "\n".join(lines)


def nearest_table(data: dict) -> str:
    lines = []
    for run in data["runs"].values():
        lines += _table(f"{run.get('device_name', '?')}, torch {data['torch']}, about {data['keep']:.0%} of each grid kept",
                        ["grid", "batch", "dense ms", "separable ms", "speed-up", "dense peak MiB", "separable peak MiB",
                         "equal"])
        for r in run["rows"]:
            grid = "x".join(str(g) for g in r["grid"])
            lines.append(f"| {grid} | {r['batch']} | {r['dense_ms']:.2f} | {r['new_ms']:.2f} | {r['speedup']:.1f}x "
                         f"| {r.get('dense_peak_mib', float('nan')):.0f} | {r.get('new_peak_mib', float('nan')):.1f} "
                         f"| {r['equal']} |")
    return "\n".join(lines)


def train_table(data: dict) -> str:
    mode = "torch.compile, DC-DiT in fixed-capacity mode" if data.get("compiled") else "eager"
    lines = _table(f"{data['card']}, torch {data['torch']}, 256px, batch {data['batch']}, {mode}, bf16 autocast "
                   f"(`{data['command']}`)",
                   ["model", "images/s", "training GFLOPs/image", "speed-up", "FLOP-predicted", "peak GiB"])
    for r in data["rows"]:
        lines.append(f"| {r['model']} | {r['images_per_s']:.1f} | {r['train_gflops_per_image']:.1f} "
                     f"| {r['measured_speedup']:.2f} | {r['flop_speedup']:.2f} | {r['peak_gib']:.1f} |")
    return "\n".join(lines)


def block_tokens_table(data: dict) -> str:
    """benchmarks/block_tokens.py: one DiT block's cost per token, by kernel role, against the largest count."""
    roles = list(data["rows"][-1]["roles_per_token_vs_ref"])
    lines = _table(f"{data['card']}, torch {data['torch']}, one DiT block (d = {data['dim']}, {data['heads']} heads), "
                   f"batch {data['batch']}, bf16, compiled; GPU ms per call, and each role's cost per token against "
                   f"{data['reference_tokens']} tokens, 1.00 = proportional (`{data['command']}`)",
                   ["tokens", "ms", "per token", *roles])
    for r in data["rows"]:
        lines.append(f"| {r['tokens']} | {r['ms']:.3f} | {r['per_token_vs_ref']:.2f} | "
                     + " | ".join(f"{r['roles_per_token_vs_ref'][k]:.2f}" for k in roles) + " |")
    return "\n".join(lines)


def gelu_epilogue_table(data: dict) -> str:
    """benchmarks/gelu_epilogue.py: fc1 + GELU as two ops against GELU in the GEMM's epilogue."""
    lines = _table(f"{data['card']}, torch {data['torch']}, fc1 {data['dim']} -> {data['hidden']} + tanh-GELU, bf16, "
                   f"ms per call (`{data['command']}`)",
                   ["rows", "fc1, then GELU", "GELU in the epilogue", "speed-up", "max error, two ops / epilogue"])
    for r in data["rows"]:
        lines.append(f"| {r['rows']} | {r['separate_ms']:.4f} | {r['epilogue_ms']:.4f} | {r['speedup']:.2f} | "
                     f"{r['separate_err']:.1e} / {r['epilogue_err']:.1e} |")
    return "\n".join(lines)


def process_spread_table(data: dict) -> str:
    """benchmarks/process_spread.py: one row per fresh process, under each allocator setting."""
    inductor = "".join(f", inductor {k}={v}" for k, v in data.get("inductor", {}).items())
    lines = _table(f"{data['card']}, torch {data['torch']}, rho {data['rho']:g}, serving configuration{inductor}, a fresh process "
                   f"and inductor cache per row; ms per step, LayerNorm + modulate and GELU in GPU ms (`{data['command']}`)",
                   ["PYTORCH_CUDA_ALLOC_CONF", "process", "DiT-XL/2 ms", "its LayerNorm / GELU", "DC-DiT-XL ms",
                    "its LayerNorm / GELU", "DC LayerNorm against its token share", "speed-up"])
    for r in data["rows"]:
        dit, dc = r["models"]["DiT-XL/2"], r["models"]["DC-DiT-XL"]
        ln_gelu = lambda m: f"{m['roles'].get('layer norm', 0.0):.2f} / {m['roles'].get('gelu', 0.0):.2f}"  # noqa: E731
        lines.append(f"| {r['setting']} | {r['process']} | {dit['ms']:.2f} | {ln_gelu(dit)} | {dc['ms']:.2f} | "
                     f"{ln_gelu(dc)} | {r['layer_norm_vs_share']:.2f} | {r['speedup']:.2f} |")
    from process_spread import config_text  # noqa: PLC0415  (benchmarks/ is on the path when run as a script)

    procs = [f"{r['setting']} #{r['process']}" for r in data["rows"]]

    kernels = sorted({(model, k) for r in data["rows"] for model, m in r["models"].items()
                      for k, v in m.get("layer_norm_kernels", {}).items() if v >= 0.1})  # the step's big ones
    if kernels:  # runs since session 23 keep each LayerNorm kernel and the config autotuning chose for it
        lines += ["", *_table("LayerNorm kernels of 0.1 ms a step or more, GPU ms per step in each process, and their "
                              "launch configs and PTX hashes (each distinct one once; a kernel name may belong to both models' graphs)",
                              ["model", "kernel", *procs, "launch config", "PTX sha256"])]
        for model, k in kernels:
            ms = [r["models"][model].get("layer_norm_kernels", {}).get(k) for r in data["rows"]]
            configs = {config_text(c) for r in data["rows"] for c in r.get("layer_norm_configs", {}).get(k, [])}
            config = " / ".join(sorted(configs)) or "none recorded (not autotuned)"
            codes = " / ".join(dict.fromkeys(h for r in data["rows"] for h in r.get("layer_norm_ptx", {}).get(k, [])))
            lines.append(f"| {model} | `{k}` | " + " | ".join("-" if v is None else f"{v:.2f}" for v in ms)
                         + f" | {config} | {codes or 'not recorded'} |")
    if data.get("moving_kernels"):  # runs since session 24 keep every kernel
        lines += ["", *_table("Kernels of 0.05 ms a step or more that move by over 10% between processes, or that some "
                              "process does not launch (-), GPU ms per step", ["model", "kernel", *procs])]
        lines += [f"| {e['model']} | `{e['kernel'][:100]}` | " + " | ".join("-" if v is None else f"{v:.3f}" for v in e["ms"])
                  + " |" for e in data["moving_kernels"]]
    return "\n".join(lines + _note(data))


def norm_placement_table(data: dict) -> str:
    """benchmarks/norm_placement.py: each LayerNorm kernel's time, trial by trial, as the buffers move."""
    kernels = list(data["spread"])
    what = data["model"] + (f" rho {data['rho']:g}" if data.get("rho") is not None else "")
    lines = _table(f"{data['card']}, torch {data['torch']}, {what}, {data['tokens']} tokens, serving configuration; each "
                   f"trial after an emptied allocator and a spacer; GPU ms per step (`{data['command']}`)",
                   ["trial", "spacer MiB", "step ms", *(f"`{k}`" for k in kernels)])
    for i, tr in enumerate(data["trials"]):
        lines.append(f"| {i} | {tr['spacer_pages'] * 2} | {tr['ms']:.2f} | " + " | ".join(
            f"{tr['layer_norm_kernels'][k]:.2f}" if k in tr["layer_norm_kernels"] else "-" for k in kernels) + " |")
    lines.append("| slowest / fastest | | | " + " | ".join(f"{data['spread'][k]['max_over_min']:.2f}x"
                                                          for k in kernels) + " |")
    return "\n".join(lines + _note(data))


def conv_forms_table(data: dict) -> str:
    """benchmarks/cell_gemm.py and implicit_conv.py: a conv in several forms, GPU ms per call from CUDA graphs
    (a tiling sweep shows every untiled form and the best three tilings of each shape)."""
    lines = _table(f"{data['card']}, torch {data['torch']}, batch {data['batch']}, {data['grid']}x{data['grid']} grid, "
                   f"bf16 channels-last, GPU ms per call from CUDA graphs (`{data['command']}`)",
                   ["operation", "form", "ms", "TFLOP/s", "relative error (vs fp64)"])
    for op in dict.fromkeys(r.get("op") or r["shape"] for r in data["rows"]):
        rows = [r for r in data["rows"] if (r.get("op") or r["shape"]) == op]
        tiled = sorted((r for r in rows if r["form"].startswith("triton") and r["ms"] == r["ms"]), key=lambda r: r["ms"])
        for r in [r for r in rows if not r["form"].startswith("triton")] + tiled[:3]:
            lines.append(f"| {op} | {r['form']} | {r['ms']:.4f} | {r['tflops']:.0f} | {r['rel_err']:.1e} |")
    return "\n".join(lines + _note(data))


def small_train_table(data: dict) -> str:
    caption = (f"{data['card']}, torch {data['torch']}, 32x32x1, batch {data['batch']}, bf16 autocast, fused AdamW, "
               f"commit {data.get('commit', '?')} (`{data['command']}`)")
    lines = _table(caption, ["variant", "steps/s", "speed-up", "FLOP-predicted", "host syncs / step",
                             "GPU kernel ms / step (wall ms)"])
    for r in data["rows"]:
        busy = f"{r['gpu_kernel_ms']:.1f} ({1e3 / r['steps_per_s']:.1f})" if "gpu_kernel_ms" in r else ""
        lines.append(f"| {r['row']} | {r['steps_per_s']:.2f} | {r['measured_speedup']:.2f} | {r['flop_speedup']:.2f} "
                     f"| {r['host_syncs']} | {busy} |")
    notes = [f"{r['row']}: {r['note']}" for r in data["rows"] if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def syncs_table(after: dict, before: dict | None) -> str:
    lines = _table(f"Host syncs and dispatched ops, batch {after['batch']}, training mode (`{after['command']}`)",
                   ["model", "host syncs fwd / bwd", "without value checks", "dispatched ops fwd / bwd"]
                   + (["ops fwd before"] if before else []))
    for name, r in after["rows"].items():
        old = before["rows"].get(name) if before else None
        lines.append(f"| {name} | {r['syncs_fwd']} / {r['syncs_bwd']} | {r['syncs_fwd_unchecked']} / "
                     f"{r['syncs_bwd_unchecked']} | {r['ops_fwd']} / {r['ops_bwd']} |"
                     + (f" {old['ops_fwd']} ({old['syncs_fwd']} syncs) |" if before else ""))
    return "\n".join(lines)


def plot(files: list[Path], out: Path) -> None:
    fig, axes = plt.subplots(1, len(files), figsize=(5 * len(files), 3.8), squeeze=False)
    for ax, path in zip(axes[0], files):
        data = json.loads(path.read_text())
        L = (data["size"] // 8) ** 2
        dit = next(r for r in data["rows"] if r["row"] in ("DiT-XL/2", "DiT-XL/2, bf16 weights"))
        variants: dict[str, list] = {}  # "" (masked), " filled", " filled, bf16 weights", ...: one line each
        for r in data["rows"]:
            if r["row"].startswith("DC-DiT-XL rho") and "graphs" not in r["row"]:
                rho, _, suffix = r["row"].removeprefix("DC-DiT-XL ").partition(" ")
                variants.setdefault(suffix, []).append((rho, r))
        for i, (suffix, rows) in enumerate(variants.items()):
            kept = [r["kept"] / L for _, r in rows]
            ax.plot(kept, [r["ms"] for _, r in rows], "o-", label=f"DC-DiT-XL {suffix or 'masked'} (measured)")
            if i == 0:  # the same FLOPs for every variant
                ax.plot(kept, [dit["ms"] * r["flops"] / dit["flops"] for _, r in rows], "s--", alpha=0.7,
                        label="DC-DiT-XL (FLOP-predicted)")
                for (rho, r), k in zip(rows, kept):
                    ax.annotate(rho, (k, r["ms"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(dit["ms"], color="k", lw=1, label=dit["row"])
        dit16 = next((r for r in data["rows"] if r["row"] == "DiT-XL/2, bf16 weights"), None)
        if dit16 is not None and dit16 is not dit:  # a run with both: the bf16-weight line too
            ax.axhline(dit16["ms"], color="k", lw=1, ls=":", label="DiT-XL/2, bf16 weights")
        ax.set_xlabel("tokens kept / latent grid")
        ax.set_ylabel("ms per sampling step")
        ax.set_title(f"{data['size']}px, batch {data['batch']}, {data['card']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def sample_table(data: dict) -> str:
    """benchmarks/sample_speed.py: images/s of the sampling recipe under each speed setting."""
    caption = (f"{data['card']}, torch {data['torch']}, {data['latent'] * 8}px, batch {data['batch']}, {data['num']} images x "
               f"{data['steps']} Euler steps, no guidance (`{data['command']}`)")
    lines = _table(caption, ["model", "setting", "images/s", "vs the model's defaults", "vs DiT-XL/2 (its setting)",
                             "TFLOPs/image"])
    for r in data["rows"]:
        lines.append(f"| {r['model']} | {r['setting']} | {r['images_per_s']:.1f} | {r['speedup_vs_defaults']:.2f}x "
                     f"| {r['speedup_vs_dit']:.2f}x ({r['dit_setting']}) | {r['tflops_per_image']:.3f} |")
    return "\n".join(lines)


def short_attention_table(data: dict) -> str:
    """benchmarks/short_attention.py: one unmasked attention call per kernel at the kept lengths."""
    clock = f", {data['clock']}" if data.get("clock") else ""
    caption = (f"{data['card']}, torch {data['torch']}, {data['heads']} heads of {data['head_dim']}, bf16, ms per call{clock} "
               f"(`{data['command']}`)")
    lines = _table(caption, ["batch x tokens", "FLOP-scaled ideal", "SDPA (cuDNN) + copy", "FlexAttention",
                             "Triton candidate, best tiles"])
    for r in data["rows"]:
        best = f"{r['triton'][r['triton best']]['ms']:.4f} ({r['triton best']})" if r.get("triton best") else "-"
        lines.append(f"| {r['batch']} x {r['tokens']} | {r['ideal']:.4f} | {r['sdpa + copy']:.4f} | "
                     f"{r.get('flex', float('nan')):.4f} | {best} |")
    backends = [name for name in data["rows"][0].get("backends", {})]
    if backends:  # --sdpa-backends: each SDPA kernel forced alone, the copy included
        lines += ["", *_table(None, ["batch x tokens", "FLOP-scaled ideal", *backends])]
        for r in data["rows"]:
            cells = ["-" if r["backends"][n] is None else f"{r['backends'][n]['ms']:.4f}" for n in backends]
            lines.append(f"| {r['batch']} x {r['tokens']} | {r['ideal']:.4f} | " + " | ".join(cells) + " |")
    if any(r.get("tails") for r in data["rows"]):  # --tails: best correct configuration per length
        lines += ["", *_table(None, ["batch x tokens", "SDPA + copy", "tails candidate, best", "/ SDPA",
                                     "configuration (max error)"])]
        for r in data["rows"]:
            best = r.get("tails best")
            w = r["tails"].get(best)
            lines.append(f"| {r['batch']} x {r['tokens']} | {r['sdpa + copy']:.4f} | " +
                         ("- | - | none correct |" if w is None else
                          f"{w['ms']:.4f} | {w['ms'] / r['sdpa + copy']:.2f} | {best} ({w['err']:.1e}) |"))
    if any(r.get("whole head") for r in data["rows"]):  # --whole-head: best correct configuration per length
        lines += ["", *_table(None, ["batch x tokens", "SDPA + copy", "whole-head candidate, best", "/ SDPA",
                                     "configuration (max error)"])]
        for r in data["rows"]:
            best = r.get("whole head best")
            if best is None:
                lines.append(f"| {r['batch']} x {r['tokens']} | {r['sdpa + copy']:.4f} | - | - | none correct |")
                continue
            w = r["whole head"][best]
            lines.append(f"| {r['batch']} x {r['tokens']} | {r['sdpa + copy']:.4f} | {w['ms']:.4f} | "
                         f"{w['ms'] / r['sdpa + copy']:.2f} | {best} ({w['err']:.1e}) |")
    return "\n".join(lines + _note(data))


def kernel_loads_table(data: dict) -> str:
    """benchmarks/kernel_loads.py: global loads by width in the attention candidates' sm_90 PTX."""
    lines = _table(f"{data['card']}, {data['heads']} heads, {data['tokens']} tokens (`{data['command']}`)",
                   ["kernel", "head dim", "head-start hint", "registers", "spilled bytes", "shared KiB",
                    "global loads by width", "wgmma / mma.sync / barriers / layout conversions"])
    for r in data["rows"]:
        loads = ", ".join(f"{n} x `{k}`" for k, n in sorted(r["loads"].items()))
        hint = "none" if r["head_align"] == 1 else f"multiple of {r['head_align']}"
        regs, spill = (("-" if r.get(k) is None else r[k]) for k in ("registers", "spill_bytes"))
        smem = "-" if r.get("shared_bytes") is None else f"{r['shared_bytes'] / 1024:.0f}"
        ins = r.get("instructions")  # session 20 on
        counts = "-" if ins is None else " / ".join(str(ins[k]) for k in ("wgmma", "mma.sync", "barriers",
                                                                          "layout conversions"))
        lines.append(f"| {r['kernel']} | {r['head_dim']} | {hint} | {regs} | {spill} | {smem} | {loads} | {counts} |")
    return "\n".join(lines)


def whole_head_table(data: dict) -> str:
    """benchmarks/whole_head_isolated.py: each whole-head configuration at head dim 72 in its own process."""
    tokens = sorted({int(L) for r in data["rows"] if r["result"] for L in r["result"]})
    caption = (f"{data['card']}, torch {data['torch']}, batch 64, 16 heads of 72, bf16, ms per call "
               f"(`{data['command']}`)")
    lines = _table(caption, ["products", "values' product", "block rows, programs, warps, stages",
                             *(f"{L} tokens: ms (SDPA)" for L in tokens), "max error"])
    for r in data["rows"]:
        head = f"| {'wgmma' if r['wgmma'] else 'mma.sync'} | {'split' if r['split_values'] else 'whole'} | {r['config']} |"
        if r["result"] is None:
            lines.append(head + " - |" * len(tokens) + f" {r['error']} |")
            continue
        cells = [f"{r['result'][str(L)]['ms']:.4f} ({r['result'][str(L)]['sdpa_ms']:.4f})" for L in tokens]
        err = max(v["err"] for v in r["result"].values())
        lines.append(head + " " + " | ".join(cells) + f" | {err:.1e} |")
    return "\n".join(lines + _note(data))


def group_norm_table(data: dict) -> str:
    """benchmarks/group_norm.py: GroupNorm + SiLU formulations on channels-last bf16 grids (``--kernels``: the
    statistics kernels from CUDA graphs, the best three tilings of ``channel_moments`` per shape)."""
    if "sweep" in data:
        lines = _table(f"{data['card']}, torch {data['torch']}, bf16 channels-last, GPU ms per call from CUDA graphs "
                       f"(`{data['command']}`)", ["shape (B, C, H, W)", "form", "ms", "TB/s"])
        for shape in dict.fromkeys(tuple(r["shape"]) for r in data["sweep"]):
            rows = [r for r in data["sweep"] if tuple(r["shape"]) == shape]
            swept = ("moments", "apply")  # the tilings of channel_moments and scale_shift: the best three of each
            tiled = [r for kind in swept
                     for r in sorted((r for r in rows if r["variant"].startswith(kind)), key=lambda r: r["graph_ms"])[:3]]
            for r in [r for r in rows if not r["variant"].startswith(swept)] + tiled:
                lines.append(f"| {shape} | {r['variant']} | {r['graph_ms']:.4f} | {r['tb_per_s']:.2f} |")
        return "\n".join(lines + _note(data))
    lines = _table(f"{data['card']}, torch {data['torch']}, bf16 channels-last, ms per call (`{data['command']}`)",
                   ["shape (B, C, H, W)", "form", "ms", "TB/s (one read + one write)", "relative error, offset 0 / 10"])
    offset10 = {(tuple(r["shape"]), r["variant"]): r["rel_err"] for r in data["rows"] if r["offset"]}
    for r in data["rows"]:
        if not r["offset"]:
            key = (tuple(r["shape"]), r["variant"])
            lines.append(f"| {tuple(r['shape'])} | {r['variant']} | {r['ms']:.4f} | {r['tb_per_s']:.2f} | "
                         f"{r['rel_err']:.1e} / {offset10.get(key, float('nan')):.1e} |")
    return "\n".join(lines)


def tap_conv_table(data: dict) -> str:
    """benchmarks/tap_conv.py: the narrowing 3x3 conv through cuDNN and as a GEMM of its taps (+ kernel profiles)."""
    lines = _table(f"{data['card']}, torch {data['torch']}, bf16 channels-last, no grad, ms per call (`{data['command']}`)",
                   ["batch x cin -> cout, grid", "form", "ms", "TFLOP/s (the conv's FLOPs)", "relative error"])
    for r in data["rows"]:
        b, cin, cout, side = r["shape"]
        lines.append(f"| {b} x {cin} -> {cout}, {side}x{side} | {r['form']} | {r['ms']:.4f} | {r['tflops']:.0f} | "
                     f"{_sci(r['rel_err'])} |")
    return "\n".join(lines + _profiles_and_note(data, "GPU ms per call, heaviest kernels"))


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _profiles_and_note(data: dict, caption: str) -> list[str]:
    """A kernel benchmark's tail: each profiled form's eight heaviest kernels, then the run's note."""
    lines = []
    for name, kernels in data.get("profiles", {}).items():
        lines += ["", *_table(f"{name}, {caption}:", ["ms", "kernel"])]
        lines += [f"| {ms:.3f} | `{k[:90]}` |" for k, ms in list(kernels.items())[:8]]
        lines += [f"| {ms:.3f} | {k} |" for k, ms in kernels.items() if k.startswith("(all ")]  # every kernel summed
    return lines + _note(data)


def scaffold_compile_table(data: dict) -> str:
    """benchmarks/scaffold_compile.py: the scaffold alone under each inductor setting (+ kernel profiles)."""
    caption = (f"{data['card']}, torch {data['torch']}, DC-DiT-XL scaffold only, {data['size']}px, batch {data['batch']}, "
               f"bf16 weights + routing, filled, GPU ms per call (`{data['command']}`)")
    lines = _table(caption, ["variant", "compile s", "ms", "speed-up over default", "max abs difference from default"])
    lines += [f"| {r['variant']} | {r['compile_s']:.0f} | {r['ms']:.3f} | {r['vs_default']:.3f} | {_sci(r['max_abs_diff'])} |"
              for r in data["rows"]]
    return "\n".join(lines + _profiles_and_note(data, "heaviest kernels"))


def launch_table(data: dict) -> str:
    """benchmarks/launch_overhead.py: host time per call of the Triton ops and of the compiled scaffold at batch 1."""
    lines = _table(f"{data['card']}, torch {data['torch']}, host time per call (`{data['command']}`)",
                   ["what", "host time per call"])
    lines += [f"| {r['op']} | {r['host_us']:.1f} us |" for r in data["ops"]]
    lines += [f"| compiled scaffold at batch 1: {r['variant']} | {r['host_ms']:.3f} ms |" for r in data["scaffolds"]]
    return "\n".join(lines + _note(data))


PLOTTED = ("step_speed_256_serving_s25_h100.json", "step_speed_512_serving_s25_h100.json")  # the figure's runs: one H100, session 25


def main() -> None:
    # the current code's runs (earlier/ keeps the ones before), each read once
    steps = {path: json.loads(path.read_text()) for path in sorted(RESULTS.glob("step_speed_*.json"))}
    for data in steps.values():
        print(step_table(data), end="\n\n")
    tables = (("vs_release_*.json", release_table), ("step_profile_*.json", profile_table),
              ("scaffold_ops_*.json", ops_table), ("attention_masks_*.json", full_plan_table),
              ("scaffold_profile_*.json", scaffold_table), ("smoothing_*.json", smoothing_table),
              ("train_speed_256*.json", train_table), ("small_train_speed_*.json", small_train_table),
              ("sample_speed_*.json", sample_table), ("short_attention_*.json", short_attention_table),
              ("kernel_loads_*.json", kernel_loads_table), ("whole_head_isolated_*.json", whole_head_table),
              ("group_norm_*.json", group_norm_table), ("tap_conv_*.json", tap_conv_table),
              ("scaffold_compile_*.json", scaffold_compile_table), ("launch_overhead_*.json", launch_table),
              ("block_tokens_*.json", block_tokens_table), ("gelu_epilogue_*.json", gelu_epilogue_table),
              ("process_spread_*.json", process_spread_table), ("norm_placement_*.json", norm_placement_table),
              ("cell_gemm_*.json", conv_forms_table), ("implicit_conv_*.json", conv_forms_table))
    for pattern, table in tables:
        for path in sorted(RESULTS.glob(pattern)):
            print(table(json.loads(path.read_text())), end="\n\n")
    near = RESULTS / "nearest_h200.json"
    if near.is_file():
        print(nearest_table(json.loads(near.read_text())))
    syncs = RESULTS / "host_syncs_cpu.json"
    if syncs.is_file():
        before = RESULTS / "host_syncs_cpu_before.json"
        print(syncs_table(json.loads(syncs.read_text()), json.loads(before.read_text()) if before.is_file() else None))
    current = [path for path in steps if path.name in PLOTTED]
    attention = RESULTS / "short_attention_h100.json"  # SDPA a call at each budget's length (session 13's H100)
    for path in current if attention.is_file() else []:
        print(tie_budget_table(steps[path], json.loads(attention.read_text()), path.name, attention.name), end="\n\n")
    if current:
        plot(current, ROOT / "docs" / "img" / "step_speed.png")
        print(f"\nwrote {ROOT / 'docs' / 'img' / 'step_speed.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
