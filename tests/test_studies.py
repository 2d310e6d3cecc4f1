"""The fidelity-study scripts (studies/): a tiny pair run, scoring wiring and the generated report."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_recipes import needs_digits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def studies(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(ROOT / "studies"))
    yield
    for name in ("mnist_pair", "score", "report"):
        sys.modules.pop(name, None)


@needs_digits
def test_pair_score_and_report(tmp_path, studies, monkeypatch):
    import mnist_pair
    import report
    import score

    run = tmp_path / "pair-s3"
    summary = mnist_pair.main(["--tiny", "--seed", "3", "--out", str(run)])
    assert set(summary["models"]) == {"DiT-S_2", "DC-DiT-S"}
    for name, entry in summary["models"].items():
        assert entry["train_tflops"] >= summary["tflops_budget"] and entry["train_steps"] >= 1
        samples = np.load(run / f"{name}.npz")["samples"]
        assert samples.dtype == np.uint8 and samples.shape == (16, 32, 32, 1)
    rows = summary["models"]["DC-DiT-S"]["router"]["per_timestep"]
    assert len(rows) == 10 and all(0 <= r["stroke_density"] <= 1 and 0 <= r["background_density"] <= 1 for r in rows)
    assert "router" not in summary["models"]["DiT-S_2"]

    calls = []

    def fake_evaluate(argv):  # the FID itself is tested in test_fid.py; here only the wiring
        calls.append(argv)
        return {"fid": 10.0 + len(calls), "num_samples": 16, "reference": "mnist"}
    monkeypatch.setattr(score, "evaluate", fake_evaluate)
    scored = score.main([str(run), "--results", str(tmp_path / "results")])
    assert [m["fid"] for m in scored["models"].values()] == [11.0, 12.0]
    assert (tmp_path / "results" / "pair-s3.json").is_file()

    runs = []
    for i, fid_shift in enumerate((0.0, 2.0)):
        r = json.loads((tmp_path / "results" / "pair-s3.json").read_text())
        r["_name"], r["seed"] = f"pair-s{i}", i
        for m in r["models"].values():
            m["fid"] += fid_shift
        runs.append(r)
    text = report.render(runs)
    assert "| pair-s1 | 1 |" in text and "13.00" in text  # 11 + 2 for DiT-S_2 in the second run
    assert "DiT-S_2 12.00 ± 1.41 (n=2)" in text  # mean and sample sd of 11 and 13
    assert "kept density on strokes" in text
    assert "No study runs yet" in report.render([])
