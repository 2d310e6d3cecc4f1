"""Shared pieces of the benchmarks: timers, result files, and the switch for the library's GPU fast paths.

Every script in ``benchmarks/`` imports from this module only (never from another script). A result file
is one JSON per (benchmark, configuration, card), ``benchmarks/results/<benchmark>_<configuration>_<card>.json``,
overwritten when the benchmark is run again; it records the card, the torch version, the git commit, the
command line and the script's rows.
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECORDED_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_CACHE_DIR")  # settings that change what a run measures


# ------------------------------------------------------------------------------------------- fast paths
def fast_paths(model: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """Apply the library's GPU fast paths to ``model`` (:func:`chunkformer.kernels.apply`) or remove them.

    Off, the model runs plain PyTorch ops only: the MLP's GELU as its own op after fc1, the decoder's
    narrowing conv through cuDNN, the norms through ``torch.nn``, and SDPA for every attention. The fast
    paths run on CUDA only, so on a model without CUDA parameters this changes nothing. Call it after
    moving the model to its device. Returns ``model``. This is the one place the benchmarks reach them.
    """
    from chunkformer import kernels

    if on and any(p.is_cuda for p in model.parameters()):
        kernels.apply(model)
    else:
        kernels.remove(model)
    kernels.set_short_attention(on)  # process-wide
    return model


def router_precision(model: torch.nn.Module, fp32: bool) -> torch.nn.Module:
    """Run DC-DiT's router and de-chunk in fp32 (the default) or under the surrounding bf16 autocast."""
    from chunkformer import kernels

    kernels.set_fp32_router_dechunk(model, fp32)
    return model


# ------------------------------------------------------------------------------------------------ timers
def bucket(tokens: float, multiple: int = 8) -> int:
    """A budget bucket: the token count rounded up to a multiple of ``multiple`` (at least ``multiple``)."""
    return max(multiple, -(-round(tokens) // multiple) * multiple)


def _sync() -> None:
    """Wait for the GPU, if there is one."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_ms(fn, reps: int, *args, warmup: int = 3, gpu_clock: bool = False) -> float:
    """Host-clock ms per call of ``fn(*args)`` over ``reps`` calls after ``warmup`` calls (GPU work included);
    ``gpu_clock``: on the GPU's clock (CUDA events around the calls) instead."""
    for _ in range(warmup):
        fn(*args)
    _sync()
    if gpu_clock:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn(*args)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    start = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    _sync()
    return 1e3 * (time.perf_counter() - start) / reps


def capture_graph(fn, reps: int, *args) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``reps`` calls of ``fn(*args)``, captured after three warm-up calls on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn(*args)
    graph.replay()
    return graph


def replay_ms(graph: "torch.cuda.CUDAGraph", reps: int, replays: int = 5) -> float:
    """GPU-clock ms per call of a graph holding ``reps`` calls, over ``replays`` replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * reps)


# ----------------------------------------------------------------------------------- other projects' code
def checkout_on_path(root: Path, itself: bool = True) -> None:
    """Put a local checkout of another project at the front of ``sys.path``: ``root/_vendor`` (where a
    ``pip install --target root/_vendor`` of its dependencies may sit) and, if ``itself``, ``root``."""
    for extra in (root / "_vendor", *([root] if itself else [])):
        if extra.is_dir() and str(extra) not in sys.path:
            sys.path.insert(0, str(extra))


def load_original_dit(root: Path) -> ModuleType:
    """The original DiT code's ``models.py`` (facebookresearch/DiT) from the local checkout ``root``, run as
    it is: nothing is downloaded or copied. Imported under the name ``original_dit_models``, so another
    checkout's ``models`` module is not shadowed; its dependencies (torch, timm, numpy) must be importable,
    from the environment or from ``root/_vendor``. The module must expose ``DiT`` and ``DiT_models``."""
    root = Path(root).expanduser().resolve()
    if not (root / "models.py").is_file():
        raise FileNotFoundError(f"{root} does not look like a checkout of the original DiT code (facebookresearch/DiT): "
                                "it has no models.py; pass --original PATH or set CHUNKFORMER_ORIGINAL_DIT")
    checkout_on_path(root, itself=False)
    spec = importlib.util.spec_from_file_location("original_dit_models", root / "models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        del sys.modules[spec.name]
        raise ModuleNotFoundError(f"the original DiT code at {root} imports {e.name!r}, which is not installed: "
                                  f"pip install {e.name} (or pip install --target {root / '_vendor'} {e.name})",
                                  name=e.name) from e
    missing = [name for name in ("DiT", "DiT_models") if not hasattr(module, name)]
    if missing:
        del sys.modules[spec.name]
        raise AttributeError(f"{root / 'models.py'} has no {' or '.join(missing)}: is it the original DiT code?")
    return module


def checkout_commit(root: Path) -> str | None:
    """The commit of the git checkout whose top folder is ``root``, or None where it is not one."""
    if not (Path(root) / ".git").exists():
        return None
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


# ------------------------------------------------------------------------------------------ compile options
def parse_compile_options(settings: list[str], flag: str = "--compile-option") -> dict:
    """``KEY=VALUE`` items (VALUE a Python literal) -> ``{KEY: VALUE}`` for ``torch.compile(options=...)``;
    exits with the reason for a malformed one."""
    from recipes.sampling import parse_compile_options as parse

    try:
        return parse(settings, flag)
    except ValueError as e:
        raise SystemExit(str(e)) from None


# ------------------------------------------------------------------------------------------------ results
def card_name() -> str:
    """The GPU's name, or ``"cpu"``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def card_slug(card: str) -> str:
    """A short file-name form of a card name: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``, ``"cpu"`` -> ``"cpu"``."""
    found = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Za-z]?)\b", card)
    return (found.group(1) if found else re.sub(r"[^0-9a-z]+", "-", card.lower()).strip("-")).lower()


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` when tracked files under chunkformer/, benchmarks/ or recipes/ differ
    from it); outside a git checkout ``$CHUNKFORMER_COMMIT`` (set it when running from a copied tree), else None."""
    if not (ROOT / ".git").exists():
        return os.environ.get("CHUNKFORMER_COMMIT")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "chunkformer", "benchmarks", "recipes"],
                               cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def result_path(benchmark: str, config: str, card: str) -> Path:
    """``benchmarks/results/<benchmark>_<config>_<card slug>.json``."""
    return RESULTS / f"{benchmark}_{config}_{card_slug(card)}.json"


def save_result(benchmark: str, config: str, card: str, out: Path | None = None, write: bool = True,
                **fields) -> dict:
    """A benchmark's record: benchmark, configuration, card, torch version, git commit and command line
    (prefixed with any of ``RECORDED_ENV`` that is set), then ``fields``. Written to ``out``, else to
    ``result_path(benchmark, config, card)`` when ``write`` (smoke runs pass ``write=False``)."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in RECORDED_ENV if os.environ.get(k)]
    command = " ".join([*env, "python", shlex.join([_script_path(), *sys.argv[1:]])])
    result = {"benchmark": benchmark, "config": config, "card": card, "torch": torch.__version__,
              "commit": git_commit(), "command": command, **fields}
    path = out if out is not None else (result_path(benchmark, config, card) if write else None)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return result


def _script_path() -> str:
    """The running script's path relative to the repository root, as a user would type it."""
    script = Path(sys.argv[0])
    try:
        return str(script.resolve().relative_to(ROOT))
    except ValueError:
        return sys.argv[0]
