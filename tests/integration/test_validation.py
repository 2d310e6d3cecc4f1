"""Bad input is refused before any work, with a message that names the setting and what it accepts."""

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkformer as cf
from chunkformer._typing import value_checks
from chunkformer.progress import Progress, progress
from recipes import evaluate as evaluate_cli
from recipes import sample as sample_cli
from recipes import train as train_cli
from recipes.config import apply_overrides, get_recipe
from recipes.data import DataError, build_source, scan_images
from recipes.validate import ConfigError, validate

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.overrides.hidden_size=32", "model.overrides.depth=1", "model.overrides.num_heads=2",
    "train.global_batch=8", "train.log_every=1", "train.ckpt_every=100", "train.num_sample_images=2",
    "diffusion.sample_steps=2", "budget.group_size=4", "optim.warmup_steps=0",
]


def usage_error(capsys, main, argv) -> str:
    """Run a CLI ``main(argv)`` in-process; return its one-line error after checking exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[0].startswith("usage:") and "error:" in lines[-1], err
    assert not any("error:" in line for line in lines[:-1]), err  # the message itself is one line
    return lines[-1]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a run gets as far as loading data or building a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("validation should have refused this before any work")

    monkeypatch.setattr(train_cli, "build_source", refuse)
    monkeypatch.setattr(train_cli, "build_model", refuse)
    monkeypatch.setattr(train_cli, "init_distributed", refuse)


# ---------------------------------------------------------------------------- recipes.train
BAD_TRAIN = [
    ("train.steps=0", "train.steps"),
    ("train.steps=-5", "train.steps"),
    ("train.precision=fp64", "train.precision"),
    ("train.global_batch=0", "train.global_batch"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.ema_decay=1.5", "optim.ema_decay"),
    ("budget.fractions=[0.1, 1.0]", "budget.fractions[1]"),
    ("budget.fractions=[-0.1]", "budget.fractions[0]"),
    ("budget.fractions=[]", "budget.fractions"),
    ("budget.group_size=0", "budget.group_size"),
    ("budget.ratio_weight=inf", "budget.ratio_weight"),
    ("budget.orient_weight=-1", "budget.orient_weight"),
    ("budget.orient_steps=-300", "budget.orient_steps"),
    ("diffusion.sampler=ddim", "diffusion.sampler"),  # tiny-cpu is a flow recipe: euler only
    ("diffusion.sample_steps=0", "diffusion.sample_steps"),
    ("data.dataset=imagenet", "data.dataset"),
    ("data.bad_images=maybe", "data.bad_images"),
    ("train.log_every=0", "train.log_every"),
    ("train.max_minutes=-1", "train.max_minutes"),
    ('train.snapshots=["5x"]', "train.snapshots"),
    ("model.overrides.depth=0", "model.overrides.depth"),
    ("model.overrides.dept=2", "model.overrides.dept"),
    ("model.overrides.gate_grad=sel", "model.overrides.gate_grad"),
    ("model.overrides.router_init=pytorch", "model.overrides.router_init"),
    ("model.overrides.router=topk", "model.overrides.router"),
    ("model.name=DC-DiT-Q", "model.name"),
    ("foo.bar=1", "'foo'"),
    ("train.stepz=3", "'stepz'"),
    ("train.steps=many", "train.steps"),
    ("train.compile=maybe", "train.compile"),
    ("train.memory_budget=0", "train.memory_budget"),
    ("train.memory_budget=1.5", "train.memory_budget"),
    ("train.memory_budget=0.5", "train.memory_budget"),  # without train.compile=true
]


@pytest.mark.parametrize("override,setting", BAD_TRAIN)
def test_train_refuses_a_bad_setting_in_one_line_before_any_work(override, setting, tmp_path, capsys, no_work):
    results = tmp_path / "results"
    line = usage_error(capsys, train_cli.main,
                       ["--recipe", "tiny-cpu", *TINY, f"train.results_dir={results}", override])
    assert setting in line
    assert any(word in line for word in ("expected", "accepted", "no field", "write a")), line
    assert not results.exists()


def test_train_refuses_missing_resume_and_unwritable_results_naming_them(tmp_path, capsys, no_work):
    results = tmp_path / "results"
    line = usage_error(capsys, train_cli.main, ["--recipe", "tiny-cpu", f"train.results_dir={results}",
                                                f"train.resume={tmp_path / 'missing.pt'}"])
    assert "train.resume" in line and "missing.pt" in line and "'auto'" in line
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = usage_error(capsys, train_cli.main, ["--recipe", "tiny-cpu", f"train.results_dir={blocker / 'runs'}"])
    assert "train.results_dir" in line and "not a folder" in line
    line = usage_error(capsys, train_cli.main, ["--recipe", "tiny-cpu", "data.dataset=folder",
                                                f"data.path={tmp_path / 'nowhere'}", "data.pixel_unshuffle=1",
                                                f"train.results_dir={results}"])
    assert "data.path" in line
    assert not results.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_train_called_from_python_raises_config_error_before_any_work(tmp_path, no_work):
    cfg = apply_overrides(get_recipe("tiny-cpu"), [f"train.results_dir={tmp_path / 'r'}", "train.steps=0"])
    with pytest.raises(ConfigError, match=r"train\.steps=0 .*\[1, inf\]"):
        train_cli.train(cfg)
    with pytest.raises(ConfigError, match="train.steps"):
        cfg.validate()
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["tiny-cpu", "DC-DiT-XL", "DiT-S", "mnist-dcdit-s", "mnist-upcycle-dcdit-s"])
def test_every_preset_passes_its_range_checks(name):
    validate(get_recipe(name), data=False, outputs=False)  # paths (ImageNet latents, sources) are the user's


def test_dry_run_and_print_config_need_no_data(capsys):
    train_cli.main(["--recipe", "DC-DiT-XL", "--print-config"])  # data/imagenet256-latents is absent here
    assert "global_batch: 256" in capsys.readouterr().out


# ---------------------------------------------------------------------------- image folders
def _folder(root: Path, n: int = 4) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def test_a_corrupt_image_is_found_before_training_refused_or_skipped(tmp_path, capsys):
    root = _folder(tmp_path / "images")
    assert scan_images([str(p) for p in sorted(root.rglob("*.png"))]) == []
    (root / "b" / "2.png").write_bytes(b"not an image at all")
    truncated = (root / "a" / "1.png").read_bytes()
    (root / "a" / "1.png").write_bytes(truncated[: len(truncated) // 2])
    with pytest.raises(DataError, match=r"2 of 8 images .*1\.png.*data\.bad_images=skip"):
        build_source("folder", str(root), image_size=8)
    source = build_source("folder", str(root), image_size=8, bad_images="skip")
    assert len(source) == 6 and "left out 2 unreadable images of 8" in capsys.readouterr().out
    assert source.get(torch.arange(6))[0].shape == (6, 3, 8, 8)

    # through the CLI: one line with the path, nothing written
    results = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--recipe", "tiny-cpu", *TINY, "data.dataset=folder", f"data.path={root}",
                        "data.image_size=8", "data.pixel_unshuffle=1", f"train.results_dir={results}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "1.png" in err and len(err.strip().splitlines()) == 1
    assert not results.exists()


def test_a_data_error_mid_run_checkpoints_the_finished_steps(tmp_path, capsys, monkeypatch):
    """The folder scans clean, then its files go bad after the first step: the run stops naming a file, with
    the finished step checkpointed; resume=auto in an empty run folder said it started fresh."""
    root = _folder(tmp_path / "images")
    real_build = train_cli.build_source

    def build_then_break(*args, **kwargs):
        source = real_build(*args, **kwargs)
        get, calls = source.get, []

        def get_then_break(indices):
            calls.append(1)
            if len(calls) == 2:
                for path in root.rglob("*.png"):
                    path.write_bytes(b"gone bad")
            return get(indices)

        source.get = get_then_break
        return source

    monkeypatch.setattr(train_cli, "build_source", build_then_break)
    monkeypatch.setenv("CHUNKFORMER_PROGRESS_SECONDS", "1000")
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--recipe", "tiny-cpu", *TINY, "data.dataset=folder", f"data.path={root}",
                        "data.image_size=8", "data.pixel_unshuffle=1", "train.steps=3", "train.resume=auto",
                        f"train.results_dir={tmp_path / 'results'}", "train.run_name=r"])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert "train.resume=auto: no loadable checkpoint" in out and "starting fresh" in out
    assert "cannot read image" in err and ".png" in err and "checkpointed" in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "results" / "r" / "checkpoints").glob("step-*")] == ["step-0000001"]


# ---------------------------------------------------------------------------- recipes.sample / evaluate
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", input_size=8, in_channels=1, num_classes=10, hidden_size=32, depth=1,
                            num_heads=2, learn_sigma=False)
    return cf.save_pretrained(model, tmp_path_factory.mktemp("pretrained") / "model")


BAD_SAMPLE = [
    (["--num-samples", "0"], "--num-samples"),
    (["--steps", "0"], "--steps"),
    (["--batch", "0"], "--batch"),
    (["--class-label", "10"], "--class-label"),
    (["--class-label", "-1"], "--class-label"),
    (["--rho", "1.5"], "--rho"),
    (["--compile"], "--capacity"),
    (["--capacity", "0"], "--capacity"),
    (["--capacity", "65"], "--capacity"),
    (["--sampler", "euler"], "--sampler"),
    (["--fill"], "--capacity"),
]


@pytest.mark.parametrize("argv,flag", BAD_SAMPLE)
def test_sample_refuses_bad_arguments_with_a_usage_error(argv, flag, pretrained, tmp_path, capsys):
    out = tmp_path / "out" / "s"
    line = usage_error(capsys, sample_cli.main, ["--ckpt", str(pretrained), "--out", str(out), *argv])
    assert flag in line
    assert not (tmp_path / "out").exists()


def test_sample_refuses_missing_checkpoints_with_a_usage_error(tmp_path, capsys):
    line = usage_error(capsys, sample_cli.main, ["--ckpt", str(tmp_path / "nope")])
    assert "--ckpt" in line and "nope" in line
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    line = usage_error(capsys, sample_cli.main, ["--ckpt", str(tmp_path / "run")])
    assert "no loadable checkpoint" in line


def test_evaluate_refuses_missing_or_wrong_npz_with_a_usage_error(tmp_path, capsys):
    line = usage_error(capsys, evaluate_cli.main, ["--samples", str(tmp_path / "missing.npz")])
    assert "--samples" in line and "missing.npz" in line
    import numpy as np

    np.savez(tmp_path / "wrong.npz", images=np.zeros((4, 8, 8), np.uint8))
    line = usage_error(capsys, evaluate_cli.main, ["--samples", str(tmp_path / "wrong.npz")])
    assert "'samples' or 'arr_0'" in line
    line = usage_error(capsys, evaluate_cli.main, ["--samples", str(tmp_path / "wrong.npz"), "--reference",
                                                   str(tmp_path / "ref.npz")])
    assert "--reference" in line
    assert not list(tmp_path.glob("*.json"))


# ---------------------------------------------------------------------------- progress off a terminal
def test_progress_prints_lines_with_rate_and_eta_off_a_terminal():
    out = io.StringIO()  # not a TTY
    with Progress(4, desc="work", unit="step", interval=0, file=out) as bar:
        for _ in range(4):
            bar.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[0].startswith("work: 1/4 step (25%)")  # four updates and the close
    assert all("step/s" in line and "elapsed" in line for line in lines) and "ETA" in lines[0]
    quiet = io.StringIO()
    with Progress(1000, desc="work", interval=3600, file=quiet) as bar:
        for _ in range(1000):
            bar.update()
    assert quiet.getvalue().count("\n") == 1  # only the closing line within the interval
    assert list(progress(range(3), False)) == [0, 1, 2]


def test_sample_reports_progress_lines_on_a_pipe(pretrained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHUNKFORMER_PROGRESS_SECONDS", "0")
    settings_out = sample_cli.main(["--ckpt", str(pretrained), "--num-samples", "3", "--batch", "2", "--steps", "2",
                                    "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sample 3 (ddpm)")]
    assert lines and lines[-1].startswith("sample 3 (ddpm): 4/4 step (100%)"), err  # 2 batches x 2 steps
    assert all("step/s" in line for line in lines) and any("ETA" in line for line in lines)
    assert "\r" not in err
    assert json.loads((tmp_path / "s.json").read_text())["steps"] == settings_out["steps"] == 2


# ---------------------------------------------------------------------------- models
def _tiny(kind):
    torch.manual_seed(0)
    if kind == "dcdit":
        return cf.DCDiT(input_size=8, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=5,
                        learn_sigma=False, attn_backend="sdpa").eval()
    if kind == "dit":
        return cf.DiT(input_size=8, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=5,
                      patch_size=2, learn_sigma=False).eval()
    dit = cf.DiT(input_size=8, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=5, patch_size=2,
                 learn_sigma=False)
    return cf.wrap(dit, encoder_depth=1, decoder_depth=1).eval()


MODELS = {kind: _tiny(kind) for kind in ("dcdit", "dit", "wrapped")}
X = torch.randn(2, 1, 8, 8)


@settings(max_examples=25)
@given(st.sampled_from(sorted(MODELS)), st.integers(-1000, 1000))
def test_any_label_outside_zero_to_num_classes_is_refused_and_any_inside_accepted(kind, label):
    model = MODELS[kind]
    y = torch.tensor([0, label])
    t = torch.tensor([10.0, 500.0])
    if 0 <= label <= model.num_classes:  # num_classes itself is the null label
        with torch.no_grad():
            assert model(X, t, y).shape == X.shape
    else:
        with pytest.raises(ValueError, match=r"y must lie in \[0, 5\] .*5 is the null label"):
            model(X, t, y)


@settings(max_examples=25)
@given(st.sampled_from(sorted(MODELS)), st.floats(-1e4, 1e4, allow_nan=False), st.booleans())
def test_any_timestep_outside_the_diffusion_range_is_refused_and_any_inside_accepted(kind, value, integer):
    model = MODELS[kind]
    t = torch.tensor([0.0, value])
    if integer:
        t = t.long()
        value = float(int(value))
    if 0 <= value < 1000:
        with torch.no_grad():
            assert model(X, t, torch.tensor([1, 2])).shape == X.shape
    else:
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
            model(X, t, torch.tensor([1, 2]))


def test_range_checks_follow_num_timesteps_and_skip_under_value_checks_off():
    model = _tiny("dcdit")
    model.num_timesteps = 50
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        model(X, torch.tensor([10.0, 60.0]), torch.tensor([1, 2]))
    with value_checks(False), torch.no_grad():  # no device read: ranges unchecked
        model(X, torch.tensor([10.0, 60.0]), torch.tensor([1, 2]))


BAD_RHO = [torch.tensor([0.1]), torch.tensor([0, 0]), torch.zeros(2, 2), torch.tensor([1, 2, 3.0]),
           torch.tensor([True, False])]


@pytest.mark.parametrize("rho", BAD_RHO, ids=["shape-1", "int64", "2d", "shape-3", "bool"])
@pytest.mark.parametrize("kind", ["dcdit", "wrapped"])
def test_a_rho_of_the_wrong_shape_or_dtype_is_refused_even_with_value_checks_off(kind, rho):
    model = MODELS[kind]
    for checks in (True, False):
        with value_checks(checks), pytest.raises(ValueError, match="rho must be"):
            model(X, torch.tensor([1.0, 2.0]), torch.tensor([1, 2]), rho=rho)


def test_rho_label_and_t_errors_read_the_same_with_shape_checks_on_and_off():
    script = textwrap.dedent("""
        import torch, chunkformer as cf
        torch.manual_seed(0)
        m = cf.DCDiT(input_size=8, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=5,
                     learn_sigma=False, attn_backend="sdpa").eval()
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([1, 2])
        for kw in ({"rho": torch.tensor([0.1])}, {"rho": torch.tensor([0, 0])}, {"y": torch.tensor([1, 9])},
                   {"t": torch.tensor([1.0, -3.0])}):
            args = {"x": x, "t": t, "y": y, **kw}
            try:
                m(args.pop("x"), args.pop("t"), args.pop("y"), **args)
                print("accepted")
            except Exception as err:
                print(type(err).__name__, str(err).splitlines()[0])
    """)
    outputs = []
    for flag in ("0", "1"):
        env = {**os.environ, "CHUNKFORMER_TYPECHECK": flag, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        outputs.append(res.stdout)
    assert outputs[0] == outputs[1], outputs
    assert "accepted" not in outputs[0] and outputs[0].count("ValueError") == 4


# ---------------------------------------------------------------------------- plans, de-chunking, constructors
def _plan(B=2, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) < 0.5
    mask[:, 0] = True
    return cf.ChunkPlan.from_mask(mask, grid=(3, 4))


def test_plug_back_with_the_wrong_slot_count_is_refused():
    plan = _plan()
    y = torch.randn(2, plan.width, 4)
    assert plan.plug_back(y).shape == (2, 12, 4)
    for bad in (y[:, :-1], torch.randn(2, plan.width + 1, 4), y[:1]):
        with pytest.raises(ValueError, match=f"plug_back needs .*width={plan.width}"):
            plan.plug_back(bad)


def test_unpack_with_the_wrong_total_is_refused():
    plan = _plan()
    total = int(plan.lengths.sum())
    assert plan.unpack(torch.randn(total, 4)).shape == (2, plan.width, 4)
    for wrong in (total - 1, total + 1):
        with pytest.raises(ValueError, match=f"unpack needs the plan's {total} packed tokens"):
            plan.unpack(torch.randn(wrong, 4))


def test_a_dechunk_decoder_handed_a_bundle_whose_parts_disagree_is_refused():
    torch.manual_seed(0)
    router = cf.Router(8, ndim=2)
    decoder = cf.DeChunkDecoder(8, 1, ndim=2, depth=1, cond_dim=0)
    tokens = torch.randn(2, 12, 8)
    routed = router(tokens, (3, 4))
    chunked = cf.Chunked.from_router(routed, tokens, mode="padded")
    y = chunked.plan.chunk(tokens)
    assert decoder(y, chunked).shape == (2, 1, 3, 4)
    other_tokens = cf.Chunked(plan=chunked.plan, probs=routed.probs, confidence=routed.confidence,
                              tokens=torch.randn(2, 10, 8), batch_size=[2])
    with pytest.raises(ValueError, match="Chunked.from_router"):
        decoder(y, other_tokens)
    other_probs = cf.Chunked(plan=chunked.plan, probs=routed.probs[:, :10], confidence=routed.confidence,
                             tokens=tokens, batch_size=[2])
    with pytest.raises(ValueError, match="Chunked.from_router"):
        decoder(y, other_probs)


@pytest.mark.parametrize("kwargs,name", [({"group_size": 0}, "group_size"), ({"ratio_weight": float("nan")},
                                                                                  "ratio_weight"),
                                         ({"ratio_weight": -1.0}, "ratio_weight"),
                                         ({"warmup_steps": -1}, "warmup_steps"),
                                         ({"group_size": 2.5}, "group_size")])
def test_budget_refuses_bad_settings_when_built(kwargs, name):
    with pytest.raises(ValueError, match=name):
        cf.TimestepAdaptiveBudget(**kwargs)


@pytest.mark.parametrize("dim", [0, -4, 2.0])
def test_router_refuses_a_bad_width_when_built(dim):
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        cf.Router(dim, ndim=2)
