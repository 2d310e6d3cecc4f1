"""What do the result files in benchmarks/results/ say, as the tables and figure of docs/performance.md?

    python benchmarks/report.py                 # prints the generated regions of performance.md, README.md
    python benchmarks/report.py --write-docs    # fills those regions in place and redraws docs/img/step_speed.png
    python benchmarks/report.py --check         # exits 1 if a region of either page is out of date (CPU)

A generated region of a page is the text between ``<!-- generated:NAME -->`` and ``<!-- end -->``; every
number in those regions is read from a result file here, never typed by hand. Needs no GPU.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "performance.md"
README = ROOT / "README.md"
PAGES = (PAGE, README)  # the pages whose generated regions this script fills
FIGURE = ROOT / "docs" / "img" / "step_speed.png"
REGION = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end -->)", re.DOTALL)
CARDS = ("h100", "h200")
SIZES = (256, 512)


def load(results: Path = RESULTS) -> dict[str, dict]:
    """Every result file of ``results``, by file name without ``.json``."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def _rows(data: dict) -> dict[str, dict]:
    """A result file's rows by name."""
    return {r["row"]: r for r in data["rows"]}


def _x(v: float | None) -> str:
    """A speed-up as ``1.23x`` (``-`` for None)."""
    return "-" if v is None else f"{v:.2f}x"


def _range(values: list[float], fmt: str = ".2f", unit: str = "x") -> str:
    """``lo-hi`` of ``values`` with ``unit``, or one value where both round alike."""
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}{unit}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}-{hi:{fmt}}{unit}"


def card_label(data: dict) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``."""
    found = re.search(r"\b([A-Z]{1,3}\d{2,4})\b", data["card"])
    return found.group(1) if found else data["card"]


def speed_table(res: dict) -> str:
    """The table of what a user gets: DC-DiT-XL's speed-up over DiT-XL/2 per operating point, size and card
    (host clock, with the FLOP-predicted speed-up), against the authors' release and the original DiT-XL/2
    code (where a step_speed run timed it; "not measured" elsewhere), and for training."""
    cols = [(size, card) for size in SIZES for card in CARDS if f"step_speed_{size}_serving_{card}" in res]
    steps = {c: res[f"step_speed_{c[0]}_serving_{c[1]}"] for c in cols}
    head = [f"{size}px, {card_label(steps[(size, card)])}, batch {steps[(size, card)]['batch']}" for size, card in cols]
    lines = ["| DC-DiT-XL against | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    any_step = next(iter(steps.values()))
    lines.append("| (DiT-XL/2's sampling step) | " + " | ".join(f"{_rows(s)['DiT-XL/2']['ms']:.1f} ms" for s in steps.values())
                 + " |")
    labels = {"DC-DiT-XL rho=0": "DiT-XL/2, rho 0", "DC-DiT-XL rho=0.2": "DiT-XL/2, rho 0.2",
              "DC-DiT-XL rho=0.4": "DiT-XL/2, rho 0.4", "DC-DiT-XL Lite-CFG (0 / 0.9)": "DiT-XL/2 with CFG, Lite-CFG"}
    for row, label in labels.items():
        if row in _rows(any_step):
            cells = [f"**{_x(_rows(s)[row]['measured_speedup'])}** ({_x(_rows(s)[row]['flop_speedup'])})"
                     for s in steps.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    release = []
    for size, card in cols:
        r = res.get(f"vs_release_{size}_{card}")
        release.append("-" if r is None else _range([x["ours_over_release"] for x in r["rows"]]))
    lines.append("| the authors' release, rho 0 / 0.2 / 0.4 / Lite-CFG | " + " | ".join(release) + " |")
    original = []
    for size, card in cols:  # the step_speed rows of a run with --original
        rows = _rows(steps[(size, card)])
        found = [rows[row]["speedup_over_original"] for row in labels if "speedup_over_original" in rows.get(row, {})]
        original.append(_range(found) if found else "not measured")
    lines.append("| the original DiT-XL/2 code, rho 0 / 0.2 / 0.4 / Lite-CFG | " + " | ".join(original) + " |")
    sample = []
    for size, card in cols:
        r = res.get(f"sample_speed_{size}_{card}")
        row = None if r is None else next((x for x in r["rows"] if x["model"] == "DC-DiT-XL"
                                           and x["setting"] == "bf16, fixed capacity, filled, compiled"), None)
        sample.append("-" if row is None else f"**{_x(row['speedup_vs_dit'])}** images/s")
    lines.append("| DiT-XL/2, whole sampling run at rho 0 | " + " | ".join(sample) + " |")
    train = []
    for size, card in cols:
        r = res.get(f"train_speed_{size}_compiled_{card}")
        row = None if r is None else next(x for x in r["rows"] if x["model"] == "DC-DiT-XL")
        train.append("-" if row is None else f"**{_x(row['measured_speedup'])}** ({_x(row['flop_speedup'])})")
    lines.append("| DiT-XL/2, training step (compiled) | " + " | ".join(train) + " |")
    return "\n".join(lines)


def sources(res: dict) -> str:
    """The result files behind the table, by card and torch version, each with its commit."""
    names = [n for n in res if n.startswith(("step_speed_", "vs_release_", "sample_speed_", "train_speed_"))
             and not n.startswith(("train_speed_account_", "train_speed_profile_"))]
    groups: dict[tuple, list[str]] = {}
    for n in names:
        groups.setdefault((res[n]["card"], res[n]["torch"]), []).append(
            f"`{n}.json` ({(res[n].get('commit') or '?')[:8]})")
    return "\n".join(f"- {card}, torch {torch}: " + ", ".join(files) for (card, torch), files in groups.items())


def tie(res: dict) -> str:
    """The caveat on rho 0.2 at 256px, with the numbers of both sizes and both cards."""
    def at(size: int, rho: str) -> list[float]:
        return [_rows(res[n])[f"DC-DiT-XL rho={rho}"]["measured_speedup"] for n in sorted(res)
                if n.startswith(f"step_speed_{size}_serving_")]
    predicted = _rows(res[next(n for n in sorted(res) if n.startswith("step_speed_256_serving_"))])["DC-DiT-XL rho=0.2"]
    return (f"At 256px, rho 0.2 is a tie with DiT-XL/2 ({_range(at(256, '0.2'))} on the cards above, where its FLOPs "
            f"predict {_x(predicted['flop_speedup'])}): the conv scaffold and attention over the shorter sequence cost "
            f"more than their FLOPs. Serve at rho 0.4 ({_range(at(256, '0.4'))} at 256px, "
            f"{_range(at(512, '0.4'))} at 512px) or at 512px, where rho 0.2 is {_range(at(512, '0.2'))}.")


def steady(res: dict) -> str:
    """The caveat on compiling with ``inplace_buffers=False``, from the fresh-process runs of both settings."""
    default = res.get("process_spread_256_rho0.2-default_h100")
    off = res.get("process_spread_256_rho0.2-no-inplace_h100")
    if default is None or off is None:
        return ""

    def norm_ms(data):
        return [r["models"]["DiT-XL/2"]["roles"]["layer norm"] for r in data["rows"]]
    return (f"On an H100, compiled graphs with inductor's default settings vary from process to process: DiT-XL/2's "
            f"LayerNorm work took {_range(norm_ms(default), unit=' ms')} a step over {len(default['rows'])} fresh "
            f"processes, and {_range(norm_ms(off), unit=' ms')} over {len(off['rows'])} compiled with "
            f"`inplace_buffers=False`, which gives steady step times (`recipes.sample --compile-option "
            f"inplace_buffers=False`).")


def training(res: dict) -> str:
    """The caveat on training speed against the FLOP prediction."""
    parts = []
    for card in CARDS:  # the XL-only run, where there is one: the checkpointed row beside the same-run DiT
        r = res.get(f"train_speed_256_compiled_xl_{card}") or res.get(f"train_speed_256_compiled_{card}")
        if r is None:
            continue
        rows = {x["model"]: x for x in r["rows"]}
        dc, dit = rows["DC-DiT-XL"], rows["DiT-XL/2"]
        ck = next((x for n, x in rows.items() if n.startswith("DC-DiT-XL + checkpoint_scaffold + ")), None)
        budget = next((x for n, x in rows.items() if n.startswith("DC-DiT-XL + memory_budget ")), None)
        saving = []
        if ck is not None:
            saving.append(f"{ck['peak_gib']:.1f} GiB, at {_x(ck['measured_speedup'])}, with the encoder, the "
                          f"router and the first {ck['model'].split(' + ')[-1]} recomputed in backward")
        if budget is not None:
            saving.append(f"{budget['peak_gib']:.1f} GiB, at {_x(budget['measured_speedup'])}, with "
                          f"`train.memory_budget={budget['model'].split()[-1]}`")
        with_ck = f" ({'; '.join(saving)})" if saving else ""
        parts.append(f"{_x(dc['measured_speedup'])} DiT-XL/2's images/s on an {card_label(r)} where its "
                     f"FLOPs predict {_x(dc['flop_speedup'])}, with {dc['peak_gib']:.1f} GiB of memory "
                     f"against DiT-XL/2's {dit['peak_gib']:.1f} GiB{with_ck}")
    return ("Training is slower than its FLOPs predict today: compiled at 256px, batch 64, DC-DiT-XL trains at "
            + "; ".join(parts) + ".")


def host_syncs(res: dict) -> str:
    """Host syncs and dispatched ops per training-mode forward and backward, from the host_syncs run."""
    r = res.get("host_syncs_s_cpu")
    if r is None:
        return ""
    lines = ["| model (batch %d, 32x32x1, width 384, 12 blocks) | host syncs fwd / bwd | without value checks | "
             "dispatched ops fwd / bwd |" % r["batch"], "|---|---|---|---|"]
    for name, x in r["rows"].items():
        lines.append(f"| {name} | {x['syncs_fwd']} / {x['syncs_bwd']} | {x['syncs_fwd_unchecked']} / "
                     f"{x['syncs_bwd_unchecked']} | {x['ops_fwd']} / {x['ops_bwd']} |")
    return "\n".join(lines)


def train_account(res: dict) -> str:
    """Where one training step's FLOPs, held memory and ops go, per component, from ``train_speed.py --account``."""
    r = res.get("train_speed_account_cpu")
    if r is None:
        return ""
    cols = [(size, c) for size in ("256px", "digits") for c in r["account"][size]]
    lines = ["| component | " + " | ".join("+ checkpoint" if "checkpoint" in c["model"] else c["model"]
                                         for _, c in cols) + " |",
             "|---|" + "---|" * len(cols)]

    def cell(x: dict) -> str:
        return f"{x['train_gflops_per_image']:.1f} · {x['held_gib']:.2f} · {x['ops_fwd'] + x['ops_bwd']}"

    for comp in cols[0][1]["components"]:
        cells = [c["components"][comp] for _, c in cols]
        if any(x["ops_fwd"] + x["ops_bwd"] for x in cells):
            lines.append(f"| {comp} | " + " | ".join(cell(x) for x in cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{cell(c)}**" for _, c in cols) + " |")
    counts = r["compiled"]
    breaks = sorted({x["graph_breaks"] for x in counts.values()})
    recompiles = sorted({x["recompiles"] for x in counts.values()})
    syncs = ", ".join(f"{k} {x['host_syncs']} ({x['host_syncs_unchecked']} without value checks)"
                      for k, x in counts.items())
    state = " / ".join(f"{c['state_gib']:.2f}" for _, c in cols)
    compiled = " / ".join(f"{c['compiled_held_gib']:.2f}" for _, c in cols if "compiled_held_gib" in c)
    kept = (f" Compiled, the step keeps {compiled} GiB for backward (what inductor's partitioner saves, "
            f"traced on the CPU, `train_speed.py --account`)." if compiled else "")
    budgeted = [c for _, c in cols if "compiled_held_budget_gib" in c]
    kept += (" Under `train.memory_budget=0.9` (the compiled step recomputes in backward what it can without "
             "a matmul), " + ", ".join(f"{c['model']} keeps {c['compiled_held_budget_gib']:.2f}"
                                       for c in budgeted) + " GiB." if budgeted else "")
    peak = " / ".join(f"{c['peak_gib']:.2f}" for _, c in cols if "peak_gib" in c)
    kept += (f" Eager, the step's peak is {peak} GiB with the weights and AdamW's moments (every storage "
             "counted from the op that makes it to its release, on fake tensors)." if peak else "")
    breaks, recompiles = "/".join(map(str, breaks)), "/".join(map(str, recompiles))
    lines.append(f"\nWeights, gradients and AdamW's moments add {state} GiB.{kept} The recomputed "
                 f"components' ops count twice, their memory goes. Compiled on toy sizes of the same models, "
                 f"the training step has {breaks} graph breaks and {recompiles} recompiles over four "
                 f"multi-budget `rho` draws. Host syncs per forward and backward: {syncs}.")
    return "\n".join(lines)


def train_profile(res: dict) -> str:
    """Where a compiled training step's time goes per component, beside its FLOP share, from ``train_speed.py
    --profile``."""
    variants = ("_prefix", "_channels_last", "_fill")
    name = next((n for n in sorted(res) if n.startswith("train_speed_profile_digits_")
                 and not any(v in n for v in variants)), None)
    if name is None:
        return ""
    r = res[name]
    dit, dc = r["rows"]
    comps = list(dc["component_ms"])
    lines = [f"| {card_label(r)}, batch {dc['batch']}, ms | " + " | ".join(comps) + " | whole step |",
             "|---|" + "---|" * (len(comps) + 1)]
    for row in (dit, dc):
        cells = [f"{row['component_ms'][c]:.2f}" if c in row["component_ms"] else "-" for c in comps]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {row['step_ms']['compiled']:.2f} |")
    lines.append(f"| {dc['model']}: share of time · of FLOPs | " + " | ".join(
        f"{dc['component_ms'][c] / dc['parts_ms']:.0%} · {dc['flop_share'].get(c, 0.0):.0%}" for c in comps) + " | |")
    graphs = "compiled + CUDA graphs"
    measured = dit["step_ms"]["compiled"] / dc["step_ms"]["compiled"]
    predicted = dit["train_gflops_per_image"] / dc["train_gflops_per_image"]
    kind = [row["profile"]["ms_per_step_by_kind"] for row in (dit, dc)]
    layout = sum(ms for k, ms in dc["profile"]["top_kernels_ms_per_step"].items() if "nchwToNhwc" in k or "nhwcToNchw" in k)
    scaffold = ("encoder", "router", "plan/pack", "de-chunk", "decoder")
    time_share = sum(dc["component_ms"][c] for c in scaffold) / dc["parts_ms"]
    flop_share = sum(dc["flop_share"].get(c, 0.0) for c in scaffold)
    text = (f"\nDC-DiT-S trains at {_x(measured)} DiT-S/2's speed where its FLOPs predict {_x(predicted)}. Replayed "
            f"from CUDA graphs the steps take {dit['step_ms'][graphs]:.1f} and {dc['step_ms'][graphs]:.1f} ms: at batch "
            f"{dc['batch']} the step is not launch-bound. The scaffold (encoder to decoder, without the backbone) takes "
            f"{time_share:.0%} of the time for {flop_share:.0%} of the FLOPs; its convolutions take "
            f"{kind[1]['convolution']:.1f} ms of kernel time a step, with {layout:.1f} ms more of layout copies between "
            f"NCHW and NHWC. The backbone, on as many tokens as DiT-S/2's, takes {dc['component_ms']['backbone']:.1f} "
            f"against {dit['component_ms']['backbone']:.1f} ms: a fixed plan with padding slots needs a key mask, and "
            f"masked attention that will be differentiated runs on the memory-efficient kernel "
            f"({kind[1]['attention']:.1f} ms of kernel time a step, against {kind[0]['attention']:.1f} ms of cuDNN's "
            f"flash kernel in DiT-S/2). Each component is compiled on its own here, so the parts sum to a little more "
            f"than the whole step.")
    filled = res.get(name.replace("_digits_", "_digits_fill_"))
    if filled is not None:  # the same models with plans filled to the capacity: no key mask
        fdit, fdc = filled["rows"]
        attention = fdc["profile"]["ms_per_step_by_kind"]["attention"]
        speed = fdit["step_ms"]["compiled"] / fdc["step_ms"]["compiled"]
        text += (f" Filled to the capacity (`--fill`, `model.overrides.fill_capacity=true`: every slot holds a "
                 f"token, so no key mask), DC-DiT-S's attention takes {attention:.1f} ms a step and it trains at "
                 f"{_x(speed)} DiT-S/2's speed in the same run, {speed / predicted:.2f} of what its FLOPs predict; "
                 f"the filled slots hold tokens the router did not choose, so that is a change of the model, off "
                 f"by default ([recipes.md](recipes.md#multi-gpu)).")
    return "\n".join(lines) + "\n" + text


def composition(res: dict) -> str:
    """Whole sampling runs with merging and caching stacked on chunking, against DiT-XL/2 (eager; with
    ``merging.apply(..., compile=True)`` in the last column where that run exists)."""
    name = next((n for n in sorted(res) if n.startswith("composition_xl256_") and "compiled" not in n), None)
    if name is None:
        return ""
    data, compiled = res[name], res.get(name.replace("xl256_", "xl256_compiled-merge_"))
    merged = {r["variant"]: r for r in compiled["rows"]} if compiled else {}
    lines = [f"{card_label(data)}, batch {data['batch']}, {data['steps']} DDIM steps, 256px, eager, DC-DiT with packed plans; speed-ups over "
             "DiT-XL/2, measured (FLOP-predicted); `dev`: relative distance of the samples from DC-DiT-XL's", "",
             "| variant | TFLOPs/image | speed-up | skipped steps | dev |" + (" speed-up, merging compiled |" if merged else ""),
             "|---|---|---|---|---|" + ("---|" if merged else "")]
    for r in data["rows"]:
        dev = "" if r["deviation_from_dcdit"] is None else f"{r['deviation_from_dcdit']:.3f}"
        extra = ""
        if merged:
            m = merged.get(r["variant"])
            extra = f" {_x(m['measured_speedup']) if m else '-'} |"
        lines.append(f"| {r['variant']} | {r['tflops_per_image']:.2f} | **{_x(r['measured_speedup'])}** "
                     f"({_x(r['flop_speedup'])}) | {r['skipped_steps']} of {data['steps']} | {dev} |{extra}")
    return "\n".join(lines)


def readme_status(res: dict) -> str:
    """The README's speed bullets: sampling against DiT-XL/2, against the authors' release and the original DiT
    code (where a step_speed run timed it), and training."""
    def speedups(size: int, row: str) -> list[float]:
        return [_rows(res[n])[row]["measured_speedup"] for n in sorted(res) if n.startswith(f"step_speed_{size}_serving_")]
    cards = sorted({card_label(res[n]) for n in res if n.startswith("step_speed_")})
    release = [x["ours_over_release"] for n in sorted(res) if n.startswith("vs_release_") for x in res[n]["rows"]]
    train = [next(x for x in res[n]["rows"] if x["model"] == "DC-DiT-XL") for n in sorted(res)
             if n.startswith("train_speed_256_compiled_")]
    original = {row: [_rows(res[n])[row]["speedup_over_original"] for n in sorted(res)
                      if n.startswith("step_speed_") and "speedup_over_original" in _rows(res[n]).get(row, {})]
                for row in ("DC-DiT-XL rho=0.4", "DiT-XL/2")}
    against_original = (f"; {_range(original['DC-DiT-XL rho=0.4'])} faster than the original DiT-XL/2 code at rho 0.4 "
                        f"(chunkformer's DiT-XL/2 alone: {_range(original['DiT-XL/2'])})"
                        if original["DiT-XL/2"] else "")
    return "\n".join([
        f"- **Sampling speed**: compiled, DC-DiT-XL's sampling step runs {_range(speedups(256, 'DC-DiT-XL rho=0.4'))} "
        f"DiT-XL/2's speed at rho 0.4 and 256px ({_range(speedups(512, 'DC-DiT-XL rho=0.4'))} at 512px), and "
        f"{_range(speedups(256, 'DC-DiT-XL Lite-CFG (0 / 0.9)') + speedups(512, 'DC-DiT-XL Lite-CFG (0 / 0.9)'))} "
        f"with Lite-CFG against classifier-free guidance ({' and '.join(cards)}). At rho 0.2 it ties at 256px "
        f"({_range(speedups(256, 'DC-DiT-XL rho=0.2'))}) and is {_range(speedups(512, 'DC-DiT-XL rho=0.2'))} at 512px "
        "([docs/performance.md](docs/performance.md)).",
        f"- **Against the authors' release and the original DiT code**: {_range(release)} faster than the release at the same kept tokens"
        + against_original + ".",
        f"- **Training speed**: {_range([x['measured_speedup'] for x in train])} DiT-XL/2's, where the FLOPs predict "
        f"{_range([x['flop_speedup'] for x in train])}.",
    ])


REGIONS = {"speed-table": speed_table, "readme-status": readme_status, "composition": composition, "host-syncs": host_syncs, "train-account": train_account, "train-profile": train_profile, "sources": sources, "tie": tie, "steady": steady, "training": training}


def fill(text: str, res: dict) -> str:
    """``text`` with every generated region's body replaced by its generator's output (unknown names: an error)."""
    def body(match: re.Match) -> str:
        name = match.group("name")
        if name not in REGIONS:
            raise KeyError(f"no generator for region {name!r}; known: {sorted(REGIONS)}")
        return f"{match.group(1)}{REGIONS[name](res)}\n{match.group(4)}"
    return REGION.sub(body, text)


def plot(res: dict, path: Path = FIGURE) -> Path:
    """Step time against the fraction of DiT-XL/2's tokens kept, per size on the first card, with the FLOP
    prediction (DiT-XL/2's time scaled by the FLOP ratio)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SIZES), figsize=(5 * len(SIZES), 3.6))
    for ax, size in zip(axes, SIZES):
        name = next((f"step_speed_{size}_serving_{c}" for c in CARDS if f"step_speed_{size}_serving_{c}" in res), None)
        if name is None:
            continue
        rows = _rows(res[name])
        dit = rows["DiT-XL/2"]
        dc = [rows[f"DC-DiT-XL rho={rho}"] for rho in ("0", "0.2", "0.4")]
        kept = [r["kept"] / dit["kept"] for r in dc]
        ax.plot(kept, [r["ms"] for r in dc], "o-", label="DC-DiT-XL (measured)")
        ax.plot(kept, [dit["ms"] * r["flops"] / dit["flops"] for r in dc], "--", label="DC-DiT-XL (FLOP prediction)")
        ax.axhline(dit["ms"], color="grey", label="DiT-XL/2")
        for k, r, rho in zip(kept, dc, ("0", "0.2", "0.4")):
            ax.annotate(f"rho {rho}", (k, r["ms"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(f"{size}px, batch {res[name]['batch']}, {card_label(res[name])}")
        ax.set_xlabel("tokens kept, fraction of DiT-XL/2's")
        ax.set_ylabel("ms per sampling step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-docs", action="store_true", help="fill docs/performance.md's regions and redraw its figure")
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/performance.md's regions are out of date")
    args = ap.parse_args(argv)
    res = load()
    stale = [page for page in PAGES if fill(page.read_text(), res) != page.read_text()]
    if args.check:
        for page in stale:
            print(f"{page.relative_to(ROOT)} is out of date: run python benchmarks/report.py --write-docs", file=sys.stderr)
        return 1 if stale else 0
    if args.write_docs:
        for page in PAGES:
            page.write_text(fill(page.read_text(), res))
            print(f"wrote {page.relative_to(ROOT)}", file=sys.stderr)
        print(f"wrote {plot(res).relative_to(ROOT)}", file=sys.stderr)
        return 0
    for name, generate in REGIONS.items():
        print(f"<!-- {name} -->\n{generate(res)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
