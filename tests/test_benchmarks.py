"""The CPU-runnable benchmarks still run and report what their docs say (numbers are not asserted)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


BENCHMARK_MODULES = ("host_syncs", "small_train_speed", "train_speed", "report", "smoothing", "scaffold_profile")  # studies/ has a report.py too


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
    assert all(r["syncs_fwd"] == r["syncs_fwd_unchecked"] + 1 for k, r in rows.items() if k.startswith("DC"))
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
