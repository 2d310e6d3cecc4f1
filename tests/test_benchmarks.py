"""The CPU-runnable benchmarks still run and report what their docs say (numbers are not asserted)."""

import copy
import json
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]


BENCHMARK_MODULES = ("host_syncs", "small_train_speed", "train_speed", "report", "smoothing", "scaffold_profile", "vs_release", "step_speed", "sample_speed", "scaffold_compile", "process_spread", "norm_placement", "cell_gemm", "implicit_conv")  # studies/ has a report.py too


@pytest.fixture
def benchmarks(monkeypatch):
    for name in BENCHMARK_MODULES:
        sys.modules.pop(name, None)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("CHUNKFORMER_TYPECHECK", "0")
    yield
    for name in BENCHMARK_MODULES:
        sys.modules.pop(name, None)


def test_host_syncs_counts_one_wait_per_packed_forward_and_none_in_fixed_mode(tmp_path, benchmarks):
    import host_syncs

    rows = host_syncs.main(["--batch", "2", "--out", str(tmp_path / "s.json")])["rows"]
    assert rows["DC-DiT-S fixed"]["syncs_fwd_unchecked"] == 0
    assert rows["DC-DiT-S packed"]["syncs_fwd_unchecked"] == rows["DC-DiT-S padded"]["syncs_fwd_unchecked"] == 1
    # value checks: the timestep / label range (every model) and the router's NaN check (DC-DiT)
    assert all(r["syncs_fwd"] == r["syncs_fwd_unchecked"] + 2 for k, r in rows.items() if k.startswith("DC"))
    assert rows["DiT-S/2"]["syncs_fwd"] == rows["DiT-S/2"]["syncs_fwd_unchecked"] + 1
    assert (tmp_path / "s.json").is_file()


def test_small_train_speed_runs_every_eager_variant(tmp_path, benchmarks):
    import small_train_speed

    result = small_train_speed.main(["--tiny", "--out", str(tmp_path / "t.json")])
    eager = [v[0] for v in small_train_speed.VARIANTS if not v[5] and "varlen" not in v[0]]  # CUDA-only rows
    assert [r["row"] for r in result["rows"]] == eager
    assert result["rows"][0]["measured_speedup"] == 1.0 and all(r["steps_per_s"] > 0 for r in result["rows"])


def test_smoothing_benchmark_reports_an_error_under_the_issue_bound(tmp_path, benchmarks):
    import smoothing

    result = smoothing.main(["--tiny", "--out", str(tmp_path / "s.json")])
    assert [r["grid"] for r in result["rows"]] == ["8x8", "16x16"]
    assert all(r["auto"] == "windowed" for r in result["rows"])  # the CPU never smooths densely
    assert all(e < 1e-4 for r in result["rows"] for e in r["relative_error"].values())
    assert (tmp_path / "s.json").is_file()


def test_scaffold_profile_rows_are_cumulative_stages(tmp_path, benchmarks):
    import scaffold_profile

    rows = scaffold_profile.main(["--tiny", "--out", str(tmp_path / "p.json")])["rows"]
    assert rows[2]["row"] == "whole scaffold (auto: windowed de-chunk)" and rows[2]["time_share"] == 1.0
    flops = [r["gflops_per_sample"] for r in rows]
    assert 0 < flops[0] < flops[1] < flops[2]  # encoder < + router < whole scaffold
    assert flops[5] < flops[2]  # no smoothing counts fewer FLOPs


def _load(name: str):
    """A benchmark script as a module, without putting benchmarks/ on sys.path (studies/ has a report.py too)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))  # for its sibling imports, only while it loads
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        for sibling in BENCHMARK_MODULES:
            sys.modules.pop(sibling, None)
    return module


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


def rows_of(result: dict) -> list[str]:
    return [r["row"] for r in result["rows"]]


def test_step_speed_rows_and_scaffold_share(tmp_path, benchmarks):
    step_speed = _load("step_speed")
    result = step_speed.main(["--tiny", "--no-compile", "--cudagraphs", "--fill-capacity", "--bf16-routing",
                              "--out", str(tmp_path / "s.json")])
    rows = {r["row"]: r for r in result["rows"]}
    rhos = [f"DC-DiT-XL rho={r}" for r in ("0", "0.2", "0.4")]
    for suffix in ("", " filled", " filled, bf16 routing"):  # every variant at every budget
        assert all(rho + suffix in rows for rho in rhos)
        kept = [rows[rho + suffix]["kept"] for rho in rhos]
        assert kept == sorted(kept, reverse=True)  # tighter budgets keep fewer tokens
    assert rows["DC-DiT-XL rho=0 filled"]["flops"] == rows["DC-DiT-XL rho=0"]["flops"]  # the same tokens
    assert {"DC-DiT-XL Lite-CFG (0 / 0.9)", "DC-DiT-XL Lite-CFG (0 / 0.9) filled"} <= set(rows)
    assert rows["DC-DiT-XL Lite-CFG (0 / 0.9)"]["base"] == "cfg"
    assert {"DC-DiT-XL scaffold only", "DC-DiT-XL scaffold only, bf16 routing"} <= set(rows)
    assert not any("CUDA graphs" in r for r in rows)  # CUDA only
    assert all(len(r["ms_rounds"]) == result["rounds"] and min(r["ms_rounds"]) <= r["ms"] <= max(r["ms_rounds"])
               for r in result["rows"])  # the median of interleaved rounds
    assert 0 < result["scaffold_flop_share"] < 1 and result["scaffold_time_share_bf16_routing"] > 0
    assert (tmp_path / "s.json").is_file()
    only = step_speed.main(["--tiny", "--no-compile", "--no-masked", "--fill-capacity", "--rounds", "1"])
    assert "DC-DiT-XL rho=0" not in rows_of(only) and "DC-DiT-XL rho=0 filled" in rows_of(only)
    import torch._inductor.config as inductor_config

    default = inductor_config.triton.autotune_pointwise
    try:
        w = step_speed.main(["--tiny", "--no-compile", "--no-masked", "--fill-capacity", "--bf16-weights", "--rounds", "1",
                             "--rows", "rho=0.4", "--inductor", "triton.autotune_pointwise=False"])
        assert inductor_config.triton.autotune_pointwise is False
    finally:  # the setting is process-wide
        inductor_config.triton.autotune_pointwise = default
    assert set(rows_of(w)) == {"DiT-XL/2", "DiT-XL/2 CFG", "DiT-XL/2, bf16 weights", "DiT-XL/2 CFG, bf16 weights",
                               "DC-DiT-XL rho=0.4 filled", "DC-DiT-XL rho=0.4 filled, bf16 weights"}
    bf16 = {r["row"]: r for r in w["rows"]}["DC-DiT-XL rho=0.4 filled, bf16 weights"]
    assert bf16["base"] == "bf16w-plain" and w["scaffold_time_share"] is None  # against the bf16-weight DiT-XL/2
    assert w["inductor_config"] == {"triton.autotune_pointwise": False}
    # --bf16-weights-only: no fp32-weight row at all, every DC-DiT row and the scaffold against the bf16-weight DiT
    b = step_speed.main(["--tiny", "--no-compile", "--no-masked", "--fill-capacity", "--bf16-routing",
                         "--bf16-weights-only", "--rounds", "1", "--rows", "bf16 routing"])
    names = rows_of(b)
    assert all(n.endswith(", bf16 weights") for n in names) and "DiT-XL/2, bf16 weights" in names
    assert "DC-DiT-XL scaffold only, bf16 routing, bf16 weights" in names
    assert all(r["base"].startswith("bf16w-") for r in b["rows"] if r["row"].startswith("DC-DiT"))
    assert b["scaffold_time_share"] is None and b["scaffold_time_share_bf16_routing"] > 0
    report = _load("report")
    assert "Scaffold alone, bf16 routing:" in report.step_table(b)
    assert b["scaffold_gpu_share_bf16_routing"] is None and "GPU clock" not in report.step_table(b)  # CUDA only
    on_gpu = dict(b, scaffold_gpu_share_bf16_routing=1.14 * b["scaffold_flop_share"])
    assert "Scaffold alone, bf16 routing, GPU clock" in report.step_table(on_gpu)
    assert "(1.14x its share)." in report.step_table(on_gpu)
    # the FLOP share at each operating point: the scaffold's FLOPs are a larger part of a shorter step
    shares = b["scaffold_flop_shares_by_rho"]
    assert set(shares) == {"0", "0.2", "0.4"} and shares["0"] < shares["0.2"] < shares["0.4"] < 1
    assert shares["0"] == pytest.approx(b["scaffold_flop_share"])
    assert b["scaffold_gpu_shares_by_rho"] == {}  # no GPU clock on the CPU
    rows = {"sc": {"gpu_ms": 5.0}, "r0": {"gpu_ms": 35.0}, "r2": {"gpu_ms": 25.0}, "r4": {"ms": 20.0}}
    by_rho = step_speed.scaffold_shares(rows, "sc", {0.0: "r0", 0.2: "r2", 0.4: "r4"}, {0.0: 0.125, 0.2: 0.16, 0.4: 0.2})
    assert list(by_rho) == ["0", "0.2"]  # rho 0.4's row has no GPU clock
    assert by_rho["0.2"]["time_share"] == pytest.approx(0.2) and by_rho["0.2"]["ratio"] == pytest.approx(1.25)
    assert by_rho["0"]["ratio"] == pytest.approx(8 / 7)  # 1/7 of the step for 1/8 of its FLOPs
    text = report.step_table(dict(on_gpu, scaffold_gpu_shares_by_rho={"bf16 routing": by_rho}))
    assert "rho=0.2 20.0% for 16.0% of the FLOPs (1.25x)" in text
    # --cudnn-narrowing: every DC-DiT row and scaffold twice, the decoder's narrowing conv through cuDNN in the twin
    n = step_speed.main(["--tiny", "--no-compile", "--no-masked", "--fill-capacity", "--bf16-routing",
                         "--bf16-weights-only", "--cudnn-narrowing", "--rounds", "1", "--rows", "rho=0.4|scaffold"])
    twin = ", cuDNN narrowing conv"
    assert {"DC-DiT-XL rho=0.4 filled, bf16 routing" + twin + ", bf16 weights",
            "DC-DiT-XL scaffold only, bf16 routing" + twin + ", bf16 weights",
            "DC-DiT-XL rho=0.4 filled, bf16 routing, bf16 weights"} <= set(rows_of(n))
    by = {r["row"]: r for r in n["rows"]}
    assert by["DC-DiT-XL rho=0.4 filled" + twin + ", bf16 weights"]["flops"] == by[
        "DC-DiT-XL rho=0.4 filled, bf16 weights"]["flops"]  # the same convolution, counted alike
    # --paths: every DC-DiT row and scaffold again through a compute path of scaffold_compile.py, FLOPs of its twin
    pa = step_speed.main(["--tiny", "--no-compile", "--no-masked", "--bf16-routing", "--fill-capacity", "--bf16-weights-only",
                          "--rounds", "1", "--rows", "rho=0.4|scaffold", "--paths", "residual in its GEMM"])
    path = ", residual in its GEMM"
    by = {r["row"]: r for r in pa["rows"]}
    assert {"DC-DiT-XL rho=0.4 filled, bf16 routing" + path + ", bf16 weights",
            "DC-DiT-XL scaffold only, bf16 routing" + path + ", bf16 weights"} <= set(by)
    assert by["DC-DiT-XL rho=0.4 filled, bf16 routing" + path + ", bf16 weights"]["flops"] == by[
        "DC-DiT-XL rho=0.4 filled, bf16 routing, bf16 weights"]["flops"] > 0  # its addmm is no nn.Linear call
    # a path compiled inside a context changes DiT-XL/2's graph too: it gets a DiT-XL/2 twin, the baseline's base
    ctx = step_speed.main(["--tiny", "--no-compile", "--no-masked", "--bf16-routing", "--fill-capacity",
                           "--bf16-weights-only", "--rounds", "1", "--rows", "rho=0.4",
                           "--paths", "position table per call (before)"])
    by = {r["row"]: r for r in ctx["rows"]}
    assert by["DiT-XL/2, bf16 weights, position table per call (before)"]["base"] == "bf16w-plain"
    assert "DC-DiT-XL rho=0.4 filled, bf16 routing, position table per call (before), bf16 weights" in by
    with pytest.raises(SystemExit):
        step_speed.main(["--tiny", "--no-compile", "--fill-capacity", "--paths", "multi-kernel"])  # a compile setting
    # --ab-options: every row again, compiled with those options, against the DiT-XL/2 compiled the same way
    ab = step_speed.main(["--tiny", "--no-compile", "--no-masked", "--fill-capacity", "--bf16-weights-only",
                          "--rounds", "1", "--rows", "rho=0.4", "--ab-options", "max_autotune_pointwise=True"])
    tag = " [max_autotune_pointwise=True]"
    names = rows_of(ab)
    assert {"DiT-XL/2, bf16 weights" + tag, "DC-DiT-XL rho=0.4 filled, bf16 weights" + tag} <= set(names)
    assert len(names) == 6 and ab["ab_options"] == {"max_autotune_pointwise": True}
    tagged = {r["row"]: r for r in ab["rows"]}["DC-DiT-XL rho=0.4 filled, bf16 weights" + tag]
    assert tagged["base"] == "bf16w-plain" + tag
    with pytest.raises(SystemExit, match="no setting"):
        step_speed.main(["--tiny", "--no-compile", "--fill-capacity", "--ab-options", "no_such_knob=1"])
    with pytest.raises(SystemExit, match="no setting"):
        step_speed.main(["--tiny", "--no-compile", "--inductor", "no_such_knob=1"])
    with pytest.raises(SystemExit):
        step_speed.main(["--tiny", "--no-compile", "--no-masked"])


def test_step_speed_unfused_gelu_twins_every_model_with_its_gelu_as_its_own_op(benchmarks, monkeypatch, capsys):
    import step_speed

    import chunkformer as cf

    turned_off = []
    real = cf.set_fused_gelu

    def spy(model, enabled):
        turned_off.append((type(model).__name__, enabled))
        return real(model, enabled)

    monkeypatch.setattr(cf, "set_fused_gelu", spy)
    res = step_speed.main(["--tiny", "--no-compile", "--no-masked", "--fill-capacity", "--bf16-weights-only",
                           "--rounds", "1", "--rows", "rho=0.4", "--unfused-gelu"])
    tag = " [GELU unfused]"
    by = {r["row"]: r for r in res["rows"]}
    assert {"DiT-XL/2, bf16 weights" + tag, "DC-DiT-XL rho=0.4 filled, bf16 weights" + tag} <= set(by)
    assert by["DC-DiT-XL rho=0.4 filled, bf16 weights" + tag]["base"] == "bf16w-plain" + tag
    assert by["DC-DiT-XL rho=0.4 filled, bf16 weights"]["base"] == "bf16w-plain"
    assert res["unfused_gelu"] and res["ab_tag"] == tag
    # each twin's models, and only theirs, have the fusion off; the scaffold alone has no MLP to turn off
    assert ("DiT", False) in turned_off and ("DCDiT", False) in turned_off
    assert all(not enabled for _, enabled in turned_off)
    with pytest.raises(SystemExit):
        step_speed.main(["--tiny", "--no-compile", "--fill-capacity", "--unfused-gelu", "--ab-options",
                         "max_autotune_pointwise=True"])
    assert "run them separately" in capsys.readouterr().err


def test_process_spread_runs_each_setting_in_fresh_processes_and_compares_to_the_token_share(tmp_path, benchmarks):
    import process_spread

    res = process_spread.main(["--tiny", "--processes", "1", "--settings", "default,expandable_segments:True",
                               "--inductor", "inplace_buffers=False", "--out", str(tmp_path / "p.json")])
    assert res["inductor"] == {"inplace_buffers": False}
    import torch._inductor.config as inductor_config

    assert inductor_config.inplace_buffers  # set in the workers only, not in the process that starts them
    with pytest.raises(SystemExit, match="no setting"):
        process_spread.main(["--tiny", "--inductor", "no_such_knob=1"])
    assert [(r["setting"], r["process"]) for r in res["rows"]] == [("default", 0), ("expandable_segments:True", 0)]
    # each worker reports the allocator setting it ran under: unset for "default", the value otherwise
    assert [r["alloc_conf"] for r in res["rows"]] == [None, "expandable_segments:True"]
    for r in res["rows"]:
        dit, dc = r["models"]["DiT-XL/2"], r["models"]["DC-DiT-XL"]
        assert dit["tokens"] == 16 and dc["tokens"] == 16  # 8x8 latent, patch 2; capacity bucketed up to 8s
        assert r["speedup"] == pytest.approx(dit["ms"] / dc["ms"])
    assert set(res["spread"]) == {"default", "expandable_segments:True"}
    assert json.loads((tmp_path / "p.json").read_text())["settings"] == ["default", "expandable_segments:True"]
    with pytest.raises(SystemExit):
        process_spread.main(["--tiny", "--processes", "0"])


def test_process_spread_table_has_a_row_per_process(benchmarks):
    report = _load("report")
    model = lambda ms, ln, gelu, tokens: {"ms": ms, "tokens": tokens, "roles": {"layer norm": ln, "gelu": gelu}}  # noqa: E731
    rows = [{"setting": "default", "process": 0, "speedup": 32.0 / 33.5, "layer_norm_vs_share": 4.5 / (4.0 * 208 / 256),
             "models": {"DiT-XL/2": model(32.0, 4.0, 0.0, 256), "DC-DiT-XL": model(33.5, 4.5, 0.0, 208)}}]
    text = report.process_spread_table({"card": "H100", "torch": "2.11", "rho": 0.2, "command": "c", "rows": rows})
    assert "| default | 0 | 32.00 | 4.00 / 0.00 | 33.50 | 4.50 / 0.00 | 1.38 | 0.96 |" in text


def test_moving_kernels_finds_a_kernel_that_moves_or_goes_missing_and_the_table_lists_it(benchmarks):
    import process_spread

    def row(kernels: dict | None) -> dict:
        m = {"ms": 30.0, "tokens": 256, "roles": {}} | ({} if kernels is None else {"kernels": kernels})
        return {"setting": "default", "process": 0, "models": {"DiT-XL/2": m}}

    rows = [row({"gemm_a": 20.0, "ln_7": 2.10, "tiny": 0.01, "algo_1": 0.30}),
            row({"gemm_a": 20.5, "ln_7": 2.90, "tiny": 0.03, "algo_2": 0.28})]
    moving = process_spread.moving_kernels(rows)
    # absent from one process first, then by spread; gemm_a moves 2.5% and "tiny" is under 0.05 ms
    assert [e["kernel"] for e in moving] == ["algo_1", "algo_2", "ln_7"]
    assert moving[0]["ms"] == [0.30, None] and moving[2]["ms"] == [2.10, 2.90]
    assert process_spread.moving_kernels([row(None), rows[1]]) == []  # a run without kernel lists compares nothing
    report = _load("report")
    data = {"card": "H100", "torch": "2.11", "rho": 0.2, "command": "c", "moving_kernels": moving,
            "rows": [r | {"speedup": 1.0, "layer_norm_vs_share": 1.0,
                          "models": {"DiT-XL/2": r["models"]["DiT-XL/2"], "DC-DiT-XL": r["models"]["DiT-XL/2"]}}
                     for r in rows]}
    text = report.process_spread_table(data)
    assert "| DiT-XL/2 | `algo_1` | 0.300 | - |" in text and "| DiT-XL/2 | `ln_7` | 2.100 | 2.900 |" in text


def test_code_hashes_ignore_the_process_but_not_the_code(tmp_path, benchmarks):
    import process_spread

    def ptx(body: str, path: str) -> str:
        return (f'.version 8.4\n.file 1 "{path}/k.py"\n.entry k()\n{{\n.loc 1 5 0\n{body}\n}}\n'
                f"\t.section\t.debug_str\n{{\n.b8 {','.join(str(ord(c)) for c in path)}\n}}\n")

    name = "triton_red_fused_native_layer_norm_7"
    for folder, body, path in (("a", "ld.global.b32 %r1, [%rd1];", "/tmp/x1"), ("b", "ld.global.b32 %r1, [%rd1];", "/tmp/y2"),
                               ("c", "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];", "/tmp/z3")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{name}.ptx").write_text(ptx(body, path))
    (tmp_path / "a" / "triton_poi_fused_gelu_3.ptx").write_text(ptx("x", "/tmp/x1"))  # not a LayerNorm
    hashes = process_spread.code_hashes(str(tmp_path))[name]
    assert len(hashes) == 3 and len(set(hashes)) == 2  # the same code under two paths: one hash
    assert list(process_spread.code_hashes(str(tmp_path))) == [name] and process_spread.code_hashes(None) == {}
    assert "/tmp" not in process_spread.ptx_code(ptx("y", "/tmp/x1"))


def test_release_table_shows_each_row_against_the_release_and_dit():
    report = _load("report")
    row = {"row": "rho=0.4", "release_kept": 154, "ours_kept": 160, "release_ms": 58.0, "ours_ms": 31.0,
           "dit_ms": 33.0, "ours_over_release": 58.0 / 31.0, "release_over_dit": 33.0 / 58.0, "ours_over_dit": 33.0 / 31.0}
    text = report.release_table({"card": "H100", "torch": "2.11", "size": 256, "batch": 64, "command": "c", "rows": [row]})
    assert "| rho=0.4 | 154 / 160 | 58.00 | 31.00 | 1.87x | 33.00 | 0.57x | 1.06x |" in text


def test_tap_conv_table_shows_every_form_and_the_profiles():
    report = _load("report")
    data = {"card": "H200", "torch": "2.11", "command": "c", "rows": [
        {"shape": [64, 1152, 288, 32], "form": "cuDNN conv", "ms": 1.13, "tflops": 346.0, "rel_err": 3.9e-3},
        {"shape": [64, 1152, 288, 32], "form": "taps GEMM alone", "ms": 0.5583, "tflops": 701.0, "rel_err": None}],
        "profiles": {"scaffold only, taps narrowing conv": {"nvjet_gemm": 0.501, "_tap_sum_kernel": 0.107}}}
    text = report.tap_conv_table(data)
    assert "| 64 x 1152 -> 288, 32x32 | cuDNN conv | 1.1300 | 346 | 3.9e-03 |" in text
    assert "| 64 x 1152 -> 288, 32x32 | taps GEMM alone | 0.5583 | 701 | - |" in text
    assert "| 0.107 | `_tap_sum_kernel` |" in text and "scaffold only, taps narrowing conv" in text


def test_tap_conv_benchmark_asks_for_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    import importlib.util

    spec = importlib.util.spec_from_file_location("tap_conv_bench", ROOT / "benchmarks" / "tap_conv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.main([])
    assert "run it on a GPU" in capsys.readouterr().err


def test_scaffold_compile_builds_a_scaffold_whose_output_shows_every_op(capsys):
    """The variants are compared by their outputs, so the zero-initialised layers must not zero them."""
    bench = _load("scaffold_compile")
    model, (x, t, y) = bench.serving_scaffold(256, torch.device("cpu"), batch=1)
    assert model.blocks is not None and len(model.blocks) == 0  # the scaffold alone
    assert model.capacity == 32 * 32 // 4 and model.fill_capacity
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.shape == (1, 8, 32, 32) and out.float().std() > 0
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main([])
        assert "run it on a GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--variants", "default,fastest"])
    assert "unknown variant(s) ['fastest']" in capsys.readouterr().err


def test_scaffold_compile_paths_compute_the_same_function_through_other_kernels():
    """The compute-path variants (1x1 convs as GEMMs, the widening conv split) change kernels, not values."""
    import chunkformer as cf

    bench = _load("scaffold_compile")
    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", input_size=16, depth=1, plan_mode="fixed", capacity=64,
                            fill_capacity=True, fp32_router_dechunk=False).eval()  # the merge the GEMM can take
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)  # zero-init layers would hide any difference
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        for name in ("1x1 as GEMMs", "widening conv split", "1x1 as GEMMs + widening conv split",
                     "residual in its GEMM", "all three paths", "merge summed in bf16 (before)",
                     "1x1 + split + wide persistent", "inputs copied per kernel (before)", "gate multiplied (before)",
                     "session 16 library (before)", "dense smoothing", "de-chunk slots written once"):
            patched = bench.VARIANTS[name][1](copy.deepcopy(model))
            kinds = {type(m).__name__ for m in patched.modules()}
            assert ("_Conv1x1AsLinear" in kinds) == ("1x1" in name or "three" in name)
            assert ("_SplitWideConv2d" in kinds) == ("split" in name or "three" in name)
            assert (type(patched.decoder).__name__ == "_MergeInGemm") == ("residual" in name or "three" in name)
            assert (type(patched.decoder).__name__ == "_MergeInBf16") == ("bf16" in name)
            assert (type(patched.decoder).__name__ == "_MergeGated") == ("gate" in name or "16 library" in name)
            assert (type(patched.decoder).__name__ == "_MergeSlotsWritten") == ("slots" in name)
            assert ("_CopiedInputResBlock" in kinds and "_CopiedInputGroupNorm" in kinds and "ResBlock" not in kinds
                    and "GroupNorm" not in kinds) == ("copied" in name or "16 library" in name)
            torch.testing.assert_close(patched(x, t, y), ref, rtol=1e-5, atol=1e-5)
        stored = bench.VARIANTS["conv weights channels-last"][1](copy.deepcopy(model))
        convs = [m for m in stored.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
        assert not model.encoder.blocks[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(stored(x, t, y), ref, rtol=1e-5, atol=1e-5)
    wide = [m for m in bench.split_widening(copy.deepcopy(model)).modules() if type(m).__name__ == "_SplitWideConv2d"]
    assert [(m.in_channels, m.out_channels) for m in wide] == [(96, 384)]  # the encoder's, not the 4 -> 96 embed


def test_scaffold_compile_table_shows_every_variant_and_missing_differences():
    report = _load("report")
    data = {"card": "H100", "torch": "2.11", "command": "c", "size": 256, "batch": 64, "rows": [
        {"variant": "default", "compile_s": 24.2, "ms": 5.67, "vs_default": 1.0, "max_abs_diff": 0.0},
        {"variant": "multi-kernel", "compile_s": 18.0, "ms": 5.505, "vs_default": 1.03, "max_abs_diff": None}],
        "profiles": {"multi-kernel": {"triton_per_fused_rms_norm": 0.154}}, "note": "n"}
    text = report.scaffold_compile_table(data)
    assert "| default | 24 | 5.670 | 1.000 | 0.0e+00 |" in text
    assert "| multi-kernel | 18 | 5.505 | 1.030 | - |" in text
    assert "| 0.154 | `triton_per_fused_rms_norm` |" in text and text.endswith("Note: n.")


def test_attention_and_group_norm_tables_show_every_measured_row():
    report = _load("report")
    attention = {"card": "H100", "torch": "2.11", "command": "c", "heads": 16, "head_dim": 72, "rows": [
        {"batch": 64, "tokens": 160, "ideal": 0.0345, "sdpa + copy": 0.08, "flex": 0.12, "triton best": "128x64 w4 s2",
         "triton": {"128x64 w4 s2": {"ms": 0.126, "err": 0.004}, "64x64 w4 s2": {"ms": 0.149, "err": 0.004}}}]}
    assert "| 64 x 160 | 0.0345 | 0.0800 | 0.1200 | 0.1260 (128x64 w4 s2) |" in report.short_attention_table(attention)
    backends = {"card": "H100", "torch": "2.11", "command": "c", "heads": 16, "head_dim": 72, "rows": [
        {"batch": 64, "tokens": 160, "ideal": 0.0346, "sdpa + copy": 0.0795, "triton": {}, "triton best": None,
         "backends": {"sdpa cuDNN": {"ms": 0.0795, "err": 4e-3}, "sdpa flash": None}}]}  # --no-triton --no-flex
    text = report.short_attention_table(backends)
    assert "| 64 x 160 | 0.0346 | 0.0795 | nan | - |" in text
    assert "| batch x tokens | FLOP-scaled ideal | sdpa cuDNN | sdpa flash |" in text
    assert "| 64 x 160 | 0.0346 | 0.0795 | - |" in text
    whole = {"card": "H200", "torch": "2.11", "command": "c", "heads": 16, "head_dim": 64, "note": "n", "rows": [
        {"batch": 64, "tokens": 160, "ideal": 0.02, "sdpa + copy": 0.06, "triton": {}, "triton best": None,
         "whole head": {"64 rows, 1 program, w4 s2": {"ms": 0.052, "err": 4e-3}},
         "whole head best": "64 rows, 1 program, w4 s2"},
        {"batch": 64, "tokens": 208, "ideal": 0.03, "sdpa + copy": 0.06, "triton": {}, "triton best": None,
         "whole head": {"64 rows, 1 program, w4 s2": {"ms": 0.07, "err": 2.0}}, "whole head best": None}]}
    text = report.short_attention_table(whole)
    assert "| 64 x 160 | 0.0600 | 0.0520 | 0.87 | 64 rows, 1 program, w4 s2 (4.0e-03) |" in text
    assert "| 64 x 208 | 0.0600 | - | - | none correct |" in text and text.endswith("Note: n.")
    tails = {"card": "H200", "torch": "2.11", "command": "c", "heads": 16, "head_dim": 72, "clock": "CUDA graph of 50 calls",
             "rows": [{"batch": 64, "tokens": 208, "ideal": 0.05, "sdpa + copy": 0.082, "triton": {}, "triton best": None,
                       "tails": {"64x64 w4 s3": {"ms": 0.095, "err": 4e-3}}, "tails best": "64x64 w4 s3"},
                      {"batch": 64, "tokens": 224, "ideal": 0.06, "sdpa + copy": 0.082, "triton": {}, "triton best": None,
                       "tails": {"64x64 w4 s3": {"ms": 0.1, "err": 3.0}}, "tails best": None}]}
    text = report.short_attention_table(tails)
    assert "ms per call, CUDA graph of 50 calls" in text
    assert "| 64 x 208 | 0.0820 | 0.0950 | 1.16 | 64x64 w4 s3 (4.0e-03) |" in text
    assert "| 64 x 224 | 0.0820 | - | - | none correct |" in text
    isolated = {"card": "H200", "torch": "2.11", "command": "c", "rows": [
        {"wgmma": True, "split_values": True, "config": "64 1 4 2", "result": None, "error": "illegal memory access"},
        {"wgmma": False, "split_values": False, "config": "128 1 8 1", "error": None,
         "result": {"160": {"ms": 0.25, "sdpa_ms": 0.081, "err": 4e-3}, "208": {"ms": 0.45, "sdpa_ms": 0.082, "err": 5e-3}}}]}
    text = report.whole_head_table(isolated)
    assert "| wgmma | split | 64 1 4 2 | - | - | illegal memory access |" in text
    assert "| mma.sync | whole | 128 1 8 1 | 0.2500 (0.0810) | 0.4500 (0.0820) | 5.0e-03 |" in text
    norm = {"card": "H200", "torch": "2.11", "command": "c", "rows": [
        {"shape": [64, 288, 32, 32], "offset": 0.0, "variant": "one-pass compiled", "ms": 0.084, "tb_per_s": 0.9,
         "rel_err": 2.6e-3},
        {"shape": [64, 288, 32, 32], "offset": 10.0, "variant": "one-pass compiled", "ms": None, "tb_per_s": None,
         "rel_err": 2.2e-3}]}
    text = report.group_norm_table(norm)
    assert "| (64, 288, 32, 32) | one-pass compiled | 0.0840 | 0.90 | 2.6e-03 / 2.2e-03 |" in text
    assert text.count("one-pass") == 1  # the offset run only adds its error to the timed row


def test_step_profile_compares_dit_with_masked_and_filled_dcdit(tmp_path, benchmarks):
    step_profile = _load("step_profile")
    result = step_profile.main(["--tiny", "--rho", "0.4", "--out", str(tmp_path / "p.json")])
    assert list(result["models"]) == ["DiT-XL/2", "DC-DiT-XL rho=0.4", "DC-DiT-XL rho=0.4 filled"]
    assert result["capacity"] == step_profile.bucket(8 * 8 / 4 * 0.6) and (tmp_path / "p.json").is_file()
    assert step_profile.kernel_class("triton_poi_fused__to_copy_add_convolution_silu_15") == "triton fused"
    assert step_profile.kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma") == "attention"
    assert step_profile.kernel_class("_attn_fwd") == "attention"  # short_attention.py's candidate
    assert step_profile.kernel_class("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc") == "convolution"
    assert step_profile.kernel_class("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "gemm"
    with pytest.raises(SystemExit):
        step_profile.main(["--tiny", "--rho", "1.0"])
    serving = step_profile.main(["--tiny", "--rho", "0.2", "--serving", "--scaffold"])  # bf16 weights everywhere
    assert list(serving["models"]) == ["DiT-XL/2, bf16 weights", "DC-DiT-XL rho=0.2 filled, bf16 weights",
                                       "DC-DiT-XL rho=0.2 filled, bf16 weights + routing",
                                       "scaffold only, filled, bf16 weights + routing"]
    assert "bf16_vs_fp32_routing" in serving and serving["serving"] is True
    with pytest.raises(SystemExit):
        step_profile.main(["--tiny", "--per-call", "gelu("])  # not a regular expression


def test_step_profile_per_call_keeps_the_last_steps_calls_in_launch_order(benchmarks):
    step_profile = _load("step_profile")
    ev = lambda name, us: types.SimpleNamespace(name=name, device_time_total=us)  # noqa: E731
    step = lambda slow: [ev("nvjet_gemm", 300.0), ev("triton_poi_fused_gelu_view_31", slow),  # noqa: E731
                         ev("triton_red_fused_layer_norm_32", 50.0), ev("triton_poi_fused_gelu_view_31", 85.0)]
    events = step(133.0) + step(90.0)  # two profiled steps: the second one's calls are kept
    calls = step_profile.last_step_calls(events, "gelu|layer_norm", reps=2)
    assert calls == {"triton_poi_fused_gelu_view_31": [0.09, 0.085], "triton_red_fused_layer_norm_32": [0.05]}
    assert step_profile.last_step_calls(events, "no such kernel", reps=2) == {}


def test_gelu_epilogue_times_both_forms_and_report_tabulates_them(tmp_path, benchmarks):
    gelu_epilogue, report = _load("gelu_epilogue"), _load("report")
    result = gelu_epilogue.main(["--tiny", "--reps", "2", "--out", str(tmp_path / "g.json")])
    assert [r["rows"] for r in result["rows"]] == [32, 48] and (tmp_path / "g.json").is_file()
    for r in result["rows"]:
        assert r["speedup"] == pytest.approx(r["separate_ms"] / r["epilogue_ms"])
        assert 0 < r["separate_err"] < 0.05 and 0 < r["epilogue_err"] < 0.05  # bf16 against an fp64 reference
    data = {"card": "H100", "torch": "2.11", "command": "python benchmarks/gelu_epilogue.py", "dim": 1152,
            "hidden": 4608, "rows": [{"rows": 13312, "separate_ms": 0.278, "epilogue_ms": 0.2136, "speedup": 1.3015,
                                      "separate_err": 0.0156, "epilogue_err": 0.0157}]}
    assert "| 13312 | 0.2780 | 0.2136 | 1.30 | 1.6e-02 / 1.6e-02 |" in report.gelu_epilogue_table(data)
    with pytest.raises(SystemExit):
        gelu_epilogue.main(["--tiny", "--tokens", "12,x"])


def test_block_tokens_reports_each_role_per_token_against_the_largest_count(tmp_path, benchmarks):
    block_tokens = _load("block_tokens")
    result = block_tokens.main(["--tiny", "--tokens", "16,8", "--code-dir", str(tmp_path / "code"),
                                "--out", str(tmp_path / "b.json")])
    assert [r["tokens"] for r in result["rows"]] == [8, 16] and result["reference_tokens"] == 16
    assert result["rows"][-1]["per_token_vs_ref"] == pytest.approx(1.0)  # the reference against itself
    ms8, ms16 = (r["ms"] for r in result["rows"])
    assert result["rows"][0]["per_token_vs_ref"] == pytest.approx(ms8 / ms16 * 2)
    assert (tmp_path / "b.json").is_file() and (tmp_path / "code").is_dir() and result["fused_gelu"]
    assert block_tokens.main(["--tiny", "--tokens", "8", "--unfused-gelu"])["fused_gelu"] is False
    assert block_tokens.role("triton_poi_fused_gelu_view_31") == "gelu"
    assert block_tokens.role("triton_red_fused__to_copy_add_mul_native_layer_norm_split_unsqueeze_view_33") == "layer norm"
    assert block_tokens.role("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert block_tokens.role("_attention_kernel") == "attention"  # chunkformer.short_attention's
    assert block_tokens.role("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_bias_TNT") == "gemm"
    assert block_tokens.role("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_gelu_bias") == "gemm"
    assert block_tokens.role("triton_poi_fused_add_mul_split_unsqueeze_view_4") == "other"
    for bad in ("8,x", "0,8", ","):
        with pytest.raises(SystemExit):
            block_tokens.main(["--tiny", "--tokens", bad])


def test_scaffold_ops_times_every_form_and_measures_its_error(tmp_path, benchmarks):
    scaffold_ops = _load("scaffold_ops")
    rows = scaffold_ops.main(["--tiny", "--out", str(tmp_path / "o.json")])["rows"]
    ran = [r for r in rows if "error" not in r]
    assert {r["op"].split()[0].split("(")[0] for r in ran} >= {"embed", "1x1", "3x3", "router", "smoothing", "GroupNorm"}
    assert all(r["rel_err"] < 1e-2 for r in ran)  # every form computes the same operation
    fp32 = {r["form"]: r["rel_err"] for r in ran if r["op"].startswith("smoothing")}
    assert fp32["fp32 (FFMA)"] < 1e-5  # the fp32 forms are fp32-exact, the bf16 ones are not


def test_sample_speed_times_each_setting_of_the_sampling_recipe(tmp_path, benchmarks):
    result = _load("sample_speed").main(["--tiny", "--no-compile", "--out", str(tmp_path / "s.json")])
    rows = {(r["model"], r["setting"]): r for r in result["rows"]}
    assert set(rows) == {("DiT-XL/2", "fp32, eager (defaults)"), ("DiT-XL/2", "bf16"),
                         ("DC-DiT-XL", "fp32, eager (defaults)"), ("DC-DiT-XL", "bf16"),
                         ("DC-DiT-XL", "bf16, fixed capacity, filled"),
                         ("DC-DiT-XL", "bf16 + bf16 routing, fixed capacity, filled")}
    assert rows[("DC-DiT-XL", "bf16, fixed capacity, filled")]["dit_setting"] == "bf16"
    assert rows[("DC-DiT-XL", "bf16 + bf16 routing, fixed capacity, filled")]["dit_setting"] == "bf16"
    for (model, _), r in rows.items():
        assert r["images_per_s"] > 0 and r["tflops_per_image"] > 0
        if model == "DC-DiT-XL":  # the budget holds in every plan mode: a quarter of the 8x8 grid
            assert r["kept_fraction"] == pytest.approx(0.25)
    assert json.loads((tmp_path / "s.json").read_text())["rows"] == result["rows"]


@given(st.integers(1, 256))
def test_whole_head_key_tiles_are_distinct_powers_of_two_covering_the_keys(n):
    pytest.importorskip("triton")
    key_chunks = _short_attention().key_chunks
    tiles = [c for c in key_chunks(n) if c]
    assert len(key_chunks(n)) == 4 and tiles == sorted(set(tiles), reverse=True)
    assert all(c >= 16 and c & (c - 1) == 0 for c in tiles)
    assert n <= sum(tiles) < n + 16  # padded to a multiple of 16 and no further
    with pytest.raises(ValueError, match="1..256"):
        key_chunks(256 + n)


@given(count=st.integers(1, 1024), block=st.sampled_from([16, 32, 64, 128]))
def test_tail_tile_covers_the_rest_with_the_smallest_power_of_two_of_at_least_16(count, block):
    pytest.importorskip("triton")
    tail, rest = _short_attention().tail_tile(count, block), count % block
    assert (tail == 0) == (rest == 0)
    if rest:
        assert tail & (tail - 1) == 0 and 16 <= tail <= block and tail >= rest and (tail == 16 or tail < 2 * rest)


@pytest.mark.parametrize("tiles", ["64,x,4,3", "64,64,4,3,2", "64,64,4,3;64"])
def test_short_attention_rejects_malformed_tails_configs(tiles, benchmarks):
    pytest.importorskip("triton")
    with pytest.raises(SystemExit):  # a usage error before anything touches the GPU
        _short_attention().main(["--tails", "--tails-configs", tiles])


@given(st.lists(st.integers(1, 4096), min_size=1, max_size=4))
def test_head_alignment_is_the_largest_power_of_two_up_to_16_dividing_every_head_stride(head_strides):
    pytest.importorskip("triton")
    align = _short_attention().head_alignment(*head_strides)
    assert align in (1, 2, 4, 8, 16) and all(s % align == 0 for s in head_strides)
    assert align == 16 or any(s % (2 * align) for s in head_strides)


def test_head_start_hint_makes_the_sm90_loads_16_bytes_wide_at_head_dim_72(tmp_path):
    """Compiled for an H100 on the CPU: without the hint Triton loads one bf16 at a time at dh = 72; with
    it every load is 8 or 16 bytes. At dh = 64 Triton proves the alignment itself."""
    pytest.importorskip("triton")
    bench = _load("kernel_loads")
    _skip_without_sm90(bench)
    result = bench.main(["--head-dims", "72", "64", "--out", str(tmp_path / "k.json")])
    for r in result["rows"]:
        widths = set(r["loads"])
        if r["head_dim"] == 72 and r["head_align"] == 1:
            assert widths == {"ld.global.b16"}, r
        else:
            assert "ld.global.b16" not in widths and any("16 B" in w or "v4" in w for w in widths), r
    assert {(r["head_dim"], r["head_align"]) for r in result["rows"]} == {(72, 1), (72, 8), (64, 1), (64, 16)}
    assert json.loads((tmp_path / "k.json").read_text())["rows"] == result["rows"]
    text = _load("report").kernel_loads_table(result)
    assert "| 72 | multiple of 8 |" in text and "| 160 x `ld.global.b16` |" in text
    assert all(r["registers"] and r["registers"] <= 255 and r["shared_bytes"] > 0 for r in result["rows"])
    library = next(r["instructions"] for r in result["rows"] if r["kernel"].startswith("the library's"))
    assert library["wgmma"] > 0 and library["mma.sync"] == 0  # four warps: Hopper's products
    assert f"| {library['wgmma']} / 0 / {library['barriers']} / {library['layout conversions']} |" in text


def _skip_without_sm90(kernel_loads):
    """Skip where this Triton cannot compile for sm_90 (no NVIDIA backend or ptxas): a kernel known to compile."""
    fn, constexprs, warps, stages = next(iter(kernel_loads.candidates(160, 64, 16).values()))
    try:
        kernel_loads.compile_sm90(fn, constexprs, kernel_loads.strides(160, 16, 64), warps, stages)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Triton cannot compile for sm_90 here: {type(e).__name__}: {str(e)[:200]}")


def f64_ops(ptx: str) -> set[str]:
    """The PTX instructions on f64 values, but the cast of an f64 argument to f32."""
    return set(re.findall(r"(?<![\w.])[a-z]+(?:\.[a-z0-9]+)*\.f64\b", ptx)) - {"cvt.rn.f32.f64"}


def test_the_attention_candidates_keep_an_fp64_scale_out_of_their_arithmetic():
    """Inductor types a Python float argument fp64 on a GPU. Compiled for sm_90 that way, each candidate must still
    compile (session 13's kernel failed: its products' accumulator became fp64) and cast the scale once, with no f64
    arithmetic on the scores (the whole-head kernel had its softmax in fp64)."""
    pytest.importorskip("triton")
    bench = _load("kernel_loads")
    ints = bench.strides(160, 16, 72)
    _skip_without_sm90(bench)
    for name, (fn, constexprs, warps, stages) in bench.candidates(160, 72, 8).items():
        ptx = bench.compile_sm90(fn, constexprs, ints, warps, stages, scale_type="fp64").asm["ptx"]
        assert "cvt.rn.f32.f64" in ptx and not f64_ops(ptx), (name, f64_ops(ptx))


def _short_attention():
    """benchmarks/short_attention.py, loaded once (its Triton kernels compile lazily, so the CPU can import it)."""
    if "short_attention" not in _LOADED:
        _LOADED["short_attention"] = _load("short_attention")
    return _LOADED["short_attention"]


_LOADED: dict = {}


def test_step_speed_records_the_attention_kernel_and_puts_sdpa_back(tmp_path, benchmarks):
    pytest.importorskip("triton")
    import chunkformer.attention as attention

    step_speed = _load("step_speed")
    sdpa = attention.masked_sdpa
    result = step_speed.main(["--tiny", "--no-compile", "--no-masked", "--fill-capacity", "--rounds", "1",
                              "--attention-kernel", "whole head", "--attention-max-tokens", "160",
                              "--attention-tiles", "32,1,4,1", "--out", str(tmp_path / "a.json")])
    assert attention.masked_sdpa is sdpa  # the CPU run attended through SDPA (the candidate is CUDA-only)
    assert result["attention_kernel"] == {"kernel": "whole head", "max_tokens": 160,
                                          "tiles": str(_short_attention().WholeHeadConfig(32, 1, 4, 1))}
    assert "attention up to 160 keys: Triton whole head (WholeHeadConfig(" in _load("report").step_table(result)
    with pytest.raises(SystemExit):
        step_speed.main(["--tiny", "--no-compile", "--attention-kernel", "tiles"])
    with pytest.raises(SystemExit):
        step_speed.main(["--tiny", "--no-compile", "--attention-kernel", "whole head", "--attention-tiles", "1,2"])


def test_candidate_attention_runs_inside_a_model_only_where_no_gradient_is_taken():
    """``short_attention.use_in_models`` under Triton's interpreter (set before import): a DiT's blocks call the
    candidate op once each without grad, and the output matches SDPA's; with grad, and after ``restore``,
    SDPA runs alone."""
    pytest.importorskip("triton")
    code = """
import sys; sys.path.insert(0, 'benchmarks')
import torch, chunkformer as cf, chunkformer.attention as attention, short_attention as a
torch.manual_seed(0)
m = cf.create_model('DiT-S/2', input_size=8, depth=2).eval()
for p in m.parameters():
    torch.nn.init.normal_(p, 0, 0.05)  # DiT starts with a zero output layer: give every path a say
x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
with torch.no_grad():
    base = m(x, t, y)
calls = []
real = a.KERNEL_OPS['whole head']
a.KERNEL_OPS['whole head'] = lambda *args: (calls.append(args[0].shape), real(*args))[1]
sdpa = attention.masked_sdpa
restore = a.use_in_models('whole head', 256, a.WholeHeadConfig(16), cuda_only=False)
with torch.no_grad():
    got = m(x, t, y)
assert len(calls) == 2 and calls[0] == (2, 16, 6, 64), calls  # one per block, (B, L, H, dh)
assert torch.allclose(got, base, atol=1e-5) and not torch.equal(got, base), (got - base).abs().max()
m(x, t, y).sum().backward()  # with grad: SDPA
assert len(calls) == 2
restore()
assert attention.masked_sdpa is sdpa
a.use_in_models('whole head', 8, cuda_only=False)  # 16 keys > 8: SDPA
with torch.no_grad():
    m(x, t, y)
assert len(calls) == 2
for args, words in [(('whole head', 257), '256 keys'), (('tiles', 256), 'whole head')]:  # too long; unknown
    try:
        a.use_in_models(*args)
    except ValueError as e:
        assert words in str(e), e
    else:
        raise AssertionError(f'use_in_models{args} was accepted')
print('ok')
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CHUNKFORMER_TYPECHECK": "0"}
    import subprocess

    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_triton_candidates_match_torch_under_the_triton_interpreter():
    """The Triton kernels of benchmarks/group_norm.py and short_attention.py, run on the CPU by Triton's
    interpreter (set before import)."""
    pytest.importorskip("triton")
    code = """
import sys; sys.path.insert(0, 'benchmarks')
import torch, group_norm as g
for shape in [(2, 64, 8, 8), (3, 288, 5, 7)]:
    x = (torch.randn(shape) + 3 * torch.randn(1, shape[1], 1, 1)).contiguous(memory_format=torch.channels_last)
    s1, s2 = g.channel_sums(x, block_hw=16, block_c=64, programs=64)  # several splits, ragged ends
    assert s1.shape[0] == shape[0] and s1.shape[2] == shape[1] and s1.shape[1] > 1, s1.shape
    assert torch.allclose(s1.sum(1), x.sum((2, 3)), rtol=1e-5, atol=1e-3)
    assert torch.allclose(s2.sum(1), (x * x).sum((2, 3)), rtol=1e-5, atol=1e-2)
import short_attention as a
for B, L, H, D, cfg in [(2, 37, 2, 72, a.KernelConfig(16, 16)), (1, 32, 3, 64, a.KernelConfig(16, 32))]:
    q, k, v = torch.randn(B, L, 3, H, D).unbind(2)  # strided views, as the model's fused qkv gives them
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert torch.allclose(a.flash_forward(q, k, v, cfg), ref, atol=1e-5), (B, L, H, D)
for B, L, H, D, cfg in [(2, 37, 2, 72, a.WholeHeadConfig(16)), (1, 208, 1, 80, a.WholeHeadConfig(32, 2)),
                        (1, 64, 2, 64, a.WholeHeadConfig(64))]:  # ragged, three key tiles, one tile
    q, k, v = torch.randn(B, L, 3, H, D).unbind(2)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert torch.allclose(a.whole_head_forward(q, k, v, cfg), ref, atol=1e-5), (B, L, H, D)
for B, Lq, Lk, H, D, cfg in [(2, 37, 37, 2, 72, a.KernelConfig(16, 16)), (1, 50, 50, 1, 72, a.KernelConfig(32, 32)),
                             (1, 20, 64, 2, 64, a.KernelConfig(16, 16)), (2, 3, 5, 1, 80, a.KernelConfig(16, 16))]:
    q = torch.randn(B, Lq, H, D)  # ragged rows (a second launch) and keys (a tail tile), whole blocks, tiny
    k, v = torch.randn(B, Lk, 2, H, D).unbind(2)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    for split in (True, False):
        assert torch.allclose(a.tails_forward(q, k, v, cfg, split), ref, atol=1e-5), (B, Lq, Lk, H, D, split)
print('ok')
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CHUNKFORMER_TYPECHECK": "0"}
    import subprocess

    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_scaffold_compile_contexts_change_what_they_say_and_restore_it():
    """``position table per call (before)`` makes the models compute their sin-cos table per call (equal values)
    only inside its context; ``wide persistent`` installs inductor's choice handler only inside its own."""
    import chunkformer as cf
    from chunkformer.models import dcdit
    from torch._inductor.virtualized import V

    bench = _load("scaffold_compile")
    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", input_size=8, depth=1)
    kept = dcdit.position_table
    with bench.position_table_per_call():
        assert dcdit.position_table is not kept
        per_call = dcdit.position_table(model, (8, 8))
    assert dcdit.position_table is kept
    torch.testing.assert_close(dcdit.position_table(model, (8, 8)), per_call, rtol=0, atol=1e-6)
    with bench.wide_persistent_reductions():
        assert type(V.choices).__name__ == "WideRows"
    assert type(V.choices).__name__ != "WideRows"
    assert set(bench.CONTEXTS) <= set(bench.VARIANTS)


def test_report_prints_every_kept_group_norm_and_scaffold_compile_result():
    """Each JSON form of these benchmarks (group_norm.py's rows and its --kernels sweep) has a table."""
    import json

    report = _load("report")
    results = ROOT / "benchmarks" / "results"
    sweeps = 0
    for path in sorted(results.glob("group_norm_*.json")):
        data = json.loads(path.read_text())
        sweeps += "sweep" in data
        assert report.group_norm_table(data).count("\n| (") >= 3, path.name
    assert sweeps >= 1
    for path in sorted(results.glob("scaffold_compile_*.json")):
        assert "| default |" in report.scaffold_compile_table(json.loads(path.read_text())), path.name


def test_report_prints_every_kept_launch_overhead_result():
    """launch_overhead.py's JSON (per-op host time, the compiled scaffold at batch 1) has a table with a row each."""
    import json

    report = _load("report")
    paths = sorted((ROOT / "benchmarks" / "results").glob("launch_overhead_*.json"))
    assert paths
    for path in paths:
        data = json.loads(path.read_text())
        table = report.launch_table(data)
        assert table.count("\n| ") == 1 + len(data["ops"]) + len(data["scaffolds"]), path.name
        assert "| compiled scaffold at batch 1: default |" in table, path.name


def test_a_result_records_the_allocator_setting_it_ran_under(tmp_path, benchmarks, monkeypatch):
    step_speed = _load("step_speed")
    monkeypatch.setattr(sys, "argv", ["benchmarks/step_profile.py", "--rho", "0.2"])
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert step_speed.save_result(None, "cpu")["command"] == "python benchmarks/step_profile.py --rho 0.2"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    result = step_speed.save_result(tmp_path / "r.json", "cpu", rows=[])
    assert result["command"] == "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python benchmarks/step_profile.py --rho 0.2"
    assert json.loads((tmp_path / "r.json").read_text())["command"] == result["command"]


def test_speedups_on_the_gpu_clock_where_both_rows_have_one(benchmarks):
    import step_speed

    rows = [{"row": "DiT", "ms": 32.0, "gpu_ms": 31.0, "flops": 240e9},
            {"row": "DC rho=0.2", "ms": 32.0, "gpu_ms": 29.5, "flops": 200e9, "base": "x"},
            {"row": "Lite-CFG", "ms": 40.0, "flops": 300e9, "base": "cfg"},
            {"row": "DiT CFG", "ms": 64.0, "flops": 480e9}]
    base = {"plain": rows[0], "x": rows[0], "cfg": rows[3]}
    step_speed.add_speedups(rows, base)
    dc, lite = rows[1], rows[2]
    assert dc["measured_speedup"] == pytest.approx(1.0) and dc["flop_speedup"] == pytest.approx(1.2)
    assert dc["gpu_speedup"] == pytest.approx(31.0 / 29.5)  # a tie on the host's clock, 5% on the GPU's
    assert dc["gpu_fraction_of_flop_speedup"] == pytest.approx(31.0 / 29.5 / 1.2)
    assert lite["measured_speedup"] == pytest.approx(1.6) and "gpu_speedup" not in lite  # its base has no GPU clock
    report = _load("report")
    rows = [dict(r, kept=k) for r, k in zip(rows, (256, 208, 256, 256))]
    data = {"card": "H100", "torch": "2.11", "size": 256, "batch": 64, "compiled": True, "command": "c", "rows": rows,
            "scaffold_time_share": None, "scaffold_flop_share": 0.11}
    text = report.step_table(data)
    assert "| DC rho=0.2 | 208 | 32.00 | 200.0 | 1.00 | 1.20 | 0.83 | 29.50 | 1.05 | 0.88 |" in text
    assert "| Lite-CFG | 256 | 40.00 | 300.0 | 1.60 | 1.60 | 1.00 | - | - | - |" in text
    assert "speed-up, GPU clock" in text
    # a run without the GPU's clock keeps the seven columns
    host_only = [{k: v for k, v in r.items() if not k.startswith("gpu")} for r in rows]
    assert "GPU clock" not in report.step_table(dict(data, rows=host_only)).split("\n")[2]


def test_process_spread_reads_the_autotuned_config_of_each_layer_norm_kernel(tmp_path, benchmarks):
    import process_spread

    def kernel(folder: str, name: str, config: dict | None) -> None:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "c0.py").write_text(f"@triton.jit\ndef {name}(in_ptr0, out_ptr0, xnumel):\n    pass\n")
        if config is not None:
            (tmp_path / folder / "k.best_config").write_text(json.dumps(config))

    kernel("ab", "triton_red_fused_native_layer_norm_7", {"XBLOCK": 8, "R0_BLOCK": 512, "num_warps": 8})
    kernel("cd", "triton_red_fused_native_layer_norm_8", None)  # one config: nothing autotuned, nothing recorded
    kernel("ef", "triton_poi_fused_gelu_3", {"XBLOCK": 1024, "num_warps": 4})  # not a LayerNorm
    found = process_spread.chosen_configs(str(tmp_path))
    assert found == {"triton_red_fused_native_layer_norm_7": [{"XBLOCK": 8, "R0_BLOCK": 512, "num_warps": 8}]}
    assert process_spread.chosen_configs(None) == {}
    report = _load("report")
    model = lambda ms, kernels: {"ms": ms, "tokens": 256, "roles": {"layer norm": sum(kernels.values())},  # noqa: E731
                                 "layer_norm_kernels": kernels}
    rows = [{"setting": "default", "process": i, "speedup": 1.0, "layer_norm_vs_share": 1.0,
             "models": {"DiT-XL/2": model(30.0, {"k7": k7, "tiny": 0.05}), "DC-DiT-XL": model(30.0, {})},
             "layer_norm_configs": {"k7": [{"XBLOCK": x, "num_warps": 8, "configs_hash": "h"}]}}
            for i, (k7, x) in enumerate(((2.1, 8), (2.9, 16)))]
    text = report.process_spread_table({"card": "H100", "torch": "2.11", "rho": 0.2, "command": "c", "rows": rows})
    assert "| DiT-XL/2 | `k7` | 2.10 | 2.90 | XBLOCK=16, num_warps=8 / XBLOCK=8, num_warps=8 |" in text
    assert "`tiny`" not in text  # under 0.1 ms a step


def test_norm_placement_runs_trials_with_spacers_and_finds_kernel_source(tmp_path, benchmarks):
    import norm_placement

    res = norm_placement.main(["--tiny", "--trials", "3", "--max-pages", "2", "--reps", "1", "--out", str(tmp_path / "n.json")])
    pages = [tr["spacer_pages"] for tr in res["trials"]]
    assert pages[0] == 0 and all(1 <= p <= 2 for p in pages[1:])  # the first trial without a spacer
    assert all(tr["ms"] > 0 for tr in res["trials"]) and res["model"] == "DiT-XL/2" and res["rho"] is None
    assert json.loads((tmp_path / "n.json").read_text())["tokens"] == 16
    with pytest.raises(SystemExit):
        norm_placement.main(["--tiny", "--trials", "1"])
    code = ("k0 = async_compile.triton('a', '''\nimport triton\n@triton.jit\ndef triton_red_fused_layer_norm_7(in_ptr0):\n"
            "    x = 1\n''', device_str='cuda')\n\nk1 = async_compile.triton('b', '''\n@triton.jit\ndef triton_poi_gelu_2(p):\n"
            "    y = 2\n''', device_str='cuda')\n")
    src = norm_placement.kernel_source(code, ["triton_red_fused_layer_norm_7"])
    assert "def triton_red_fused_layer_norm_7(in_ptr0):\n    x = 1\n" in src and "gelu" not in src


def test_norm_placement_table_shows_each_trial_and_the_spread(benchmarks):
    report = _load("report")
    trials = [{"spacer_pages": 0, "ms": 30.0, "layer_norm_kernels": {"k7": 2.1}},
              {"spacer_pages": 37, "ms": 30.8, "layer_norm_kernels": {"k7": 2.9}}]
    data = {"card": "H100", "torch": "2.11", "command": "c", "model": "DiT-XL/2", "rho": None, "tokens": 256,
            "trials": trials, "spread": {"k7": {"min": 2.1, "max": 2.9, "max_over_min": 2.9 / 2.1}}}
    text = report.norm_placement_table(data)
    assert "| 1 | 74 | 30.80 | 2.90 |" in text and "| slowest / fastest | | | 1.38x |" in text
    assert "DiT-XL/2, 256 tokens" in text


def test_cell_gemm_forms_agree_with_the_conv(tmp_path, benchmarks):
    import cell_gemm

    res = cell_gemm.main(["--tiny", "--out", str(tmp_path / "c.json")])
    assert {r["op"] for r in res["rows"]} == {"widening 3x3 288->1152 + 1x1 skip", "embed 3x3 4->288"}
    assert all(r["rel_err"] < 2e-2 for r in res["rows"])  # bf16 forms of the same sum, against fp64
    x, w = torch.randn(2, 3, 5, 4), torch.randn(6, 3, 3, 3)
    cols = cell_gemm.neighbourhoods(x, pad_to=8)  # (40, 27 + 5 zero columns)
    assert cols.shape == (2 * 5 * 4, 32) and not cols[:, 27:].any()
    got = cell_gemm.to_grid(cols @ cell_gemm.neighbourhood_weights(w, pad_to=8), x)
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)


def test_conv_forms_table_keeps_the_baselines_and_the_best_tilings(benchmarks):
    report = _load("report")
    rows = [{"shape": "288->288", "form": "cuDNN", "ms": 0.166, "tflops": 590.0, "rel_err": 3e-3}]
    rows += [{"shape": "288->288", "form": f"triton rows 4, N {n}", "ms": ms, "tflops": 1.0, "rel_err": 2e-3}
             for n, ms in ((32, 0.40), (64, 0.30), (128, 0.28), (256, 0.29), (512, float("nan")))]
    text = report.conv_forms_table({"card": "H100", "torch": "2.11", "batch": 64, "grid": 32, "command": "c", "rows": rows})
    assert "| 288->288 | cuDNN | 0.1660 | 590 | 3.0e-03 |" in text
    assert "N 128 | 0.2800" in text and "N 256" in text and "N 64" in text and "N 32 |" not in text and "N 512" not in text


def test_implicit_conv_kernel_matches_the_conv_in_triton_interpreter(tmp_path):
    pytest.importorskip("triton")
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1", "CHUNKFORMER_TYPECHECK": "0"}
    out = tmp_path / "i.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "implicit_conv.py"), "--tiny", "--out", str(out)],
                   env=env, check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    mine = [r for r in rows if r["form"].startswith("triton")]
    assert len(mine) == 3 and all("error" not in r and r["rel_err"] < 1e-5 for r in mine)  # fp32, zeros from TMA at the border


def test_norm_kernels_profiles_the_model_rows_and_keeps_their_big_layer_norms(benchmarks, monkeypatch):
    import step_profile
    import step_speed

    profiled = []
    fake = {"triton_red_fused_add_native_layer_norm_7": 2.9, "triton_red_fused_native_layer_norm_2": 0.05,
            "nvjet_sm90_gemm": 20.0}
    monkeypatch.setattr(step_profile, "kernel_ms", lambda fn, reps: profiled.append(fn()) or (fake, []))
    cases = [(name, lambda name=name: name, 1.0, 256, "plain") for name in (
        "DiT-XL/2, bf16 weights", "DC-DiT-XL rho=0.2 filled", "DC-DiT-XL scaffold only", "DiT-XL/2 CUDA graphs")]
    norms = step_speed.layer_norm_kernels(cases)
    assert profiled == ["DiT-XL/2, bf16 weights", "DC-DiT-XL rho=0.2 filled"]  # the scaffold and graph rows are not steps
    assert norms["DiT-XL/2, bf16 weights"] == {"triton_red_fused_add_native_layer_norm_7": 2.9}  # no GEMM, none under 0.1
    report = _load("report")
    row = {"row": "DiT-XL/2", "kept": 256, "ms": 31.9, "flops": 2.4e11, "measured_speedup": 1.0, "flop_speedup": 1.0,
           "fraction_of_flop_speedup": 1.0, "layer_norm_kernels": {"k6": 1.69, "k7": 2.9}}
    data = {"card": "H100", "torch": "2.11", "size": 256, "batch": 64, "compiled": True, "command": "c",
            "rows": [row], "scaffold_time_share": None, "scaffold_flop_share": 0.11}
    assert "| DiT-XL/2 | 1.69, 2.90 |" in report.step_table(data)


@given(dit=st.floats(20, 40), dc=st.floats(20, 40), attention_excess=st.floats(0, 0.01), scaffold_ms=st.floats(2, 6),
       scaffold_excess=st.floats(0, 1.5))
def test_tie_budget_gives_back_each_excess_it_is_handed(dit, dc, attention_excess, scaffold_ms, scaffold_excess):
    """report.tie_budget: a row's speed-up without attention's excess over its FLOPs (28 calls of SDPA minus its
    FLOP-scaled time) and without the scaffold's time above its FLOP share of the step, each taken off the row's
    GPU time; rows whose length the short-attention kernel runs get no attention figure."""
    report = _load("report")
    flops = {"dit": 240.0, "rho=0.2": 220.0, "rho=0.4": 180.0}
    share = (scaffold_ms - scaffold_excess) / dc  # the scaffold's FLOP share, chosen so its excess is scaffold_excess
    row = lambda name, kept, ms, fl: {"row": name, "kept": kept, "ms": ms + 1.0, "gpu_ms": ms,  # noqa: E731
                                      "flops": fl, "base": "plain"}
    step = {"card": "test card", "size": 256, "batch": 64, "short_attention": {"72": [128, 192]}, "rows": [
        row("DiT-XL/2, bf16 weights", 256, dit, flops["dit"]),
        row("DiT-XL/2 CFG, bf16 weights", 256, 2 * dit, 2 * flops["dit"]),
        row("DC-DiT-XL rho=0.2 filled", 208, dc, flops["rho=0.2"]),
        row("DC-DiT-XL rho=0.4 filled", 160, dc, flops["rho=0.4"]),
        row("DC-DiT-XL scaffold only", 256, scaffold_ms, share * flops["rho=0.2"])]}
    attention = {"rows": [{"batch": 64, "tokens": 208, "sdpa + copy": 0.06 + attention_excess, "ideal": 0.06},
                          {"batch": 64, "tokens": 160, "sdpa + copy": 0.08, "ideal": 0.035}]}
    b02, b04 = report.tie_budget(step, attention)
    assert (b02["kept"], b04["kept"]) == (208, 160)  # CFG and scaffold rows are not operating points
    att, sc = 28 * attention_excess, scaffold_excess
    assert b02["attention_ms"] == pytest.approx(att) and b02["scaffold_ms"] == pytest.approx(sc, abs=1e-9)
    assert b02["measured"] == pytest.approx(dit / dc)
    assert b02["attention_at_flops"] == pytest.approx(dit / (dc - att))
    assert b02["scaffold_at_flops"] == pytest.approx(dit / (dc - sc))
    assert b02["both"] == pytest.approx(dit / (dc - att - sc))
    assert b02["predicted"] == pytest.approx(240 / 220)
    assert b04["attention_ms"] is None and b04["attention_at_flops"] is None and b04["both"] is None  # its own kernel
    table = report.tie_budget_table(step, attention, "step.json", "attention.json")
    assert table.count("\n| DC-DiT-XL rho=") == 2 and "| - |" in table and "-x" not in table
