"""Recipes as typed configs: one dataclass tree, named presets, dotted ``key=value`` overrides.

    cfg = get_recipe("DC-DiT-S")                      # the paper's ImageNet-256 setting
    cfg = apply_overrides(cfg, ["train.steps=1000", "model.overrides.target_ratio=16"])
    print(to_yaml(cfg))                               # what --print-config shows

Presets: ``tiny-cpu`` (the README's main job: a small DC-DiT on the built-in digits, on a
2-core CPU in minutes), ``DC-DiT-{S,B,L,XL}`` and ``DiT-{S,B,L,XL}`` (the papers'
hyper-parameters: AdamW lr 1e-4, wd 0, clip 1.0, EMA 0.9999, global batch 256, ratio loss
0.03 with N = 4, multi-budget after warm-up, SD-VAE latents of ImageNet 256), and
``mnist-dcdit-s`` / ``mnist-dit-s`` (GPU-sized runs on the digits), and ``mnist-upcycle-dcdit-s``
(a DC-DiT-S upcycled from a finished ``mnist-dit-s`` run: ``upcycle.source``).
"""

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field

from recipes.validate import ConfigError, validate

__all__ = [
    "Recipe",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "DiffusionConfig",
    "BudgetConfig",
    "TrainConfig",
    "UpcycleConfig",
    "PRESETS",
    "get_recipe",
    "apply_overrides",
    "to_dict",
    "from_dict",
    "to_yaml",
    "RUN_CONTROL",
    "identity",
    "config_differences",
    "config_hash",
    "default_run_name",
]


@dataclass
class ModelConfig:
    name: str = "DC-DiT-S"  # any chunkformer.list_models() name
    overrides: dict = field(default_factory=dict)  # create_model(**overrides): input_size, num_classes, ...


@dataclass
class DataConfig:
    dataset: str = "mnist"  # "mnist" (built-in digits), "folder" (ImageFolder), "latents" (extracted cache)
    path: str = ""  # folder / latent cache for "folder" and "latents"
    image_size: int = 32  # pixel-space side for "folder" (center crop + resize)
    # space-to-depth factor r: (C, H, W) images -> (C r^2, H / r, W / r) grids, like a lossless "latent"
    # (r = 2 turns 1 x 32 x 32 digits into 4 x 16 x 16, the shape of SD-VAE latents of a 128px image)
    pixel_unshuffle: int = 1
    limit: int = 0  # use only the first N samples (0 = all); for over-fitting checks
    workers: int = 0  # DataLoader workers for "folder"
    # "folder": every image's header is checked before training; an unreadable one stops the run naming its
    # path ("error") or is left out, with a count ("skip")
    bad_images: str = "error"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    warmup_steps: int = 0  # linear learning-rate warm-up
    schedule: str = "constant"  # "constant" or "cosine" (decay to 0 at train.steps) after warm-up
    ema_warmup: bool = True  # EMA decay min(ema_decay, (1 + step) / (10 + step)): short runs don't sample from init


@dataclass
class DiffusionConfig:
    kind: str = "ddpm"  # "ddpm" (epsilon, learned-range variance) or "flow" (rectified flow)
    num_timesteps: int = 1000
    schedule: str = "linear"
    sample_steps: int = 250  # for periodic samples and recipes.sample defaults
    sampler: str = "ddpm"  # "ddpm", "ddim" or "euler" (flow)
    guidance: float = 1.0  # classifier-free guidance scale of the end-of-run samples (1 = none)


@dataclass
class BudgetConfig:
    ratio_weight: float = 0.03
    group_size: int = 16
    multi_budget: bool = True
    warmup_steps: int = 0  # steps at rho = 0 before multi-budget draws start
    fractions: tuple = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    # weight of chunkformer.routing.orientation_loss, a hinge asking the router's keep logits to rank the
    # input's unpredictable tokens (chunkformer.routing.unpredictability) above the rest; 0 = the paper's
    # losses only
    orient_weight: float = 0.0
    orient_steps: int = 0  # the prior's first steps only (0 = every step)


@dataclass
class UpcycleConfig:
    # a local pretrained DiT to build the DC-DiT on ("" = train from scratch): a chunkformer
    # save_pretrained folder, an original-DiT-layout .pt / .safetensors, or a diffusers folder
    source: str = ""
    distill_steps: int = 0  # warm-up steps that add the block-output distillation loss (frozen original)
    distill_weight: float = 1.0
    num_heads: int = 0  # heads of an original-DiT checkpoint of unregistered width (0: from its width)


@dataclass
class TrainConfig:
    steps: int = 400_000
    global_batch: int = 256
    seed: int = 0
    precision: str = "bf16"  # "bf16" (autocast, CUDA) or "fp32"
    compile: bool = False
    # DC-DiT: recompute the encoder and router in backward instead of holding their full-grid activations
    # (ChunkPipeline.checkpoint_scaffold; the same gradients, about a sixth more scaffold work)
    checkpoint_scaffold: bool = False
    # DC-DiT: recompute the first N backbone blocks in backward too (ChunkPipeline.checkpoint_blocks:
    # each keeps only its input; one more forward of N blocks)
    checkpoint_blocks: int = 0
    # with compile: the share of its activations the compiled step may keep for backward (torch.compile's
    # activation memory budget); below 1 it recomputes the cheapest of the rest in backward. Any model.
    memory_budget: float = 1.0
    parallel: str = "ddp"  # "ddp" or "fsdp" (FSDP2), used under torchrun
    results_dir: str = "results"
    run_name: str = ""  # default: <preset>-<model>
    resume: str = ""  # "", "auto" (latest in the run folder) or a checkpoint path
    log_every: int = 100
    ckpt_every: int = 10_000
    sample_every: int = 10_000  # EMA sample grid + boundary maps; 0 = only at the end
    keep_checkpoints: int = 2
    num_sample_images: int = 16
    max_minutes: float = 0.0  # stop early after this much training wall-clock (0 = no limit)
    max_tflops: float = 0.0  # stop early once training has spent this many TFLOPs (0 = no limit; counts FLOPs)
    count_flops: bool = False  # count training FLOPs (3x the forward's, all ranks) even without max_tflops
    # EMA snapshots saved (loadable with create_model) once training passes each mark: "2.5min", "1500steps"
    # or "9000tflops" (counts FLOPs); in <run>/snapshots/<mark>/ with snapshots.jsonl (step, minutes, TFLOPs)
    snapshots: tuple = ()
    # stop after this step with a checkpoint (0 = run to train.steps); the schedules still span train.steps,
    # so a run split at stop_at and resumed repeats a straight one bit for bit
    stop_at: int = 0
    # CPU runs: intra-op threads (0 = torch's default, one per core). Tiny models step fastest on one thread:
    # their ops are too small to split, and a second thread waits on a core that another process holds
    cpu_threads: int = 0


@dataclass
class Recipe:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, *, data: bool = True, outputs: bool = True) -> "Recipe":
        """Raise :class:`~recipes.validate.ConfigError` naming the first setting outside its accepted range
        (:func:`recipes.validate.validate`; writes nothing); returns ``self``."""
        validate(self, data=data, outputs=outputs)
        return self


# ---------------------------------------------------------------------------- presets
def _imagenet(name: str, model: str) -> Recipe:
    return Recipe(
        name=name,
        model=ModelConfig(model, {"input_size": 32, "in_channels": 4, "num_classes": 1000}),
        data=DataConfig(dataset="latents", path="data/imagenet256-latents"),
        budget=BudgetConfig(warmup_steps=50_000, multi_budget=model.startswith("DC")),
    )


def _mnist_gpu(name: str, model: str) -> Recipe:
    kwargs = {"input_size": 32, "in_channels": 1, "num_classes": 10}
    if model.startswith("DC"):  # memory guard: the untrained router can keep most of the 1024 pixels of a
        kwargs["capacity"] = 512  # batch of 256 for a few steps, more than one GPU's memory (at most half)
    return Recipe(
        name=name,
        model=ModelConfig(model, kwargs),
        optim=OptimConfig(lr=2e-4, ema_decay=0.999),
        diffusion=DiffusionConfig(sample_steps=50, sampler="ddim"),
        # the orientation prior keeps the router on the strokes (docs/routing.md, "Orientation")
        budget=BudgetConfig(warmup_steps=1000, multi_budget=model.startswith("DC"),
                            orient_weight=1.0 if model.startswith("DC") else 0.0),
        train=TrainConfig(steps=5000, global_batch=256, log_every=100, ckpt_every=2500, sample_every=2500),
    )


def _upcycle(recipe: Recipe) -> Recipe:
    recipe.model.overrides = {"target_ratio": 4.0}  # wrap() options; the backbone comes from the source
    recipe.upcycle = UpcycleConfig(source="results/mnist-dit-s-DiT-S_2/final", distill_steps=500)
    recipe.budget.warmup_steps = 500
    return recipe


PRESETS: dict[str, Recipe] = {
    # The README's main job: 4000 steps on one CPU thread, under 7 minutes on an idle 2-core machine.
    "tiny-cpu": Recipe(
        name="tiny-cpu",
        model=ModelConfig("DC-DiT-tiny", {"num_classes": 10, "learn_sigma": False, "attn_backend": "sdpa"}),
        data=DataConfig(dataset="mnist", pixel_unshuffle=2),
        # lr 3e-3: at batch 16 the samples read as the asked-for digit 0.93 of the time, at 2e-3 0.78
        optim=OptimConfig(lr=3e-3, ema_decay=0.995, warmup_steps=100, schedule="cosine"),
        # guidance: the end-of-run samples read as the digit asked for far more often (docs/recipes.md);
        # 20 Euler steps agree as often as 40 and take half the time
        diffusion=DiffusionConfig(kind="flow", sample_steps=20, sampler="euler", guidance=3.0),
        # the demo spends its few minutes on quality: multi-budget training is off here (on in the paper presets)
        budget=BudgetConfig(ratio_weight=0.03, group_size=16, multi_budget=False),
        # batch 16: a step costs about half of one at batch 32, and in the same minutes 4000 steps of 16
        # learn the classes far better than 2000 of 32 (agreement 0.93 against about 0.3; docs/recipes.md)
        train=TrainConfig(steps=4000, global_batch=16, precision="fp32", log_every=50, ckpt_every=500,
                          sample_every=0, num_sample_images=80, cpu_threads=1),
    ),
    **{f"DC-DiT-{s}": _imagenet(f"DC-DiT-{s}", f"DC-DiT-{s}") for s in ("S", "B", "L", "XL")},
    **{f"DiT-{s}": _imagenet(f"DiT-{s}", f"DiT-{s}/2") for s in ("S", "B", "L", "XL")},
    "mnist-dcdit-s": _mnist_gpu("mnist-dcdit-s", "DC-DiT-S"),
    "mnist-dit-s": _mnist_gpu("mnist-dit-s", "DiT-S/2"),
    # DC-DiT-S upcycled from a trained mnist-dit-s run (set upcycle.source to its final folder)
    "mnist-upcycle-dcdit-s": _upcycle(_mnist_gpu("mnist-upcycle-dcdit-s", "DC-DiT-S")),
}


def get_recipe(name: str) -> Recipe:
    """A deep copy of preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown recipe {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


# ---------------------------------------------------------------------------- overrides
def _convert(value: str, hint, where: str):
    """Parse the string ``value`` as type ``hint`` (JSON for containers, literals for scalars)."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}={value}: expected a boolean (true/false)")
    if hint in (int, float):
        try:
            return hint(value)
        except ValueError:
            raise ValueError(f"{where}={value}: expected {hint.__name__}, e.g. {where}={hint(1)}") from None
    if hint is str:
        return value
    if hint in (tuple, list, dict) or origin in (tuple, list, dict):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{where}={value}: expected JSON ({getattr(hint, '__name__', hint)}), e.g. [0.0, 0.1]") from None
        return tuple(parsed) if (hint is tuple or origin is tuple) else parsed
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        for arg in typing.get_args(hint):
            try:
                return _convert(value, arg, where)
            except ValueError:
                continue
    raise ValueError(f"{where}: cannot parse {value!r} as {hint}")


def _parse_free(value: str):
    """A value for a free-form dict entry: JSON if it parses (numbers, bools, lists), else the string."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def apply_overrides(cfg: Recipe, overrides: list[str]) -> Recipe:
    """Apply ``section.key=value`` overrides, parsed against the dataclass field types.

    ``model.overrides.KEY=VALUE`` sets a ``create_model`` keyword (JSON-parsed when it can be).
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=1000")
        key, value = item.split("=", 1)
        parts = key.split(".")
        node = cfg
        for i, part in enumerate(parts):
            if isinstance(node, dict):
                node[".".join(parts[i:])] = _parse_free(value)
                break
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])} is not a config section")
            names = {f.name: f for f in dataclasses.fields(node)}
            if part not in names:
                where = ".".join(parts[:i]) or "sections"
                raise ConfigError(f"override {key!r}: no field {part!r} in {where}; "
                                  f"accepted: {', '.join(sorted(names))}")
            if i == len(parts) - 1:
                hints = typing.get_type_hints(type(node))
                try:
                    setattr(node, part, _convert(value, hints[part], key))
                except ValueError as err:
                    raise ConfigError(str(err)) from None
            else:
                node = getattr(node, part)
    return cfg


def to_dict(cfg: Recipe) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Recipe:
    """Rebuild a :class:`Recipe` from :func:`to_dict` output (e.g. a checkpoint's config)."""
    def build(cls, values):
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            if dataclasses.is_dataclass(hints[f.name]):
                v = build(hints[f.name], v)
            elif hints[f.name] is tuple and isinstance(v, list):
                v = tuple(v)
            kwargs[f.name] = v
        return cls(**kwargs)

    return build(Recipe, data)


def to_yaml(cfg: Recipe) -> str:
    """A readable, YAML-like dump (no dependency on a YAML library)."""
    lines = []

    def emit(obj, indent):
        for key, value in obj.items():
            if isinstance(value, dict) and value:
                lines.append(f"{'  ' * indent}{key}:")
                emit(value, indent + 1)
            else:
                lines.append(f"{'  ' * indent}{key}: {json.dumps(value)}")

    emit(to_dict(cfg), 0)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- run identity
# Settings that steer a run without changing what its steps compute: a run may be resumed with other
# values (e.g. more train.steps, another data.path mount). Everything else is the run's configuration:
# a run folder holds one, and a checkpoint resumes only into the same one.
RUN_CONTROL = {
    "train": {"steps", "stop_at", "resume", "results_dir", "run_name", "log_every", "ckpt_every", "sample_every",
              "keep_checkpoints", "num_sample_images", "max_minutes", "max_tflops", "count_flops", "snapshots",
              "compile", "memory_budget", "parallel", "cpu_threads"},
    "data": {"path", "workers"},
}


def identity(cfg: "Recipe | dict") -> dict:
    """The recipe without :data:`RUN_CONTROL` settings, as plain JSON (a dict from an older config gets the
    current defaults for fields it lacks)."""
    if isinstance(cfg, dict):
        cfg = from_dict(cfg)
    out = json.loads(json.dumps(to_dict(cfg)))
    for section, keys in RUN_CONTROL.items():
        for key in keys:
            out[section].pop(key, None)
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: "Recipe | dict", new: "Recipe | dict") -> list[str]:
    """``["model.overrides.depth: 4 -> 2", ...]``: where two recipes' :func:`identity` differ."""
    a, b = _flat(identity(old)), _flat(identity(new))
    return [f"{k}: {json.dumps(a.get(k, '(unset)'))} -> {json.dumps(b.get(k, '(unset)'))}"
            for k in sorted(set(a) | set(b)) if a.get(k, "(unset)") != b.get(k, "(unset)")]


def config_hash(cfg: "Recipe | dict") -> str:
    """Eight hex digits of the sha256 of :func:`identity`."""
    import hashlib

    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:8]


def default_run_name(cfg: Recipe) -> str:
    """``<preset>-<model>`` for a preset as it stands; ``<preset>-<model>-<config_hash>`` once overrides change
    what it computes (so another configuration never lands in the preset's folder)."""
    base = f"{cfg.name}-{cfg.model.name.replace('/', '_')}"
    preset = PRESETS.get(cfg.name)
    if preset is not None and identity(preset) == identity(cfg):
        return base
    return f"{base}-{config_hash(cfg)}"
