"""Which side a predictability router picks on the MNIST digits: strokes or background.

    python studies/router_orientation.py --seeds 0,1,2,3 --inits oriented,release --steps 150

Trains ``examples/mnist_demo.py``'s tiny DC-DiT (CPU, one thread) per seed and router init, and every
``--probe-every`` steps records, over 64 held-out digits at ``t = 0.1``: the kept density on strokes
(clean pixel > 0) and on background, and the mean keep probability ``p`` on each. A router is
*inverted* when it keeps background more densely than strokes. ``--inits`` and ``--gate`` pick the
router's ``init`` and ``gate_grad`` (docs/routing.md, "Orientation").
Writes one JSON line per run to ``--out`` (default: stdout only).
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import chunkformer as cf  # noqa: E402
from chunkformer.data import load_mnist_digits  # noqa: E402


def load_demo():
    spec = importlib.util.spec_from_file_location("mnist_demo", ROOT / "examples" / "mnist_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


@torch.no_grad()
def probe(demo, model, x0, y, t_val=0.1, seed=0):
    """Kept density and mean p on strokes / background at ``t_val``, over ``x0`` (N, 1, 32, 32)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    t = torch.full((x0.shape[0],), t_val)
    _, routed = model(demo.noisy(x0, t, torch.randn(x0.shape, generator=gen)), t, y)
    model.train()
    strokes = (x0 > 0).flatten(1)
    m, p = routed.mask.float(), routed.probs
    return {
        "stroke_density": float(m[strokes].mean()), "background_density": float(m[~strokes].mean()),
        "stroke_p": float(p[strokes].mean()), "background_p": float(p[~strokes].mean()),
        "kept": float(routed.kept.float().mean()),
    }


def run(demo, images, labels, seed, init, steps, batch, dim, probe_every, init_bias=-1.1, gate="keep"):
    torch.manual_seed(seed)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, held = perm[:-500], perm[-64:]
    model = demo.TinyDCDiT(dim, 4)
    model.router = cf.Router(dim, init=init, init_bias=init_bias, gate_grad=gate)
    budget = cf.TimestepAdaptiveBudget(target_ratio=4, ratio_weight=0.03)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trace = [dict(step=0, **probe(demo, model, images[held], labels[held], seed=seed))]
    for step in range(1, steps + 1):
        idx = train[torch.randint(len(train), (batch,))]
        x0, y = images[idx], labels[idx]
        t, eps = torch.rand(batch), torch.randn_like(x0)
        eps_hat, routed = model(demo.noisy(x0, t, eps), t, y)
        loss = F.mse_loss(eps_hat, eps) + budget.ratio_weight * budget.ratio_loss(routed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % probe_every == 0 or step == steps:
            trace.append(dict(step=step, **probe(demo, model, images[held], labels[held], seed=seed)))
    return trace


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--inits", default="oriented,release")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--probe-every", type=int, default=25)
    p.add_argument("--init-bias", type=float, default=-1.1)
    p.add_argument("--gate", default="keep", choices=["keep", "selected"], help="Router(gate_grad=...)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    demo = load_demo()
    images, labels = load_mnist_digits()
    for init in args.inits.split(","):
        for seed in map(int, args.seeds.split(",")):
            start = time.perf_counter()
            trace = run(demo, images, labels, seed, init, args.steps, args.batch, args.dim, args.probe_every,
                        args.init_bias, args.gate)
            end = trace[-1]
            record = {"init": init, "init_bias": args.init_bias, "gate": args.gate, "seed": seed,
                      "steps": args.steps, "batch": args.batch, "dim": args.dim,
                      "seconds": round(time.perf_counter() - start, 1),
                      "inverted": end["background_density"] > end["stroke_density"], "trace": trace}
            print(f"{init:9s} b{args.init_bias} {args.gate} seed {seed} {record['seconds']}s " + "  ".join(
                f"s{r['step']}: {r['stroke_density']:.2f}/{r['background_density']:.2f} "
                f"p {r['stroke_p']:.2f}/{r['background_p']:.2f}" for r in trace), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
