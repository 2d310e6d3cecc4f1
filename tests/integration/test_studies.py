"""The fidelity-study scripts (studies/): tiny arms end to end, scoring, log recovery and the generated report."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_recipes import needs_digits

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("mnist_study", "score", "report", "from_log", "bootstrap", "collect", "kept_sets", "fill_training")


@pytest.fixture
def studies(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(ROOT / "studies"))
    monkeypatch.setenv("CHUNKFORMER_TYPECHECK", "0")
    yield
    for name in MODULES:
        sys.modules.pop(name, None)
        sys.modules.pop(f"studies.{name}", None)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """One tiny CPU run of the arms that depend on each other: dit -> dcdit -> upcycled."""
    sys.path[:0] = [str(ROOT), str(ROOT / "studies")]
    import mnist_study

    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("out")
    results = mnist_study.main(["--tiny", "--seed", "3", "--arms", "dit,dcdit,upcycled,dcdit-random",
                                "--work", str(work), "--out", str(out), "--fid", "off"])
    return results, work, out


@needs_digits
def test_arms_train_to_the_dits_budget_and_record_their_sets(tiny_study):
    results, work, out = tiny_study
    assert all("error" not in r for r in results.values()), {k: r.get("error") for k, r in results.items()}
    dit, dc, up, rnd = (results[a] for a in ("dit", "dcdit", "upcycled", "dcdit-random"))
    for r in (dc, rnd):  # equal training FLOPs: each stops once it has spent the DiT's
        assert r["train_tflops"] >= dit["train_tflops"] > 0
        assert r["recipe"]["train"]["max_tflops"] == dit["train_tflops"]
    assert set(dit["sets"]) == {"base", "cfg", "merge0.5", "cache0.1"} and "router" not in dit
    assert set(dc["sets"]) == {"base", "rho0.2", "rho0.4", "rho0.6", "cfg", "lite-cfg", "merge0.5", "cache0.1"}
    for name, s in dc["sets"].items():
        images = np.load(work / "s3" / "dcdit" / f"{name}.npz")["samples"]
        assert images.dtype == np.uint8 and images.shape == (s["num_samples"], 32, 32, 1)
        assert "fid" not in s and s["tflops_per_image"] > 0
    # a tighter budget keeps fewer tokens and costs fewer FLOPs per image
    assert dc["sets"]["rho0.6"]["tflops_per_image"] < dc["sets"]["base"]["tflops_per_image"]
    assert dc["sets"]["lite-cfg"]["tflops_per_image"] < dc["sets"]["cfg"]["tflops_per_image"]
    # the router's orientation during training: logged for chunking arms only, every log step
    logs = {a: [json.loads(line) for line in (work / "s3" / a / "run" / "metrics.jsonl").read_text().splitlines()]
            for a in ("dit", "dcdit", "upcycled")}
    for a in ("dcdit", "upcycled"):
        assert logs[a] and all(0 <= r[f"{k}_t{t}"] <= 1 for r in logs[a] for k in ("stroke", "background")
                               for t in (25, 500))
    assert not any("stroke_t25" in r for r in logs["dit"])
    rows = dc["router"]["per_timestep"]
    assert len(rows) == 10 and all(0 <= r["stroke_density"] <= 1 and 0 <= r["background_density"] <= 1 for r in rows)
    # equal wall-clock: one snapshot at the DiT's minutes, sampled too
    (mark, snap), = dc["snapshots"].items()
    assert mark == f"{dit['train_seconds'] / 60:.6f}min" and snap["minutes"] >= float(mark[:-3])
    assert "base" in snap["sets"]
    # upcycling: snapshots at 1/16, 1/8, 1/4 of the from-scratch steps, from the DiT's weights; ends at 1/2
    assert [m for m in up["snapshots"]] == [f"{max(1, round(f * dc['train_steps']))}steps"
                                            for f in (1 / 16, 1 / 8, 1 / 4)]
    assert up["train_steps"] == max(1, round(dc["train_steps"] / 2)) and up["recipe"]["train"]["steps"] == up["train_steps"]
    assert all("base" in snap["sets"] for snap in up["snapshots"].values()) and "base" in up["sets"]
    assert up["recipe"]["upcycle"]["source"].endswith("s3/dit/run/final")
    # it trains in fixed capacity (a memory guard) and samples in the packed layout, like the others
    assert up["recipe"]["model"]["overrides"]["plan_mode"] == "fixed" and up["sample_layout"] == "packed"
    assert dc["sample_layout"] is None
    assert rnd["recipe"]["model"]["overrides"]["router"] == "random"
    assert (out / "s3-dcdit.json").is_file() and (out / "dcdit-boundary_maps.png").is_file()


@needs_digits
def test_upcycle_fractions_set_the_snapshots_and_the_end(tiny_study, tmp_path):
    """--upcycle-fractions: snapshots at all but the largest fraction of the scratch steps, the run ends at it."""
    import shutil

    import mnist_study

    results, work, _ = tiny_study
    scratch = results["dcdit"]["train_steps"]
    for arm in ("dit", "dcdit"):  # a fresh work folder holding the two arms the upcycled one reads
        shutil.copytree(work / "s3" / arm, tmp_path / "w" / "s3" / arm)
    missing = mnist_study.main(["--tiny", "--seed", "3", "--arms", "upcycled", "--scratch-steps", "4",
                                "--work", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--fid", "off"])
    assert "run arm 'dit' or 'dit-compiled' with --seed 3" in missing["upcycled"]["error"]
    (tmp_path / "w" / "s3" / "dit").rename(tmp_path / "w" / "s3" / "dit-compiled")  # a compiled DiT serves as well
    up = mnist_study.main(["--tiny", "--seed", "3", "--arms", "upcycled", "--upcycle-fractions", "1,0.5",
                           "--sets", "base", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
                           "--fid", "off"])["upcycled"]
    assert "error" not in up, up.get("error")
    assert list(up["snapshots"]) == [f"{max(1, round(scratch / 2))}steps"] and up["train_steps"] == scratch
    assert mnist_study.fractions("1,0.125,0.25,1") == (0.125, 0.25, 1.0)  # sorted, repeats dropped
    for bad in ("0,1", "half", "5"):
        with pytest.raises(Exception, match="fractions must be|comma-separated numbers"):
            mnist_study.fractions(bad)


@needs_digits
def test_an_arm_without_the_dits_record_fails_alone_and_says_what_to_run(tmp_path, studies):
    import mnist_study

    results = mnist_study.main(["--tiny", "--seed", "5", "--arms", "dcdit-cosine", "--work", str(tmp_path / "w"),
                                "--out", str(tmp_path / "o"), "--fid", "off"])
    assert "run arm 'dit'" in results["dcdit-cosine"]["error"]
    assert json.loads((tmp_path / "o" / "s5-dcdit-cosine.json").read_text())["error"]
    with pytest.raises(SystemExit):
        mnist_study.main(["--arms", "nope", "--work", str(tmp_path), "--out", str(tmp_path)])


@needs_digits
def test_compiled_arms_train_for_the_minutes_without_counting(tmp_path, studies, monkeypatch):
    """dit-compiled / dcdit-compiled: train.compile on, FLOPs not counted, --minutes as the budget, no DiT
    record needed; --tflops is refused (counting hooks and torch.compile exclude each other)."""
    import mnist_study

    seen = {}

    class Stop(Exception):
        pass

    def fake_train(cfg, probe=None):  # what the arm would train, without training it
        seen[cfg.model.name] = (cfg, probe)
        raise Stop
    monkeypatch.setattr(mnist_study, "train", fake_train)
    args = ["--tiny", "--seed", "6", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
            "--fid", "off"]
    results = mnist_study.main([*args, "--arms", "dit-compiled,dcdit-compiled"])
    assert all("Stop" in r["error"] for r in results.values())  # each reached train(), nothing else failed
    for name, (cfg, probe) in seen.items():  # (--tiny shortens --minutes to a few seconds, for both alike)
        assert cfg.train.compile and not cfg.train.count_flops and cfg.train.max_tflops == 0
        assert cfg.train.max_minutes > 0 and (probe is not None) == name.startswith("DC-DiT")
    assert seen["DiT-S/2"][0].train.max_minutes == seen["DC-DiT-S"][0].train.max_minutes
    dc = seen["DC-DiT-S"][0].model.overrides  # static shapes for the compiler
    assert dc["plan_mode"] == "fixed" and dc["capacity"] == 320
    refused = mnist_study.main([*args, "--arms", "dcdit-compiled", "--tflops", "100"])
    assert "without --tflops" in refused["dcdit-compiled"]["error"]
    assert "dit-compiled" not in mnist_study.EVERY and "dcdit" in mnist_study.EVERY  # "--arms all" keeps one rule
    seen.clear()  # --steps: a step budget for each arm instead of the minutes
    mnist_study.main([*args, "--arms", "dit-compiled,dcdit-compiled", "--steps", "40"])
    for name, (cfg, _) in seen.items():
        assert cfg.train.steps == 40 and cfg.train.max_minutes == 0 and cfg.train.compile
    assert set(seen) == {"DiT-S/2", "DC-DiT-S"}


@needs_digits
def test_score_fills_missing_fids_per_sample_count(tiny_study, tmp_path, studies, monkeypatch):
    import score

    _, work, out = tiny_study
    results = tmp_path / "results"
    results.mkdir()
    (results / "s3-dit.json").write_text((out / "s3-dit.json").read_text())
    seen = []

    def fake_fid(images, reference, device=None):  # the FID itself is tested in test_fid.py
        seen.append(len(images))
        return 100.0 + len(images)
    monkeypatch.setattr(score, "compute_fid", fake_fid)
    score.main([str(results), "--work", str(work), "--limit", "3"])
    r = json.loads((results / "s3-dit.json").read_text())
    assert seen == [3, 3, 3, 3] and all(s["fid_by_samples"] == {"3": 103.0} for s in r["sets"].values())
    assert all("fid" not in s for s in r["sets"].values())  # 3 of 8 samples is not the set's FID
    score.main([str(results), "--work", str(work)])  # the whole sets now; the limited ones stay
    r = json.loads((results / "s3-dit.json").read_text())
    assert all(s["fid"] == 108.0 and s["fid_by_samples"] == {"3": 103.0, "8": 108.0} for s in r["sets"].values())
    score.main([str(results), "--work", str(work)])
    assert len(seen) == 8  # nothing left to score

    def stops(images, reference, device=None):  # a run stopped while scoring its second set
        if len(seen) == 9:
            raise KeyboardInterrupt
        seen.append(len(images))
        return 50.0
    monkeypatch.setattr(score, "compute_fid", stops)
    with pytest.raises(KeyboardInterrupt):
        score.main([str(results), "--work", str(work), "--limit", "2"])
    r = json.loads((results / "s3-dit.json").read_text())
    assert sorted(len(s["fid_by_samples"]) for s in r["sets"].values()) == [2, 2, 2, 3]  # the first one kept


def test_from_log_rebuilds_a_record_from_the_printed_lines(tmp_path, studies):
    import from_log

    log = tmp_path / "s0-dcdit.log"
    log.write_text("NVIDIA H200\n[dit] 10 steps, 5.0 TFLOPs, 1.00 min\n  base: 1.0000 TFLOPs/img, kept 100.0%\n"
                   "[dcdit] 12 steps, 5.5 TFLOPs, 2.50 min\n  base: 0.7701 TFLOPs/img, kept 24.9%, FID 89.35\n"
                   "  rho0.4: 0.5134 TFLOPs/img, kept 14.9%, FID 92.38\n  mystery: 1.0 TFLOPs/img, kept 1.0%\n")
    r = from_log.main([str(log), "--seed", "0", "--arm", "dcdit", "--samples", "2000", "--out", str(tmp_path / "r.json")])
    assert (r["train_steps"], r["train_tflops"], r["train_seconds"], r["device"]) == (12, 5.5, 150.0, "NVIDIA H200")
    assert set(r["sets"]) == {"base", "rho0.4"}
    assert r["sets"]["rho0.4"]["rho"] == 0.4 and r["sets"]["rho0.4"]["fid_by_samples"] == {"2000": 92.38}
    assert r["sets"]["base"]["kept_fraction"] == pytest.approx(0.249) and "console log" in r["source"]
    with pytest.raises(ValueError, match="no '\\[upcycled\\]"):
        from_log.main([str(log), "--seed", "0", "--arm", "upcycled", "--samples", "1", "--out", str(tmp_path / "x")])


def _record(seed, arm, fids, tflops, kept=0.25):
    sets = {k: {"rho": float(k[3:]) if k.startswith("rho") else 0.0, "tflops_per_image": t, "kept_fraction": kept,
                "num_samples": 2000, "fid_by_samples": {"2000": f}} for (k, f), t in zip(fids.items(), tflops)}
    return {"seed": seed, "arm": arm, "device": "NVIDIA H200", "train_steps": 100, "train_tflops": 50.0,
            "train_seconds": 60.0, "sets": sets, "snapshots": {}}


def test_report_tables_come_from_the_records(tmp_path, studies):
    import report

    curve = lambda mse: [{"step": 100, "mse": 2 * mse, "train_tflops": 25.0, "steps_per_sec": 2.0},  # noqa: E731
                         {"step": 200, "mse": mse, "train_tflops": 50.0, "steps_per_sec": 2.0}]
    data = {"records": {(0, "dit"): _record(0, "dit", {"base": 140.0, "cfg": 139.0}, [0.6, 1.2], kept=1.0),
                        (0, "dcdit"): _record(0, "dcdit", {"base": 90.0, "rho0.4": 92.5, "lite-cfg": 84.0},
                                              [0.77, 0.51, 0.99])},
            "curves": {(0, "dit"): curve(0.025), (0, "dcdit"): curve(0.020)},
            "metrics": {(0, "dcdit"): {"kept_fraction_noisy": 0.223, "kept_fraction_clean": 0.266}}}
    text = report.render(data, img=tmp_path)
    assert "| 0 | DiT-S/2 | 100 | 50 | 1.00 | 0.0250 | 140.00 |" in text
    assert "| 0 | DC-DiT-S | 100 | 50 | 1.00 | 0.0200 | 90.00 |" in text
    assert "came back): 0.80 (seed 0)." in text  # 0.020 / 0.025
    assert "| 0 | DC-DiT-S | 0.4 | 25.0% | 0.510 | 92.50 |" in text
    assert "| 0 | DC-DiT-S | lite-cfg | 0.990 | 25.0% | 84.00 |" in text
    assert "| 0 | 22.3% | 26.6% | - |" in text
    assert "dcdit-single`): not run yet" in text and "Not run yet (arm `upcycled`)" in text
    assert "Not run yet (arms `dcdit-random`" in text

    # a second run of an ablation arm, in another layout, joins the ablation table and the density table
    again = _record(0, "dcdit-random", {"base": 99.0}, [0.85]) | {
        "overrides": ["model.overrides.router=random", "model.overrides.plan_mode=padded"],
        "router": {"probe_images": 10, "per_timestep": [{"t": 25, "stroke_density": 0.25, "background_density": 0.5}]}}
    text = report.render(data | {"reruns": [again]}, img=tmp_path)
    assert "| 0 | DC-DiT-S, random boundaries (another run) | padded | 100 | 25.0% | 0.850 | 99.00 |" in text
    assert "| 0 | DC-DiT-S | packed | 100 | 25.0% | 0.770 | 90.00 |" in text
    assert "| t | DC-DiT-S, random boundaries (seed 0, another run) |" in text and "| 25 | 25.0% / 50.0% |" in text
    assert "Another run of" not in text  # only DiT / DC-DiT re-runs get the line under table 1
    # more seeds: paired FID gaps 50 and 30 -> mean 40, sd 14.142, se 10, t(df 1) 12.706 -> +-127.06
    snap = {"mark": "1.00min", "step": 60, "minutes": 1.0, "sets": {"base": {"fid_by_samples": {"2000": 170.0}}}}
    seeds = {(1, "dit"): _record(1, "dit", {"base": 140.0}, [0.6], kept=1.0),
             (1, "dcdit"): _record(1, "dcdit", {"base": 110.0}, [0.77]) | {"snapshots": {"1.00min": snap}}}
    seeds[(1, "dcdit")]["sets"]["base"]["kept_by_step"] = [0.2] * 2 + [0.25] * 6 + [0.4] * 2  # 10 steps
    text = report.render(data | {"records": data["records"] | seeds}, img=tmp_path)
    assert "| 1 | - | - | 20.0% | 40.0% | 27.0% |" in text  # first / last fifth of the steps, mean over all
    assert "FID 50.00 (seed 0), 30.00 (seed 1); mean 40.00, 95% t-interval [-87.06, 167.06] over 2 seeds" in text
    assert "DC-DiT-S is better in 2 of 2." in text
    assert "| 1 | NVIDIA H200 | 1.00 | 100 | 140.00 | 60 | 170.00 | 110.00 | 2000 |" in text
    # the gap beside each seed's stroke density: seed 1's own probe, seed 0's from its second DC-DiT run
    probe = lambda stroke: {"probe_images": 10, "per_timestep": [  # noqa: E731
        {"t": 25, "stroke_density": stroke, "background_density": 0.3}]}
    seeds[(1, "dcdit")]["router"] = probe(0.0)
    second = _record(0, "dcdit", {"base": 95.0}, [0.77]) | {"router": probe(0.99), "command": "python studies/mnist_study.py"}
    text = report.render(data | {"records": data["records"] | seeds, "reruns": [second]}, img=tmp_path)
    assert "| 0 | 50.00 | 99.0% / 30.0% (its second run) | - |" in text and "| 1 | 30.00 | 0.0% / 30.0% | - |" in text
    # the compiled wall-clock pair gets its own table
    fast = {(2, "dit-compiled"): _record(2, "dit-compiled", {"base": 130.0}, [0.6], kept=1.0)
            | {"train_seconds": 120.0, "train_steps": 2000, "first_step_seconds": 41.0},
            (2, "dcdit-compiled"): _record(2, "dcdit-compiled", {"base": 125.0}, [0.77])
            | {"train_seconds": 121.0, "train_steps": 1500, "first_step_seconds": 95.0}}
    text = report.render(data | {"records": data["records"] | fast}, img=tmp_path)
    assert "| 2 | NVIDIA H200 | 2.00 | 2000 | 130.00 | 1500 | 125.00 | 41 / 95 | 2000 |" in text
    guarded = {"overrides": ["model.overrides.plan_mode=fixed"], "sample_layout": "packed"}
    assert report.plan_layout(guarded) == "fixed (sampled packed)" and report.plan_layout({}) == "packed"
    assert (tmp_path / "loss_curves.png").is_file() and (tmp_path / "elastic_pareto.png").is_file()
    assert not (tmp_path / "router_orientation.png").exists()  # no arm logged its router yet
    probed = [r | {"stroke_t25": 0.1 * i, "background_t25": 0.3} for i, r in enumerate(curve(0.02))]
    text = report.render(data | {"curves": data["curves"] | {(0, "dcdit"): probed}}, img=tmp_path)
    assert "![router orientation](" in text and (tmp_path / "router_orientation.png").is_file()
    assert "No study runs yet" in report.render({"records": {}, "curves": {}, "metrics": {}}, img=tmp_path)
    assert "Not run yet (`mnist_study.py --arms dit-compiled" in text  # no trained-regime records here
    # the trained regime: each snapshot and the end of each longer DiT run, in step order
    snap = {"mark": "1.5min", "step": 2000, "minutes": 1.5, "sets": {"base": {"fid_by_samples": {"5000": 14.0}}}}
    long = _record(0, "dit-compiled", {}, [], kept=1.0) | {
        "sets": {"base": {"fid_by_samples": {"5000": 9.5}}}, "snapshots": {"1.5min": snap}, "train_steps": 4000,
        "train_seconds": 180.0, "overrides": ["train.compile=true", "optim.lr=6e-4", "optim.warmup_steps=200"],
        "command": "python studies/mnist_study.py --override train.snapshots=[\"1.5min\"] --out /root/out"}
    text = report.render(data | {"regime": [long]}, img=tmp_path)
    row = "| 0 | DiT-S/2, compiled training | H200 | compiled | 6e-4, warm-up 200 | {} |"
    assert text.index(row.format("2000 | 1.5 | 14.00")) < text.index(row.format("4000 | 3.0 | 9.50"))
    assert "--override 'train.snapshots=[\"1.5min\"]' --out OUT" in text
    assert "## 9. The speed-quality frontier of sampling" in text and "Not run yet (arms `dit-compiled`" in text
    # the frontier: every set of a run that drew more than its base set, images/s beside FID, and the figure
    fewer = {"fid_by_samples": {"5000": 12.5}, "num_samples": 5000, "seconds": 25.0, "steps": 15,
             "tflops_per_image": 0.18, "images_per_second": 250.0, "precision": "bf16"}  # the timed rest's rate
    long["sets"] |= {"ddim15": fewer}
    long["sets"]["base"] |= {"num_samples": 5000, "seconds": 50.0, "steps": 50, "tflops_per_image": 0.6}
    text = report.render(data | {"regime": [long]}, img=tmp_path)
    assert "| 0 | DiT-S/2, compiled training | H200 | ddim15 | bf16 | 15 | 250 | 0.180 | 12.50 |" in text
    assert "| 0 | DiT-S/2, compiled training | H200 | base | fp32 | 50 | 100 | 0.600 | 9.50 |" in text  # an older record
    assert (tmp_path / "frontier.png").is_file() and "![sampling frontier](" in text
    timed = {**long, "arm": "dcdit-compiled", "sets": {"base": {**fewer, "steps": 50, "fid_by_samples": {"5000": 20.0}}}}
    text = report.render(data | {"regime": [long, timed]}, img=tmp_path)  # a timed base set alone is a point too
    assert "| 0 | DC-DiT-S, compiled training | H200 | base | bf16 | 50 | 250 | 0.180 | 20.00 |" in text
    # a run with the orientation prior: a row and a series of its own
    prior = {**timed, "recipe": {"budget": {"orient_weight": 1.0, "orient_steps": 0}}}
    text = report.render(data | {"regime": [long, timed, prior]}, img=tmp_path)
    assert ("| 0 | DC-DiT-S, compiled training, router prior | H200 | base | bf16 | 50 | 250 | 0.180 "
            "| 20.00 |" in text)


def test_equal_compute_pairs_each_dcdit_run_with_the_dit_run_it_names(tmp_path, studies):
    """Section 8's comparison: a DC-DiT-S run names its DiT run (--wallclock-of); its snapshot is the equal
    wall-clock point, its end the equal-FLOP one; the FLOP ratio is steps x forward GFLOPs; seeds give intervals."""
    import report

    def run(seed, arm, steps, gflops, fid, snapshots=None, **extra):  # the base set: 50 forwards of 12.5 GFLOPs
        base = {"fid_by_samples": {"5000": fid}, "tflops_per_image": 0.625, "steps": 50}
        return {"seed": seed, "arm": arm, "device": "NVIDIA H100 80GB HBM3", "train_steps": steps,
                "train_seconds": 300.0, "train_gflops_per_image": gflops, "overrides": [], "file": f"s{seed}-{arm}.json",
                "sets": {"base": base}, "snapshots": snapshots or {}, **extra}

    runs = []
    for seed, (dit_fid, wall_fid, flops_fid) in enumerate([(10.0, 14.0, 9.0), (11.0, 13.0, 10.5), (9.5, 12.5, 9.0)]):
        snap = {"5.000000min": {"step": 3500, "minutes": 5.0, "sets": {"base": {"fid_by_samples": {"5000": wall_fid}}}}}
        runs += [run(seed, "dit-compiled", 6500, 12.0, dit_fid),
                 run(seed, "dcdit-compiled", 4160, 18.75, flops_fid, snap, wallclock_of=f"s{seed}-dit-compiled.json")]
    text = "\n".join(report.equal_compute(runs))
    # as trained 4160 x 18.75 / (6500 x 12) = 1.00; packed (both 12.5 per forward) 4160 / 6500 = 0.64
    assert ("| 1 | H100 80GB HBM3 | 6500 | 5.0 | 11.00 | - | - | 3500 | 13.00 | 4160 | 1.00 · 0.64 | 10.50 |"
            in text)
    # wall-clock gaps -4, -2, -3: mean -3.00, t(2) 4.303 * 1 / sqrt 3 = 2.48
    assert "At equal wall-clock, DiT-S/2 minus DC-DiT-S FID: mean -3.00, 95% t-interval [-5.48, -0.52] over 3 seeds; " \
           "DC-DiT-S is better in 0 of 3." in text
    assert "At equal FLOPs" in text and "better in 3 of 3" in text
    assert "Not run yet" in "\n".join(report.equal_compute(runs[:1]))  # a DiT run alone: nothing to pair
    # runs with the router's orientation prior are a configuration of their own, with an interval of their own
    snap = {"5.000000min": {"step": 3500, "minutes": 5.0,
                            "sets": {"base": {"fid_by_samples": {"5000": 8.0}}}}}
    on = {"budget": {"orient_weight": 1.0, "orient_steps": 0}}
    router = {"per_timestep": [{"t": 100, "stroke_density": 0.5, "background_density": 0.5},  # t = 25 counts
                               {"t": 25, "stroke_density": 0.9, "background_density": 0.1}]}
    prior = [run(seed, "dcdit-compiled", 4160, 18.75, 7.0, snap, wallclock_of=f"s{seed}-dit-compiled.json",
                 file=f"s{seed}-prior.json", recipe=on, router=router) for seed in (0, 1)]
    text = "\n".join(report.equal_compute(runs + prior))
    assert ("| 0 | H100 80GB HBM3 | 6500 | 5.0 | 10.00 | all steps | 0.90 · 0.10 | 3500 | 8.00 | 4160 "
            "| 1.00 · 0.64 | 7.00 |" in text)
    assert "over 3 seeds" in text and "At equal wall-clock (router prior: all steps)" in text
    assert "DC-DiT-S is better in 2 of 2." in text


@needs_digits
def test_wallclock_of_snapshots_at_the_reference_minutes_on_the_same_card_only(tmp_path, studies):
    """--wallclock-of: the snapshot mark is the reference run's minutes, the record names the reference file and
    holds its training forward GFLOPs; a reference from another card is refused (the arm records the error)."""
    import mnist_study

    ref = tmp_path / "s0-dit-compiled-steps6500.json"
    ref.write_text(json.dumps({"device": "cpu", "train_seconds": 0.001}))
    common = ["--tiny", "--seed", "0", "--arms", "dcdit", "--steps", "3", "--sets", "base", "--fid", "off",
              "--work", str(tmp_path / "w"), "--wallclock-of", str(ref)]
    r = mnist_study.main([*common, "--out", str(tmp_path / "o")])["dcdit"]
    assert r["wallclock_of"] == ref.name and list(r["snapshots"]) == ["0.000017min"]
    assert r["train_gflops_per_image"] > 0 and r["sets"]["base"]["images_per_second"] > 0
    ref.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "train_seconds": 0.3}))
    r = mnist_study.main([*common, "--out", str(tmp_path / "o2")])["dcdit"]
    assert "same kind of card" in r["error"] and not r.get("sets")
    with pytest.raises(SystemExit):  # a wall-clock mark needs a step budget
        mnist_study.main(["--tiny", "--arms", "dcdit", "--wallclock-of", str(ref), "--work", "w", "--out", "o"])


@needs_digits
def test_the_predictability_rule_keeps_strokes_far_denser_than_background_and_chance_does_not(studies):
    import predictability_rule

    images = predictability_rule.load_mnist_digits()[0][:200].float()
    rows = predictability_rule.measure(images, sigmas=(0.1,), fractions=(0.25,))
    assert rows[0]["ratio"] > 3  # the bar a learned router is held to
    chance = predictability_rule.densities(torch.rand(images.shape, generator=torch.Generator().manual_seed(0)),
                                           images > 0, 0.25)
    assert 0.8 < chance[0] / chance[1] < 1.25


@needs_digits
def test_resume_keeps_the_trained_arm_and_draws_only_what_is_missing(tmp_path, studies):
    """A call that ran out of time mid-sampling: the arm's record holds what was drawn; --resume
    skips training and the finished sets, and draws the rest."""
    import mnist_study

    work, out = tmp_path / "w", tmp_path / "o"
    common = ["--tiny", "--seed", "2", "--work", str(work), "--out", str(out), "--fid", "off"]
    first = mnist_study.main([*common, "--arms", "dit", "--sets", "base"])["dit"]
    assert set(first["sets"]) == {"base"} and first["complete"]
    stamp = (work / "s2" / "dit" / "run" / "final" / "model.safetensors").stat().st_mtime_ns
    base_npz = (work / "s2" / "dit" / "base.npz").stat().st_mtime_ns
    again = mnist_study.main([*common, "--arms", "dit", "--resume"])["dit"]
    assert set(again["sets"]) == {"base", "cfg", "merge0.5", "cache0.1"}
    assert again["train_steps"] == first["train_steps"] and again["sets"]["base"] == first["sets"]["base"]
    assert (work / "s2" / "dit" / "run" / "final" / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    assert (work / "s2" / "dit" / "base.npz").stat().st_mtime_ns == base_npz  # not redrawn
    assert json.loads((out / "s2-dit.json").read_text())["complete"]


def test_bootstrap_interval_brackets_the_difference_and_caches_features(tmp_path, studies, monkeypatch):
    import bootstrap

    rng = np.random.default_rng(0)
    for name, shift in (("a", 1.0), ("b", 0.0)):
        np.savez(tmp_path / f"{name}.npz", samples=np.zeros((60, 32, 32, 1), np.uint8))
        np.save(tmp_path / f"{name}.features60.npy", rng.normal(shift, 1.0, (60, 4)))  # cached: nothing computed
    monkeypatch.setattr(bootstrap, "fid_features", lambda *a, **k: pytest.fail("features should come from the cache"))
    monkeypatch.setattr(bootstrap, "reference_stats", lambda *a, **k: (np.zeros(4), np.eye(4)))
    r = bootstrap.main(["--a", f"A={tmp_path / 'a.npz'}", "--b", f"B={tmp_path / 'b.npz'}", "--samples", "60",
                        "--resamples", "40", "--out", str(tmp_path / "boot.json")])
    lo, mid, hi = (r["difference_percentiles"][k] for k in ("2.5", "50", "97.5"))
    assert lo <= mid <= hi and lo < r["difference"] < hi
    assert r["difference"] > 2 and r["share_a_worse"] > 0.9  # a is shifted by 1 in every dimension: FID ~ +4
    assert json.loads((tmp_path / "boot.json").read_text())["resamples"] == 40


def test_collect_copies_records_figures_and_logs_and_skips_failed_arms(tmp_path, studies):
    """A call's results.tgz: records land under their names, figures renamed per seed and arm (the record
    names the new files), curves and run metrics copied; an error-only record never replaces a good one."""
    import tarfile

    import collect

    src, results, img = tmp_path / "src", tmp_path / "results", tmp_path / "img"
    (src / "curves").mkdir(parents=True)
    (src / "runs").mkdir()
    good = {"seed": 3, "arm": "dcdit-random", "sets": {"base": {"fid": 1.0}},
            "figures": {"samples": "dcdit-random-final.png", "boundary_maps": "dcdit-random-boundary_maps.png"}}
    (src / "s3-dcdit-random.json").write_text(json.dumps(good))
    (src / "dcdit-random-final.png").write_bytes(b"png-a")
    (src / "dcdit-random-boundary_maps.png").write_bytes(b"png-b")
    (src / "s4-dcdit-compiled.json").write_text(json.dumps({"seed": 4, "arm": "dcdit-compiled", "error": "boom\nmore"}))
    (src / "curves" / "s3-dcdit-random.jsonl").write_text('{"step": 1}\n')
    (src / "runs" / "s3-dcdit-random-metrics.json").write_text("{}")
    results.mkdir()
    (results / "s4-dcdit-compiled.json").write_text('{"kept": "the earlier good record"}')
    archive = tmp_path / "results.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=".")
    done = collect.main([str(archive), "--results", str(results), "--img", str(img)])
    assert done["records"] == ["s3-dcdit-random.json"] and done["skipped"] == {"s4-dcdit-compiled.json": "boom"}
    record = json.loads((results / "s3-dcdit-random.json").read_text())
    assert record["figures"] == {"samples": "s3-dcdit-random-samples.png",
                                 "boundary_maps": "s3-dcdit-random-boundary_maps.png"}
    assert (img / "s3-dcdit-random-samples.png").read_bytes() == b"png-a"
    assert (img / "s3-dcdit-random-boundary_maps.png").read_bytes() == b"png-b"
    assert (results / "curves" / "s3-dcdit-random.jsonl").read_text() == '{"step": 1}\n'
    assert (results / "runs" / "s3-dcdit-random-metrics.json").is_file()
    assert "earlier good" in (results / "s4-dcdit-compiled.json").read_text()
    with pytest.raises(SystemExit):
        collect.main([str(tmp_path / "missing.tgz")])


@needs_digits
def test_router_seeds_records_what_the_router_keeps_on_strokes_and_background(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from studies import router_seeds

    out, seen = tmp_path / "seed0.json", []  # the file as each probe finds it: a run cut short keeps it
    real = router_seeds.orientation_probe

    def watched(*args):
        inner = real(*args)
        return lambda model, step: (seen.append(json.loads(out.read_text()) if out.exists() else None),
                                    inner(model, step))[1]

    monkeypatch.setattr(router_seeds, "orientation_probe", watched)
    result = router_seeds.main(["0", "4", str(out), "train.precision=fp32", "model.overrides.hidden_size=32",
                                "model.overrides.depth=1", "model.overrides.num_heads=2", "train.global_batch=8",
                                "train.log_every=2", "budget.group_size=4", "--selected-after=4"])
    assert [r["step"] for r in result["curve"]] == [2, 4]
    assert result["selected_after"] == 4 and not any(o.startswith("--") for o in result["overrides"])
    assert 0 <= result["stroke_t25"] <= 1 and 0 <= result["background_t25"] <= 1
    assert json.loads(out.read_text())["ratio_t25"] == result["ratio_t25"] and result["complete"]
    assert seen[0] is None and not seen[1]["complete"] and [r["step"] for r in seen[1]["curve"]] == [2]
    last = result["curve"][-1]  # the mean keep logits: below 0 where the router keeps less than half
    assert result["logit_gap_t25"] == last["stroke_logit_t25"] - last["background_logit_t25"]
    for side in ("stroke", "background"):
        assert math.isfinite(last[f"{side}_logit_t25"]) and (last[f"{side}_logit_t25"] < 0) == (last[f"{side}_t25"] < 0.5)


@needs_digits
def test_fill_training_trains_unfilled_and_filled_and_scores_each_model_in_three_layouts(tmp_path, studies,
                                                                                         monkeypatch):
    import fill_training

    monkeypatch.setattr(fill_training, "EVAL_IMAGES", 32)
    out = tmp_path / "seed0.json"
    record = fill_training.main(["0", "4", str(out), "train.precision=fp32", "model.overrides.hidden_size=32",
                                 "model.overrides.depth=1", "model.overrides.num_heads=2", "train.global_batch=8",
                                 "train.log_every=2", "budget.group_size=4", "model.overrides.capacity=1024"])
    assert json.loads(out.read_text()) == record and set(record["runs"]) == {"unfilled", "filled"}
    kept = {}
    for name, run in record["runs"].items():
        assert run["capacity"] == 1024 and [r["step"] for r in run["curve"]] == [2, 4]
        errors = run["denoising_mse"]  # a full-grid capacity holds the router's whole choice: packed = fixed
        assert errors["packed"] == pytest.approx(errors["fixed"], rel=1e-5) and errors["filled"] != errors["packed"]
        metrics = (tmp_path / "fill-runs-0" / name / "metrics.jsonl").read_text().splitlines()
        kept[name] = [json.loads(line)["kept_fraction"] for line in metrics]
    assert kept["filled"] == [1.0, 1.0] and max(kept["unfilled"]) < 1.0  # filled: every slot holds a token


@needs_digits
@pytest.mark.parametrize("seed", [1, 3])
def test_the_orientation_prior_makes_a_tiny_dcdit_keep_the_strokes_where_the_papers_losses_alone_do_not(
        tmp_path, seed, monkeypatch):
    """300 CPU steps of a width-32 DC-DiT-S on the digits with the recipe's prior: strokes kept at least 3x as
    densely as background at t = 25. Without the prior these seeds end at 0.0x (inverted) and 2.4x."""
    monkeypatch.setenv("CHUNKFORMER_TYPECHECK", "0")
    sys.path.insert(0, str(ROOT))
    from studies import router_seeds

    result = router_seeds.main([str(seed), "300", str(tmp_path / "r.json"), "train.precision=fp32",
                                "model.overrides.hidden_size=32", "model.overrides.depth=1",
                                "model.overrides.num_heads=2", "train.global_batch=16", "train.log_every=300",
                                "train.cpu_threads=1"])
    assert result["stroke_t25"] >= 3 * result["background_t25"], result


def test_a_sample_set_draws_with_its_own_ddim_steps(tmp_path, studies, monkeypatch):
    """The frontier's DiT sets sample with fewer DDIM steps than --sample-steps, and record the steps they used;
    FLOPs come from the counted first batch, the rate from the uncounted rest, labels run on as in one call."""
    import argparse

    import mnist_study

    seen = []

    def fake_generate(model, diffusion, *, num, steps, seed, labels=None, count_flops=True, **kw):
        seen.append((steps, num, count_flops))
        labels = torch.arange(num) % 10 if labels is None else labels
        return {"samples": torch.zeros(num, 1, 4, 4), "labels": labels, "kept_fraction": 0.5 if count_flops else 0.2,
                "kept_by_step": [0.5 if count_flops else 0.2] * steps,
                "tflops_per_image": 0.1 if count_flops else None, "skipped_steps": 0.0}
    monkeypatch.setattr(mnist_study, "generate", fake_generate)
    model = argparse.Namespace(in_channels=1, grid=(4, 4), num_classes=10)
    args = argparse.Namespace(samples=5, sample_steps=50, seed=0, batch=2, sample_precision="fp32")
    sets = {s.name: s for s in mnist_study.ARMS["dit-compiled"].sets}
    assert list(sets) == ["base", "ddim35", "ddim25", "ddim15"]
    records = [mnist_study.draw(model, None, sets[k], args, "cpu", tmp_path, score=False) for k in ("base", "ddim15")]
    assert seen == [(50, 2, True), (50, 3, False), (15, 2, True), (15, 3, False)]
    assert [r["steps"] for r in records] == [50, 15] and len(records[1]["kept_by_step"]) == 15
    assert records[0]["tflops_per_image"] == 0.1 and records[0]["kept_fraction"] == pytest.approx((2 * 0.5 + 3 * 0.2) / 5)
    assert records[0]["images_per_second"] > 0 and records[0]["precision"] == "fp32"
    saved = np.load(tmp_path / "ddim15.npz")
    assert saved["samples"].shape[0] == 5 and saved["labels"].tolist() == [0, 1, 2, 3, 4]
    assert [s.name for s in mnist_study.ARMS["dcdit-single-compiled"].sets] == ["base", "rho0.2", "rho0.4", "rho0.6"]


@settings(max_examples=25, deadline=None)
@given(kept=st.lists(st.integers(2, 16), min_size=1, max_size=3), seed=st.integers(0, 2**16),
       policy=st.sampled_from(["strokes", "background", "random"]))
def test_forced_kept_sets_keep_the_routers_count_and_its_ends(kept, seed, policy):
    if str(ROOT / "studies") not in sys.path:
        sys.path.insert(0, str(ROOT / "studies"))
    import kept_sets

    g = torch.Generator().manual_seed(seed)
    L = 16
    own = torch.rand(len(kept), L, generator=g).argsort(1).argsort(1) < torch.tensor(kept)[:, None]
    strokes = torch.rand(len(kept), L, generator=g) < 0.3
    mask = kept_sets.forced_mask(own, strokes, policy)
    assert torch.equal(mask.sum(1), own.sum(1)) and mask[:, 0].all() and mask[:, -1].all()
    inner, inner_strokes = mask[:, 1:-1], strokes[:, 1:-1]
    for b, k in enumerate(kept):  # the inner tokens it keeps come from the preferred side while that side lasts
        chosen, pool = inner[b], inner_strokes[b] if policy == "strokes" else ~inner_strokes[b]
        if policy != "random":
            assert int((chosen & pool).sum()) == min(k - 2, int(pool.sum()))


@needs_digits
def test_kept_sets_compares_a_trained_runs_own_set_with_forced_ones(tiny_study, studies, capsys):
    import kept_sets

    _, work, _ = tiny_study
    result = kept_sets.main([str(work / "s3" / "dcdit" / "run"), "--images", "16"])
    for t, rows in result["by_t"].items():
        assert set(rows) == set(kept_sets.POLICIES) and len({r["kept"] for r in rows.values()}) == 1  # same count
        assert rows["strokes"]["stroke_kept"] >= rows["random"]["stroke_kept"] >= rows["background"]["stroke_kept"]
        assert all(r["mse"] > 0 for r in rows.values())
    assert "| 25 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        kept_sets.main([str(work / "s3"), "--images", "16"])  # not a run folder
