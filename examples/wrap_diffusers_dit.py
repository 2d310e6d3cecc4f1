"""Dynamic chunking around diffusers' ``DiTTransformer2DModel`` (pip install 'chunkformer[dev]' or diffusers).

``--model-dir`` loads a local diffusers folder (e.g. a saved ``transformer/`` of a DiT pipeline);
without it a small model is built from a config. The wrapped model runs the diffusers blocks on
packed, per-sample token sequences; ``chunkformer.unwrap`` gives the diffusers model back.

    python examples/wrap_diffusers_dit.py --steps 200
"""

import argparse
import sys
from pathlib import Path

import torch

import chunkformer as cf

sys.path.insert(0, str(Path(__file__).parent))
from wrap_chunkformer_dit import train_wrapped  # noqa: E402


def main(argv=None) -> dict:
    from diffusers import DiTTransformer2DModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--model-dir", default="", help="a local DiTTransformer2DModel folder")
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.model_dir:
        dit = DiTTransformer2DModel.from_pretrained(args.model_dir, local_files_only=True)
    else:
        dit = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=1, out_channels=1,
                                    num_layers=args.depth, sample_size=16, patch_size=2, num_embeds_ada_norm=10)
    model = cf.wrap(dit, target_ratio=4)                # the "diffusers" adapter, found by structure
    losses = train_wrapped(model, args.steps)
    info = cf.summary(model, torch.randn(4, 1, 16, 16), torch.full((4,), 500), torch.arange(4))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")
    assert cf.unwrap(model) is dit
    return {"losses": losses, **info}


if __name__ == "__main__":
    main()
