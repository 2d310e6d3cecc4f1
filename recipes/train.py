"""Train a DC-DiT or DiT: ``python -m recipes.train --recipe NAME [section.key=value ...]``.

    python -m recipes.train --recipe tiny-cpu                    # the README's main job (CPU, minutes)
    python -m recipes.train --recipe DC-DiT-XL --print-config    # the paper's setting
    python -m recipes.train --recipe DC-DiT-S --dry-run          # params and FLOPs, then exit
    torchrun --nproc_per_node 8 -m recipes.train --recipe DC-DiT-XL data.path=/data/in256-latents
    python -m recipes.train --recipe tiny-cpu train.resume=auto  # continue the latest run

Phases: setup -> model + EMA -> run folder check -> optimiser -> data -> resume -> run folder -> loop -> final
samples, figures and metrics. A run folder ``results/<run>/`` holds ``log.txt``,
``metrics.jsonl``, ``config.json``, ``checkpoints/step-NNNNNNN/`` (safetensors + JSON, see
:mod:`recipes.checkpoints`), ``samples/`` and ``figures/``. A run folder holds one configuration (the
recipe less :data:`recipes.config.RUN_CONTROL`): the default name gets a hash of it once overrides change
it, a named folder of another configuration is refused, and nothing is written before a resumed state loads.
Randomness of step ``s`` (timesteps, noise, label dropout, the multi-budget ``rho``) is drawn
for the whole global batch from a generator seeded by ``(seed, s)``; each rank takes its slice.
So a resumed run repeats an uninterrupted one bit for bit, and N processes make the same
update as one process with the same global batch.
"""

import argparse
import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch

import chunkformer as cf
from chunkformer.diffusion import create_diffusion
from recipes.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_aside_after,
    set_rng_state,
)
from recipes.config import (
    PRESETS,
    Recipe,
    apply_overrides,
    config_differences,
    default_run_name,
    get_recipe,
    to_dict,
    to_yaml,
)
from recipes.data import DataError, StepBatches, build_source
from recipes.parallel import (
    Dist,
    all_reduce_mean,
    barrier,
    full_tensors,
    init_distributed,
    load_training_state,
    model_state,
    optimizer_state,
    parallelize,
)
from recipes.sampling import make_report_figures, plan_mode, plot_router_maps, sample_images
from recipes.validate import usage_errors, validate

__all__ = ["main", "train", "build_model"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipe", default="tiny-cpu", choices=sorted(PRESETS), help="named preset")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true", help="build the model, print params and FLOPs, exit")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=1000 model.overrides.depth=4")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def build_model(cfg: Recipe, source_shape: tuple[int, ...] | None, num_classes: int | None,
                device: torch.device) -> torch.nn.Module:
    """``create_model`` with the data's channels / grid / classes filled in where the recipe leaves them.

    The filled-in values are written back into ``cfg.model.overrides``, so the config saved with
    every checkpoint rebuilds exactly this model.
    """
    if cfg.upcycle.source:
        model = build_upcycled(cfg, source_shape, device)
    else:
        kw = cfg.model.overrides
        if source_shape is not None:
            kw.setdefault("in_channels", source_shape[0])
            kw.setdefault("input_size", list(source_shape[1:]))
        if num_classes is not None:
            kw.setdefault("num_classes", num_classes)
        model = cf.create_model(cfg.model.name, **kw).to(device)
    model.num_timesteps = cfg.diffusion.num_timesteps  # the timesteps its forward accepts: [0, T)
    return model


WRAP_OPTIONS = ("target_ratio", "router", "encoder_depth", "decoder_depth", "scaffold_width", "sigma", "smoothing",
                "plan_mode", "capacity", "cond_adaptor", "coord_scale", "router_init", "gate_grad")


def _pretrained(cfg: Recipe):
    from chunkformer.upcycling import load_pretrained

    source = Path(cfg.upcycle.source)
    kw = {"num_heads": cfg.upcycle.num_heads} if cfg.upcycle.num_heads and source.is_file() else {}
    return load_pretrained(source, **kw)


def build_upcycled(cfg: Recipe, source_shape: tuple[int, ...] | None, device: torch.device) -> torch.nn.Module:
    """A DC-DiT on the blocks of the pretrained DiT at ``upcycle.source`` (``model.overrides`` = wrap options)."""
    from chunkformer.upcycling import upcycle

    bad = sorted(set(cfg.model.overrides) - set(WRAP_OPTIONS))
    if bad:
        raise ValueError(f"when upcycling, model.overrides are chunkformer.wrap options {WRAP_OPTIONS}; "
                         f"{bad} come from the pretrained model and cannot be changed")
    student, _ = upcycle(_pretrained(cfg), **cfg.model.overrides)
    if source_shape is not None and (student.in_channels, *student.grid) != tuple(source_shape):
        raise ValueError(f"the pretrained model takes {(student.in_channels, *student.grid)} inputs but the data is "
                         f"{tuple(source_shape)}: upcycle a model trained on this data's shape")
    return student.to(device)


def _log(d: Dist, log_file, message: str) -> None:
    if d.is_main:
        print(message, flush=True)
        if log_file is not None:
            log_file.write(message + "\n")
            log_file.flush()


def _oom_hint(model, memory_budget: float | None = None) -> str:
    """What to try after running out of memory: bound a dynamic plan layout (it grows with what the router
    keeps); compiled (``memory_budget`` given), a memory budget; then recompute the scaffold and blocks in
    backward; then a smaller batch."""
    budget = ("Let the compiled step recompute in backward what it can without a matmul (the same updates): "
              "train.memory_budget=0.9; or lower train.global_batch.")
    if not getattr(model, "supports_chunking", False):
        return budget if memory_budget == 1 else "Lower train.global_batch."
    if plan_mode(model) != "fixed" and model.capacity is None:
        return ("The plan layout grows with the tokens the router keeps, and an untrained router can keep most "
                "of the grid for its first steps: bound it with model.overrides.capacity (e.g. half the grid's "
                "positions), or lower train.global_batch.")
    if memory_budget == 1:
        return budget
    if not model.checkpoint_scaffold:
        return ("Recompute the scaffold in backward instead of holding its full-grid activations (the same "
                "updates): train.checkpoint_scaffold=true; or lower train.global_batch.")
    if model.checkpoint_blocks < len(model.blocks):
        more = min(len(model.blocks), model.checkpoint_blocks + 2)
        return (f"Recompute more backbone blocks in backward (the same updates): "
                f"train.checkpoint_blocks={more}; or lower train.global_batch.")
    return "Lower train.global_batch (or model.overrides.capacity)."


@torch.no_grad()
def flops_at_kept_fraction(model: torch.nn.Module, x, t, y, fraction: float) -> "cf.FlopReport":
    """``count_flops`` of one forward with every sample keeping ``round(fraction * L)`` of its ``L`` tokens
    (a filled fixed-capacity plan, whatever the router's scores), so the figure does not depend on how
    many tokens an untrained router happens to keep."""
    tokens = math.prod(x.shape[2:])
    saved = model.plan_mode, model.capacity, model.fill_capacity
    model.set_plan(mode="fixed", capacity=max(1, round(fraction * tokens)), fill=True)
    try:
        return cf.count_flops(model, x, t, y)
    finally:
        model.set_plan(*saved)


def dry_run_report(cfg: Recipe, model: torch.nn.Module, diffusion, device, *, is_main: bool = True) -> dict:
    """Parameters and FLOPs per forward of ``model``; a chunking model's at the recipe's target kept fraction
    ``1 / target_ratio`` of the tokens (and, with multi-budget training, at the largest trained tail drop
    ``rho``: ``(1 - rho) / target_ratio``), since an untrained router keeps an arbitrary share."""
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, model.in_channels, *model.grid, device=device)
    t = diffusion.model_timesteps(diffusion.sample_timesteps(1, device))
    y = torch.zeros(1, dtype=torch.long, device=device)
    model.eval()
    steps = cfg.diffusion.sample_steps
    if not getattr(model, "supports_chunking", False):
        report, fraction, where = cf.count_flops(model, x, t, y), 1.0, "every token"
    else:
        fraction = 1 / model.budget.target_ratio
        report = flops_at_kept_fraction(model, x, t, y, fraction)
        where = (f"the target kept fraction 1/N = 1/{model.budget.target_ratio:g} = {fraction:.1%} of "
                 f"{math.prod(model.grid)} tokens (rho = 0)")
    if is_main:
        print(f"{cfg.model.name}: {n_params / 1e6:.2f}M parameters")
        print(f"FLOPs per forward at {where}:")
        print(report.table())
        print(f"per image, {steps} sampling steps: {report.tflops_per_image(steps):.4f} TFLOPs")
        rho = max(cfg.budget.fractions) if cfg.budget.multi_budget else 0.0
        if getattr(model, "supports_chunking", False) and rho > 0:
            low = flops_at_kept_fraction(model, x, t, y, fraction * (1 - rho))
            print(f"at rho = {rho:g} (kept {fraction * (1 - rho):.1%}): {low.per_sample / 1e9:.3f} GFLOPs/sample, "
                  f"{low.tflops_per_image(steps):.4f} TFLOPs per image")
    return {"params": n_params, "flops_per_sample": report.per_sample, "kept_fraction": fraction}


def train(cfg: Recipe, *, dry_run: bool = False, probe: Callable[[torch.nn.Module, int], dict] | None = None) -> dict:
    """Run the recipe; returns the final metrics (rank 0) or an empty dict.

    ``probe(model, step) -> {name: float}`` runs at every log step on every rank, with the training model in eval
    mode, under ``no_grad`` and the recipe's autocast; rank 0's values join that line of ``metrics.jsonl``
    (e.g. what the router keeps of a fixed batch, to see when it settles). Its time is not training time: it
    counts neither in ``steps_per_sec`` nor against ``train.max_minutes``.
    """
    with ExitStack() as files:  # the run's log file closes however the run ends (a failed step raises)
        return _train(cfg, files, dry_run=dry_run, probe=probe)


def _train(cfg: Recipe, files: ExitStack, *, dry_run: bool, probe) -> dict:
    # 1. setup ---------------------------------------------------------------------
    validate(cfg, data=not dry_run, outputs=not dry_run)  # settings in range, paths there: before any work
    snapshots = parse_snapshots(cfg.train.snapshots)
    run_name = cfg.train.run_name or default_run_name(cfg)  # before build_model fills in the data's shapes
    d = init_distributed()
    device = d.device
    if device.type == "cpu" and cfg.train.cpu_threads:  # the caller's thread count returns when the run ends
        files.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(cfg.train.cpu_threads)
    torch.manual_seed(cfg.train.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = cfg.train.precision == "bf16" and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # 2. data, model and EMA (a dry run needs no data: the recipe's model overrides give the shapes)
    source = None if dry_run else build_source(cfg.data.dataset, cfg.data.path, cfg.data.image_size,
                                               cfg.data.pixel_unshuffle, cfg.data.limit,
                                               bad_images=cfg.data.bad_images)
    model = build_model(cfg, source and source.sample_shape, source and source.num_classes, device)
    chunking = getattr(model, "supports_chunking", False)
    if chunking:  # the model's budget is the one owner of the ratio loss and the multi-budget draws
        model.set_budget(ratio_weight=cfg.budget.ratio_weight, group_size=cfg.budget.group_size,
                         fractions=tuple(cfg.budget.fractions), warmup_steps=cfg.budget.warmup_steps,
                         seed=cfg.train.seed)
    if cfg.train.checkpoint_scaffold:
        if not chunking:
            raise ValueError(f"train.checkpoint_scaffold recomputes a DC-DiT's scaffold; {cfg.model.name} has none. "
                             "Leave it off for a DiT (its activations are the blocks')")
        model.checkpoint_scaffold = True
    if blocks := cfg.train.checkpoint_blocks:
        depth = len(model.blocks) if chunking else 0
        if not 0 < blocks <= depth:
            has = depth if chunking else "no DC-DiT backbone"
            raise ValueError(f"train.checkpoint_blocks={blocks}: recomputes the first N blocks of a "
                             f"DC-DiT's backbone, 1 <= N <= its depth ({cfg.model.name} has {has}). Use 0 "
                             "(the default) to keep them all")
        model.checkpoint_blocks = blocks
    if cfg.train.compile and plan_mode(model) != "fixed":
        warnings.warn(f"train.compile with plan_mode={model.plan_mode!r}: the kept-token count changes every step, "
                      "so the compiled step keeps recompiling. Compile fixed-capacity plans: "
                      "model.overrides.plan_mode=fixed model.overrides.capacity=<tokens per sample>", stacklevel=2)
    learn_sigma = model.out_channels != model.in_channels
    diffusion = create_diffusion(cfg.diffusion.kind, num_timesteps=cfg.diffusion.num_timesteps,
                                 schedule=cfg.diffusion.schedule, learn_sigma=learn_sigma)
    n_params = sum(p.numel() for p in model.parameters())
    if dry_run:
        return dry_run_report(cfg, model, diffusion, device, is_main=d.is_main)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    teacher = None
    if cfg.upcycle.source and cfg.upcycle.distill_steps > 0:
        from chunkformer.upcycling import DistillationTeacher

        teacher = DistillationTeacher(_pretrained(cfg)).to(device)
    ddp_model = parallelize(model, d, parallel=cfg.train.parallel, compile=cfg.train.compile,
                            memory_budget=cfg.train.memory_budget)

    # 3. run folder: where, and whether it holds this configuration (nothing is written before the resume loads)
    run_dir = Path(cfg.train.results_dir) / run_name
    ckpt_dir = run_dir / "checkpoints"
    check_run_folder(run_dir, cfg)

    # 4. optimiser ------------------------------------------------------------------------------
    # fused: one kernel per step, and it skips a step on the device when told its gradients are not finite
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                            betas=tuple(cfg.optim.betas), fused=True)
    warm, total = max(cfg.optim.warmup_steps, 0), cfg.train.steps
    if cfg.optim.schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {cfg.optim.schedule!r}")

    def lr_factor(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        if cfg.optim.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    # 5. data -------------------------------------------------------------------------------------
    batches = StepBatches(len(source), cfg.train.global_batch, cfg.train.seed, d.rank, d.world)

    # 6. resume: load and check everything before the run folder is touched ------------------------------
    step = 0
    resume = cfg.train.resume
    found = None
    notes: list[str] = []  # logged once the run folder exists
    if resume == "auto":
        found = latest_checkpoint(ckpt_dir, log=notes.append)
        if found is None:
            notes.append(f"train.resume=auto: no loadable checkpoint in {ckpt_dir}; starting fresh at step 0")
    elif resume:
        found = (Path(resume), load_checkpoint(resume))
    train_flops = 0.0  # training FLOPs so far, all ranks: 3x each forward's (backward ~ 2x forward)
    if found is not None:
        path, state = found
        diff = config_differences(state["config"], cfg)
        if diff:
            raise ValueError(f"checkpoint {path} was written by another configuration ({'; '.join(diff)}); nothing "
                             "was written. Resume it with the settings it was trained with (the 'config' in its "
                             "state.json), or train this configuration from scratch without train.resume.")
        load_training_state(model, opt, state["model"], state["opt"])
        ema.load_state_dict(state["ema"])
        sched.load_state_dict(state["sched"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        train_flops = float(state.get("train_flops", 0.0))
        notes.append(f"resumed from {path} at step {step}")
        old_steps = state["config"].get("train", {}).get("steps", cfg.train.steps)
        if old_steps != cfg.train.steps and cfg.optim.schedule == "cosine":
            notes.append(f"warning: the cosine schedule now ends at train.steps={cfg.train.steps}, but steps up to "
                         f"{step} followed one ending at {old_steps}: this run will not repeat a straight "
                         f"{cfg.train.steps}-step run. To split a run exactly, keep train.steps and stop early with "
                         "train.stop_at.")
    barrier(d)  # every rank has read its checkpoint before rank 0 moves any aside
    log_file = None
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        log_file = files.enter_context(open(run_dir / "log.txt", "a"))
    _log(d, log_file, f"run folder {run_dir} | {cfg.model.name} {n_params / 1e6:.2f}M params | "
                      f"world {d.world} on {device} | data {cfg.data.dataset} ({len(source)} samples)")
    for note in notes:
        _log(d, log_file, note)
    if d.is_main:
        moved = set_aside_after(ckpt_dir, step)  # later checkpoints are another branch: out of pruning's way
        if moved is not None:
            _log(d, log_file, f"this run continues from step {step}: the {len(moved[1])} later checkpoint(s) "
                              f"({', '.join(p.name for p in moved[1])}) moved to {moved[0]}")
        trim_metrics(run_dir / "metrics.jsonl", step)
    count = cfg.train.count_flops or cfg.train.max_tflops > 0 or any(q == "tflops" for _, q, _ in snapshots)
    if count and cfg.train.compile:
        raise ValueError("train.max_tflops / train.count_flops count FLOPs with module hooks, which would recompile a "
                         "torch.compile'd model every step: train eagerly, or stop on train.max_minutes / train.steps")

    def checkpoint() -> Path | None:
        model_sd, opt_sd = model_state(model), optimizer_state(model, opt)  # collectives under FSDP2
        if not d.is_main:
            return None
        state = {
            "model": model_sd, "ema": ema.state_dict(), "opt": opt_sd,
            "sched": sched.state_dict(), "step": step, "rng": rng_state(), "data": batches.position(step),
            "config": to_dict(cfg), "train_flops": train_flops,
        }
        return save_checkpoint(state, ckpt_dir, step, keep=cfg.train.keep_checkpoints)

    # 7. loop ----------------------------------------------------------------------------------------
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())
    null_class = model.null_class
    p_drop = model.label_dropout if null_class is not None else 0.0
    sample_shape = source.sample_shape
    progress = _progress(d, cfg.train.steps, step)
    t0, t_last, steps_since = time.time(), time.time(), 0
    first_step, compile_seconds = step, None
    running: dict[str, float] = {}
    skipped = torch.zeros((), dtype=torch.long, device=device)  # steps skipped for non-finite values, and the first
    first_skipped = torch.full((), -1, dtype=torch.long, device=device)
    model.train()
    while step < cfg.train.steps:
        # the global batch's randomness, identical on every rank; this rank takes its slice
        g = torch.Generator(device="cpu").manual_seed(cfg.train.seed * 1_000_003 + step)
        B, b, r = cfg.train.global_batch, batches.local_batch, d.rank
        t_all = diffusion.sample_timesteps(B, torch.device("cpu"), generator=g)
        noise_all = torch.randn((B, *sample_shape), generator=g)
        drop_all = torch.rand(B, generator=g) < p_drop
        sl = slice(r * b, (r + 1) * b)
        try:
            x0, y = (v.to(device, non_blocking=True) for v in source.get(batches.indices(step)))
        except DataError as err:  # a file that went bad mid-run: keep the finished steps, then stop
            checkpoint()
            raise DataError(f"{err} (step {step}); the {step} finished steps are checkpointed in {ckpt_dir}. "
                            "Fix or remove the file, then continue with train.resume=auto") from err
        t, noise, drop = t_all[sl].to(device), noise_all[sl].to(device), drop_all[sl].to(device)
        x_t, _ = diffusion.q_sample(x0, t, noise)
        rho = model.budget.training_rho(step) if (chunking and cfg.budget.multi_budget) else 0.0

        distill = teacher is not None and step < cfg.upcycle.distill_steps
        label_drop = drop if null_class is not None else None
        try:
            with autocast, (cf.flops.FlopCounter(model) if count else nullcontext()) as counter:
                kwargs = {"rho": rho} if chunking else {}
                if chunking and cfg.train.compile:  # a (B,) tensor: every new float would be a recompile
                    kwargs["rho"] = torch.full((x_t.shape[0],), rho, device=device)
                if distill:
                    kwargs["block_outputs"] = True
                out, info = ddp_model(x_t, diffusion.model_timesteps(t), y, return_info=True,
                                      label_drop=label_drop, **kwargs)
                distill_loss = (teacher.distillation_loss(info, x_t, diffusion.model_timesteps(t), y, label_drop)
                                if distill else torch.zeros((), device=device))
            losses = diffusion.training_losses(out.float(), x0, x_t, t, noise)
            loss = (losses["loss"].mean() + cfg.budget.ratio_weight * info.ratio_loss
                    + cfg.upcycle.distill_weight * distill_loss.float())
            orient = cfg.budget.orient_steps == 0 or step < cfg.budget.orient_steps
            if chunking and cfg.budget.orient_weight > 0 and orient:  # the router's side: keep the detail
                loss = loss + cfg.budget.orient_weight * cf.routing.orientation_loss(
                    info.router.probs, cf.routing.unpredictability(x_t, info.router.grid),
                    1.0 / model.budget.target_ratio)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except torch.OutOfMemoryError as err:
            out = info = losses = loss = distill_loss = None  # free this step's graph before saving
            opt.zero_grad(set_to_none=True)
            if d.world == 1:  # the weights are those of the last finished step; with several processes the
                checkpoint()  # others may still be in a collective, so only the periodic checkpoints stand
            saved = "last good state checkpointed" if d.world == 1 else "periodic checkpoints"
            hint = _oom_hint(model, cfg.train.memory_budget if cfg.train.compile else None)
            raise torch.OutOfMemoryError(f"out of memory at step {step} (batch {batches.local_batch} per process); "
                                         f"{saved} in {ckpt_dir}. {hint}") from err
        grad_norm = full_tensors([torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)])[0]
        # A step whose loss or gradients are not finite changes no weight and no optimiser state: fused AdamW
        # skips it on the device (GradScaler's found_inf protocol). The host reads the count at the next log
        # step, so no step waits for the device. The norm is the same on every rank; the loss is this rank's.
        bad = ~torch.isfinite(grad_norm)
        if d.world == 1:
            bad = bad | ~torch.isfinite(loss.detach())
        opt.found_inf = bad.float()
        opt.step()
        skipped += bad
        first_skipped = torch.where(bad & (first_skipped < 0), step, first_skipped)
        sched.step()
        decay = cfg.optim.ema_decay
        if cfg.optim.ema_warmup:
            decay = min(decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, full_tensors(model_params), 1.0 - decay)
        step += 1
        steps_since += 1
        if count:  # every rank's forward, summed (one all-reduce per step when counting under torchrun)
            local = counter.total
            train_flops += 3 * (all_reduce_mean(torch.tensor(local, device=device), d).item() * d.world
                                if d.enabled else local)
        if cfg.train.compile and step == first_step + 1:  # the first compiled step is mostly compilation:
            compile_seconds = time.time() - t0                # the budget's clock starts after it
            t0 = time.time()
        stop = _budget_spent(cfg, time.time() - t0, train_flops, d, device)
        stop_at = step == cfg.train.stop_at < cfg.train.steps  # only when reached, not when resumed past
        stop = stop or stop_at

        # bookkeeping (host syncs only here, every log_every steps)
        for k, v in (("loss", losses["loss"].mean()), ("mse", losses["mse"].mean()),
                     ("ratio_loss", info.ratio_loss), ("kept_fraction", info.kept.float().mean() / info.tokens),
                     ("distill", distill_loss),
                     ("grad_norm", grad_norm)):
            running[k] = running.get(k, 0.0) + v.detach().float()
        if progress is not None:
            progress.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps or stop:
            if skipped.item():
                checkpoint()
                raise FloatingPointError(
                    f"the loss or its gradients were not finite at step {first_skipped.item()} ({skipped.item()} "
                    f"step(s) up to step {step}, each skipped: no weight changed); the state at step {step} is "
                    f"checkpointed in {ckpt_dir}. Lower optim.lr or check the data.")
            now = time.time()
            stats = {k: all_reduce_mean(v / steps_since, d).item() for k, v in running.items()}
            stats.update(step=step, rho=rho, lr=sched.get_last_lr()[0], steps_per_sec=steps_since / (now - t_last))
            if probe is not None:
                model.eval()
                with torch.no_grad(), autocast:
                    stats.update({k: float(v) for k, v in probe(model, step).items()})
                model.train()
                t0 += time.time() - now  # the probe's time is not training time
                now = time.time()
            if count:
                stats["train_tflops"] = train_flops / 1e12
            if d.is_main:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(stats) + "\n")
                line = (f"step {step:>7d} | loss {stats['loss']:.4f} | ratio {stats['ratio_loss']:.3f} | "
                        f"kept {stats['kept_fraction']:.1%} | {stats['steps_per_sec']:.2f} steps/s")
                if progress is not None:
                    progress.set_postfix_str(line.split("| ", 1)[1])
                    if log_file is not None:
                        log_file.write(line + "\n")
                        log_file.flush()
                else:
                    _log(d, log_file, line)
            running, steps_since, t_last = {}, 0, now
        if snapshots and d.is_main:
            reached = {"step": step, "minutes": (time.time() - t0) / 60, "tflops": train_flops / 1e12}
            for mark in [m for m in snapshots if reached[m[1]] >= m[2]]:
                snapshots.remove(mark)
                saving = time.time()
                save_weights(ema, run_dir / "snapshots" / mark[0])
                with open(run_dir / "snapshots" / "snapshots.jsonl", "a") as f:
                    f.write(json.dumps({"mark": mark[0], **reached, "counted_flops": count}) + "\n")
                t0 += time.time() - saving  # saving is not training time
        if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps or stop:
            checkpoint()
        if stop:
            why = "train.stop_at reached" if stop_at else "training budget spent"
            _log(d, log_file, f"{why} at step {step} ({(time.time() - t0) / 60:.2f} min"
                              + (f", {train_flops / 1e12:.3f} TFLOPs" if count else "") + "); stopping")
            break
        if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step < cfg.train.steps and d.is_main:
            sample_images(ema, diffusion, cfg, run_dir / "samples" / f"step-{step:07d}.png", device=device,
                          num=cfg.train.num_sample_images)
            if chunking:
                plot_router_maps(ema, diffusion, cfg, source, run_dir / "figures" / f"boundary-maps-{step:07d}.png",
                                 device=device)
    if progress is not None:
        progress.close()
    barrier(d)

    # 8. final samples, figures and metrics ----------------------------------------------------------
    if not d.is_main:
        return {}
    wall = time.time() - t0
    save_weights(ema, run_dir / "final")
    metrics = make_report_figures(ema, diffusion, cfg, run_dir, device=device, source=source)
    metrics.update(step=step, wall_seconds=wall, params=n_params, run_dir=str(run_dir))
    if compile_seconds is not None:
        metrics["first_step_seconds"] = compile_seconds  # compilation and the first step, outside wall_seconds
    if count:
        metrics["train_tflops"] = train_flops / 1e12
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _log(d, log_file, f"done in {wall / 60:.1f} min. Outputs in {run_dir}/:")
    for key in ("samples", "boundary_maps", "kept_vs_timestep", "flops_by_component"):
        if key in metrics:
            _log(d, log_file, f"  {key:<20} {metrics[key]}")
    _log(d, log_file, f"  {'metrics':<20} {run_dir / 'metrics.json'}")
    if log_file is not None:
        log_file.close()
    return metrics


def check_run_folder(run_dir: Path, cfg: Recipe) -> None:
    """Refuse a run folder whose ``config.json`` is another configuration (see :func:`recipes.config.identity`)."""
    saved = run_dir / "config.json"
    if not saved.is_file():
        return
    try:
        diff = config_differences(json.loads(saved.read_text()), cfg)
    except (ValueError, TypeError, KeyError) as err:
        diff = [f"its config.json cannot be read ({err})"]
    if diff:
        raise ValueError(f"{run_dir} holds a run of another configuration ({'; '.join(diff)}); nothing was written. "
                         f"To continue that run, repeat its settings ({saved}) with train.resume=auto. To run this "
                         "configuration, leave train.run_name unset (each configuration gets its own folder), name "
                         "a new one, or delete the folder.")


def trim_metrics(path: Path, step: int) -> None:
    """Drop the ``metrics.jsonl`` lines of steps after ``step`` (they are about to be run again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(path)


def save_weights(model: torch.nn.Module, directory: Path) -> Path:
    """``save_pretrained`` for chunkformer models (``create_model(directory)`` rebuilds them); only
    ``model.safetensors`` for wrapped / upcycled ones (rebuild with the run's recipe, then ``load_weights``)."""
    if hasattr(model, "config"):
        return cf.save_pretrained(model, directory)
    from chunkformer.models.checkpoint import save_weights as save_state

    return save_state(model, directory)


SNAPSHOT_UNITS = {"min": "minutes", "steps": "step", "tflops": "tflops"}


def parse_snapshots(marks) -> list[tuple[str, str, float]]:
    """``("2.5min", "1500steps", "9000tflops")`` -> ``[(mark, quantity, value)]``, in the order given."""
    out = []
    for mark in marks:
        text = str(mark).strip().lower()
        unit = next((u for u in SNAPSHOT_UNITS if text.endswith(u)), None)
        try:
            value = float(text[: -len(unit)]) if unit else float("nan")
        except ValueError:
            value = float("nan")
        if unit is None or not value > 0:
            raise ValueError(f"train.snapshots: cannot read {mark!r}; write a positive number followed by "
                             f"'min', 'steps' or 'tflops', e.g. ['2.5min', '1500steps', '9000tflops']")
        out.append((str(mark), SNAPSHOT_UNITS[unit], value))
    return out


def _budget_spent(cfg: Recipe, seconds: float, train_flops: float, d: Dist, device) -> bool:
    """Whether ``train.max_minutes`` / ``train.max_tflops`` is reached (rank 0 decides for all ranks)."""
    if not (cfg.train.max_minutes > 0 or cfg.train.max_tflops > 0):
        return False
    spent = (cfg.train.max_minutes > 0 and seconds >= 60 * cfg.train.max_minutes) or (
        cfg.train.max_tflops > 0 and train_flops >= 1e12 * cfg.train.max_tflops)
    if not d.enabled:  # one process: no device round trip
        return spent
    flag = torch.tensor(float(spent) if d.is_main else 0.0, device=device)
    return all_reduce_mean(flag, d).item() > 0  # rank 0's decision, seen by every rank


def _progress(d: Dist, total: int, initial: int):
    """A tqdm bar on rank 0 when attached to a terminal; ``None`` otherwise (lines are logged)."""
    if not d.is_main or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    with usage_errors(p):  # a bad key or value: one line and exit status 2, before any work
        cfg = apply_overrides(get_recipe(args.recipe), args.overrides)
        run = not (args.print_config or args.dry_run)
        validate(cfg, data=run, outputs=run)
    if args.print_config:
        print(to_yaml(cfg))
        return {}
    try:
        return train(cfg, dry_run=args.dry_run)
    except DataError as err:  # an unreadable image: its path, without a traceback (exit status 1)
        p.exit(1, f"{p.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
