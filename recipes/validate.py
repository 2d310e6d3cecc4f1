"""Check a recipe before any work: every typed setting against its accepted range or values.

    validate(cfg)          # raises ConfigError naming the setting and what it accepts

:func:`validate` reads the file system only to look (a resume path, a data folder, whether the
results folder can be written); it creates nothing. ``recipes.train`` calls it before data
loads, models build or the run folder is made, and turns a :class:`ConfigError` into a one-line
usage error (exit status 2), as argparse does for its own arguments.
"""

import argparse
import inspect
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["ConfigError", "validate", "usage_errors", "check_writable", "check_range"]


class ConfigError(ValueError):
    """A setting outside what it accepts; the message names the setting and the accepted values."""


def check_range(name: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False, integer=False,
                hint: str = "") -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number in the given interval."""
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value).is_integer()
    ok = ok and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if ok:
        return
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    raise ConfigError(f"{name}={value!r} is out of range: expected {kind} in {span}" + (f"; {hint}" if hint else ""))


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not accepted: expected one of {', '.join(map(repr, choices))}")


def check_writable(name: str, folder: str | Path) -> None:
    """Raise :class:`ConfigError` unless ``folder`` is, or could be made as, a writable directory."""
    path = Path(folder).absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{name}={str(folder)!r}: {probe} is a file, not a folder; choose another {name}")
    reason = "permission denied" if not os.access(probe, os.W_OK | os.X_OK) else None
    if reason is None:  # access() says yes to root everywhere: try a file, removed at once
        try:
            fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=probe)
            os.close(fd)
            os.unlink(tmp)
        except OSError as err:
            reason = err.strerror or type(err).__name__
    if reason is not None:
        raise ConfigError(f"{name}={str(folder)!r}: cannot write in {probe} ({reason}); choose a writable {name}")


def _model_keywords(name: str) -> set[str] | None:
    """Keyword names the model class of registered ``name`` accepts (``None``: not a registered name)."""
    from chunkformer.models.registry import _REGISTRY

    if name not in _REGISTRY:
        return None
    cls = _REGISTRY[name][0]
    accepted = {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "device", "dtype")}
    return accepted | {"pretrained"}  # create_model's own keyword


def validate(cfg, *, data: bool = True, outputs: bool = True) -> None:
    """Raise :class:`ConfigError` for the first setting of ``cfg`` (a :class:`~recipes.config.Recipe`) outside its
    range: counts and sizes, learning rate and weights, choices, the tail-drop fractions, and (``data``) the input
    paths (data, upcycling source), (``outputs``) the resume path and whether the results folder can be written.
    Writes nothing."""
    import chunkformer as cf

    m, d, o, f, b, u, t = cfg.model, cfg.data, cfg.optim, cfg.diffusion, cfg.budget, cfg.upcycle, cfg.train

    # model
    if not isinstance(m.overrides, dict):
        raise ConfigError(f"model.overrides must be a mapping of create_model keywords, got {m.overrides!r}")
    if u.source:
        from recipes.train import WRAP_OPTIONS

        unknown = sorted(set(m.overrides) - set(WRAP_OPTIONS))
        if unknown:
            raise ConfigError(f"model.overrides.{unknown[0]}: when upcycling, model.overrides are chunkformer.wrap "
                              f"options ({', '.join(WRAP_OPTIONS)}); the rest comes from upcycle.source")
    elif not (Path(m.name) / "config.json").is_file():  # a save_pretrained folder takes its own config
        accepted = _model_keywords(m.name)
        if accepted is None:
            raise ConfigError(f"model.name={m.name!r} is not a registered model: expected one of "
                              f"{', '.join(cf.list_models())}")
        unknown = sorted(set(m.overrides) - accepted)
        if unknown:
            raise ConfigError(f"model.overrides.{unknown[0]} is not a {m.name} setting: accepted keys are "
                              f"{', '.join(sorted(accepted))}")
        for key in ("depth", "hidden_size", "num_heads", "num_classes", "in_channels", "capacity"):
            if m.overrides.get(key) is not None:
                check_range(f"model.overrides.{key}", m.overrides[key], lo=1, integer=True)
    for key, choices in (("router", cf.routing.ROUTER_KINDS), ("router_init", cf.routing.ROUTER_INITS),
                         ("gate_grad", cf.routing.GATE_GRADS)):
        if m.overrides.get(key) is not None:
            check_choice(f"model.overrides.{key}", m.overrides[key], choices)

    # data
    check_choice("data.dataset", d.dataset, ("mnist", "folder", "latents"))
    if data and d.dataset == "folder" and not (d.path and Path(d.path).is_dir()):
        raise ConfigError(f"data.path={d.path!r}: data.dataset=folder needs an existing image folder "
                          "(one sub-folder per class)")
    if data and d.dataset == "latents" and not (Path(d.path) / "latents.safetensors").is_file():
        raise ConfigError(f"data.path={d.path!r} holds no latents.safetensors: write the cache with "
                          f"`python -m recipes.extract_latents --images DIR --vae VAE_DIR --out {d.path or 'DIR'}`")
    if data and d.dataset == "mnist" and d.path and not Path(d.path).is_file():
        raise ConfigError(f"data.path={d.path!r}: for data.dataset=mnist leave it empty (the built-in digits) "
                          "or name a mnist_5k.csv.gz file")
    check_range("data.image_size", d.image_size, lo=1, integer=True)
    check_range("data.pixel_unshuffle", d.pixel_unshuffle, lo=1, integer=True)
    check_range("data.limit", d.limit, lo=0, integer=True, hint="0 uses every sample")
    check_range("data.workers", d.workers, lo=0, integer=True)
    check_choice("data.bad_images", d.bad_images, ("error", "skip"))

    # optimiser
    check_range("optim.lr", o.lr, lo=0, lo_open=True)
    check_range("optim.weight_decay", o.weight_decay, lo=0)
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas={list(o.betas)!r}: expected two numbers in [0, 1), e.g. [0.9, 0.999]")
    for i, beta in enumerate(o.betas):
        check_range(f"optim.betas[{i}]", beta, lo=0, hi=1, hi_open=True)
    check_range("optim.grad_clip", o.grad_clip, lo=0, lo_open=True)
    check_range("optim.ema_decay", o.ema_decay, lo=0, hi=1)
    check_range("optim.warmup_steps", o.warmup_steps, lo=0, integer=True)
    check_choice("optim.schedule", o.schedule, ("constant", "cosine"))

    # diffusion
    check_choice("diffusion.kind", f.kind, ("ddpm", "flow"))
    check_range("diffusion.num_timesteps", f.num_timesteps, lo=1, integer=True)
    check_choice("diffusion.schedule", f.schedule, ("linear",) if f.kind == "flow" else ("linear", "cosine"))
    check_range("diffusion.sample_steps", f.sample_steps, lo=1, integer=True)
    check_choice("diffusion.sampler", f.sampler, ("euler",) if f.kind == "flow" else ("ddpm", "ddim"))

    # budget
    check_range("budget.ratio_weight", b.ratio_weight, lo=0)
    check_range("budget.group_size", b.group_size, lo=1, integer=True)
    check_range("budget.warmup_steps", b.warmup_steps, lo=0, integer=True)
    check_range("budget.orient_steps", b.orient_steps, lo=0, integer=True)
    check_range("budget.orient_weight", b.orient_weight, lo=0)
    if not b.fractions:
        raise ConfigError("budget.fractions is empty: expected at least one tail-drop fraction in [0, 1), e.g. [0.0]")
    for i, frac in enumerate(b.fractions):
        check_range(f"budget.fractions[{i}]", frac, lo=0, hi=1, hi_open=True,
                    hint="a tail-drop fraction of the kept tokens")

    # upcycling
    if data and u.source and not Path(u.source).exists():
        raise ConfigError(f"upcycle.source={u.source!r} does not exist: expected a save_pretrained folder, an "
                          "original-DiT .pt / .safetensors or a diffusers folder")
    check_range("upcycle.distill_steps", u.distill_steps, lo=0, integer=True)
    check_range("upcycle.distill_weight", u.distill_weight, lo=0)
    check_range("upcycle.num_heads", u.num_heads, lo=0, integer=True, hint="0 infers the heads from the width")

    # training
    check_range("train.steps", t.steps, lo=1, integer=True)
    check_range("train.global_batch", t.global_batch, lo=1, integer=True)
    check_choice("train.precision", t.precision, ("bf16", "fp32"))
    check_choice("train.parallel", t.parallel, ("ddp", "fsdp"))
    check_range("train.log_every", t.log_every, lo=1, integer=True)
    check_range("train.ckpt_every", t.ckpt_every, lo=1, integer=True)
    check_range("train.sample_every", t.sample_every, lo=0, integer=True, hint="0 samples only at the end")
    check_range("train.keep_checkpoints", t.keep_checkpoints, lo=0, integer=True, hint="0 keeps them all")
    check_range("train.num_sample_images", t.num_sample_images, lo=1, integer=True)
    check_range("train.max_minutes", t.max_minutes, lo=0, hint="0 = no limit")
    check_range("train.max_tflops", t.max_tflops, lo=0, hint="0 = no limit")
    check_range("train.memory_budget", t.memory_budget, lo=0, hi=1, lo_open=True,
                hint="the share of its activations a compiled step keeps; 1 keeps what torch.compile would")
    if t.memory_budget != 1 and not t.compile:
        raise ConfigError(f"train.memory_budget={t.memory_budget} sets what a compiled step keeps for "
                          "backward: expected train.compile=true with it (eager, a DC-DiT recomputes its "
                          "activations with train.checkpoint_scaffold and train.checkpoint_blocks)")
    check_range("train.cpu_threads", t.cpu_threads, lo=0, integer=True, hint="0 = torch's default")
    try:
        from recipes.train import parse_snapshots

        parse_snapshots(t.snapshots)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if "/" in t.run_name or t.run_name in (".", ".."):
        raise ConfigError(f"train.run_name={t.run_name!r}: expected a plain folder name (no '/')")
    if not outputs:
        return
    if t.resume not in ("", "auto") and not Path(t.resume).exists():
        raise ConfigError(f"train.resume={t.resume!r} does not exist: expected '' (start fresh), 'auto' (the "
                          "latest checkpoint of this run) or the path of a checkpoint file")
    check_writable("train.results_dir", t.results_dir)


@contextmanager
def usage_errors(parser: argparse.ArgumentParser, *errors: type[BaseException]) -> Iterator[None]:
    """Turn :class:`ConfigError` (and ``errors``) raised inside the block into ``parser.error``: one line on
    standard error and exit status 2. Other exceptions (bugs) keep their traceback."""
    try:
        yield
    except (ConfigError, *errors) as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        parser.error(message.replace("\n", " "))


