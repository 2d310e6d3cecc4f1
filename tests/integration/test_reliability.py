"""Checkpoints that cannot run code or lose a run: every loader refuses malicious pickles, damaged files are
named, pruning keeps the newest branch, a run folder holds one configuration, resume is exact in every
schedule phase, and kill -9 at any moment leaves loadable checkpoints and a bit-identical resume."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkformer as cf
from chunkformer.models.checkpoint import CorruptCheckpointError, UnsafeCheckpointError
from recipes.checkpoints import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_aside_after,
    set_rng_state,
)
from recipes.config import apply_overrides, default_run_name, get_recipe
from conftest import needs_digits

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.overrides.hidden_size=32", "model.overrides.depth=1", "model.overrides.num_heads=2",
    "train.global_batch=8", "train.log_every=1", "train.ckpt_every=2", "train.num_sample_images=4",
    "diffusion.sample_steps=2", "budget.group_size=4", "budget.warmup_steps=0", "optim.warmup_steps=0",
]




def recipe(tmp_path: Path, *extra: str):
    return apply_overrides(get_recipe("tiny-cpu"), [*TINY, f"train.results_dir={tmp_path}", *extra])


def train_in_process(tmp_path: Path, *extra: str, capsys=None) -> str:
    from recipes.train import train

    train(recipe(tmp_path, *extra))
    return capsys.readouterr().out if capsys is not None else ""


def tiny_dit():
    return cf.create_model("DiT-S/2", hidden_size=32, depth=1, num_heads=2, input_size=8, in_channels=1,
                           num_classes=3, learn_sigma=False)


# ---------------------------------------------------------------------------- malicious pickles
class Payload:
    """Unpickled by an unrestricted loader, this creates ``marker``: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def malicious_pt(path: Path, marker: Path, base: dict) -> Path:
    """A torch.save file that holds ``base`` plus a payload: otherwise a valid checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**base, "extra": Payload(marker)}, path)
    return path


def assert_refused(err: BaseException, path: Path, marker: Path) -> None:
    msg = str(err)
    assert not marker.exists(), "the payload ran"
    assert str(path) in msg, msg  # says which file
    assert "weights_only" in msg and "refused" in msg, msg  # ... what it is and what to do


def test_every_model_loader_refuses_a_malicious_pickle_without_running_it(tmp_path):
    from chunkformer.models.interop import from_original_dit, from_reference_dcdit, load_state_dict
    from chunkformer.upcycling import load_pretrained, upcycle

    marker = tmp_path / "PAYLOAD-RAN"
    model = tiny_dit()
    evil = malicious_pt(tmp_path / "evil.pt", marker, {"model": model.state_dict(), "ema": model.state_dict()})
    folder = cf.save_pretrained(model, tmp_path / "pretrained")
    loaders = {
        "load_weights": lambda: cf.load_weights(tiny_dit(), evil),
        "create_model(dir, pretrained=)": lambda: cf.create_model(str(folder), pretrained=evil),
        "interop.load_state_dict": lambda: load_state_dict(evil),
        "from_original_dit": lambda: from_original_dit(evil, num_heads=2),
        "from_reference_dcdit": lambda: from_reference_dcdit(evil),
        "upcycling.load_pretrained": lambda: load_pretrained(evil, num_heads=2),
        "upcycle": lambda: upcycle(evil),
    }
    for name, load in loaders.items():
        with pytest.raises(UnsafeCheckpointError) as err:
            load()
        assert not marker.exists(), f"{name} ran the payload"
        assert_refused(err.value, evil, marker)
    # a folder whose only weights are the pickle: interop picks the .pt and refuses it
    only = tmp_path / "only-pt"
    only.mkdir()
    shutil.copy(evil, only / "weights.pt")
    with pytest.raises(UnsafeCheckpointError) as err:
        load_state_dict(only)
    assert_refused(err.value, only / "weights.pt", marker)
    # a pickle renamed model.safetensors in a save_pretrained folder: not parsed as safetensors, never unpickled
    shutil.copy(evil, folder / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        cf.create_model(str(folder))
    assert not marker.exists()


def test_sampling_refuses_a_malicious_checkpoint_file_and_run_folder(tmp_path, capsys):
    from recipes.sample import load_for_sampling

    marker = tmp_path / "PAYLOAD-RAN"
    model = tiny_dit()
    base = {"model": model.state_dict(), "ema": model.state_dict(), "config": {}, "step": 1}
    evil = malicious_pt(tmp_path / "run" / "checkpoints" / "step-0000001.pt", marker, base)
    with pytest.raises(UnsafeCheckpointError) as err:  # --ckpt FILE
        load_for_sampling(str(evil))
    assert_refused(err.value, evil, marker)
    with pytest.raises(FileNotFoundError, match="no loadable checkpoint"):  # --ckpt RUNDIR: skipped, and said why
        load_for_sampling(str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert f"skipping checkpoint {evil}" in out and "refused" in out and not marker.exists()


@needs_digits
def test_training_resume_refuses_a_malicious_checkpoint_and_auto_skips_it(tmp_path, capsys):
    marker = tmp_path / "PAYLOAD-RAN"
    train_in_process(tmp_path, "train.steps=2", "train.run_name=good")
    good = tmp_path / "good" / "checkpoints" / "step-0000002"
    state = load_checkpoint(good)
    evil = malicious_pt(tmp_path / "evil" / "step-0000002.pt", marker, state)
    with pytest.raises(UnsafeCheckpointError) as err:  # train.resume=PATH
        train_in_process(tmp_path, "train.steps=4", "train.run_name=victim", f"train.resume={evil}")
    assert_refused(err.value, evil, marker)
    assert not (tmp_path / "victim").exists()  # nothing written
    capsys.readouterr()
    # train.resume=auto: a planted newer checkpoint is skipped (and said so), the run resumes from the good one
    planted = shutil.copy(evil, tmp_path / "good" / "checkpoints" / "step-0000003.pt")
    out = train_in_process(tmp_path, "train.steps=4", "train.run_name=good", "train.resume=auto", capsys=capsys)
    assert f"skipping checkpoint {planted}" in out and "refused" in out
    assert f"resumed from {good} at step 2" in out and not marker.exists()
    assert "abandoned-after-step-2" in out  # the planted file is set aside, out of resume=auto's way
    assert load_checkpoint(tmp_path / "good" / "checkpoints" / "step-0000004")["step"] == 4


# ---------------------------------------------------------------------------- the format itself
def test_checkpoint_round_trips_model_optimizer_scheduler_and_rng_without_pickle(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        sched.step()
    random.random(), np.random.rand(), torch.rand(1)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": rng_state(),
             "step": 3, "config": {"betas": (0.8, 0.9), "name": "x"}, "train_flops": 1.5}
    expected = (random.random(), np.random.rand(), torch.rand(1))  # what follows the saved RNG state
    path = save_checkpoint(state, tmp_path, 3)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "opt.safetensors",
                                                      "rng.safetensors", "state.json"]
    back = load_checkpoint(path)
    assert back["step"] == 3 and back["config"] == state["config"] and back["sched"] == sched.state_dict()
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    fresh.load_state_dict(back["model"])
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3, foreach=True)
    opt2.load_state_dict(back["opt"])
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    set_rng_state(back["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


@needs_digits
def test_load_weights_reads_a_training_checkpoint_folder_and_a_legacy_pt(tmp_path):
    from recipes.train import build_model

    train_in_process(tmp_path, "train.steps=2", "train.run_name=r")
    step = tmp_path / "r" / "checkpoints" / "step-0000002"
    state = load_checkpoint(step)
    cfg = recipe(tmp_path)
    cfg.model.overrides.update(state["config"]["model"]["overrides"])
    model = cf.load_weights(build_model(cfg, None, None, torch.device("cpu")), step)  # the documented path
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["ema"][name]), name  # EMA weights first
    legacy = tmp_path / "step-0000002.pt"  # the older format, numpy RNG state included
    torch.save({**state, "rng": {**state["rng"], "numpy": np.random.get_state()}}, legacy)
    other = cf.load_weights(build_model(cfg, None, None, torch.device("cpu")), legacy)
    assert all(torch.equal(v, state["ema"][k]) for k, v in other.state_dict().items())
    assert load_checkpoint(legacy)["step"] == 2


def flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    offset = offset % max(1, len(data) - n)
    for i in range(offset, min(len(data), offset + n)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@settings(max_examples=12)
@given(which=st.sampled_from(["model", "ema", "opt", "rng", "state"]), where=st.floats(0, 1))
def test_64_flipped_bytes_anywhere_in_a_checkpoint_are_named_and_auto_falls_back(tmp_path_factory, which, where):
    folder = tmp_path_factory.mktemp("ckpt")
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    for step in (1, 2):
        save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "opt": opt.state_dict(),
                         "rng": rng_state(), "step": step}, folder, step)
    name = "state.json" if which == "state" else f"{which}.safetensors"
    damaged = folder / "step-0000002" / name
    flip(damaged, int(where * damaged.stat().st_size))
    with pytest.raises(CorruptCheckpointError) as err:
        load_checkpoint(folder / "step-0000002")
    assert str(damaged) in str(err.value) and "earlier checkpoint" in str(err.value)
    notes = []
    path, state = latest_checkpoint(folder, log=notes.append)
    assert path.name == "step-0000001" and state["step"] == 1
    assert len(notes) == 1 and str(damaged) in notes[0]


def test_64_flipped_bytes_in_model_safetensors_are_named_by_create_model_and_load_weights(tmp_path):
    folder = cf.save_pretrained(tiny_dit(), tmp_path / "m")
    assert json.loads((folder / "manifest.json").read_text())["files"].keys() == {"model.safetensors", "config.json"}
    flip(folder / "model.safetensors", 4000)
    for load in (lambda: cf.create_model(str(folder)), lambda: cf.load_weights(tiny_dit(), folder),
                 lambda: cf.load_weights(tiny_dit(), folder / "model.safetensors")):
        with pytest.raises(CorruptCheckpointError, match=r"model.safetensors is damaged: its sha256 differs"):
            load()
    folder = cf.save_pretrained(tiny_dit(), tmp_path / "c")
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"depth": 1', '"depth": 2'))
    with pytest.raises(CorruptCheckpointError, match="config.json is damaged"):
        cf.create_model(str(folder))


@pytest.mark.parametrize("content", [b"", b"garbage", bytes(range(256)) * 40, None])
def test_truncated_empty_or_random_files_give_a_clear_error_and_auto_falls_back(tmp_path, content):
    model = torch.nn.Linear(4, 4)
    save_checkpoint({"model": model.state_dict(), "step": 1}, tmp_path, 1)
    good = save_checkpoint({"model": model.state_dict(), "step": 2}, tmp_path, 2)
    if content is None:  # truncated mid-file
        target = good / "model.safetensors"
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target = tmp_path / "step-0000003.pt"  # a legacy-named file of junk
        target.write_bytes(content)
        (tmp_path / ".step-0000004.tmp").mkdir()  # and a write that never finished
    with pytest.raises(CorruptCheckpointError) as err:
        load_checkpoint(target if content is not None else good)
    assert str(target) in str(err.value)
    notes = []
    path, state = latest_checkpoint(tmp_path, log=notes.append)
    assert state["step"] == (2 if content is not None else 1)
    assert any(str(target) in n for n in notes)


# ---------------------------------------------------------------------------- pruning
def test_pruning_never_deletes_the_new_checkpoint_or_a_newer_branch(tmp_path):
    w = {"w": torch.ones(2)}
    for step in (36, 38, 40):
        save_checkpoint({"model": w, "step": step}, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000038", "step-0000040"]
    # continuing from 38: the later checkpoint moves aside, then 39 is kept as the newest
    moved_to, moved = set_aside_after(tmp_path, 38)
    assert moved_to.name == "abandoned-after-step-38" and [p.name for p in moved] == ["step-0000040"]
    assert load_checkpoint(moved[0])["step"] == 40  # kept, not deleted
    save_checkpoint({"model": w, "step": 39}, tmp_path, 39, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000038", "step-0000039"]
    # a stray unreadable step-9999999 with keep=1: new checkpoints survive, the stray is left alone
    (tmp_path / "step-9999999.pt").write_bytes(b"junk")
    for step in (41, 42):
        new = save_checkpoint({"model": w, "step": step}, tmp_path, step, keep=1)
        assert new.is_dir() and load_checkpoint(new)["step"] == step
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000042", "step-9999999.pt"]
    assert latest_checkpoint(tmp_path, log=lambda _: None)[1]["step"] == 42


@needs_digits
def test_resuming_an_older_step_moves_later_checkpoints_aside_and_metrics_keep_one_line_per_step(tmp_path, capsys):
    train_in_process(tmp_path, "train.steps=6", "train.run_name=r", "train.keep_checkpoints=2")
    ckpts = tmp_path / "r" / "checkpoints"
    (ckpts / "step-9999999.pt").write_bytes(b"unreadable stray")
    capsys.readouterr()
    out = train_in_process(tmp_path, "train.steps=6", "train.run_name=r", "train.keep_checkpoints=1",
                           f"train.resume={ckpts / 'step-0000004'}", capsys=capsys)
    assert "this run continues from step 4" in out and "abandoned-after-step-4" in out
    aside = ckpts / "abandoned-after-step-4"
    assert sorted(p.name for p in aside.iterdir()) == ["step-0000006", "step-9999999.pt"]
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-0000006"]  # the new step 6, not deleted
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    final = tmp_path / "r" / "final"
    mode = (final / "config.json").stat().st_mode
    assert (final / "model.safetensors").stat().st_mode == mode
    assert all(p.stat().st_mode == mode for p in (ckpts / "step-0000006").iterdir())


# ---------------------------------------------------------------------------- one configuration per run folder
def test_each_configuration_gets_its_own_default_folder():
    base = get_recipe("tiny-cpu")
    assert default_run_name(base) == "tiny-cpu-DC-DiT-tiny"
    assert default_run_name(apply_overrides(base, ["train.steps=500", "train.log_every=7"])) == "tiny-cpu-DC-DiT-tiny"
    deeper = default_run_name(apply_overrides(base, ["model.overrides.depth=2"]))
    lr = default_run_name(apply_overrides(base, ["optim.lr=1e-3"]))
    assert len({deeper, lr, "tiny-cpu-DC-DiT-tiny"}) == 3 and deeper.startswith("tiny-cpu-DC-DiT-tiny-")


@needs_digits
def test_another_configuration_is_refused_before_anything_is_written(tmp_path):
    from recipes.sample import load_for_sampling

    train_in_process(tmp_path, "train.steps=2", "train.run_name=r")
    run = tmp_path / "r"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"another configuration \(model.overrides.depth: 1 -> 2\)") as err:
        train_in_process(tmp_path, "train.steps=4", "train.run_name=r", "train.resume=auto", "model.overrides.depth=2")
    assert "train.resume=auto" in str(err.value) and "train.run_name" in str(err.value)  # how to continue / fresh
    with pytest.raises(ValueError, match=r"was written by another configuration \(optim.lr"):
        train_in_process(tmp_path, "train.steps=4", "train.run_name=other", "optim.lr=1e-2",
                         f"train.resume={run / 'checkpoints' / 'step-0000002'}")
    assert not (tmp_path / "other").exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # config.json and all untouched
    # a folder that mixes runs (a checkpoint of another configuration copied in) is not sampled silently
    train_in_process(tmp_path, "train.steps=2", "train.run_name=deep", "model.overrides.depth=2")
    shutil.copytree(tmp_path / "deep" / "checkpoints" / "step-0000002", run / "checkpoints" / "step-0000003")
    with pytest.raises(ValueError, match="mixes runs"):
        load_for_sampling(str(run))
    model, _, cfg, path = load_for_sampling(str(run / "checkpoints" / "step-0000002"))  # the one asked for: fine
    assert cfg.model.overrides["depth"] == 1 and path.name == "step-0000002"


# ---------------------------------------------------------------------------- exact resume
_STRAIGHT: dict = {}
SCHEDULES = {"constant": ["optim.schedule=constant"], "cosine": ["optim.schedule=cosine"],
             "warmup-cosine": ["optim.schedule=cosine", "optim.warmup_steps=3"]}


@needs_digits
@settings(max_examples=3)
@given(schedule=st.sampled_from(sorted(SCHEDULES)), split=st.integers(1, 5))
def test_a_run_split_anywhere_in_any_schedule_phase_repeats_a_straight_one(tmp_path_factory, schedule, split):
    root = tmp_path_factory.mktemp("split")
    common = ["train.steps=6", "train.ckpt_every=100", *SCHEDULES[schedule]]
    if schedule not in _STRAIGHT:
        train_in_process(root, *common, "train.run_name=straight")
        _STRAIGHT[schedule] = load_checkpoint(root / "straight" / "checkpoints" / "step-0000006")
    train_in_process(root, *common, "train.run_name=split", f"train.stop_at={split}")
    train_in_process(root, *common, "train.run_name=split", "train.resume=auto")
    a, b = _STRAIGHT[schedule], load_checkpoint(root / "split" / "checkpoints" / "step-0000006")
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (schedule, split, key, name)
    assert a["sched"] == b["sched"]


# ---------------------------------------------------------------------------- kill -9
KILL_ARGS = ["train.steps=8", "train.ckpt_every=1", "train.log_every=1", "optim.schedule=cosine"]
_KILL_REFERENCE: dict = {}


def _train_cmd(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "recipes.train", "--recipe", "tiny-cpu", *TINY, *KILL_ARGS,
            f"train.results_dir={tmp_path}", f"train.run_name={name}", *extra]


ENV = {**os.environ, "CHUNKFORMER_TYPECHECK": "0", "OMP_NUM_THREADS": "1"}


@needs_digits
@settings(max_examples=3)
@given(at=st.sampled_from(["tmp", "checkpoint", "deleting"]), nth=st.integers(2, 7), delay=st.floats(0, 0.02))
def test_kill_9_at_random_moments_leaves_loadable_checkpoints_and_an_exact_resume(tmp_path_factory, at, nth, delay):
    """Kill the training process (a subprocess) when the ``nth`` checkpoint write starts (``tmp``), has landed
    (``checkpoint``) or prunes an older one (``deleting``), ``delay`` seconds later; then every surviving
    checkpoint loads and resume=auto finishes bit-identical to a run that was never interrupted."""
    root = tmp_path_factory.mktemp("kill")
    if "state" not in _KILL_REFERENCE:
        train_in_process(root, *KILL_ARGS, "train.run_name=straight")
        _KILL_REFERENCE["state"] = load_checkpoint(root / "straight" / "checkpoints" / "step-0000008")
    ckpts = root / "victim" / "checkpoints"
    proc = subprocess.Popen(_train_cmd(root, "victim"), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pattern = {"tmp": f".step-{nth:07d}.tmp", "checkpoint": f"step-{nth:07d}",
               "deleting": f".step-{nth - 2:07d}.deleting"}[at]  # keep_checkpoints=2: step n prunes step n-2
    landed = ckpts / f"step-{nth:07d}"  # if the poll misses the brief moment, kill right after it
    deadline = time.time() + 120
    while proc.poll() is None and not (ckpts / pattern).exists() and not landed.exists() and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    for path in list_checkpoints(ckpts):  # every surviving checkpoint loads and verifies
        assert load_checkpoint(path)["step"] == int(path.name[5:12])
    train_in_process(root, *KILL_ARGS, "train.run_name=victim", "train.resume=auto")
    a, b = _KILL_REFERENCE["state"], load_checkpoint(ckpts / "step-0000008")
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (at, nth, key, name)
    steps = [json.loads(x)["step"] for x in (root / "victim" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
