"""Does the router keep the digit strokes in every run? DC-DiT-S (``mnist-dcdit-s``) over seeds, one process per seed.

    python studies/router_seeds.py 0 1450 out/seed0.json                 # one seed at the study's step budget (GPU)
    for s in 0 1 2 3 4 5 6 7; do python studies/router_seeds.py $s 1450 out/seed$s.json; done   # eight seeds
    python studies/router_seeds.py 0 4 /tmp/s0.json train.precision=fp32 model.overrides.hidden_size=32 \\
        model.overrides.depth=1 model.overrides.num_heads=2 train.global_batch=8 train.log_every=2 budget.group_size=4

Trains ``mnist-dcdit-s`` for the given steps with the given seed (extra ``key=value`` overrides after the
output path) and, at every log step, measures over 256 fixed real digits what the router keeps at
``t = 25`` and ``t = 500``: the kept density on strokes and on background (``studies.mnist_study.orientation_probe``).
Writes the curve (with the mean keep logit on strokes and on background, which shows the side the router leans to
before it keeps anything) and the last probe's stroke / background ratio and logit gap at ``t = 25`` to the
JSON file after every probe (``"complete": false`` until the run ends, so a run cut short keeps its curve) and
prints a one-line summary. The router finds the detail when strokes are kept at least 3x as densely as background.
``model.overrides.router_init=release model.overrides.gate_grad=selected`` trains with the paper's router
settings; ``--selected-after=K`` (among the overrides) switches to the paper's gate gradient at the first log
step at or after step ``K``. ``budget.orient_weight=0`` trains without the router's orientation prior (the
paper's losses only), ``budget.orient_steps=K`` with it for the first ``K`` steps only. On a GPU, with
``train.checkpoint_scaffold=true``, one run holds up to about 24 GiB (``peak_gib`` in the record) and keeps
the card busy: on an H100 a run alone takes about 3.5 minutes and two at once about 7.5.
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipes.config import apply_overrides, get_recipe  # noqa: E402
from recipes.train import train  # noqa: E402
from studies.mnist_study import orientation_probe  # noqa: E402


def main(argv: list[str]) -> dict:
    seed, steps, out, extra = int(argv[0]), int(argv[1]), Path(argv[2]), argv[3:]
    switch = next((int(a.split("=", 1)[1]) for a in extra if a.startswith("--selected-after=")), None)
    extra = [a for a in extra if not a.startswith("--selected-after=")]
    cfg = apply_overrides(get_recipe("mnist-dcdit-s"), [
        f"train.steps={steps}", f"train.seed={seed}", "train.log_every=50", f"train.results_dir={out.parent}/runs-{seed}",
        "train.sample_every=0", "train.num_sample_images=10", f"train.ckpt_every={steps}", *extra])
    probe = orientation_probe(cfg, seed, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rows, start = [], time.time()

    def summary(complete: bool) -> dict:  # the last probe's figures; written after every probe
        last = rows[-1]
        return {"seed": seed, "steps": steps, "overrides": extra, "selected_after": switch,
                "complete": complete, "seconds": time.time() - start, "curve": rows,
                "stroke_t25": last["stroke_t25"], "background_t25": last["background_t25"],
                "ratio_t25": last["stroke_t25"] / max(last["background_t25"], 1e-6),
                "logit_gap_t25": last["stroke_logit_t25"] - last["background_logit_t25"],
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}

    def record(model, step):
        if switch is not None and step >= switch:  # the paper's gate gradient from here on
            model.router.gate_grad = "selected"
        r = probe(model, step)
        rows.append({"step": step, **r})
        out.write_text(json.dumps(summary(complete=False)))  # a run cut short keeps its curve so far
        return r

    out.parent.mkdir(parents=True, exist_ok=True)
    train(cfg, probe=record)
    result = summary(complete=True)
    out.write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
