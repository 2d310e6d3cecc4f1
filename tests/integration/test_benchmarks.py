"""The benchmarks run on a CPU at toy size and report what their docstrings say (numbers are not asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.multiprocessing.reductions import StorageWeakRef

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = ("step_speed", "sample_speed", "train_speed", "vs_release", "composition", "host_syncs", "step_time", "report")
MODULES = (*SCRIPTS, "common")  # studies/ has a report.py too: load these by path, never by name


@pytest.fixture
def benchmarks(monkeypatch):
    for name in MODULES:
        sys.modules.pop(name, None)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("CHUNKFORMER_TYPECHECK", "0")
    yield
    for name in MODULES:
        sys.modules.pop(name, None)


def _load(name: str):
    """A benchmark script as a module (benchmarks/ on the path only while it loads, for ``common``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_the_benchmark_set_is_what_the_readme_lists():
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "common")
    assert scripts == sorted(SCRIPTS) and len(scripts) <= 8
    index = (BENCHMARKS / "README.md").read_text()
    for name in scripts:
        assert f"{name}.py" in index, f"benchmarks/README.md does not list {name}.py"


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_opens_with_its_question_and_a_cpu_smoke_command(name):
    doc = _load(name).__doc__
    assert doc and doc.splitlines()[0].rstrip().endswith("?"), f"{name}.py's docstring should open with its question"
    assert f"python benchmarks/{name}.py" in doc


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_import_no_other_script(name):
    source = (BENCHMARKS / f"{name}.py").read_text()
    for other in MODULES:
        if other not in (name, "common"):
            assert f"from {other} import" not in source and f"import {other}\n" not in source, (name, other)


def test_host_syncs_counts_one_wait_per_packed_forward_and_none_in_fixed_mode(tmp_path, benchmarks):
    result = _load("host_syncs").main(["--batch", "2", "--out", str(tmp_path / "s.json")])
    rows = result["rows"]
    assert rows["DC-DiT-S fixed"]["syncs_fwd_unchecked"] == 0
    assert rows["DC-DiT-S packed"]["syncs_fwd_unchecked"] == rows["DC-DiT-S padded"]["syncs_fwd_unchecked"] == 1
    # value checks: the timestep / label range (every model) and the router's NaN check (DC-DiT)
    assert all(r["syncs_fwd"] == r["syncs_fwd_unchecked"] + 2 for k, r in rows.items() if k.startswith("DC"))
    assert rows["DiT-S/2"]["syncs_fwd"] == rows["DiT-S/2"]["syncs_fwd_unchecked"] + 1
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == rows


def test_step_speed_rows_keep_fewer_tokens_at_tighter_budgets(benchmarks):
    result = _load("step_speed").main(["--tiny", "--rounds", "2"])
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["DiT-XL/2", "DiT-XL/2 CFG", "DC-DiT-XL rho=0", "DC-DiT-XL rho=0.2", "DC-DiT-XL rho=0.4",
                          "DC-DiT-XL Lite-CFG (0 / 0.9)", "DC-DiT-XL scaffold only"]
    kept = [rows[f"DC-DiT-XL rho={r}"]["kept"] for r in ("0", "0.2", "0.4")]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    flops = [rows[f"DC-DiT-XL rho={r}"]["flops"] for r in ("0", "0.2", "0.4")]
    assert flops == sorted(flops, reverse=True)
    assert rows["DC-DiT-XL Lite-CFG (0 / 0.9)"]["base"] == "DiT-XL/2 CFG"
    assert rows["DC-DiT-XL Lite-CFG (0 / 0.9)"]["baseline_ms"] == rows["DiT-XL/2 CFG"]["ms"]
    assert all(len(r["ms_rounds"]) == 2 and min(r["ms_rounds"]) <= r["ms"] <= max(r["ms_rounds"]) for r in rows.values())
    shares = result["scaffold_flop_shares_by_rho"]
    assert 0 < shares["0"] < shares["0.2"] < shares["0.4"] < 1  # the scaffold's share grows as the backbone shrinks
    assert result["benchmark"] == "step_speed" and result["config"] == "256_serving" and result["card"] == "cpu"


ORIGINAL_STAND_IN = ROOT / "tests" / "data" / "original_dit"  # DiT, DiT_models, as the original's models.py


def test_step_speed_times_the_original_dit_from_a_local_checkout(benchmarks):
    result = _load("step_speed").main(["--tiny", "--rounds", "2", "--original", str(ORIGINAL_STAND_IN)])
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows)[:4] == ["DiT-XL/2", "DiT-XL/2 CFG", "original DiT-XL/2", "original DiT-XL/2 CFG"]
    assert len(rows) == 9 and result["original"] == str(ORIGINAL_STAND_IN)
    original, original_cfg = rows["original DiT-XL/2"], rows["original DiT-XL/2 CFG"]
    # the same network at the same widths: the same FLOPs; its CFG step runs the doubled batch once
    assert original["flops"] == pytest.approx(rows["DiT-XL/2"]["flops"], rel=1e-6)
    assert original_cfg["flops"] == pytest.approx(2 * original["flops"], rel=1e-6)
    assert original["base"] == "DiT-XL/2" and original_cfg["base"] == "DiT-XL/2 CFG"
    assert "speedup_over_original" not in original and "speedup_over_original" not in original_cfg
    for name, r in rows.items():
        if name.startswith("original"):
            continue
        ref = original_cfg if "CFG" in name else original
        assert r["original_base"] == ref["row"] and r["original_ms"] == ref["ms"]
        assert r["speedup_over_original"] == pytest.approx(ref["ms"] / r["ms"])
        assert r["flop_speedup_over_original"] == pytest.approx(ref["flops"] / r["flops"])
    assert all(len(r["ms_rounds"]) == 2 for r in rows.values())  # timed in the same interleaved rounds


def test_step_speed_without_the_original_records_no_speedup_over_it():
    step_speed = _load("step_speed")
    rows = [{"row": "DiT-XL/2", "ms": 30.0, "flops": 240e9, "base": "DiT-XL/2"},
            {"row": "DC-DiT-XL rho=0.4", "ms": 20.0, "flops": 160e9, "base": "DiT-XL/2"}]
    step_speed.add_original_speedups(rows)
    assert all("speedup_over_original" not in r for r in rows)
    rows.insert(1, {"row": "original DiT-XL/2", "ms": 36.0, "gpu_ms": 35.0, "flops": 240e9,
                    "base": "DiT-XL/2"})
    rows[2]["gpu_ms"] = 17.5
    step_speed.add_original_speedups(rows)
    assert rows[2]["speedup_over_original"] == pytest.approx(1.8)
    assert rows[2]["gpu_speedup_over_original"] == 2.0
    assert rows[0]["speedup_over_original"] == pytest.approx(1.2)
    assert "gpu_speedup_over_original" not in rows[0]


def test_a_checkout_without_the_original_code_is_refused_with_what_to_do(tmp_path, benchmarks):
    common = _load("common")
    with pytest.raises(FileNotFoundError, match="--original PATH or set CHUNKFORMER_ORIGINAL_DIT"):
        common.load_original_dit(tmp_path)
    (tmp_path / "models.py").write_text("import no_such_package_here\n")
    with pytest.raises(ModuleNotFoundError, match="pip install --target .*_vendor no_such_package_here"):
        common.load_original_dit(tmp_path)
    (tmp_path / "models.py").write_text("DiT = object\n")
    with pytest.raises(AttributeError, match="no DiT_models"):
        common.load_original_dit(tmp_path)


def test_step_speed_names_each_configuration_apart():
    step_speed = _load("step_speed")
    names = {step_speed.config_name(size, config, options, fast)
             for size in (256, 512) for config in ("serving", "default")
             for options in ({}, {"inplace_buffers": False}) for fast in (True, False)}
    assert len(names) == 16 and "256_serving" in names and "512_default_inplace_buffers-False_no-fast-paths" in names


def test_step_speed_speedups_on_each_clock_where_both_rows_have_one():
    step_speed = _load("step_speed")
    rows = [{"row": "DiT-XL/2", "ms": 32.0, "gpu_ms": 31.0, "flops": 240e9, "base": "DiT-XL/2"},
            {"row": "DC-DiT-XL rho=0.2", "ms": 32.0, "gpu_ms": 29.5, "flops": 200e9, "base": "DiT-XL/2"},
            {"row": "DC-DiT-XL rho=0.4", "ms": 16.0, "flops": 120e9, "base": "DiT-XL/2"}]
    step_speed.add_speedups(rows)
    assert rows[1]["measured_speedup"] == 1.0 and rows[1]["gpu_speedup"] == pytest.approx(31.0 / 29.5)
    assert rows[1]["gpu_fraction_of_flop_speedup"] == pytest.approx(31.0 / 29.5 / 1.2)
    assert rows[2]["measured_speedup"] == 2.0 and "gpu_speedup" not in rows[2]


def test_sample_speed_times_each_setting_of_the_sampling_recipe(tmp_path, benchmarks):
    result = _load("sample_speed").main(["--tiny", "--no-compile", "--out", str(tmp_path / "s.json")])
    rows = {(r["model"], r["setting"]): r for r in result["rows"]}
    assert set(rows) == {("DiT-XL/2", "fp32, eager (defaults)"), ("DiT-XL/2", "bf16"),
                         ("DC-DiT-XL", "fp32, eager (defaults)"), ("DC-DiT-XL", "bf16"),
                         ("DC-DiT-XL", "bf16, fixed capacity, filled"),
                         ("DC-DiT-XL", "bf16 + bf16 routing, fixed capacity, filled")}
    assert rows[("DC-DiT-XL", "bf16, fixed capacity, filled")]["dit_setting"] == "bf16"
    for (model, _), r in rows.items():
        assert r["images_per_s"] > 0 and r["tflops_per_image"] > 0
        if model == "DC-DiT-XL":  # the budget holds in every plan mode: a quarter of the 8x8 grid
            assert r["kept_fraction"] == pytest.approx(0.25)
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == result["rows"]


def test_train_speed_sets_each_dc_dit_against_the_dit_of_its_width(benchmarks):
    result = _load("train_speed").main(["--tiny"])
    models = [r["model"] for r in result["rows"]]
    assert models == [f"{m}{w}{v}" for w in ("B", "XL") for m, v in (
        ("DiT-", "/2"), ("DC-DiT-", ""), ("DC-DiT-", " + checkpoint_scaffold + 4 blocks"),
        ("DC-DiT-", " scaffold only"))]
    assert [r["measured_speedup"] for r in result["rows"][::4]] == [1.0, 1.0]
    assert all(r["images_per_s"] > 0 and r["train_gflops_per_image"] > 0 for r in result["rows"])
    for dit, dc, ck, scaffold in (result["rows"][:4], result["rows"][4:]):
        assert ck["train_gflops_per_image"] == dc["train_gflops_per_image"]  # recomputation is not counted
        assert scaffold["train_gflops_per_image"] < dc["train_gflops_per_image"]
        assert 0 < dc["scaffold_flop_share"] < 1 and dc["scaffold_time_share"] > 0
    digits = _load("train_speed").main(["--tiny", "--size", "digits"])
    assert [r["model"] for r in digits["rows"]][:2] == ["DiT-S/2", "DC-DiT-S"]
    xl = _load("train_speed").main(["--tiny", "--widths", "XL"])
    assert [r["model"] for r in xl["rows"]][:2] == ["DiT-XL/2", "DC-DiT-XL"] and len(xl["rows"]) == 4


def test_train_speed_compiled_adds_dc_dit_under_a_memory_budget(benchmarks, monkeypatch):
    from torch._functorch import config

    ts = _load("train_speed")
    budgets = []
    real = ts.throughput

    def throughput(run, *args, **kwargs):  # the budget each model's forward runs under
        run.register_forward_pre_hook(lambda *a: budgets.append(config.activation_memory_budget))
        return real(run, *args, **kwargs)
    # torch.compile is the identity here (compiling takes minutes on 2 cores): the budget wraps the model
    monkeypatch.setattr(ts.torch, "compile", lambda model, **kw: model)
    monkeypatch.setattr(ts, "throughput", throughput)
    rows = ts.main(["--tiny", "--compile", "--widths", "B"])["rows"]
    assert [r["model"] for r in rows] == ["DiT-B/2", "DC-DiT-B", "DC-DiT-B + checkpoint_scaffold + 4 blocks",
                                          "DC-DiT-B + memory_budget 0.9", "DC-DiT-B scaffold only"]
    assert rows[3]["train_gflops_per_image"] == rows[1]["train_gflops_per_image"]
    assert sorted(set(budgets)) == [0.9, 1.0] and config.activation_memory_budget == 1.0
    assert 0 < rows[1]["scaffold_flop_share"] < 1  # still against the scaffold-only row


def test_train_speed_step_marks_each_phase_after_it_ran(benchmarks):
    ts = _load("train_speed")
    model = ts._build("DC-DiT-S", {"latent": 8, "channels": 1, "classes": 10}, False, depth=1, hidden_size=32,
                      num_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, y = ts._inputs({"latent": 8, "channels": 1, "classes": 10}, 2)
    seen = []
    before = model.blocks[0].attn.qkv.weight.detach().clone()

    def mark(phase):  # what each phase has done by the time it is marked
        grad = model.blocks[0].attn.qkv.weight.grad
        seen.append((phase, grad is not None, torch.equal(model.blocks[0].attn.qkv.weight, before)))
    ts.training_step(model, opt, x, t, y)(mark)
    assert seen == [("forward", False, True), ("backward", True, True), ("update", False, False)]
    assert "memory_gib" not in ts.main(["--tiny", "--widths", "B"])["rows"][0]  # measured on a GPU only


def test_train_speed_names_the_widths_a_size_has(benchmarks, capsys):
    with pytest.raises(SystemExit):
        _load("train_speed").main(["--tiny", "--size", "digits", "--widths", "XL"])
    assert "--size digits has widths S" in capsys.readouterr().err


def test_train_profile_stages_compute_the_models_own_loss(benchmarks):
    """The profile's staged step (each component on its own) is the model's forward and loss, unrolled."""
    ts = _load("train_speed")
    size = {"latent": 16, "channels": 1, "classes": 10}
    for name in ("DiT-S/2", "DC-DiT-S"):
        s = ts.Subject(name, size, 3, dict(depth=2, hidden_size=64, num_heads=2))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # no zero-initialised layer: every output depends on every component
            for p in s.model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        stages = (ts.dcdit_stages if s.model.supports_chunking else ts.dit_stages)(s.model, s.kw.get("rho"))
        torch.manual_seed(2)  # label dropout draws alike in both
        staged = ts.run_values(stages, {"x": s.x, "t": s.t, "y": s.y}, cuda=False)["loss"]
        torch.manual_seed(2)
        out, info = s.model(s.x, s.t, s.y, return_info=True, **s.kw)
        torch.testing.assert_close(staged, ts._loss(out) + 0.03 * info.ratio_loss)
        assert staged > 0


def test_train_profile_times_every_component_beside_its_flop_share(benchmarks):
    result = _load("train_speed").main(["--profile", "--tiny", "--size", "digits"])
    dit, dc = result["rows"]
    assert (dit["model"], dc["model"]) == ("DiT-S/2", "DC-DiT-S")
    assert set(dc["component_ms"]) == {"conditioning", "embed", "encoder", "router", "plan/pack", "backbone",
                                       "de-chunk", "decoder", "loss", "AdamW"}
    assert "router" not in dit["component_ms"] and dit["component_ms"]["backbone"] > 0
    for r in (dit, dc):
        assert r["parts_ms"] == pytest.approx(sum(r["component_ms"].values()))
        assert sum(r["flop_share"].values()) == pytest.approx(1.0) and r["step_ms"]["eager"] > 0
    assert dc["flop_share"]["encoder"] > 0 and dit["flop_share"].get("encoder", 0.0) == 0


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_train_attention_times_dits_layer_against_dcdits_masked_ones(benchmarks):
    result = _load("train_speed").main(["--attention", "--tiny", "--size", "digits"])
    assert [r["variant"].split(" (")[0] for r in result["rows"]] == [
        "DiT: unmasked", "DC-DiT: key mask, SDPA", "DC-DiT: FlexAttention block mask"]
    assert all(r["ms"] > 0 for r in result["rows"]) and result["heads"] == 6 and result["head_dim"] == 64


def test_train_speed_fast_path_flags_reach_the_built_models(benchmarks, monkeypatch):
    ts = _load("train_speed")
    size = {"latent": 8, "channels": 1, "classes": 10}
    plain = ts._build("DC-DiT-S", size, False, depth=1, hidden_size=64, num_heads=2)
    monkeypatch.setattr(ts, "_PREFIX_ATTENTION", True)
    monkeypatch.setattr(ts, "_CHANNELS_LAST", True)
    monkeypatch.setattr(ts, "_FILL", True)
    fast = ts._build("DC-DiT-S", size, False, depth=1, hidden_size=64, num_heads=2)
    assert fast.fill_capacity and not plain.fill_capacity and fast.plan_mode == "fixed"
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.ndim == 4]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)
    assert ts.kernels.applied(fast).get("attention", 0) > 0 and not ts.kernels.applied(plain)
    prefix_only = ts._build("DC-DiT-S", size, False, fast={"channels_last": False, "fill": False}, depth=1,
                            hidden_size=64, num_heads=2)  # an explicit setting wins over the flag
    assert ts.kernels.applied(prefix_only) and not prefix_only.fill_capacity
    assert not all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in prefix_only.modules()
                   if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)


def test_peak_memory_counts_each_storage_from_its_op_to_its_release(benchmarks):
    ts = _load("train_speed")
    kept = torch.zeros(10)
    with ts.PeakMemory({StorageWeakRef(kept.untyped_storage())}) as peak:
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 alive
        del a
        c = b + kept.sum()  # the sum's 4 bytes and c: a is gone, the parameter never counts
        assert peak.now == 8004
        del b, c
        torch.ones(1)
    assert peak.peak == 8004 and peak.now == 4


def test_train_ab_times_each_fast_path_against_the_dit_in_the_same_rounds(benchmarks):
    ts = _load("train_speed")
    result = ts.main(["--ab", "--tiny", "--size", "digits", "--rounds", "2"])
    rows = result["rows"]
    assert [r["model"] for r in rows] == ["DiT-S/2"] + [f"DC-DiT-S, {label}" for label in ts.FAST_PATHS]
    assert rows[0]["speedup"] == rows[0]["ratio"] == 1.0 and all(len(r["rounds_ms"]) == 2 for r in rows)
    for r in rows[1:]:  # the fast paths change no FLOPs, the scaffold adds some
        assert r["train_gflops_per_image"] == rows[1]["train_gflops_per_image"]
        assert r["train_gflops_per_image"] > rows[0]["train_gflops_per_image"]
        assert r["speedup"] > 0 and r["ratio"] == pytest.approx(r["speedup"] / r["flop_speedup"])
    with pytest.raises(SystemExit):
        ts.main(["--ab", "--tiny", "--rounds", "0"])


def test_train_account_splits_a_step_by_component_and_checkpointing_holds_less(benchmarks):
    result = _load("train_speed").main(["--account", "--tiny"])
    for size, (dit, dc, ck) in result["account"].items():
        assert dit["held_gib"] > 0 and dc["components"]["router"]["ops_fwd"] > 0
        assert dit["components"]["router"]["ops_fwd"] == 0  # a DiT has no router
        assert ck["held_gib"] < dc["held_gib"]  # the scaffold recomputed ...
        assert ck["ops_bwd"] > dc["ops_bwd"]  # ... in the backward pass
        assert ck["train_gflops_per_image"] == dc["train_gflops_per_image"]
        assert all(c["compiled_held_gib"] > 0 for c in (dit, dc, ck))  # traced through inductor's partitioner
        for c in (dit, dc):  # a budget keeps no more (less: test_recipes); none where checkpointed
            assert 0 < c["compiled_held_budget_gib"] <= c["compiled_held_gib"]
        assert "compiled_held_budget_gib" not in ck
        assert ck["peak_gib"] < dc["peak_gib"]
        assert dit["peak_gib"] > dit["state_gib"] * 0.75  # the weights and moments: 12 of its 16 bytes
    from chunkformer._typing import TYPECHECK

    for counts in result["compiled"].values():
        assert counts["host_syncs_unchecked"] == 0
        if not TYPECHECK:  # the runtime type checks (off by default, on in this suite) break graphs
            assert counts["graph_breaks"] == 0 and counts["recompiles"] == 0


def test_composition_stacks_merging_and_caching_on_chunking(tmp_path, benchmarks):
    result = _load("composition").main(["--preset", "tiny", "--smoke", "--steps", "2", "--batch", "1", "--reps", "1",
                                        "--out", str(tmp_path / "c.json")])
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows)[0] == "DiT-S/2" and rows["DiT-S/2"]["measured_speedup"] == 1.0
    assert rows["DC-DiT-S"]["deviation_from_dcdit"] == 0.0 and rows["DiT-S/2"]["deviation_from_dcdit"] is None
    merged = [rows[f"DC-DiT-S + merge {r}"]["tflops_per_image"] for r in ("0.25", "0.5")]
    assert rows["DC-DiT-S"]["tflops_per_image"] > merged[0] > merged[1]  # merging more counts fewer FLOPs


def test_step_time_rows_cover_each_rho(benchmarks):
    result = _load("step_time").main(["--tiny"])
    assert [r["rho"] for r in result["rows"]] == [None, 0.0, 0.2, 0.4]
    assert result["rows"][0]["measured_speedup_vs_dit"] == 1.0


def _attention(q, k, v):  # (N, H, d) each, written out: softmax(q k^T / sqrt(d)) v
    w = torch.softmax(torch.einsum("nhd,mhd->hnm", q, k) / q.shape[-1] ** 0.5, dim=-1)
    return torch.einsum("hnm,mhd->nhd", w, v)


@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.booleans())
def test_release_stand_ins_are_exact_attention(lengths, equal):
    """vs_release.py's flash-attn stand-ins: one batched call for equal lengths, a loop otherwise;
    both must equal attention computed per sequence, and unpad/pad must round-trip."""
    vs_release = _load("vs_release")
    if equal:
        lengths = [max(lengths)] * len(lengths)
    g = torch.Generator().manual_seed(sum(lengths))
    q, k, v = (torch.randn(sum(lengths), 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = vs_release._varlen(q, k, v, cu, cu, max(lengths), max(lengths))
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert torch.allclose(out[a:b], _attention(q[a:b], k[a:b], v[a:b]))
    qkv = torch.randn(2, 5, 3, 2, 4, generator=g, dtype=torch.float64)
    packed = vs_release._qkvpacked(qkv)
    for b in range(2):
        assert torch.allclose(packed[b], _attention(*qkv[b].unbind(1)))
    hidden = torch.randn(len(lengths), max(lengths), 3, generator=g)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    flat, index, cu2, longest, _ = vs_release._unpad(hidden, mask)
    assert torch.equal(cu2, cu) and longest == max(lengths) and flat.shape[0] == sum(lengths)
    assert torch.equal(vs_release._pad(flat, index, *mask.shape), hidden * mask[..., None])


def test_vs_release_runs_against_a_local_checkout(tmp_path, benchmarks):
    """Needs the release at $CHUNKFORMER_DCDIT_REFERENCE (never downloaded); skipped otherwise."""
    root = os.environ.get("CHUNKFORMER_DCDIT_REFERENCE")
    if not root or not (Path(root) / "models.py").is_file():
        pytest.skip("set CHUNKFORMER_DCDIT_REFERENCE to a checkout of AMD-AGI/DynamicChunkingDiT")
    import vs_release

    rows = vs_release.main(["--tiny", "--reference", root, "--out", str(tmp_path / "r.json")])["rows"]
    assert [r["row"] for r in rows] == ["rho=0", "rho=0.2", "rho=0.4", "Lite-CFG (0 / 0.9)"]
    assert rows[0]["release_kept"] == rows[0]["ours_kept"] == 16  # a quarter of the 8x8 grid
    assert rows[2]["release_kept"] < rows[0]["release_kept"]


def test_a_result_records_card_torch_commit_command_and_settings(tmp_path, benchmarks, monkeypatch):
    common = _load("common")
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "step_speed.py"), "--size", "512"])
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    result = common.save_result("step_speed", "512_serving", "NVIDIA H100 80GB HBM3", write=False)
    assert result["command"] == "python benchmarks/step_speed.py --size 512"
    assert result["torch"] == torch.__version__ and result["card"] == "NVIDIA H100 80GB HBM3"
    assert result["commit"] is None or len(result["commit"].split("+")[0]) == 40
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    result = common.save_result("step_speed", "512_serving", "cpu", out=tmp_path / "r.json", rows=[])
    assert result["command"].startswith("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python ")
    assert json.loads((tmp_path / "r.json").read_text()) == result


@pytest.mark.parametrize("card, slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("cpu", "cpu"),
                                        ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090")])
def test_result_files_are_named_by_benchmark_configuration_and_card(card, slug):
    common = _load("common")
    assert common.result_path("step_speed", "256_serving", card).name == f"step_speed_256_serving_{slug}.json"


def test_fast_paths_remove_every_patch_and_apply_only_on_cuda(benchmarks):
    common = _load("common")
    from chunkformer import kernels
    from chunkformer.kernels import short_attention
    from chunkformer.models import create_model

    model = create_model("DC-DiT-S", input_size=16, depth=1)
    kernels.apply(model, force=True)  # patched, as on a GPU
    assert kernels.applied(model)
    try:
        common.fast_paths(model, on=False)
        assert not kernels.applied(model) and short_attention._enabled is False
    finally:
        common.fast_paths(model, on=True)
    assert not kernels.applied(model) and short_attention._enabled  # a CPU model: nothing to apply
    common.fast_paths(create_model("DiT-S/2", input_size=8, depth=1), on=False)  # no scaffold: nothing to raise


@pytest.mark.parametrize("path", sorted((BENCHMARKS / "results").glob("*.json")), ids=lambda p: p.name)
def test_every_result_file_records_where_it_came_from(path):
    data = json.loads(path.read_text())
    for key in ("benchmark", "config", "card", "torch", "commit", "command"):
        assert data.get(key), f"{path.name} has no {key}"
    common = _load("common")
    assert path.name == common.result_path(data["benchmark"], data["config"], data["card"]).name


@pytest.mark.parametrize("page", ["docs/performance.md", "README.md"])
def test_report_regenerates_each_page_unchanged(page):
    """Every number in a generated region comes from a result file: regenerating the regions changes nothing."""
    report = _load("report")
    assert ROOT / page in report.PAGES
    text = (ROOT / page).read_text()
    assert report.REGION.search(text), f"{page} has no generated region"
    assert report.fill(text, report.load()) == text, "run python benchmarks/report.py --write-docs"


def test_report_fills_only_marked_regions_and_rejects_unknown_ones(tmp_path):
    report = _load("report")
    res = report.load()
    page = "intro 1.23x\n<!-- generated:tie -->\nstale\n<!-- end -->\noutro\n"
    filled = report.fill(page, res)
    assert filled.startswith("intro 1.23x\n<!-- generated:tie -->\nAt 256px") and filled.endswith("<!-- end -->\noutro\n")
    assert "stale" not in filled and report.fill(filled, res) == filled
    with pytest.raises(KeyError, match="no generator"):
        report.fill("<!-- generated:nope -->\n<!-- end -->", res)


def test_report_table_reads_each_cell_from_its_file(tmp_path):
    report = _load("report")
    res = report.load()
    step = res["step_speed_256_serving_h100"]
    row = next(r for r in step["rows"] if r["row"] == "DC-DiT-XL rho=0.4")
    table = report.speed_table(res)
    line = next(x for x in table.splitlines() if x.startswith("| DiT-XL/2, rho 0.4 |"))
    assert line.split(" | ")[1] == f"**{row['measured_speedup']:.2f}x** ({row['flop_speedup']:.2f}x)"  # 256px, H100
    changed = json.loads(json.dumps(res))
    next(r for r in changed["step_speed_256_serving_h100"]["rows"] if r["row"] == "DC-DiT-XL rho=0.4")["measured_speedup"] /= 2
    assert report.speed_table(changed) != table


def test_report_fills_the_original_dit_row_from_runs_that_timed_it():
    report = _load("report")
    bare = json.loads(json.dumps(report.load()))
    for data in bare.values():  # the result files as runs without --original write them
        for row in data.get("rows", []) if isinstance(data.get("rows"), list) else []:
            row.pop("speedup_over_original", None)

    def cells(table):
        line = next(x for x in table.splitlines() if x.startswith("| the original DiT-XL/2 code"))
        return line.strip("| ").split(" | ")[1:]

    assert set(cells(report.speed_table(bare))) == {"not measured"}
    changed = json.loads(json.dumps(bare))
    speedups = {"DC-DiT-XL rho=0": 1.07, "DC-DiT-XL rho=0.2": 1.25, "DC-DiT-XL rho=0.4": 1.5,
                "DC-DiT-XL Lite-CFG (0 / 0.9)": 1.66,
                "DC-DiT-XL scaffold only": 9.0}  # not an operating point: not in the cell
    for row in changed["step_speed_512_serving_h100"]["rows"]:
        if row["row"] in speedups:
            row["speedup_over_original"] = speedups[row["row"]]
    table = report.speed_table(changed)
    head = next(x for x in table.splitlines() if x.startswith("| DC-DiT-XL against"))
    column = [c for c in head.strip("| ").split(" | ")[1:]].index("512px, H100, batch 16")
    filled = cells(table)
    assert filled[column] == "1.07-1.66x"
    assert [c for i, c in enumerate(filled) if i != column] == ["not measured"] * (len(filled) - 1)
    assert table.replace("1.07-1.66x", "not measured") == report.speed_table(bare)  # nothing else moves


def test_training_profile_reads_the_plain_run_and_adds_the_filled_one_beside_it():
    report = _load("report")
    res = report.load()
    assert "train_speed_profile_digits_fill_h100" in res  # sorts before the plain run's file
    text = report.train_profile(res)
    plain = res["train_speed_profile_digits_h100"]["rows"]
    assert f"| {plain[1]['model']} |" in text and f"{plain[1]['step_ms']['compiled']:.2f} |" in text
    filled = res["train_speed_profile_digits_fill_h100"]["rows"]
    speed = filled[0]["step_ms"]["compiled"] / filled[1]["step_ms"]["compiled"]
    assert f"trains at {speed:.2f}x DiT-S/2's speed in the same run" in text
    slower = json.loads(json.dumps(res))
    slower["train_speed_profile_digits_fill_h100"]["rows"][1]["step_ms"]["compiled"] *= 2
    assert f"trains at {speed / 2:.2f}x" in report.train_profile(slower)
    del slower["train_speed_profile_digits_fill_h100"]
    assert "Filled to the capacity" not in report.train_profile(slower)


def test_training_caveat_adds_the_checkpointed_run_where_a_result_has_it():
    report = _load("report")
    res = json.loads(json.dumps(report.load()))
    xl = {"model": "DiT-XL/2", "images_per_s": 500.0, "peak_gib": 25.0, "measured_speedup": 1.0,
          "flop_speedup": 1.0}
    dc = {**xl, "model": "DC-DiT-XL", "peak_gib": 28.0, "measured_speedup": 0.75, "flop_speedup": 0.9}
    ck = {**dc, "model": "DC-DiT-XL + checkpoint_scaffold + 4 blocks", "peak_gib": 24.5,
          "measured_speedup": 0.7}
    res["train_speed_256_compiled_xl_h100"] = {**res["train_speed_256_compiled_h100"], "rows": [xl, dc]}
    text = report.training(res)
    assert "with 28.0 GiB of memory against DiT-XL/2's 25.0 GiB;" in text  # the XL run, not all widths
    assert "recomputed in backward" not in text
    res["train_speed_256_compiled_xl_h100"]["rows"].append(ck)
    want = "(24.5 GiB, at 0.70x, with the encoder, the router and the first 4 blocks recomputed in backward)"
    assert want in report.training(res)
    res["train_speed_256_compiled_xl_h100"]["rows"].append({**dc, "model": "DC-DiT-XL + memory_budget 0.9",
                                                            "peak_gib": 20.0, "measured_speedup": 0.74})
    assert "in backward; 20.0 GiB, at 0.74x, with `train.memory_budget=0.9`)" in report.training(res)


def test_report_check_passes_from_the_command_line():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "report.py"), "--check"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
