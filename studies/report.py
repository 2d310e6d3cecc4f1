"""docs/results.md and its figures from studies/results/: nothing in its tables is typed by hand.

    python studies/report.py            # rewrites docs/results.md and docs/img/results/*.png

Reads ``studies/results/s<seed>-<arm>.json`` (``mnist_study.py`` / ``score.py`` / ``from_log.py``),
``studies/results/curves/s<seed>-<arm>.jsonl`` (the training logs: loss, TFLOPs, steps/s every 100
steps) and ``studies/results/runs/s<seed>-<arm>-metrics.json`` (the recipe's end-of-training metrics).
"""

import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "studies" / "results"
IMG = ROOT / "docs" / "img" / "results"
PAPER = {  # DC-DiT v2 (arXiv 2603.06351), ImageNet 256, 400K steps, FID-50K, 250 DDPM steps; DESIGN.md
    "kept": "about 22% kept at the noisiest steps rising to about 45% at the cleanest",
    "equal_flops": "DiT-S/2 FID 68.40 at 3.02 TFLOPs/img vs DC-DiT-S (rho 0.2) 58.43 at 3.06",
    "cosine": "the v1 2-D cosine router about 1.2 FID behind the default on DC-DiT-S",
    "upcycle": "about 8x fewer steps (50K vs 400K)",
}
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)  # Student t 97.5% quantiles, df 1..9 (df 9 beyond: wider)
LABEL = {"dit": "DiT-S/2", "dcdit": "DC-DiT-S", "dcdit-single": "DC-DiT-S, single budget",
         "dcdit-random": "DC-DiT-S, random boundaries", "dcdit-cosine": "DC-DiT-S, 2-D cosine router",
         "upcycled": "DC-DiT-S upcycled from DiT-S/2", "dit-compiled": "DiT-S/2, compiled training",
         "dcdit-compiled": "DC-DiT-S, compiled training"}
ORDER_COLOURS = tuple(LABEL)  # one colour per arm in the figures


# ---------------------------------------------------------------------------------------------- loading
def load(results: Path = RESULTS) -> dict:
    """``{"records": {(seed, arm): record}, "curves": {(seed, arm): [rows]}, "metrics": {...}}``."""
    out: dict = {"records": {}, "curves": {}, "metrics": {}, "bootstrap": []}
    for path in sorted(results.glob("s*-*.json")):
        r = json.loads(path.read_text())
        if r.get("sets"):  # an arm that failed before drawing anything has nothing to report
            out["records"][(r["seed"], r["arm"])] = r
    for path in sorted((results / "curves").glob("s*-*.jsonl")):
        seed, arm = path.stem[1:].split("-", 1)
        out["curves"][(int(seed), arm)] = [json.loads(line) for line in path.read_text().splitlines() if line]
    out["reruns"] = [json.loads(path.read_text()) for path in sorted((results / "raw").glob("s*-*-rerun.json"))]
    for path in sorted(results.glob("bootstrap-*.json")):
        out["bootstrap"].append(json.loads(path.read_text()))
    out["regime"] = [json.loads(path.read_text()) | {"file": path.name}
                     for path in sorted((results / "regime").glob("s*-*.json"))]
    for path in sorted((results / "runs").glob("s*-*-metrics.json")):
        seed, arm = path.name[1: -len("-metrics.json")].split("-", 1)
        out["metrics"][(int(seed), arm)] = json.loads(path.read_text())
    return out


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% Student t interval of ``values`` (two or more)."""
    half = T975[min(len(values) - 1, len(T975)) - 1] * statistics.stdev(values) / len(values) ** 0.5
    return statistics.mean(values), half


def fid_at(s: dict | None, n: int) -> float | None:
    if not s:
        return None
    return s.get("fid_by_samples", {}).get(str(n))


def common_samples(sets: list[dict]) -> int | None:
    """The largest sample count at which every set in ``sets`` has a FID."""
    counts = [set(map(int, s.get("fid_by_samples", {}))) for s in sets if s]
    shared = set.intersection(*counts) if counts else set()
    return max(shared) if shared else None


def elapsed_minutes(curve: list[dict]) -> list[float]:
    """Cumulative training minutes at each logged row (from each window's steps/s)."""
    out, t, prev = [], 0.0, 0
    for row in curve:
        t += (row["step"] - prev) / row["steps_per_sec"] / 60
        prev = row["step"]
        out.append(t)
    return out


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def fmt(v, spec=".2f", none="-") -> str:
    return none if v is None else format(v, spec)


# ---------------------------------------------------------------------------------------------- figures
def _save(fig, path: Path) -> Path:
    """Lay out, write (creating the folder) and close a figure; its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(data: dict, path: Path) -> Path | None:
    curves = data["curves"]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colours = dict(zip(ORDER_COLOURS, ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown",
                                       "tab:cyan", "tab:pink")))
    dashes = ("-", "--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 4)))
    for (seed, arm), rows in sorted(curves.items()):
        style = dict(color=colours.get(arm, "tab:gray"), ls=dashes[seed % len(dashes)],
                     label=f"{LABEL.get(arm, arm)} seed {seed}")
        mse = [r["mse"] for r in rows]
        if all("train_tflops" in r for r in rows):  # compiled arms count no FLOPs
            axes[0].plot([r["train_tflops"] / 1e3 for r in rows], mse, **style)
        if not _side_by_side(data, seed):
            axes[1].plot(elapsed_minutes(rows), mse, **style)
    axes[0].set(xlabel="training PFLOPs (count_flops)", ylabel="epsilon MSE (training batch)", yscale="log",
                title="equal FLOPs")
    axes[1].set(xlabel="training minutes (card per run; compiled ones include compiling)",
                yscale="log", title="equal wall-clock")
    axes[1].legend(fontsize=7)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_pareto(points: list[tuple[str, float, float]], path: Path, n: int,
                xlabel: str = "TFLOPs per image (50 DDIM steps)", title: str = "elastic inference") -> Path | None:
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    by_series: dict[str, list] = {}
    for series, x, y in points:
        by_series.setdefault(series, []).append((x, y))
    for series, xy in by_series.items():
        xy.sort()
        ax.plot(*zip(*xy), "o-" if len(xy) > 1 else "s", label=series)
    ax.set(xlabel=xlabel, ylabel=f"FID ({n} samples)", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_orientation(data: dict, path: Path) -> Path | None:
    """What each chunking arm's router kept of fixed real digits during training (``train(probe=...)``):
    stroke density (solid) against background density (dashed) at t = 25, per training step."""
    probed = {k: rows for k, rows in sorted(data["curves"].items()) if any("stroke_t25" in r for r in rows)}
    if not probed:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, ((seed, arm), rows) in enumerate(probed.items()):
        rows = [r for r in rows if "stroke_t25" in r]
        colour = f"C{i % 10}"
        ax.plot([r["step"] for r in rows], [r["stroke_t25"] for r in rows], color=colour,
                label=f"{LABEL.get(arm, arm)} seed {seed}")
        ax.plot([r["step"] for r in rows], [r["background_t25"] for r in rows], color=colour, ls="--")
    ax.set(xlabel="training step", ylabel="kept density at t = 25", ylim=(0, 1),
           title="router orientation: strokes (solid) vs background (dashed)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plan_layout(record: dict) -> str:
    """The plan layout an arm trained in (its ``model.overrides.plan_mode`` override, else packed), and
    the one it sampled in when that differs."""
    modes = [o.split("=", 1)[1] for o in record.get("overrides", []) if o.startswith("model.overrides.plan_mode=")]
    trained = modes[-1] if modes else "packed"
    sampled = record.get("sample_layout") or trained
    return trained if sampled == trained else f"{trained} (sampled {sampled})"


def _side_by_side(data: dict, seed: int) -> bool:
    return any(r.get("side_by_side") for (s, _), r in data["records"].items() if s == seed)


# ---------------------------------------------------------------------------------------------- document
def _rel(p) -> str:
    """A figure's path as docs/results.md links it (relative to docs/ when it lies there)."""
    return Path(p).relative_to(ROOT / "docs").as_posix() if Path(p).is_relative_to(ROOT / "docs") else str(p)


def render(data: dict, img: Path = IMG) -> str:
    recs, curves, metrics = data["records"], data["curves"], data["metrics"]
    seeds = sorted({s for s, _ in recs} | {s for s, _ in curves})
    lines = ["# Results: does our DC-DiT reproduce the paper?", "",
             "Generated by `python studies/report.py` from `studies/results/` (JSON written by the study scripts;",
             "`docs/recipes.md#studies` says how each was made). Setting: the 5000 built-in MNIST digits, 32x32,",
             "pixel space, class-conditional, recipes `mnist-dit-s` / `mnist-dcdit-s` (epsilon prediction with",
             "learned variance, AdamW 2e-4, batch 256, EMA 0.999 with warm-up, bf16 autocast), eager PyTorch on one",
             "GPU. Evaluation: EMA weights, DDIM 50 steps, no guidance unless a row says so, FID of N samples",
             "(N stated per column) against the 5000 digits with the offline Inception-v3 (pool3, TF-FID weights).",
             "FID grows as N shrinks, so only numbers at the same N are compared. The DC-DiT-S runs trained",
             "with the paper's losses alone unless a row names the router's orientation prior (routing.md),",
             "which the `mnist-dcdit-s` recipe adds: `--override budget.orient_weight=0` repeats them.", ""]
    if not recs and not curves:
        return "\n".join(lines + ["No study runs yet.", ""])
    devices = sorted({r.get("device", "?") for r in recs.values()})
    lines += [f"Card: {', '.join(devices)}. Seeds: {', '.join(map(str, seeds))}.", ""]

    # 1 ------------------------------------------------------------------------------------------------
    lines += ["## 1. DC-DiT-S against DiT-S/2 at equal training FLOPs and equal wall-clock", "",
              f"Paper (ImageNet 256, 400K steps): {PAPER['equal_flops']}.", ""]
    rows = [(s, a) for s in seeds for a in ("dit", "dcdit") if (s, a) in recs or (s, a) in curves]
    pair_sets = [recs[k]["sets"].get("base") for k in rows if k in recs]
    n = common_samples([s for s in pair_sets if s and s.get("fid_by_samples")])
    lines += [f"| seed | model | steps | train TFLOPs | train min | final epsilon MSE | FID ({n or '-'}) |",
              "|---|---|---|---|---|---|---|"]
    for key in rows:
        r, c = recs.get(key, {}), curves.get(key, [])
        mse = c[-1]["mse"] if c else None
        minutes = r["train_seconds"] / 60 if "train_seconds" in r else None
        note = " (side by side)" if r.get("side_by_side") else ""
        lines.append(f"| {key[0]} | {LABEL[key[1]]} | {r.get('train_steps', c[-1]['step'] if c else '-')} "
                     f"| {fmt(r.get('train_tflops', c[-1]['train_tflops'] if c else None), '.0f')} "
                     f"| {fmt(minutes)}{note} | {fmt(mse, '.4f')} | {fmt(fid_at(r.get('sets', {}).get('base'), n))} |")
    gaps = {s: curves[(s, "dcdit")][-1]["mse"] / curves[(s, "dit")][-1]["mse"]
            for s in seeds if (s, "dit") in curves and (s, "dcdit") in curves}
    if gaps:
        lines += ["", "Final training MSE of DC-DiT-S relative to DiT-S/2 at equal FLOPs (seeds whose training logs "
                  "came back): " + ", ".join(f"{g:.2f} (seed {s})" for s, g in gaps.items())
                  + (f"; mean {statistics.mean(gaps.values()):.2f}" if len(gaps) > 1 else "") + "."]
    for b in data.get("bootstrap", []):
        pct = b["difference_percentiles"]
        lines += ["", f"FID sampling noise ({b['resamples']} bootstrap resamples of {b['samples']} samples each, against "
                  f"fixed reference statistics; `studies/bootstrap.py`): {b['a']} {b['fid_a']:.2f} minus {b['b']} "
                  f"{b['fid_b']:.2f} = {b['difference']:.2f}, 95% interval [{pct['2.5']:.2f}, {pct['97.5']:.2f}]; "
                  f"{b['a']} scores worse in {b['share_a_worse']:.0%} of the resamples. (Features on the CPU here; "
                  "this bounds the noise of the estimate, not the variation between training seeds.)"]
    pairs = [(s, fid_at(recs[(s, "dit")]["sets"].get("base"), n), fid_at(recs[(s, "dcdit")]["sets"].get("base"), n))
             for s in seeds if (s, "dit") in recs and (s, "dcdit") in recs]
    pairs = [(s, a, b) for s, a, b in pairs if a is not None and b is not None]
    if len(pairs) > 1:
        gap = [a - b for _, a, b in pairs]
        mean, half = t_interval(gap)
        lines += ["", f"Across training seeds (each seed's pair at its own budget, {n} samples): DiT-S/2 minus DC-DiT-S "
                  f"FID {', '.join(f'{g:.2f} (seed {s})' for g, (s, _, _) in zip(gap, pairs))}; mean {mean:.2f}, "
                  f"95% t-interval [{mean - half:.2f}, {mean + half:.2f}] over {len(gap)} seeds; DC-DiT-S is better in "
                  f"{sum(g > 0 for g in gap)} of {len(gap)}."]
    seg = []  # does the FID gap follow whether the router learned to keep the strokes? (claims 1 and 3)
    for sd, a, b in pairs:
        router, note = recs[(sd, "dcdit")].get("router"), ""
        if router is None:  # seed 0's JSON was rebuilt from a log: its second run carries the probe
            again = next((r for r in data.get("reruns", []) if r["seed"] == sd and r["arm"] == "dcdit" and "router" in r), None)
            router, note = (again["router"], " (its second run)") if again else (None, "")
        by_t = by_timestep(router)
        seg.append((sd, a - b, by_t.get(25), by_t.get(200), note))
    if len(seg) > 1 and any(lo for _, _, lo, _, _ in seg):
        lines += ["", "The gap beside what each seed's DC-DiT-S router keeps of the clean digit at low noise "
                  "(stroke / background density, as in section 2):", "",
                  "| seed | DiT-S/2 minus DC-DiT-S FID | kept at t = 25 | kept at t = 200 |", "|---|---|---|---|"]
        cell = lambda r: f"{r['stroke_density']:.1%} / {r['background_density']:.1%}" if r else "-"  # noqa: E731
        lines += [f"| {sd} | {g:.2f} | {cell(lo)}{note} | {cell(hi)} |" for sd, g, lo, hi, note in seg]
    for again in data.get("reruns", []):
        if again["arm"] not in ("dit", "dcdit"):
            continue  # the ablation arms' second runs sit in their own table (section 5)
        first = recs.get((again["seed"], again["arm"]), {}).get("sets", {}).get("base")
        n_r = common_samples([first, again["sets"].get("base")]) if first else None
        if n_r:
            lines += ["", f"Another run of seed {again['seed']}'s {LABEL[again['arm']]} with the same budget "
                      f"({again['train_steps']} steps, {again['device']}, `{again['command']}`): FID "
                      f"{fid_at(again['sets']['base'], n_r):.2f} against {fid_at(first, n_r):.2f} above ({n_r} "
                      "samples): the spread between two runs of one seed (GPU kernels are not bitwise deterministic, "
                      "and code between the runs may differ: see the notes)."]
    wall = []
    for s in seeds:
        if (s, "dit") in curves and (s, "dcdit") in curves and not _side_by_side(data, s):
            dit, dc = curves[(s, "dit")], curves[(s, "dcdit")]
            t_dit = elapsed_minutes(dit)[-1]
            at = interpolate(elapsed_minutes(dc), [r["mse"] for r in dc], t_dit)
            steps = interpolate(elapsed_minutes(dc), [r["step"] for r in dc], t_dit)
            wall.append((s, t_dit, dit[-1]["mse"], at, steps))
    if wall:
        lines += ["", "Equal wall-clock (training MSE when the DiT's time is up; eager, FLOP counting on for both):", "",
                  "| seed | minutes | DiT-S/2 MSE | DC-DiT-S MSE at the same minute | DC-DiT-S steps by then |",
                  "|---|---|---|---|---|"]
        lines += [f"| {s} | {t:.2f} | {a:.4f} | {fmt(b, '.4f')} | {fmt(st, '.0f')} |" for s, t, a, b, st in wall]
    clock = []  # FID of DC-DiT-S's snapshot at the DiT's training minutes (mnist_study.py --minutes)
    for s in seeds:
        dit, dc = recs.get((s, "dit")), recs.get((s, "dcdit"))
        if not (dit and dc) or dit.get("side_by_side") or dc.get("side_by_side"):
            continue
        for snap in dc.get("snapshots", {}).values():
            if snap["mark"].endswith("min") and snap.get("sets", {}).get("base"):
                n_c = common_samples([dit["sets"].get("base"), snap["sets"]["base"]])
                if n_c:
                    clock.append((s, dit, dc, snap, n_c))
    if clock:
        lines += ["", "Equal wall-clock FID (DC-DiT-S's weights when the DiT's training minutes are up, same card, "
                  "one after the other; sampled and scored like the rows above):", "",
                  "| seed | card | minutes | DiT-S/2 steps | DiT-S/2 FID | DC-DiT-S steps by then | DC-DiT-S FID "
                  "| DC-DiT-S FID at equal FLOPs | FID samples |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s} | {dc['device']} | {snap['minutes']:.2f} | {dit['train_steps']} "
                  f"| {fid_at(dit['sets']['base'], n_c):.2f} | {snap['step']} | {fid_at(snap['sets']['base'], n_c):.2f} "
                  f"| {fmt(fid_at(dc['sets'].get('base'), n_c))} | {n_c} |" for s, dit, dc, snap, n_c in clock]
    compiled = [(s, recs[(s, "dit-compiled")], recs[(s, "dcdit-compiled")]) for s in seeds
                if (s, "dit-compiled") in recs and (s, "dcdit-compiled") in recs]
    compiled = [(s, a, b, common_samples([a["sets"].get("base"), b["sets"].get("base")])) for s, a, b in compiled]
    if any(n_c for *_, n_c in compiled):
        lines += ["", "Equal wall-clock with compiled training steps (arms `dit-compiled` / `dcdit-compiled`: "
                  "`train.compile=true`, each for the same minutes counted from the end of its first, compiling step; "
                  "FLOPs not counted):", "",
                  "| seed | card | minutes | DiT-S/2 steps | DiT-S/2 FID | DC-DiT-S steps | DC-DiT-S FID "
                  "| first step s (DiT / DC-DiT) | FID samples |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s} | {b['device']} | {a['train_seconds'] / 60:.2f} | {a['train_steps']} "
                  f"| {fid_at(a['sets']['base'], n_c):.2f} | {b['train_steps']} | {fid_at(b['sets']['base'], n_c):.2f} "
                  f"| {fmt(a.get('first_step_seconds'), '.0f')} / {fmt(b.get('first_step_seconds'), '.0f')} | {n_c} |"
                  for s, a, b, n_c in compiled if n_c]
    fig = plot_curves(data, img / "loss_curves.png")
    if fig:
        lines += ["", f"![training curves]({_rel(fig)})"]
    lines.append("")

    # 2-3 ----------------------------------------------------------------------------------------------
    maps = sorted(img.glob("s*-boundary_maps.png"))
    lines += ["## 2. Emergent segmentation", "",
              "Real digits noised to five levels (x_t above, the router's kept tokens below, % kept per column),",
              "from each trained DC-DiT-S (the file name says which arm and seed):", ""]
    lines += [f"![boundary maps {p.stem}]({_rel(p)})" for p in maps] or ["No figure yet."]
    orient = plot_orientation(data, img / "router_orientation.png")
    if orient:
        lines += ["", "During training (arms trained since the probe existed; 256 fixed real digits at t = 25, every "
                  "log step):", "", f"![router orientation]({_rel(orient)})"]
    routed = [(f"{LABEL[a]} (seed {s})", r) for (s, a), r in sorted(recs.items())]
    routed += [(f"{LABEL[r['arm']]} (seed {r['seed']}, another run)", r) for r in data.get("reruns", [])]
    dens = {name: by_timestep(r["router"]) for name, r in routed if "router" in r}
    if dens:
        probes = next(r["router"]["probe_images"] for _, r in routed if "router" in r)
        lines += ["", f"Kept density on digit strokes / on background (strokes: pixels above half intensity in the "
                  f"clean digit; {probes} real digits, noised to each t of 1000):", "",
                  "| t | " + " | ".join(dens) + " |",
                  "|---|" + "---|" * len(dens)]
        for t in sorted({t for d in dens.values() for t in d}):
            cells = [f"{d[t]['stroke_density']:.1%} / {d[t]['background_density']:.1%}" if t in d else "-"
                     for d in dens.values()]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "## 3. Timestep adaptivity", "", f"Paper: {PAPER['kept']}.", "",
              "Real digits noised to random t (the training run's probe, 512 digits) and the model's own sampling "
              "trajectories (the `base` set: DDIM 50, first and last 10 steps):", "",
              "| seed | real digits, noisiest fifth (t > 0.8) | real digits, cleanest fifth (t < 0.2) "
              "| sampling, first 10 steps | sampling, last 10 steps | over sampling |", "|---|---|---|---|---|---|"]
    for s in sorted({s for s, a in metrics if a == "dcdit"} | {s for s, a in recs if a == "dcdit"}):
        m, steps = metrics.get((s, "dcdit"), {}), recs.get((s, "dcdit"), {}).get("sets", {}).get("base", {})
        steps = steps.get("kept_by_step") or []
        fifth = len(steps) // 5
        first, last = (statistics.mean(steps[:fifth]), statistics.mean(steps[-fifth:])) if fifth else (None, None)
        overall = m.get("sampling_kept_fraction", statistics.mean(steps) if steps else None)
        lines.append(f"| {s} | {fmt(m.get('kept_fraction_noisy'), '.1%')} | {fmt(m.get('kept_fraction_clean'), '.1%')} "
                     f"| {fmt(first, '.1%')} | {fmt(last, '.1%')} | {fmt(overall, '.1%')} |")
    kv = sorted(img.glob("s*-dcdit-kept_vs_timestep.png"))
    lines += [""] + [f"![kept vs timestep]({_rel(p)})" for p in kv] + [""]

    # 4 ------------------------------------------------------------------------------------------------
    lines += ["## 4. Elastic inference and Lite-CFG", ""]
    elastic = [(a, recs[(s, a)]) for s in seeds for a in ("dcdit", "dcdit-single") if (s, a) in recs]
    names = ("base", "rho0.2", "rho0.4", "rho0.6")
    cand = [r["sets"].get(k) for _, r in elastic for k in names] + [recs[k]["sets"].get("base") for k in recs
                                                                    if k[1] == "dit"]
    n4 = common_samples([c for c in cand if c and c.get("fid_by_samples")])
    points = []
    if elastic:
        lines += [f"| seed | model | rho | kept | TFLOPs/img | FID ({n4}) |", "|---|---|---|---|---|---|"]
        for (s, a), r in sorted(recs.items()):
            if a not in ("dcdit", "dcdit-single", "dit"):
                continue
            for k in names if a != "dit" else ("base",):
                e = r["sets"].get(k)
                if e is None:
                    continue
                lines.append(f"| {s} | {LABEL[a]} | {e.get('rho', 0):g} | {e['kept_fraction']:.1%} "
                             f"| {e['tflops_per_image']:.3f} | {fmt(fid_at(e, n4))} |")
                if fid_at(e, n4) is not None:
                    points.append((f"{LABEL[a]} (seed {s})", e["tflops_per_image"], fid_at(e, n4)))
        if not any(a == "dcdit-single" for a, _ in elastic):
            lines += ["", "Without multi-budget training (arm `dcdit-single`): not run yet, so the comparison the "
                      "paper makes is missing."]
        fig = plot_pareto(points, img / "elastic_pareto.png", n4 or 0)
        if fig:
            lines += ["", f"![elastic Pareto curve]({_rel(fig)})"]
    guided = [(s, a, k, recs[(s, a)]["sets"][k]) for (s, a) in sorted(recs) for k in ("base", "cfg", "lite-cfg")
              if k in recs[(s, a)]["sets"] and a in ("dit", "dcdit")]
    if guided:
        ng = common_samples([g[3] for g in guided if g[3].get("fid_by_samples")])
        lines += ["", f"Guidance scale {GUIDANCE_SCALE} (the paper's Lite-CFG setting); Lite-CFG runs the "
                  "unconditional pass at rho 0.9:", "",
                  f"| seed | model | sampling | TFLOPs/img | kept | FID ({ng}) |", "|---|---|---|---|---|---|"]
        lines += [f"| {s} | {LABEL[a]} | {k} | {e['tflops_per_image']:.3f} | {e['kept_fraction']:.1%} "
                  f"| {fmt(fid_at(e, ng))} |" for s, a, k, e in guided]
    lines.append("")

    # 5-6 ----------------------------------------------------------------------------------------------
    lines += ["## 5. Learned versus random boundaries; predictability versus 2-D cosine router", "",
              f"Paper: {PAPER['cosine']}.", ""]
    ablated = ("dcdit", "dcdit-random", "dcdit-cosine")
    abl = [(s, a, "", recs[(s, a)]) for (s, a) in sorted(recs) if a in ablated]
    abl += [(r["seed"], r["arm"], " (another run)", r) for r in data.get("reruns", []) if r["arm"] in ablated]
    abl.sort(key=lambda row: (row[0], ablated.index(row[1]), row[2]))
    if any(a != "dcdit" for _, a, _, _ in abl):
        n5 = common_samples([r["sets"]["base"] for *_, r in abl if r["sets"].get("base", {}).get("fid_by_samples")])
        lines += [f"| seed | model | plan layout | train steps (same TFLOPs) | kept | TFLOPs/img | FID ({n5}) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {s} | {LABEL[a]}{again} | {plan_layout(r)} | {r['train_steps']} | "
                  f"{r['sets']['base']['kept_fraction']:.1%} | {r['sets']['base']['tflops_per_image']:.3f} | "
                  f"{fmt(fid_at(r['sets']['base'], n5))} |" for s, a, again, r in abl if "base" in r["sets"]]
    else:
        lines.append("Not run yet (arms `dcdit-random`, `dcdit-cosine`).")
    lines += ["", "## 6. Upcycling", "", f"Paper: {PAPER['upcycle']}.", ""]
    up = [(s, r) for (s, a), r in sorted(recs.items()) if a == "upcycled"]
    if up:
        lines += ["| seed | plan layout | steps | of the from-scratch run's | FID | from-scratch DC-DiT-S FID (steps) |",
                  "|---|---|---|---|---|---|"]
        for s, r in up:
            scratch = recs.get((s, "dcdit"), {})
            scratch_fid = scratch.get("sets", {}).get("base", {}).get("fid")
            points = [(snap["step"], snap["sets"].get("base", {})) for snap in r["snapshots"].values()]
            points.append((r["train_steps"], r["sets"].get("base", {})))  # the run ends at the last fraction
            for step, base in points:
                share = f"1/{scratch['train_steps'] / step:.0f}" if scratch.get("train_steps") else ""
                lines.append(f"| {s} | {plan_layout(r)} | {step} | {share} | {fmt(base.get('fid'))} "
                             f"| {fmt(scratch_fid)} ({scratch.get('train_steps', '')}) |")
    else:
        lines.append("Not run yet (arm `upcycled`).")

    # 7 ------------------------------------------------------------------------------------------------
    lines += ["", "## 7. Composition with token merging and step caching", ""]
    comp = [(s, a, k, recs[(s, a)]["sets"][k]) for (s, a) in sorted(recs) for k in ("base", "merge0.5", "cache0.1")
            if k in recs[(s, a)]["sets"] and a in ("dit", "dcdit")]
    if any(k != "base" for _, _, k, _ in comp):
        nc = common_samples([e for *_, e in comp if e.get("fid_by_samples")])
        lines += [f"| seed | model | sampling | TFLOPs/img | steps skipped | FID ({nc}) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {s} | {LABEL[a]} | {k} | {e['tflops_per_image']:.3f} | {fmt(e.get('skipped_steps'), '.1f')} "
                  f"| {fmt(fid_at(e, nc))} |" for s, a, k, e in comp]
    else:
        lines.append("Not run yet.")
    lines += ["", *regime_section(data.get("regime", []), img)]
    lines.append("")
    return "\n".join(lines)


def regime_section(runs: list[dict], img: Path) -> list[str]:
    """Sections 8 and 9, from ``studies/results/regime/``: FID on the way to and in the trained regime, and the
    speed-quality frontier of sampling there (images/s beside FID)."""
    lines = ["## 8. A trained regime: DiT-S/2 to FID 12 and below", "",
             "The sections above compare models after two minutes of training. Here the models train longer, with "
             "the learning rate and warm-up a row names (the recipe's otherwise); FID of the EMA model at snapshots "
             "on the way and at the end. Training minutes start after the first (compiling) step.", ""]
    if not runs:
        return lines + ["Not run yet (`mnist_study.py --arms dit-compiled --minutes 6.3 --override optim.lr=6e-4`)."]
    def card(r: dict) -> str:
        return r.get("device", "?").replace("NVIDIA ", "")

    lines += ["| seed | model | card | training | lr, warm-up steps | steps | training min | FID (5000) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        extra = overrides(r)
        optim = r.get("recipe", {}).get("optim", {})
        lr = f"{float(extra.get('optim.lr', optim.get('lr', 'nan'))):.0e}".replace("e-0", "e-")
        lr += f", warm-up {extra.get('optim.warmup_steps', optim.get('warmup_steps', '-'))}"
        how, prior = "compiled" if extra.get("train.compile") == "true" else "eager", router_prior(r)
        how += f", router prior {prior}" if prior != "-" else ""
        points = [(snap["step"], snap["minutes"], snap["sets"].get("base", {})) for snap in r["snapshots"].values()]
        points.append((r["train_steps"], r["train_seconds"] / 60, r["sets"].get("base", {})))
        lines += [f"| {r['seed']} | {LABEL.get(r['arm'], r['arm'])} | {card(r)} "
                  f"| {how} | {lr} | {step} | {minutes:.1f} | {fmt(fid_at(base, 5000))} |"
                  for step, minutes, base in sorted(points, key=lambda p: p[0])]
    commands = sorted({re.sub(r"--wallclock-of \S*/", "--wallclock-of studies/results/regime/",  # the record here
                              re.sub(r"(\S+=\[\S*\])", r"'\1'", r["command"].replace(" --out /root/out", " --out OUT")))
                       for r in runs if r.get("command")})  # a list override quoted for the shell
    lines += ["", "Commands:", "", *[f"    {c}" for c in commands]]

    lines += ["", *equal_compute(runs)]

    lines += ["", "## 9. The speed-quality frontier of sampling", "",
              "What a user chooses from, in the trained regime: each model's sample sets, images per second beside "
              "FID (5000 samples). The rate is timed on the FID set itself, eager, batch 1000, on the card named, "
              "with the GPU fast paths: FLOPs are counted on its first batch and the rest is timed uncounted. "
              "DiT-S/2 goes faster with fewer DDIM steps, DC-DiT-S with a tighter budget rho.", ""]
    rows = [(r, name, e) for r in runs for name, e in r["sets"].items() if fid_at(e, 5000) is not None
            and (e.get("images_per_second")  # a timed set, or a set of an older run that drew its frontier
                 or (set(r["sets"]) - {"base"} and e.get("seconds") and e.get("num_samples")))]
    if not rows:
        return lines + ["Not run yet (arms `dit-compiled`, `dcdit-compiled`, `dcdit-single-compiled` with `--sets` of "
                        "their frontier, in the trained regime)."]
    lines += ["| seed | model | card | sampling | precision | DDIM steps | images/s | TFLOPs/img | FID (5000) |",
              "|---|---|---|---|---|---|---|---|---|"]
    points = []
    for r, name, e in rows:
        rate = e.get("images_per_second") or e["num_samples"] / e["seconds"]
        model = LABEL.get(r["arm"], r["arm"]) + (", router prior" if router_prior(r) != "-" else "")
        lines.append(f"| {r['seed']} | {model} | {card(r)} "
                     f"| {name} | {e.get('precision', 'fp32')} | {e.get('steps', '-')} | {rate:.0f} "
                     f"| {e['tflops_per_image']:.3f} "
                     f"| {fmt(fid_at(e, 5000))} |")
        series = model + (", Lite-CFG" if name == "lite-cfg" else "")
        points.append((f"{series} (seed {r['seed']})", rate, fid_at(e, 5000)))
    figure = plot_pareto(points, img / "frontier.png", 5000, xlabel="images per second", title="sampling frontier")
    if figure is not None:
        lines += ["", f"![sampling frontier]({_rel(figure)})"]
    return lines


def by_timestep(router: dict | None) -> dict[int, dict]:
    """A record's router statistics (``mnist_study.router_statistics``) by probed t; ``{}`` if none."""
    return {row["t"]: row for row in (router or {}).get("per_timestep", [])}


def overrides(r: dict) -> dict:
    """A record's ``key=value`` overrides as a dict."""
    return dict(o.split("=", 1) for o in r.get("overrides", []) if "=" in o)


def router_prior(r: dict) -> str:
    """When a run trained with the router's orientation prior: "-" (never; older records), "all steps" or
    "first K steps" (``budget.orient_weight``, ``budget.orient_steps``)."""
    extra = overrides(r)
    budget = r.get("recipe", {}).get("budget", {})
    weight = float(extra.get("budget.orient_weight", budget.get("orient_weight", 0.0)))
    steps = int(extra.get("budget.orient_steps", budget.get("orient_steps", 0)))
    return "-" if weight <= 0 else "all steps" if steps == 0 else f"first {steps} steps"


def equal_compute(runs: list[dict]) -> list[str]:
    """DC-DiT-S against DiT-S/2 in the trained regime: each DC-DiT-S run trained to equal FLOPs (its steps) with a
    snapshot at the DiT run's training minutes (``--wallclock-of``), FID of the EMA model on 5000 samples."""
    lines = ["### At equal training compute", "",
             "Each DC-DiT-S run (`--steps`, compiled, fixed capacity) trains as many steps as DiT-S/2's training "
             "FLOPs buy it, with a snapshot at DiT-S/2's training minutes on the same kind of card "
             "(`--wallclock-of`, the DiT run's record). FLOPs / DiT's: steps times forward FLOPs per image, "
             "first as trained (the fixed layout's padding slots included: what the compiled step computes), then "
             "as the model needs them (the packed layout of its base sample set at rho 0, per forward: kept tokens "
             "only); the batch is the same. Router prior: whether the DC-DiT-S run trained with the router's "
             "orientation prior (routing.md); a run with `-` had the paper's losses alone, which "
             "`--override budget.orient_weight=0` repeats. Kept at t = 25: the fraction of stroke and of "
             "background pixels the trained router keeps at low noise, over 1000 real digits.", ""]
    by_file = {r["file"]: r for r in runs if "file" in r}
    pairs = [(by_file[r["wallclock_of"]], r) for r in runs if r.get("wallclock_of") in by_file]
    if not pairs:
        return lines + ["Not run yet (`mnist_study.py --arms dcdit-compiled --steps N --wallclock-of DIT.json`)."]
    lines += ["| seed | card | DiT-S/2 steps | min | FID | DC-DiT-S router prior "
              "| kept at t = 25: strokes · background | equal wall-clock: steps | FID | equal FLOPs: steps "
              "| FLOPs / DiT's: trained · packed | FID |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def kept(r: dict) -> str:  # the trained router's kept density on strokes and background at t = 25
        row = by_timestep(r.get("router")).get(25)
        return "-" if row is None else f"{row['stroke_density']:.2f} · {row['background_density']:.2f}"

    def per_forward(r: dict) -> float | None:  # GFLOPs of one forward of the base set (packed, rho 0)
        base = r["sets"].get("base", {})
        return base["tflops_per_image"] * 1e3 / base["steps"] if base.get("tflops_per_image") and base.get("steps") \
            else None

    gaps: dict[tuple[str, str], list[float]] = {}  # (comparison, router prior): an interval per configuration
    for dit, dc in sorted(pairs, key=lambda p: p[1]["seed"]):
        base = fid_at(dit["sets"].get("base"), 5000)
        wall = next(iter(dc["snapshots"].values()), None)
        wall_fid = fid_at(wall["sets"].get("base"), 5000) if wall else None
        flops_fid = fid_at(dc["sets"].get("base"), 5000)
        ratio = (dc["train_steps"] * dc["train_gflops_per_image"] / (dit["train_steps"] * dit["train_gflops_per_image"])
                 if dit.get("train_gflops_per_image") and dc.get("train_gflops_per_image") else None)
        packed = (dc["train_steps"] * per_forward(dc) / (dit["train_steps"] * per_forward(dit))
                  if per_forward(dc) and per_forward(dit) else None)
        lines.append(f"| {dc['seed']} | {dit.get('device', '?').replace('NVIDIA ', '')} | {dit['train_steps']} "
                     f"| {dit['train_seconds'] / 60:.1f} | {fmt(base)} | {router_prior(dc)} | {kept(dc)} "
                     f"| {wall['step'] if wall else '-'} "
                     f"| {fmt(wall_fid)} | {dc['train_steps']} | {fmt(ratio)} · {fmt(packed)} | {fmt(flops_fid)} |")
        for key, fid in (("wall-clock", wall_fid), ("FLOPs", flops_fid)):
            if base is not None and fid is not None:
                gaps.setdefault((key, router_prior(dc)), []).append(base - fid)
    for key, prior in sorted(gaps, key=lambda k: (k[1] != "-", k[1], k[0] != "wall-clock")):  # no prior first
        gap = gaps[key, prior]
        if len(gap) > 1:
            mean, half = t_interval(gap)
            which = f" (router prior: {prior})" if prior != "-" else ""
            lines += ["", f"At equal {key}{which}, DiT-S/2 minus DC-DiT-S FID: mean {mean:.2f}, "
                      f"95% t-interval [{mean - half:.2f}, {mean + half:.2f}] over {len(gap)} seeds; "
                      f"DC-DiT-S is better in {sum(g > 0 for g in gap)} of {len(gap)}."]
    return lines


GUIDANCE_SCALE = 1.25


def main(argv=None) -> Path:
    out = ROOT / "docs" / "results.md"
    text = render(load())
    notes = RESULTS / "NOTES.md"  # the prose around the numbers (what we conclude, what is not reproduced)
    if notes.is_file():
        text += "\n" + notes.read_text()
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
