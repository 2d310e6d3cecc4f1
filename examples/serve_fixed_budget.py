"""Serve a DC-DiT at a fixed cost: fixed capacity, full plans and the precision switch, on the same noise.

    python examples/serve_fixed_budget.py --steps 1500          # the suite runs --steps 3 --depth 1
    python examples/serve_fixed_budget.py --compile             # on a GPU: one compiled graph per budget

Trains a small DC-DiT on the built-in digits (rectified flow, 16x16), then samples the same noise
with the model as trained (packed plans: each sample keeps what its router keeps) and with four
serving settings of the same weights:

* ``plan_mode="fixed", capacity=K``: static shapes, no host sync, at most ``K`` tokens per sample;
* ``fill_capacity=True``: exactly ``K`` per sample, so attention needs no padding mask;
* ``.to(torch.bfloat16)`` under bf16 autocast: the weights cast once (the router and de-chunk
  residual stay fp32), instead of autocast casting them again at every step;
* ``fp32_router_dechunk=False``: router and de-chunk under the caller's autocast (bf16) instead of fp32.

It prints tokens per sample, TFLOPs per image, wall-clock and how far each setting's samples land
from the packed model's. The speed of these settings is a GPU matter (docs/performance.md); on the
CPU this shows the API and that the samples stay close.
"""

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import chunkformer as cf
from chunkformer.diffusion import create_diffusion
from chunkformer.diffusion.guidance import model_fn
from chunkformer.flops import FlopCounter

sys.path.insert(0, str(Path(__file__).parent))
from wrap_chunkformer_dit import train_wrapped  # noqa: E402  (rectified flow on 16x16 digits)


def served(folder, **settings):
    """The saved model rebuilt with other plan / precision settings: the weights do not depend on them."""
    return cf.create_model(str(folder), **settings).eval()


@torch.no_grad()
def sample(model, diffusion, noise, y, steps, compile_=False, autocast=False):
    fn = torch.compile(model) if compile_ else model
    amp = torch.autocast(noise.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    with amp:
        _, info = model(noise, torch.zeros(len(y)), y, return_info=True)  # tokens per sample at this noise
        with FlopCounter(model) as counter:
            start = time.perf_counter()
            x = diffusion.sample(model_fn(fn, y), noise.shape, steps=steps, noise=noise)
            seconds = time.perf_counter() - start
    return x.float(), float(info.kept.float().mean()), counter.total / len(y) / 1e12, seconds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--compile", action="store_true", help="torch.compile the fixed-capacity models (GPU)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", input_size=16, in_channels=1, num_classes=10, depth=args.depth,
                            hidden_size=64, num_heads=4, learn_sigma=False)
    diffusion = create_diffusion("flow", learn_sigma=False)
    losses = train_wrapped(model, args.steps)
    model = model.eval().to(device)
    capacity = 16 * 16 // 4  # the budget: a quarter of the grid
    fixed = dict(plan_mode="fixed", capacity=capacity)
    noise = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.arange(8, device=device)
    with tempfile.TemporaryDirectory() as tmp:  # removed on exit, errors included
        folder = Path(tmp) / "dcdit"
        cf.save_pretrained(model, folder)  # config.json + model.safetensors; a serving process starts here
        settings = {
            "packed (as trained)": (model, False, False),
            f"fixed, capacity {capacity}": (served(folder, **fixed), True, False),
            "+ fill_capacity": (served(folder, **fixed, fill_capacity=True), True, False),
            "+ bf16 weights (autocast)": (served(folder, **fixed, fill_capacity=True).to(torch.bfloat16), True, True),
            "+ bf16 routing (autocast)": (served(folder, **fixed, fill_capacity=True, fp32_router_dechunk=False),
                                          True, True),
        }
    rows, reference = {}, None
    for name, (m, static, autocast) in settings.items():
        x, kept, tflops, seconds = sample(m.to(device), diffusion, noise, y, args.sample_steps,
                                          compile_=args.compile and static, autocast=autocast)
        reference = x if reference is None else reference
        rows[name] = (kept, tflops, seconds, float((x - reference).norm() / reference.norm()))

    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps; saved with save_pretrained to a "
          "temporary folder (removed), rebuilt from it per setting")
    print(f"{'sampling':<28}{'tokens':>8}{'TFLOPs/img':>12}{'seconds':>9}{'rel. change':>13}")
    for name, (kept, tf, s, dev) in rows.items():
        print(f"{name:<28}{kept:>8.1f}{tf:>12.5f}{s:>9.2f}{dev:>13.4f}")
    return {"losses": losses, "rows": rows, "capacity": capacity, "folder": folder}


if __name__ == "__main__":
    main()
