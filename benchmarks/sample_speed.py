"""How many images per second does ``recipes.sample`` make under each of its speed flags?

    python benchmarks/sample_speed.py         # GPU, about 5 min: writes results/sample_speed_256_<card>.json
    python benchmarks/sample_speed.py --tiny  # CPU smoke run (nothing written)

``recipes.sampling.generate`` (what ``recipes.sample`` runs: Euler steps, FLOP counting, samples
copied to the host) for DiT-XL/2 and DC-DiT-XL at 256px, batch 64, under each setting:

* the defaults: fp32, eager; DC-DiT with packed plans (the recipe's);
* ``--precision bf16``: weights cast to bf16 once, bf16 autocast;
* ``--precision bf16 --capacity N --fill`` (DC-DiT): fixed-capacity plans, exactly N tokens;
* the same with ``--compile`` (DiT-XL/2: ``--precision bf16 --compile``);
* the same with ``--bf16-routing`` (DC-DiT: router and de-chunk under the bf16 autocast too).

The DC-DiT router is biased to keep every token, and the budget is a quarter of the grid
(``capacity = L / 4``, an upper bound for packed plans), so every DC-DiT row sees 256 tokens per
sample whatever its plan mode, as a trained router at DC-DiT's N = 4 does. Weights are random:
this measures time, not images. Columns: images/s, speed-up over the same model's defaults and
over DiT-XL/2 with the same settings, and TFLOPs per image as ``generate`` counted them; the
table is printed at the end.
"""

import argparse
import time
from pathlib import Path

import torch

from common import card_name, fast_paths, router_precision, save_result

import chunkformer as cf
from chunkformer.diffusion import create_diffusion
from recipes.sample import set_serving_plan
from recipes.sampling import generate

SETTINGS = {  # name: (bf16, fixed-capacity filled plans, compile, bf16 routing, the DiT-XL/2 row it is set against)
    "fp32, eager (defaults)": (False, False, False, False, "fp32, eager (defaults)"),
    "bf16": (True, False, False, False, "bf16"),
    "bf16, compiled": (True, False, True, False, "bf16, compiled"),  # DiT-XL/2 only: packed plans do not compile
    "bf16, fixed capacity, filled": (True, True, False, False, "bf16"),
    "bf16, fixed capacity, filled, compiled": (True, True, True, False, "bf16, compiled"),
    "bf16 + bf16 routing, fixed capacity, filled": (True, True, False, True, "bf16"),  # DC-DiT only
    "bf16 + bf16 routing, fixed capacity, filled, compiled": (True, True, True, True, "bf16, compiled"),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--num", type=int, default=128, help="images per timed run (batches of --batch)")
    ap.add_argument("--steps", type=int, default=10, help="Euler steps per image")
    ap.add_argument("--tiny", action="store_true", help="small models on the CPU (a smoke run)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    ap.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/<name>.json)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latent, sizes = 32, {}
    if args.tiny:
        latent, sizes, args.batch, args.num, args.steps = 8, dict(hidden_size=32, depth=1, num_heads=2), 2, 2, 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as recipes.train sets
    torch._dynamo.config.recompile_limit = 64
    L = latent * latent
    diffusion = create_diffusion("flow", learn_sigma=False)

    def build(name: str, bf16: bool, fixed: bool, low_routing: bool):
        """The model under one setting: bf16 weights, fixed-capacity filled plans, bf16 routing."""
        torch.manual_seed(0)
        if name == "DiT-XL/2":
            model = cf.create_model(name, input_size=latent, learn_sigma=False, **sizes)
        else:
            model = cf.create_model(name, input_size=latent, learn_sigma=False, capacity=L // 4, **sizes)
            torch.nn.init.constant_(model.router.scorer[-1].bias, 30.0)  # keep everything: the capacity cuts
            if fixed:
                set_serving_plan(model, L // 4, fill=True)
            router_precision(model, fp32=not low_routing)
        model = fast_paths(model.to(device).eval(), on=True)
        return model.to(torch.bfloat16) if bf16 else model

    rows = []
    for name in ("DiT-XL/2", "DC-DiT-XL"):
        for setting, (bf16, fixed, compile_, low_routing, _) in SETTINGS.items():
            dit = name == "DiT-XL/2"
            if (dit and (fixed or low_routing)) or (not dit and compile_ and not fixed) or (compile_ and args.no_compile):
                continue
            model = build(name, bf16, fixed, low_routing)
            kw = dict(num=args.num, shape=(4, latent, latent), num_classes=1000, device=device, sampler="euler",
                      steps=args.steps, batch_size=args.batch, autocast=torch.bfloat16 if bf16 else None,
                      compile=compile_)
            generate(model, diffusion, **{**kw, "num": args.batch})  # warm-up (compiles)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = generate(model, diffusion, **kw)  # ends with the samples on the host
            seconds = time.perf_counter() - start
            rows.append({"model": name, "setting": setting, "images_per_s": args.num / seconds, "seconds": seconds,
                         "tflops_per_image": out["tflops_per_image"], "kept_fraction": out["kept_fraction"]})
            print(f"{name}, {setting}: {rows[-1]['images_per_s']:.2f} images/s", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def find(model: str, setting: str) -> dict | None:
        """The row of ``model`` under ``setting``, or None."""
        return next((r for r in rows if r["model"] == model and r["setting"] == setting), None)

    for r in rows:
        r["speedup_vs_defaults"] = r["images_per_s"] / find(r["model"], "fp32, eager (defaults)")["images_per_s"]
        dit = find("DiT-XL/2", SETTINGS[r["setting"]][-1])
        r["dit_setting"] = dit["setting"]  # (present: a DC-DiT row is compiled only when DiT-XL/2's is)
        r["speedup_vs_dit"] = r["images_per_s"] / dit["images_per_s"]
    card = card_name()
    print(f"\n{card}, torch {torch.__version__}, {latent * 8}px (latent {latent}x{latent}), batch {args.batch}, "
          f"{args.num} images x {args.steps} Euler steps, no guidance")
    print(f"{'model':<11}{'setting':<56}{'images/s':>10}{'vs defaults':>13}{'vs DiT':>8}{'TFLOPs/img':>12}")
    for r in rows:
        print(f"{r['model']:<11}{r['setting']:<56}{r['images_per_s']:>10.2f}{r['speedup_vs_defaults']:>13.2f}"
              f"{r['speedup_vs_dit']:>8.2f}{r['tflops_per_image']:>12.3f}")
    return save_result("sample_speed", str(latent * 8), card, out=args.out, write=not args.tiny, batch=args.batch, num=args.num, steps=args.steps, latent=latent, rows=rows)


if __name__ == "__main__":
    main()
