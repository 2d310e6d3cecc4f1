"""Stack dynamic chunking, token merging and step caching on a DC-DiT trained on the built-in digits.

    python examples/merge_and_cache.py --steps 1500          # the suite runs --steps 3 --depth 1

Trains a small DC-DiT (rectified flow, 16x16 digits), then samples the same noise four
ways and prints TFLOPs per image (counted over the whole sampling run), wall-clock and how
far each accelerated run's samples land from the plain DC-DiT's.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import chunkformer as cf
from chunkformer.data import load_mnist_digits
from chunkformer.diffusion import create_diffusion
from chunkformer.diffusion.guidance import model_fn
from chunkformer.flops import FlopCounter
from chunkformer.progress import progress


def train(model, diffusion, steps: int, batch: int = 32, lr: float = 1e-3) -> list[float]:
    images, labels = load_mnist_digits()
    images = F.interpolate(images, size=16, mode="area") * 2 - 1  # (5000, 1, 16, 16) in [-1, 1]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in progress(range(steps), desc="train", unit="step"):  # a bar on a terminal, else a line every 30 s
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x0, y = images[idx], labels[idx]
        t, noise = diffusion.sample_timesteps(batch, generator=g), torch.randn(x0.shape, generator=g)
        x_t, _ = diffusion.q_sample(x0, t, noise)
        out, info = model(x_t, diffusion.model_timesteps(t), y, return_info=True)
        loss = diffusion.training_losses(out, x0, x_t, t, noise)["loss"].mean() + 0.03 * info.ratio_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def sample(model, diffusion, noise, y, steps, cache=None):
    with FlopCounter(model) as counter:
        start = time.perf_counter()
        x = diffusion.sample(model_fn(model, y), noise.shape, steps=steps, noise=noise, cache=cache)
        seconds = time.perf_counter() - start
    return x, counter.total / len(y) / 1e12, seconds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=25)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", input_size=16, in_channels=1, num_classes=10, depth=args.depth,
                            hidden_size=64, num_heads=4, learn_sigma=False)
    diffusion = create_diffusion("flow", learn_sigma=False)
    losses = train(model, diffusion, args.steps)
    model.eval()

    noise, y = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.arange(8)
    plain, tflops, seconds = sample(model, diffusion, noise, y, args.sample_steps)
    rows = {"DC-DiT": (tflops, seconds, 0.0)}
    cf.merging.apply(model, ratio=0.5)                                           # merge half of the kept tokens
    merged, tflops, seconds = sample(model, diffusion, noise, y, args.sample_steps)
    rows["+ merging 0.5"] = (tflops, seconds, float((merged - plain).norm() / plain.norm()))
    cf.merging.remove(model)
    cache = cf.StepCache(model, threshold=0.1)                                   # skip steps that barely change
    cached, tflops, seconds = sample(model, diffusion, noise, y, args.sample_steps, cache)
    rows[f"+ caching ({cache.skipped} skipped)"] = (tflops, seconds, float((cached - plain).norm() / plain.norm()))
    cf.merging.apply(model, ratio=0.5)
    both, tflops, seconds = sample(model, diffusion, noise, y, args.sample_steps, cf.StepCache(model, 0.1))
    rows["+ both"] = (tflops, seconds, float((both - plain).norm() / plain.norm()))
    cf.merging.remove(model)

    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")
    print(f"{'sampling':<26}{'TFLOPs/img':>12}{'seconds':>9}{'rel. change':>13}")
    for name, (tf, s, dev) in rows.items():
        print(f"{name:<26}{tf:>12.5f}{s:>9.2f}{dev:>13.4f}")
    return {"losses": losses, "rows": rows}


if __name__ == "__main__":
    main()
