"""Shared by train / sample: generate images, and the figures that show what the router does.

* :func:`generate`: samples from a model with every setting explicit (sampler, steps,
  guidance, Lite-CFG, rho, seed), recording kept tokens per step and the FLOPs spent.
* :func:`sample_images`: a PNG grid from the EMA model during training.
* :func:`make_report_figures`: the end-of-run report: sample grid, boundary maps over
  timesteps, kept tokens versus timestep, FLOPs by component; returns the metrics.
"""

import ast
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

import chunkformer as cf
from chunkformer import kernels
from chunkformer.diffusion import FlowMatching, guided_model_fn
from chunkformer.flops import FlopCounter
from chunkformer.progress import Progress
from chunkformer.viz import (
    plot_boundary_maps,
    plot_flops_by_component,
    plot_kept_vs_timestep,
    save_image_grid,
)
from recipes.data import to_display
from recipes.label_agreement import classifier_for_run, label_agreement

__all__ = ["generate", "inductor_setting", "parse_compile_options", "sample_images", "plot_router_maps",
           "make_report_figures"]


@contextmanager
def _merging(model, ratio: float):
    """Token merging at ``ratio`` for the duration of a block (nothing at 0)."""
    if ratio > 0:
        cf.merging.apply(model, ratio=ratio)
    try:
        yield
    finally:
        if ratio > 0:
            cf.merging.remove(model)


@contextmanager
def _fast_paths(model, enabled: bool, device):
    """:func:`chunkformer.kernels.apply` for the duration of a block when sampling on CUDA (removed afterwards;
    a model already patched is left as it is)."""
    patch = enabled and torch.device(device).type == "cuda" and not kernels.applied(model)
    if patch:
        kernels.apply(model)
    try:
        yield
    finally:
        if patch:
            kernels.remove(model)


class _CountedForward:
    """A compiled model that adds a fixed per-sample FLOP count at every call (FlopCounter's hooks do not run
    inside a compiled graph); every other attribute is the model's, as the guidance closures expect."""

    def __init__(self, model, compiled, report: cf.flops.FlopReport) -> None:
        self._model, self._compiled = model, compiled
        self._per_sample = {name: value / report.batch for name, value in report.by_component.items()}
        self.total, self.by_component = 0.0, dict.fromkeys(report.by_component, 0.0)

    def __call__(self, x, *args, **kwargs):
        for name, value in self._per_sample.items():
            self.by_component[name] += value * x.shape[0]
        self.total = sum(self.by_component.values())
        return self._compiled(x, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def plan_mode(model) -> str:
    """The token layout of ``model``'s forwards: a chunking model's ``plan_mode``; ``"fixed"`` (static shapes)
    for a model that does not chunk. Anything but ``"fixed"`` changes shape with the router's choice."""
    return getattr(model, "plan_mode", "fixed") if getattr(model, "supports_chunking", False) else "fixed"


def check_compilable(model) -> None:
    """Raise unless every forward of ``model`` has the same shapes (what ``compile=True`` needs)."""
    mode = plan_mode(model)
    if mode != "fixed":
        raise ValueError(
            f"compiled sampling needs static shapes, but this DC-DiT plans {mode!r}: the kept-token count changes "
            "every step and each new count would compile another graph. Sample with fixed-capacity plans "
            "(recipes.sample --capacity N [--fill]; in Python model.set_plan(mode='fixed', capacity=N))")


def inductor_setting(key: str) -> tuple[object, str] | None:
    """``"triton.cudagraphs"`` -> ``(torch._inductor.config.triton, "cudagraphs")``, or None for a name the config
    does not have."""
    import torch._inductor.config as inductor_config

    *path, leaf = key.split(".")
    target = inductor_config
    for part in path:
        target = getattr(target, part, None)
    return (target, leaf) if target is not None and hasattr(target, leaf) else None


def parse_compile_options(items: list[str], flag: str = "--compile-option") -> dict:
    """``["inplace_buffers=False", "triton.cudagraphs=True"]`` -> ``{"inplace_buffers": False, ...}`` for
    ``torch.compile(options=...)``. Raises ``ValueError`` (naming ``flag``) for an item without ``=``, a value that
    is not a Python literal, or a name ``torch._inductor.config`` does not have."""
    options = {}
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        if inductor_setting(key) is None:
            raise ValueError(f"torch._inductor.config has no setting {key!r} (see torch._inductor.list_options())")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{flag} {key}: {value!r} is not a Python literal (True, 3, 'max')") from None
    return options


@torch.no_grad()
def generate(model, diffusion, *, num: int, shape: tuple[int, ...], num_classes: int, device,
             seed: int = 0, sampler: str = "ddpm", steps: int = 250, guidance: float = 1.0,
             rho: float = 0.0, uncond_rho: float | None = None, labels: torch.Tensor | None = None,
             batch_size: int = 64, progress: bool = False, merge_ratio: float = 0.0,
             cache_threshold: float = 0.0, autocast: torch.dtype | None = None, compile: bool = False,
             compile_options: dict | None = None, fast_paths: bool = True, count_flops: bool = True) -> dict:
    """Generate ``num`` samples; returns ``samples`` (N, C, *grid) float, ``labels``, ``kept_fraction``
    (mean over forwards and samples), ``kept_by_t`` (per-step means), ``tflops_per_image`` and
    ``skipped_steps`` (backbone passes step caching skipped, per batch on average).

    ``merge_ratio > 0`` applies token merging for the run (removed afterwards);
    ``cache_threshold > 0`` samples with a :class:`~chunkformer.StepCache`. ``autocast``: run every
    forward under ``torch.autocast`` to this dtype (``torch.bfloat16`` after casting the weights once:
    recipes.sample ``--precision bf16``). ``compile``: ``torch.compile`` the model for the run; it needs
    static shapes (DiT, or DC-DiT with ``plan_mode="fixed"``), so every forward does the same work, and
    FLOPs are counted once, eagerly, on the first batch and added per forward. ``compile_options``: inductor
    settings for that compile (``torch.compile(options=...)``; docs/recipes.md has one that steadies step times).
    ``fast_paths``: on a CUDA ``device``, sample with :func:`chunkformer.kernels.apply`'s GPU fast paths (removed
    afterwards; ``False`` samples the plain model). ``count_flops=False``: no FLOP counting (its hooks run the
    plain layers, not the fast paths): ``tflops_per_image`` is None, for timing a run."""
    model.eval()
    if num < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"num, steps and batch_size must be >= 1 (samples, sampling steps, samples per batch), "
                         f"got {num}, {steps}, {batch_size}")
    if compile_options and not compile:
        raise ValueError("compile_options apply to the compiled model: pass compile=True too")
    if compile:
        check_compilable(model)
        if cache_threshold > 0:
            raise ValueError("step caching decides on the host at every step; sample with compile=False")
    chunking = getattr(model, "supports_chunking", False)
    if labels is None:
        labels = torch.arange(num) % num_classes
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((num, *shape), generator=g)
    amp = torch.autocast(torch.device(device).type, dtype=autocast) if autocast is not None else nullcontext()
    with _fast_paths(model, fast_paths, device), _merging(model, merge_ratio), amp:
        compiled = None
        if compile:
            compiled = torch.compile(model, options=compile_options) if compile_options else torch.compile(model)
        if not count_flops:
            denoiser, counting = compiled or model, nullcontext()
        elif compile:  # a fixed plan's compute does not depend on the content: count one eager forward
            probe = noise[: min(batch_size, num)].to(device)
            report = cf.count_flops(model, probe, torch.zeros(len(probe), device=device),
                                    labels[: len(probe)].to(device))
            denoiser = counter = _CountedForward(model, compiled, report)
            counting = nullcontext(counter)
        else:
            denoiser, counting = model, FlopCounter(model)
        bar = Progress(math.ceil(num / batch_size) * steps, desc=f"sample {num} ({sampler})",
                       unit="step") if progress else False
        with counting as counter:
            outs, kept_rows, skipped = _sample_batches(
                denoiser, model, diffusion, noise, labels, num=num, shape=shape, device=device, sampler=sampler,
                steps=steps, guidance=guidance, rho=rho, uncond_rho=uncond_rho, batch_size=batch_size,
                progress=bar, cache_threshold=cache_threshold, chunking=chunking)
        if bar:
            bar.close()
    kept = torch.cat(kept_rows, dim=1)  # (forwards per sample, N or 2N with CFG)
    return {
        "samples": torch.cat(outs),
        "labels": labels,
        "kept_fraction": float(kept.mean()),
        "kept_by_step": kept.mean(1).tolist(),
        "tflops_per_image": counter.total / num / 1e12 if counter is not None else None,
        "skipped_steps": sum(skipped) / len(skipped),
        "flops_by_component": dict(counter.by_component) if counter is not None else {},
    }


def _sample_batches(denoiser, model, diffusion, noise, labels, *, num, shape, device, sampler, steps, guidance,
                    rho, uncond_rho, batch_size, progress, cache_threshold, chunking):
    """The batches of :func:`generate`: ``(samples, kept rows, skipped steps)`` per batch."""
    outs, kept_rows, skipped = [], [], []
    for start in range(0, num, batch_size):
        y = labels[start : start + batch_size].to(device)
        infos = []
        fn = guided_model_fn(denoiser, y, scale=guidance, null_class=getattr(model, "null_class", None),
                             rho=rho if chunking else None, uncond_rho=uncond_rho if chunking else None,
                             learn_sigma=model.out_channels != model.in_channels, on_info=infos.append)
        cache = cf.StepCache(model, cache_threshold) if cache_threshold > 0 else None
        x = diffusion.sample(fn, (y.shape[0], *shape), sampler=sampler, steps=steps,
                             noise=noise[start : start + batch_size].to(device), progress=progress,
                             device=device, cache=cache)
        skipped.append(cache.skipped if cache is not None else 0)
        outs.append(x.float().cpu())
        kept_rows.append(torch.stack([i.kept.float() / i.tokens for i in infos]).cpu())  # (steps, B')
    return outs, kept_rows, skipped


def sample_images(model, diffusion, cfg, path: Path, *, device, num: int = 16) -> Path:
    """An EMA sample grid during training (the recipe's sampler and step count, no guidance)."""
    shape = (model.in_channels, *model.grid)
    out = generate(model, diffusion, num=num, shape=shape, num_classes=model.num_classes,
                   device=device, sampler=cfg.diffusion.sampler, steps=cfg.diffusion.sample_steps,
                   seed=cfg.train.seed)
    return save_image_grid(to_display(out["samples"], cfg.data.pixel_unshuffle).clamp(-1, 1), path)


def _display_maps(x_t: torch.Tensor, mask: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and a (B, L) map at grid resolution -> both at display resolution."""
    B, _, H, W = x_t.shape
    grid_map = mask.float().reshape(B, 1, H, W)
    if r > 1:
        grid_map = grid_map.repeat_interleave(r, 2).repeat_interleave(r, 3)
    return to_display(x_t, r), grid_map.flatten(1)


@torch.no_grad()
def plot_router_maps(model, diffusion, cfg, source, path: Path, *, device) -> Path:
    """Boundary maps of four fixed real images at five noise levels (x_t above, kept tokens below)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(1234)
    idx = torch.randperm(len(source), generator=g)[:4]
    x0, y = (v.to(device) for v in source.get(idx))
    fractions = (0.9, 0.7, 0.5, 0.3, 0.1)
    r = cfg.data.pixel_unshuffle
    xs, masks = [], []
    for tv in _timestep_values(diffusion, fractions):
        dtype = torch.float32 if isinstance(tv, float) else torch.long
        t = torch.full((x0.shape[0],), tv, device=device, dtype=dtype)
        x_t, _ = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g).to(device))
        _, info = model(x_t, diffusion.model_timesteps(t), y, return_info=True)
        shown, mask = _display_maps(x_t.cpu(), info.router.mask.cpu(), r)
        xs.append(shown)
        masks.append(mask > 0.5)
    model.train(was_training)
    return plot_boundary_maps(xs, masks, fractions, path, title="x_t (top) and kept tokens (bottom); noise level")


def _timestep_values(diffusion, fractions) -> list:
    """Timesteps at the given fractions of the noise range (0 = clean, 1 = pure noise)."""
    if isinstance(diffusion, FlowMatching):
        return [float(f) for f in fractions]
    T = diffusion.num_timesteps
    return [int(round(f * (T - 1))) for f in fractions]


@torch.no_grad()
def make_report_figures(model, diffusion, cfg, run_dir: Path, *, device, source) -> dict:
    """Samples, boundary maps, kept-vs-timestep and FLOPs figures for a trained (EMA) model."""
    model.eval()
    figures = Path(run_dir) / "figures"
    chunking = getattr(model, "supports_chunking", False)
    shape = (model.in_channels, *model.grid)
    metrics: dict = {}

    # 1. samples: one class per row when the count allows it
    num, classes = cfg.train.num_sample_images, model.num_classes
    per_row = num // classes if classes and num >= classes and num % classes == 0 else None
    labels = torch.arange(classes).repeat_interleave(per_row) if per_row else None
    guidance = cfg.diffusion.guidance
    out = generate(model, diffusion, num=num, shape=shape, num_classes=classes, device=device,
                   sampler=cfg.diffusion.sampler, steps=cfg.diffusion.sample_steps, seed=cfg.train.seed,
                   guidance=guidance, labels=labels)
    r = cfg.data.pixel_unshuffle
    images = to_display(out["samples"], r).clamp(-1, 1)
    small = max(images.shape[-2:]) <= 32  # digits: shown 3x
    shown = images.repeat_interleave(3, -1).repeat_interleave(3, -2) if small else images
    metrics["samples"] = str(save_image_grid(shown, Path(run_dir) / "samples" / "final.png", nrow=per_row))
    metrics["sampling_kept_fraction"] = out["kept_fraction"]
    metrics["sampling_tflops_per_image"] = out["tflops_per_image"]
    metrics["sampler"] = {"sampler": cfg.diffusion.sampler, "steps": cfg.diffusion.sample_steps, "ema": True,
                          "guidance": guidance, "seed": cfg.train.seed}
    digits = cfg.data.dataset == "mnist" and tuple(images.shape[1:]) == (1, 32, 32)
    if digits and classes == 10 and num >= classes:
        clf, ceiling = classifier_for_run(run_dir)  # a small CNN trained on 4500 real digits
        metrics["label_agreement"] = label_agreement(clf, images, out["labels"])
        metrics["classifier_heldout_accuracy"] = ceiling  # the same judge on 500 held-out real digits
    if not chunking:
        return metrics

    # 2. boundary maps: real images at several noise levels (x_t above, kept tokens below)
    g = torch.Generator().manual_seed(1234)
    metrics["boundary_maps"] = str(plot_router_maps(model, diffusion, cfg, source, figures / "boundary_maps.png",
                                                    device=device))

    # 3. kept fraction versus timestep over many real images
    n = min(len(source), 512)
    idx = torch.randperm(len(source), generator=g)[:n]
    x0, y = (v.to(device) for v in source.get(idx))
    levels = torch.rand(n, generator=g)
    tvals = _timestep_values(diffusion, levels.tolist())
    t = torch.tensor(tvals, device=device)
    kept = []
    for s in range(0, n, 128):
        x_t, _ = diffusion.q_sample(x0[s : s + 128], t[s : s + 128], torch.randn(x0[s : s + 128].shape, generator=g).to(device))
        _, info = model(x_t, diffusion.model_timesteps(t[s : s + 128]), y[s : s + 128], return_info=True)
        kept.append(info.kept_fraction.cpu())
    kept = torch.cat(kept)
    metrics["kept_vs_timestep"] = str(plot_kept_vs_timestep(levels, kept, figures / "kept_vs_timestep.png"))
    clean, noisy = kept[levels < 0.2], kept[levels > 0.8]
    metrics["kept_fraction_clean"] = float(clean.mean()) if clean.numel() else None
    metrics["kept_fraction_noisy"] = float(noisy.mean()) if noisy.numel() else None

    # 4. FLOPs by component for one forward of one image at mid noise (t at half the schedule)
    t_mid = torch.tensor(_timestep_values(diffusion, [0.5]), device=device)
    x_mid, _ = diffusion.q_sample(x0[:1], t_mid, torch.randn(x0[:1].shape, generator=g).to(device))
    report = cf.count_flops(model, x_mid, diffusion.model_timesteps(t_mid), y[:1])
    kept_mid = float(report.kept[0]) / math.prod(model.grid)
    steps = cfg.diffusion.sample_steps
    title = (f"FLOPs by component, per forward of one image at mid noise (kept {kept_mid:.1%} of "
             f"{math.prod(model.grid)} tokens)\n{report.per_sample / 1e9:.3g} GFLOPs per forward; x {steps} "
             f"sampling steps at this kept fraction = {report.tflops_per_image(steps):.3g} TFLOPs per image")
    metrics["flops_by_component"] = str(plot_flops_by_component(report.by_component, figures / "flops_by_component.png",
                                                                title=title, xlabel="GFLOPs per forward, one image"))
    return metrics
