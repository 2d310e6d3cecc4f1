"""The fidelity study, one GPU call at a time: train arms, sample them, measure the router, score.

    python studies/mnist_study.py --seed 0 --arms dit,dcdit --minutes 2 --work /tmp/study --out $OUT/s0
    python studies/mnist_study.py --seed 0 --arms dcdit-single,dcdit-random --work /tmp/study --out $OUT/s0b
    python studies/mnist_study.py --tiny --seed 0 --arms all --work /tmp/w --out /tmp/o    # CPU smoke run

Setting: the 5000 built-in MNIST digits, 32x32, pixel space, class-conditional, recipes
``mnist-dit-s`` / ``mnist-dcdit-s`` (epsilon prediction, AdamW 2e-4, batch 256, EMA 0.999, bf16).
An *arm* is one trained model and the sample sets drawn from it (:data:`ARMS`):

* ``dit`` trains DiT-S/2 for ``--minutes`` (FLOPs counted); it fixes the seed's budget:
  its training TFLOPs (equal FLOPs) and its minutes (equal wall-clock).
* ``dcdit`` trains DC-DiT-S (multi-budget) until it has spent the DiT's TFLOPs, saving an EMA
  snapshot when it passes the DiT's minutes; ``dcdit-single`` (no multi-budget training),
  ``dcdit-random`` (content-blind boundaries at the same expected kept count) and
  ``dcdit-cosine`` (the v1 2-D cosine router) train to the same FLOPs;
  ``upcycled`` starts from this seed's trained DiT (``dit``, else ``dit-compiled``), saves snapshots at
  1/16, 1/8 and 1/4 of the from-scratch ``dcdit`` steps and stops at 1/2 (``--upcycle-fractions``
  sets them; its budget is these steps, not the DiT's FLOPs), to find the steps it needs to match it
  (``--scratch-steps`` gives that count when the ``dcdit`` arm ran elsewhere).
* ``dit-compiled`` and ``dcdit-compiled``: equal wall-clock with compiled training steps
  (``train.compile=true``), each for ``--minutes`` counted from the end of its first (compiling)
  step; FLOPs are not counted (counting hooks and torch.compile exclude each other). Run them one
  after the other on one card: ``--arms dit-compiled,dcdit-compiled --minutes 2``. Their sets are the
  speed-quality frontier: DiT-S/2 at 50, 35, 25 and 15 DDIM steps, DC-DiT-S at rho 0 to 0.6 and with
  Lite-CFG, and ``dcdit-single-compiled`` (no multi-budget training) at rho 0 to 0.6.
* ``--steps N`` trains every arm N steps instead: for budgets longer than one call allows, each arm
  trains in a call of its own. DC-DiT-S trains the steps DiT-S/2's training FLOPs buy it, and
  ``--wallclock-of DIT.json`` adds a snapshot at the DiT run's training minutes (equal wall-clock).
* Each sample set draws ``--samples`` images from the EMA model with DDIM (``--sample-steps``)
  at a kept-token budget ``rho``, optionally with guidance (standard CFG, or Lite-CFG: the
  unconditional pass at rho 0.9), token merging or step caching, and records TFLOPs per image
  and the kept fraction per step; chunking arms also get the router statistics (kept fraction,
  kept density on strokes and background per timestep, over ``--probe`` real digits).

Models and samples stay in ``--work`` (``<work>/s<seed>/<arm>/``): later arms and later calls on
the same machine read the DiT's budget and checkpoint there. When the offline Inception weights
are in ``$CHUNKFORMER_CACHE`` (or ``--fid``), every set is scored on the spot (FID against the
5000 digits); otherwise ``studies/score.py`` scores the saved ``.npz`` later. Each arm rewrites
``<out>/s<seed>-<arm>.json`` after every step (training, router statistics, each sample set), so a
call that runs out of time loses only the set at hand; ``--resume`` (same machine, same ``--work``)
keeps the trained arms and draws only what their records lack.
``studies/report.py`` turns the collected JSON in ``studies/results/`` into docs/results.md.
"""

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chunkformer as cf  # noqa: E402
from chunkformer.data import load_mnist_digits  # noqa: E402
from chunkformer.diffusion import create_diffusion  # noqa: E402
from recipes.config import apply_overrides, get_recipe, to_dict  # noqa: E402
from recipes.sample import to_uint8  # noqa: E402
from recipes.sampling import generate  # noqa: E402
from recipes.train import build_model, train  # noqa: E402
from studies.score import record_fid  # noqa: E402

TINY = ["model.overrides.hidden_size=32", "model.overrides.depth=1", "model.overrides.num_heads=2",
        "train.global_batch=8", "diffusion.sample_steps=2", "budget.group_size=4", "budget.warmup_steps=0",
        "train.num_sample_images=4", "train.log_every=2", "train.precision=fp32", "upcycle.distill_steps=1"]
PROBE_T = (25, 100, 200, 300, 400, 500, 600, 700, 800, 950)
GUIDANCE = 1.25  # the paper's Lite-CFG scale
UPCYCLE_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)


def fractions(text: str) -> tuple[float, ...]:
    """``--upcycle-fractions``: comma-separated fractions in (0, 4] of the from-scratch arm's steps."""
    try:
        values = tuple(sorted({float(v) for v in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.25,0.5,1, got {text!r}") from None
    if not values or not all(0 < v <= 4 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 4] (of the from-scratch steps), got {text!r}")
    return values


@dataclass(frozen=True)
class SampleSet:
    """One sampling configuration (``name`` is the key in the results)."""

    name: str
    rho: float = 0.0
    guidance: float = 1.0
    uncond_rho: float | None = None  # Lite-CFG: the unconditional pass's rho
    merge_ratio: float = 0.0
    cache_threshold: float = 0.0
    ddim_steps: int | None = None  # sampling steps (None: --sample-steps)


@dataclass(frozen=True)
class Arm:
    """One trained model of the study: a recipe preset, its overrides, and what to draw from it."""

    preset: str
    overrides: tuple = ()
    sets: tuple = (SampleSet("base"),)
    budget: str = "dit-flops"  # "minutes" (the seed's reference arm) or "dit-flops"
    snapshot_sets: tuple = (SampleSet("base"),)  # drawn from every snapshot
    upcycle: bool = False  # start from this seed's trained DiT arm
    sample_layout: str | None = None  # plan layout to sample in, when training used another (a memory guard)


ELASTIC = tuple(SampleSet(f"rho{r:g}", rho=r) for r in (0.2, 0.4, 0.6))
FEWER_STEPS = tuple(SampleSet(f"ddim{n}", ddim_steps=n) for n in (35, 25, 15))  # what a DiT user does to go faster
COMPILED = ("train.compile=true", "train.count_flops=false")
ARMS: dict[str, Arm] = {
    "dit": Arm("mnist-dit-s", budget="minutes", sets=(
        SampleSet("base"), SampleSet("cfg", guidance=GUIDANCE),
        SampleSet("merge0.5", merge_ratio=0.5), SampleSet("cache0.1", cache_threshold=0.1))),
    "dcdit": Arm("mnist-dcdit-s", sets=(
        SampleSet("base"), *ELASTIC, SampleSet("cfg", guidance=GUIDANCE),
        SampleSet("lite-cfg", guidance=GUIDANCE, uncond_rho=0.9),
        SampleSet("merge0.5", merge_ratio=0.5), SampleSet("cache0.1", cache_threshold=0.1))),
    "dcdit-single": Arm("mnist-dcdit-s", ("budget.multi_budget=false",), sets=(SampleSet("base"), *ELASTIC)),
    "dcdit-random": Arm("mnist-dcdit-s", ("model.overrides.router=random",)),
    "dcdit-cosine": Arm("mnist-dcdit-s", ("model.overrides.router=cosine",)),
    # fixed capacity (half the grid) bounds memory: during distillation the upcycled router swings between
    # ~4% and ~79% kept within a few steps (on the CPU, batch 8), and 79% of a batch of 256 does not fit in
    # one GPU's memory; the ratio loss still sees the router's own choice
    "upcycled": Arm("mnist-upcycle-dcdit-s", ("model.overrides.plan_mode=fixed", "model.overrides.capacity=512"),
                    upcycle=True, sample_layout="packed"),
    # equal wall-clock with compiled training steps: both for --minutes (from the end of the compiling first
    # step), FLOPs not counted (counting hooks and torch.compile exclude each other); run them one after the other
    "dit-compiled": Arm("mnist-dit-s", COMPILED, budget="minutes", sets=(SampleSet("base"), *FEWER_STEPS)),
    # static shapes for the compiler: fixed capacity 320 (31% of the grid; the trained router keeps 17-27%), and
    # rho reaches the model as a tensor. Packed plans change shape every step, so a compiled packed arm
    # keeps recompiling
    "dcdit-compiled": Arm("mnist-dcdit-s", (*COMPILED, "model.overrides.plan_mode=fixed", "model.overrides.capacity=320"),
                          budget="minutes", sample_layout="packed", sets=(
                              SampleSet("base"), *ELASTIC, SampleSet("lite-cfg", guidance=GUIDANCE, uncond_rho=0.9))),
    "dcdit-single-compiled": Arm("mnist-dcdit-s", (*COMPILED, "budget.multi_budget=false",
                                                   "model.overrides.plan_mode=fixed", "model.overrides.capacity=320"),
                                 budget="minutes", sample_layout="packed", sets=(SampleSet("base"), *ELASTIC)),
}
ORDER = tuple(ARMS)
EVERY = tuple(a for a in ARMS if "train.compile=true" not in ARMS[a].overrides)  # "--arms all": one budget rule


@torch.no_grad()
def router_statistics(model, diffusion, images: torch.Tensor, labels: torch.Tensor, device, seed: int,
                      timesteps: tuple[int, ...] = PROBE_T) -> dict:
    """Kept fraction, kept density and mean keep logit ``log(p / (1 - p))`` on strokes / background per timestep,
    over ``images`` (N, 1, 32, 32). The logits show which side the router leans to before it keeps anything."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in timesteps:
        kept = stroke_kept = stroke = bg_kept = bg = stroke_logit = bg_logit = 0.0
        for start in range(0, len(images), 500):
            x0, y = images[start:start + 500].to(device), labels[start:start + 500].to(device)
            tt = torch.full((len(x0),), t, device=device, dtype=torch.long)
            x_t, _ = diffusion.q_sample(x0, tt, torch.randn(x0.shape, generator=g).to(device))
            _, info = model(x_t, diffusion.model_timesteps(tt), y, return_info=True)
            mask = info.router.mask.float()  # (B, L), L = 32 * 32
            strokes = (x0.flatten(1) > 0).float()  # pixel above half intensity in [-1, 1]
            logit = torch.logit(info.router.probs.float(), eps=1e-6)  # (B, L)
            stroke_logit += float((logit * strokes).sum())
            bg_logit += float((logit * (1 - strokes)).sum())
            kept += float(mask.sum())
            stroke_kept += float((mask * strokes).sum())
            stroke += float(strokes.sum())
            bg_kept += float((mask * (1 - strokes)).sum())
            bg += float((1 - strokes).sum())
        total = stroke + bg
        rows.append({"t": t, "kept_fraction": kept / total, "stroke_density": stroke_kept / max(stroke, 1.0),
                     "background_density": bg_kept / max(bg, 1.0), "stroke_logit": stroke_logit / max(stroke, 1.0),
                     "background_logit": bg_logit / max(bg, 1.0)})
    return {"per_timestep": rows, "probe_images": len(images)}


ORIENTATION_T = (25, 500)  # low and mid noise: where the router's stroke / background split shows


def orientation_probe(cfg, seed: int, device, images: int = 256):
    """A ``train(probe=...)`` for chunking arms: what the router keeps of ``images`` fixed real digits at
    ``ORIENTATION_T`` during training (``stroke_t25``, ``background_t25``, ...) and its mean keep logit there
    (``stroke_logit_t25``, ...), to see when it picks its side."""
    digits, labels = load_mnist_digits()
    digits, labels = digits[:images], labels[:images]
    diffusion = create_diffusion(cfg.diffusion.kind, num_timesteps=cfg.diffusion.num_timesteps,
                                 schedule=cfg.diffusion.schedule)

    def probe(model, step: int) -> dict:
        rows = router_statistics(model, diffusion, digits, labels, device, seed, ORIENTATION_T)["per_timestep"]
        return {f"{key}{kind}_t{r['t']}": r[f"{key}_{'density' if not kind else 'logit'}"]
                for r in rows for key in ("stroke", "background") for kind in ("", "_logit")}
    return probe


def load_weights(cfg, directory: Path, device, layout: str | None = None) -> torch.nn.Module:
    """The EMA model train() saved in ``directory`` (a wrapped/upcycled one is rebuilt from the recipe),
    switched to plan ``layout`` when given (the same weights and maths; only the token layout differs)."""
    if (directory / "config.json").is_file():
        model = cf.create_model(str(directory)).to(device).eval()
    else:
        model = cf.load_weights(build_model(cfg, None, None, device), directory).to(device).eval()
    return in_layout(model, layout)


def in_layout(model: torch.nn.Module, layout: str | None) -> torch.nn.Module:
    """``model`` switched to plan ``layout`` (None: as it is)."""
    if layout is not None:
        model.set_plan(mode=layout, capacity=None, fill=False)
    return model


def fid_available() -> bool:
    """Whether the converted Inception weights are already in the cache (no conversion, no download)."""
    from chunkformer import fid

    cache = fid.resolve_cache_dir()
    return (cache / fid._CONVERTED_NAME).is_file() and (cache / fid._CONVERTED_NAME).with_suffix(".json").is_file()


def draw(model, diffusion, s: SampleSet, args, device, where: Path, score: bool) -> dict:
    """Sample set ``s`` from ``model``; saves ``<where>/<s.name>.npz``; returns its record (FID if ``score``).

    FLOPs are counted on the first batch (its hooks run the plain layers), and the rest is sampled uncounted
    with the GPU fast paths and timed: ``images_per_second``, the frontier's rate, from a warm model."""
    steps, count = s.ddim_steps or args.sample_steps, min(args.batch, args.samples)
    kw = dict(shape=(model.in_channels, *model.grid), num_classes=model.num_classes, device=device,
              sampler="ddim", steps=steps, guidance=s.guidance, rho=s.rho, uncond_rho=s.uncond_rho,
              batch_size=args.batch, merge_ratio=s.merge_ratio, cache_threshold=s.cache_threshold,
              autocast=torch.bfloat16 if args.sample_precision == "bf16" else None)
    start = time.time()
    outs = [generate(model, diffusion, num=count, seed=args.seed, **kw)]
    timed = time.time()
    if args.samples > count:  # the same labels in the same order as one run; noise from the next seed
        labels = torch.arange(count, args.samples) % model.num_classes
        outs.append(generate(model, diffusion, num=args.samples - count, seed=args.seed + 1, labels=labels,
                             count_flops=False, **kw))
    end = time.time()
    rate = (args.samples - count) / (end - timed) if args.samples > count else count / (timed - start)
    images = to_uint8(torch.cat([o["samples"] for o in outs]))
    labels = torch.cat([o["labels"] for o in outs])
    np.savez_compressed(where / f"{s.name}.npz", samples=images, labels=labels.numpy())
    sizes = [len(o["labels"]) for o in outs]
    mean = lambda key: sum(o[key] * n for o, n in zip(outs, sizes)) / sum(sizes)  # noqa: E731
    by_step = [sum(k * n for k, n in zip(ks, sizes)) / sum(sizes) for ks in zip(*(o["kept_by_step"] for o in outs))]
    record = {**{k: v for k, v in vars(s).items()}, "sampler": "ddim", "steps": steps,
              "precision": args.sample_precision, "ema": True, "num_samples": args.samples, "seed": args.seed,
              "kept_fraction": mean("kept_fraction"), "kept_by_step": by_step,
              "tflops_per_image": outs[0]["tflops_per_image"], "skipped_steps": mean("skipped_steps"),
              "seconds": end - start, "images_per_second": rate}
    if score:
        from chunkformer.fid import compute_fid

        record_fid(record, compute_fid(images, reference="mnist", device=device), len(images))
    print(f"  {s.name}: {record['tflops_per_image']:.4f} TFLOPs/img, kept {record['kept_fraction']:.1%}"
          + (f", FID {record['fid']:.2f}" if "fid" in record else ""), flush=True)
    return record


def training_gflops(model, device, batch: int = 8) -> float:
    """Forward GFLOPs per image of ``model`` in its own plan layout (:func:`chunkformer.count_flops`), on a batch
    of noise at mixed timesteps."""
    from chunkformer import count_flops

    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, model.in_channels, *model.grid), generator=g).to(device)
    t = torch.linspace(0, 999, batch).to(device)
    y = (torch.arange(batch) % model.num_classes).to(device)
    return count_flops(model, x, t, y).per_sample / 1e9


def run_arm(name: str, args, device, score: bool, header: dict) -> dict:
    """Train arm ``name`` (unless ``--resume`` finds it trained), then draw what is missing. The record
    is saved after every step (``<work>/s<seed>/<arm>/record.json`` and ``<out>/s<seed>-<arm>.json``), so
    a call that runs out of time loses only the set at hand, and ``--resume`` continues from there."""
    arm = ARMS[name]
    seed_dir = args.work / f"s{args.seed}"
    arm_dir = seed_dir / name
    trained = args.resume and (arm_dir / "run" / "metrics.json").is_file()
    if not trained:
        if arm_dir.exists():
            shutil.rmtree(arm_dir)
        arm_dir.mkdir(parents=True)
    overrides = [f"train.seed={args.seed}", "train.steps=100000000", f"train.results_dir={arm_dir}",
                 "train.run_name=run", "train.ckpt_every=100000000", "train.sample_every=0", "train.count_flops=true"]
    ref_path = seed_dir / "dit" / "record.json"
    reference = json.loads(ref_path.read_text()) if name != "dit" and ref_path.is_file() else None
    compiled = "train.compile=true" in arm.overrides
    if compiled and args.tflops > 0:
        raise ValueError(f"arm {name!r} trains compiled for --minutes (FLOPs cannot be counted under torch.compile); "
                         "run it without --tflops")
    fixed_steps = args.steps > 0 and not arm.upcycle
    if arm.upcycle:  # its budget is steps (--upcycle-fractions of the scratch arm's, below), not the DiT's FLOPs
        pass
    elif fixed_steps:  # a step budget for every arm (equal wall-clock from rates measured in one call: see --steps)
        overrides.append(f"train.steps={args.steps}")
        if name.startswith("dcdit"):  # multi-budget draws start after an eighth, as in the paper (50K of 400K)
            overrides.append(f"budget.warmup_steps={max(1, args.steps // 8)}")
        if args.wallclock_of is not None:  # equal wall-clock: a snapshot at the reference's training minutes
            ref = json.loads(args.wallclock_of.read_text())
            if ref.get("device") != header["device"]:
                raise ValueError(f"--wallclock-of {args.wallclock_of} trained on {ref.get('device')!r}, this call "
                                 f"runs on {header['device']!r}: equal wall-clock needs the same kind of card")
            overrides.append("train.snapshots=" + json.dumps([f"{ref['train_seconds'] / 60:.6f}min"]))
    elif args.tflops > 0:  # a fixed budget for every arm (arms may then run side by side)
        overrides.append(f"train.max_tflops={args.tflops}")
    elif arm.budget == "minutes":
        overrides.append(f"train.max_minutes={args.minutes}")
    elif reference is None:
        raise FileNotFoundError(f"{ref_path} is missing: arm {name!r} trains to the DiT's budget, so run arm "
                                f"'dit' with --seed {args.seed} first on this machine (same --work), or give --tflops")
    else:
        overrides.append(f"train.max_tflops={reference['train_tflops']}")
    if arm.budget == "minutes" and name.startswith("dcdit") and not fixed_steps:  # draws start after an eighth
        overrides.append(f"budget.warmup_steps={max(1, args.warmup_hint // 8)}")
    if arm.budget != "minutes" and not fixed_steps:
        marks = []
        if not arm.upcycle and reference is not None and args.tflops <= 0:  # (side by side, minutes mean nothing)
            marks.append(f"{reference['train_seconds'] / 60:.6f}min")  # equal wall-clock
        if not arm.upcycle:  # multi-budget draws start after an eighth of the run, as in the paper (50K of 400K)
            steps = reference["train_steps"] if reference else args.warmup_hint
            overrides.append(f"budget.warmup_steps={max(1, steps // 8)}")
        if arm.upcycle:  # snapshots at fractions of the from-scratch arm's steps; the last one ends the run
            scratch = args.scratch_steps or json.loads((seed_dir / "dcdit" / "record.json").read_text())["train_steps"]
            *early, last = [max(1, round(f * scratch)) for f in args.upcycle_fractions]  # ascending
            marks = [f"{s}steps" for s in early]
            source = next((seed_dir / d / "run" / "final" for d in ("dit", "dit-compiled")
                           if (seed_dir / d / "run" / "final").is_dir()), None)
            if source is None:
                raise FileNotFoundError(f"arm 'upcycled' starts from this seed's trained DiT: run arm 'dit' or "
                                        f"'dit-compiled' with --seed {args.seed} first on this machine (same --work)")
            overrides += [f"upcycle.source={source}", f"train.steps={last}",
                          f"upcycle.distill_steps={max(1, scratch // 10)}",
                          f"budget.warmup_steps={max(0, scratch // 10)}"]
        overrides.append("train.snapshots=" + json.dumps(marks))
    tiny = [o for o in TINY if not (arm.upcycle and o.startswith("model."))] if args.tiny else []  # width: the DiT's
    extra = list(args.override) if name != "dit" else []  # e.g. the plan layout (see --override)
    cfg = apply_overrides(get_recipe(arm.preset), [*overrides, *tiny, *arm.overrides, *extra])
    if trained:
        metrics = json.loads((arm_dir / "run" / "metrics.json").read_text())
        print(f"[{name}] resuming: trained already, drawing what is missing", flush=True)
    else:
        print(f"[{name}] training {cfg.model.name} ({arm.preset} {' '.join(arm.overrides)})", flush=True)
        chunks = cfg.model.name.startswith("DC-DiT") or arm.upcycle
        probe = orientation_probe(cfg, args.seed, device, images=16 if args.tiny else 256) if chunks else None
        metrics = train(cfg, probe=probe)
    run_dir = Path(metrics["run_dir"])
    record = {"arm": name, "preset": arm.preset, "overrides": list(arm.overrides) + extra, "recipe": to_dict(cfg),
              "sample_layout": arm.sample_layout,
              "train_steps": metrics["step"], "train_tflops": metrics.get("train_tflops"),
              "train_seconds": metrics["wall_seconds"], "sets": {}, "snapshots": {}, "complete": False,
              **({"first_step_seconds": metrics["first_step_seconds"]} if "first_step_seconds" in metrics else {}),
              **({"wallclock_of": args.wallclock_of.name} if fixed_steps and args.wallclock_of else {})}
    if trained and (arm_dir / "record.json").is_file():
        done = json.loads((arm_dir / "record.json").read_text())
        record.update({k: done[k] for k in ("sets", "snapshots", "router", "train_gflops_per_image") if k in done})

    def save() -> None:
        (arm_dir / "record.json").write_text(json.dumps(record, indent=1))
        (args.out / f"s{args.seed}-{name}.json").write_text(json.dumps({**header, **record}, indent=1))

    save()
    spent = "FLOPs not counted" if record["train_tflops"] is None else f"{record['train_tflops']:.1f} TFLOPs"
    print(f"[{name}] {metrics['step']} steps, {spent}, {metrics['wall_seconds'] / 60:.2f} min", flush=True)
    model = load_weights(cfg, run_dir / "final", device)
    if "train_gflops_per_image" not in record:  # the training layout's forward FLOPs: equal-FLOP budgets by steps
        record["train_gflops_per_image"] = training_gflops(model, device)
        save()
    model = in_layout(model, arm.sample_layout)
    diffusion = create_diffusion(cfg.diffusion.kind, num_timesteps=cfg.diffusion.num_timesteps,
                                 schedule=cfg.diffusion.schedule, learn_sigma=model.out_channels != model.in_channels)
    if getattr(model, "supports_chunking", False) and "router" not in record:  # cheap: before the samples
        images, labels = load_mnist_digits()
        record["router"] = router_statistics(model, diffusion, images[:args.probe], labels[:args.probe], device,
                                             args.seed)
        save()
    if args.sample_precision == "bf16":  # weights cast once, as recipes.sample --precision bf16 (router, de-chunk fp32)
        model.to(torch.bfloat16)
    wanted = [s for s in arm.sets if (args.sets is None or s.name in args.sets) and s.name not in record["sets"]]
    for s in wanted[:1]:  # the base set, then the snapshots' (a call that runs out of time has both), then the rest
        record["sets"][s.name] = draw(model, diffusion, s, args, device, arm_dir, score)
        save()
    snap_log = run_dir / "snapshots" / "snapshots.jsonl"
    for line in snap_log.read_text().splitlines() if snap_log.is_file() else []:
        snap = json.loads(line)
        snap = {**snap, "sets": {}, **record["snapshots"].get(snap["mark"], {})}
        todo = [s for s in arm.snapshot_sets if s.name not in snap["sets"]]
        if not todo:
            continue
        snap_model = load_weights(cfg, run_dir / "snapshots" / snap["mark"], device, arm.sample_layout)
        if args.sample_precision == "bf16":
            snap_model.to(torch.bfloat16)
        where = arm_dir / "snapshots" / snap["mark"]
        where.mkdir(parents=True, exist_ok=True)
        for s in todo:
            snap["sets"][s.name] = draw(snap_model, diffusion, s, args, device, where, score)
            record["snapshots"][snap["mark"]] = snap
            save()
    for s in wanted[1:]:
        record["sets"][s.name] = draw(model, diffusion, s, args, device, arm_dir, score)
        save()
    figures = {}
    for key in ("boundary_maps", "kept_vs_timestep", "samples"):
        if key in metrics and Path(metrics[key]).is_file():
            dst = args.out / f"{name}-{Path(metrics[key]).name}"
            shutil.copy(metrics[key], dst)
            figures[key] = dst.name
    record["figures"] = figures
    record["complete"] = True
    save()
    return record


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="dit,dcdit", help=f"comma-separated, from {', '.join(ORDER)}, or 'all' (all but the compiled ones)")
    ap.add_argument("--minutes", type=float, default=2.0, help="training minutes of the DiT arm (the budget)")
    ap.add_argument("--tflops", type=float, default=0.0,
                    help="training TFLOPs of every arm (default: the DiT arm trains --minutes, the others its TFLOPs)")
    ap.add_argument("--steps", type=int, default=0,
                    help="training steps of every arm but 'upcycled', instead of --minutes / --tflops: trains a "
                         "compiled arm in a call of its own, e.g. DC-DiT-S to the steps DiT-S/2's training FLOPs buy "
                         "it, with --wallclock-of for the equal-wall-clock point (docs/recipes.md#studies)")
    ap.add_argument("--wallclock-of", type=Path, default=None, metavar="RECORD.json",
                    help="with --steps: snapshot at this record's training minutes (a DiT arm trained on the same kind "
                         "of card in an earlier call): the equal-wall-clock point of a run trained to equal FLOPs")
    ap.add_argument("--warmup-hint", type=int, default=1450,
                    help="expected training steps when no DiT record sets them (multi-budget warm-up = 1/8)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override for every arm but 'dit' (repeatable), e.g. "
                         "model.overrides.plan_mode=padded: the same model and maths in another layout, but "
                         "its FLOP count includes the padding, so a FLOP-budgeted arm makes fewer steps")
    ap.add_argument("--scratch-steps", type=int, default=0,
                    help="steps of the from-scratch DC-DiT arm, for 'upcycled' (default: its record in --work)")
    ap.add_argument("--upcycle-fractions", type=fractions, default=UPCYCLE_FRACTIONS, metavar="F,F,...",
                    help="'upcycled' snapshots at these fractions of the from-scratch steps; the largest ends the "
                         "run (default 1/16,1/8,1/4,1/2; e.g. 0.125,0.25,0.5,1 to train it as long as the scratch arm)")
    ap.add_argument("--sets", default=None, help="comma-separated sample sets to draw (default: each arm's all)")
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1000, help="sampling batch")
    ap.add_argument("--sample-precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: every set sampled with bf16 weights under bf16 autocast, as recipes.sample --precision "
                         "bf16 (DC-DiT's router and de-chunk stay fp32)")
    ap.add_argument("--probe", type=int, default=1000, help="real digits for the router statistics")
    ap.add_argument("--work", type=Path, required=True, help="models and samples (kept for later arms)")
    ap.add_argument("--out", type=Path, required=True, help="one JSON per arm and its figures")
    ap.add_argument("--fid", choices=("auto", "on", "off"), default="auto",
                    help="score every set on the spot (auto: when the Inception weights are cached)")
    ap.add_argument("--resume", action="store_true",
                    help="keep arms already trained in --work and draw only what their records lack")
    ap.add_argument("--tiny", action="store_true", help="toy sizes for a CPU smoke run")
    args = ap.parse_args(argv)
    arms = list(EVERY) if args.arms == "all" else [a.strip() for a in args.arms.split(",") if a.strip()]
    args.sets = None if args.sets is None else set(args.sets.split(","))
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {', '.join(ORDER)}")
    if args.wallclock_of is not None and args.steps <= 0:
        ap.error("--wallclock-of marks a snapshot in a --steps run: give --steps too")
    if args.steps < 0:
        ap.error(f"--steps must be >= 0 (0: the --minutes / --tflops budgets), got {args.steps}")
    if args.tiny:
        args.samples, args.sample_steps, args.probe, args.batch = min(args.samples, 8), 2, min(args.probe, 16), 8
        args.minutes = min(args.minutes, 0.05)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    score = args.fid == "on" or (args.fid == "auto" and fid_available())
    args.out.mkdir(parents=True, exist_ok=True)
    header = {"seed": args.seed, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "command": "python " + " ".join(sys.argv)}
    results = {}
    for name in arms:
        path = args.out / f"s{args.seed}-{name}.json"
        try:
            record = {**header, **run_arm(name, args, device, score, header)}
        except Exception as e:  # one broken arm must not cost the others; what it finished stays
            import traceback

            traceback.print_exc()
            partial = json.loads(path.read_text()) if path.is_file() else {}
            record = {**header, **partial, "arm": name, "error": f"{type(e).__name__}: {e}"}
            path.write_text(json.dumps(record, indent=1))
        results[name] = record
    return results


if __name__ == "__main__":
    main()
