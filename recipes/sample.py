"""Sample from a trained model: a PNG grid, and for evaluation an .npz of uint8 samples + a JSON of every setting.

    python -m recipes.sample --ckpt results/tiny-cpu-DC-DiT-tiny --num-samples 64
    python -m recipes.sample --ckpt results/run/checkpoints/step-0005000 --num-samples 5000 \\
        --sampler ddim --steps 50 --guidance 1.5 --uncond-rho 0.9 --rho 0.2 --out samples/run-rho0.2
    torchrun --nproc_per_node 8 -m recipes.sample --ckpt ... --num-samples 50000   # each rank a share, merged on rank 0
    python -m recipes.sample --ckpt ... --precision bf16 --capacity 256 --fill --compile      # fast sampling on a GPU
    python -m recipes.sample --ckpt ... --precision bf16 --bf16-routing --capacity 256 --fill --compile   # fastest

``--ckpt`` takes a run folder (its newest checkpoint), a checkpoint file, or a
``save_pretrained`` directory. EMA weights are used unless ``--no-ema``. Writes
``OUT.png`` (a grid of the first 64), ``OUT.npz`` (``samples``: uint8 ``(N, H, W, C)``,
``labels``) and ``OUT.json`` (checkpoint, EMA, sampler, steps, guidance, rho, Lite-CFG rho,
seed, kept-token fraction, TFLOPs per image).

Speed (docs/performance.md has the figures): ``--precision bf16`` casts the weights to bf16 once
(DC-DiT's fp32 router and de-chunk stay fp32) and samples under bf16 autocast; ``--capacity N``
samples a DC-DiT with fixed-capacity plans (at most ``N`` tokens per sample, static shapes, no
host sync; ``--fill``: exactly ``N``, attention without a mask); ``--compile`` compiles the model
once (it needs those static shapes for a DC-DiT), ``--compile-option KEY=VALUE`` with an inductor
setting. ``--bf16-routing`` (with ``--precision bf16``) runs the router and de-chunk under the bf16
autocast too, instead of DC-DiT's fp32
(:func:`chunkformer.kernels.set_fp32_router_dechunk`): the serving configuration of docs/performance-log.md.
On CUDA the model samples with :func:`chunkformer.kernels.apply`'s fast paths; ``--no-kernels`` samples the
plain model.
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

import chunkformer as cf
from chunkformer import kernels
from chunkformer.diffusion import FlowMatching, create_diffusion
from chunkformer.viz import save_image_grid
from recipes.checkpoints import is_checkpoint, latest_checkpoint, load_checkpoint
from recipes.config import config_differences, from_dict
from recipes.data import to_display
from recipes.parallel import barrier, init_distributed
from recipes.sampling import check_compilable, generate, parse_compile_options
from recipes.train import build_model
from recipes.validate import usage_errors

__all__ = ["main", "load_for_sampling", "set_serving_plan", "to_uint8"]


def load_for_sampling(ckpt: str, *, ema: bool = True, device="cpu"):
    """``(model, diffusion, recipe_or_None, resolved_path)`` from a run folder, checkpoint or pretrained dir.

    A run folder gives its newest checkpoint that verifies, which must have been written by the configuration
    in the folder's ``config.json``: a folder whose checkpoints are of another configuration is refused.
    """
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt {path} does not exist: pass a run folder, a checkpoints/step-NNNNNNN "
                                "folder (or legacy .pt) or a save_pretrained folder")
    if not is_checkpoint(path) and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        model = cf.create_model(str(path)).to(device).eval()
        learn_sigma = model.out_channels != model.in_channels
        return model, create_diffusion("ddpm", learn_sigma=learn_sigma), None, path
    if is_checkpoint(path):
        state = load_checkpoint(path)
    else:
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = latest_checkpoint(ckpt_dir)
        if found is None:
            raise FileNotFoundError(f"no loadable checkpoint under {ckpt_dir}")
        path, state = found
        run_config = ckpt_dir.parent / "config.json" if ckpt_dir.name == "checkpoints" else ckpt_dir / "config.json"
        if run_config.is_file():
            diff = config_differences(json.loads(run_config.read_text()), state["config"])
            if diff:
                raise ValueError(f"{path} was written by another configuration than {run_config} "
                                 f"({'; '.join(diff)}): this run folder mixes runs. Pass the checkpoint you mean "
                                 "with --ckpt (a checkpoints/step-NNNNNNN folder), or the run's final/ folder.")
    cfg = from_dict(state["config"])
    model = build_model(cfg, None, None, torch.device(device))
    model.load_state_dict(state["ema" if ema else "model"])
    diffusion = create_diffusion(cfg.diffusion.kind, num_timesteps=cfg.diffusion.num_timesteps,
                                 schedule=cfg.diffusion.schedule, learn_sigma=model.out_channels != model.in_channels)
    return model.eval(), diffusion, cfg, path


def set_serving_plan(model, capacity: int | None, *, fill: bool = False) -> None:
    """Switch a DC-DiT to fixed-capacity plans of ``capacity`` tokens per sample (``fill``: exactly that many);
    ``None`` leaves the model's own plans. Raises for a model that does not chunk or a capacity off its grid."""
    if capacity is None:
        if fill:
            raise ValueError("--fill needs --capacity N (the tokens every sample keeps)")
        return
    if not getattr(model, "supports_chunking", False):
        raise ValueError(f"--capacity sets a DC-DiT's token budget; {type(model).__name__} does not chunk")
    L = math.prod(model.grid)
    if not 1 <= capacity <= L:
        raise ValueError(f"--capacity must be in [1, {L}] (the grid has {L} positions), got {capacity}")
    model.set_plan(mode="fixed", capacity=capacity, fill=fill)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in ``[-1, 1]`` -> ``(N, H, W, C)`` uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m recipes.sample", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="run folder, checkpoint file or save_pretrained directory")
    p.add_argument("--out", default="", help="output stem (default: <run>/samples/eval-...)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--sampler", default=None, help="ddpm | ddim | euler (default: the recipe's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--rho", type=float, default=0.0, help="tail-drop fraction (elastic inference)")
    p.add_argument("--uncond-rho", type=float, default=None, help="Lite-CFG: rho of the unconditional half")
    p.add_argument("--merge-ratio", type=float, default=0.0, help="token merging ratio per block (0 = off)")
    p.add_argument("--cache-threshold", type=float, default=0.0, help="step-caching threshold (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-label", type=int, default=None, help="sample one class only")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: weights cast once (fp32 router / de-chunk kept), bf16 autocast")
    p.add_argument("--bf16-routing", action="store_true",
                   help="with --precision bf16: router and de-chunk under bf16 autocast too (DC-DiT: fp32)")
    p.add_argument("--capacity", type=int, default=None,
                   help="DC-DiT: fixed-capacity plans of at most N tokens per sample (static shapes)")
    p.add_argument("--fill", action="store_true", help="with --capacity: every sample keeps exactly N tokens")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (DC-DiT: needs --capacity)")
    p.add_argument("--no-kernels", action="store_true",
                   help="sample the plain model: no GPU fast paths (chunkformer.kernels.apply, on by default on CUDA)")
    p.add_argument("--compile-option", action="append", default=[], metavar="KEY=VALUE",
                   help="with --compile: an inductor setting for it (a torch._inductor.config name and a Python "
                        "literal), e.g. inplace_buffers=False; repeatable")
    args = p.parse_args(argv)

    for flag, value, lo in (("--num-samples", args.num_samples, 1), ("--batch", args.batch, 1),
                            ("--steps", args.steps, 1), ("--capacity", args.capacity, 1)):
        if value is not None and value < lo:
            p.error(f"{flag} must be >= {lo}, got {value}")
    for flag, value in (("--rho", args.rho), ("--uncond-rho", args.uncond_rho), ("--merge-ratio", args.merge_ratio)):
        if value is not None and not 0 <= value < 1:
            p.error(f"{flag} must be in [0, 1), got {value}")
    if not math.isfinite(args.guidance):
        p.error(f"--guidance must be a finite number (1 = no guidance), got {args.guidance}")
    if not args.cache_threshold >= 0:
        p.error(f"--cache-threshold must be >= 0 (0 = off), got {args.cache_threshold}")
    if not Path(args.ckpt).exists():
        p.error(f"--ckpt {args.ckpt}: no such file or folder (give a run folder, a checkpoint file or a "
                "save_pretrained folder)")
    if args.bf16_routing and args.precision != "bf16":
        p.error("--bf16-routing needs --precision bf16 (in fp32 the router and de-chunk run fp32 either way)")
    if args.compile_option and not args.compile:
        p.error("--compile-option sets up --compile: pass --compile too")
    try:
        compile_options = parse_compile_options(args.compile_option)
    except ValueError as e:
        p.error(str(e))
    d = init_distributed()
    with usage_errors(p, FileNotFoundError):
        model, diffusion, cfg, path = load_for_sampling(args.ckpt, ema=not args.no_ema, device=d.device)
    # settings that depend on the model: refused before any sampling work
    with usage_errors(p, ValueError):
        set_serving_plan(model, args.capacity, fill=args.fill)
        if args.compile:
            try:
                check_compilable(model)  # a packed DC-DiT would recompile at every step
            except ValueError:
                raise ValueError("--compile needs static shapes: for this DC-DiT pass --capacity N (tokens per "
                                 "sample, e.g. a quarter of the grid) and optionally --fill") from None
        if args.bf16_routing:
            kernels.set_fp32_router_dechunk(model, False)  # raises for a model that does not route
    num_classes = model.num_classes
    if args.class_label is not None and not 0 <= args.class_label < num_classes:
        p.error(f"--class-label must be in [0, {num_classes - 1}] (this model has {num_classes} classes), "
                f"got {args.class_label}")
    sampler = args.sampler or (cfg.diffusion.sampler if cfg else "ddpm")
    accepted = ("euler",) if isinstance(diffusion, FlowMatching) else ("ddpm", "ddim")
    if sampler not in accepted:
        p.error(f"--sampler {sampler}: this model's diffusion samples with {' or '.join(accepted)}")
    steps = args.steps if args.steps is not None else (cfg.diffusion.sample_steps if cfg else 250)
    if args.precision == "bf16":
        model.to(torch.bfloat16)  # FP32Module keeps DC-DiT's router and de-chunk residual in fp32
    labels = torch.full((args.num_samples,), args.class_label) if args.class_label is not None else torch.arange(args.num_samples) % num_classes
    share = torch.arange(args.num_samples)[d.rank :: d.world]  # this rank's samples (interleaved, stable per seed)
    out = generate(model, diffusion, num=len(share), shape=(model.in_channels, *model.grid), num_classes=num_classes,
                   device=d.device, seed=args.seed * 1000 + d.rank, sampler=sampler, steps=steps,
                   guidance=args.guidance, rho=args.rho, uncond_rho=args.uncond_rho, labels=labels[share],
                   batch_size=args.batch, progress=d.is_main, merge_ratio=args.merge_ratio,
                   cache_threshold=args.cache_threshold,
                   autocast=torch.bfloat16 if args.precision == "bf16" else None, compile=args.compile,
                   compile_options=compile_options, fast_paths=not args.no_kernels)
    stem = Path(args.out) if args.out else Path(path).parent.parent / "samples" / (
        f"eval-{sampler}{steps}-g{args.guidance:g}-rho{args.rho:g}" + (f"-u{args.uncond_rho:g}" if args.uncond_rho is not None else "")
        + (f"-m{args.merge_ratio:g}" if args.merge_ratio else "") + (f"-c{args.cache_threshold:g}" if args.cache_threshold else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    part = stem.with_name(stem.name + f".rank{d.rank}.pt")
    torch.save({"samples": out["samples"], "labels": out["labels"], "index": share, "kept": out["kept_fraction"],
                "tflops": out["tflops_per_image"], "skipped": out["skipped_steps"]}, part)
    barrier(d)
    if not d.is_main:
        return {}
    parts = [torch.load(stem.with_name(stem.name + f".rank{r}.pt"), weights_only=True) for r in range(d.world)]
    order = torch.cat([q["index"] for q in parts]).argsort()
    samples = torch.cat([q["samples"] for q in parts])[order]
    samples = to_display(samples, cfg.data.pixel_unshuffle if cfg else 1)  # undo space-to-depth
    if cfg is not None and cfg.data.dataset == "latents":  # decode with the VAE recorded beside the cache
        from recipes.extract_latents import decode

        samples = decode(samples, cfg.data.path, device=d.device)
    labels_out = torch.cat([q["labels"] for q in parts])[order]
    for r in range(d.world):
        stem.with_name(stem.name + f".rank{r}.pt").unlink()
    np.savez(stem.with_name(stem.name + ".npz"), samples=to_uint8(samples), labels=labels_out.numpy())
    save_image_grid(samples[:64].clamp(-1, 1), stem.with_name(stem.name + ".png"))
    settings = {
        "checkpoint": str(path), "ema": not args.no_ema, "sampler": sampler, "steps": steps,
        "guidance": args.guidance, "rho": args.rho, "uncond_rho": args.uncond_rho, "seed": args.seed,
        "merge_ratio": args.merge_ratio, "cache_threshold": args.cache_threshold,
        "precision": args.precision, "bf16_routing": args.bf16_routing, "capacity": args.capacity, "fill": args.fill,
        "compile": args.compile, "compile_options": compile_options,
        "skipped_steps": float(np.mean([q["skipped"] for q in parts])),
        "num_samples": args.num_samples, "world_size": d.world,
        "kept_fraction": float(np.mean([q["kept"] for q in parts])),
        "tflops_per_image": float(np.mean([q["tflops"] for q in parts])),
        "npz": str(stem.with_name(stem.name + ".npz")), "grid": str(stem.with_name(stem.name + ".png")),
    }
    stem.with_name(stem.name + ".json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {settings['npz']} ({args.num_samples} samples), {settings['grid']}, {stem.with_name(stem.name + '.json')} | "
          f"kept {settings['kept_fraction']:.1%} | {settings['tflops_per_image']:.4f} TFLOPs/image")
    return settings


if __name__ == "__main__":
    main()
