"""Wrap chunkformer's own DiT with dynamic chunking and train it a few steps on the built-in digits.

    python examples/wrap_chunkformer_dit.py --steps 200        # the suite runs --steps 3 --depth 1
"""

import argparse

import torch
import torch.nn.functional as F

import chunkformer as cf
from chunkformer.data import load_mnist_digits
from chunkformer.diffusion import create_diffusion
from chunkformer.progress import progress


def train_wrapped(model: torch.nn.Module, steps: int, batch: int = 32, lr: float = 1e-3) -> list[float]:
    """Rectified-flow training of a wrapped model on 16x16 digits; returns the loss per step."""
    images, labels = load_mnist_digits()
    images = F.interpolate(images, size=16, mode="area") * 2 - 1  # (5000, 1, 16, 16) in [-1, 1]
    diffusion = create_diffusion("flow", learn_sigma=model.out_channels != model.in_channels)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dit = cf.create_model("DiT-S/2", input_size=16, in_channels=1, num_classes=10, depth=args.depth,
                          hidden_size=64, num_heads=4)              # your DiT (trained or not)
    model = cf.wrap(dit, target_ratio=4)                            # its blocks, now on chunked tokens
    losses = train_wrapped(model, args.steps)
    x = torch.randn(4, 1, 16, 16)
    info = cf.summary(model, x, torch.full((4,), 500), torch.arange(4))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")
    return {"losses": losses, **info}


if __name__ == "__main__":
    main()
