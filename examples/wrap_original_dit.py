"""Dynamic chunking for a DiT in the original release's layout (facebookresearch/DiT, SiT, fast-DiT).

Two routes, both offline:

* you have the original code: ``--dit-repo /path/to/DiT`` imports its ``models.DiT_models`` and
  wraps that module as it is (the ``"dit"`` adapter, found by its module names);
* you have a checkpoint: ``--checkpoint DiT-S-2.pt`` converts it to chunkformer's DiT
  (``from_original_dit``, identical outputs) and wraps that. Without either, a stand-in checkpoint
  in the original key layout is written first, so the example runs anywhere.

    python examples/wrap_original_dit.py --steps 200
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import chunkformer as cf
from chunkformer.models.interop import from_original_dit, to_original_dit

sys.path.insert(0, str(Path(__file__).parent))
from wrap_chunkformer_dit import train_wrapped  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--checkpoint", default="", help="an original-DiT-layout .pt (state dict or training checkpoint)")
    p.add_argument("--dit-repo", default="", help="a checkout of the original DiT code, to wrap its module directly")
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.dit_repo:
        sys.path.insert(0, args.dit_repo)
        from models import DiT_models  # the original code's registry

        dit = DiT_models["DiT-S/2"](input_size=16, in_channels=1, num_classes=10, learn_sigma=False)
    else:
        path = args.checkpoint
        if not path:  # a stand-in with the original release's key names and pos_embed
            stand_in = cf.create_model("DiT-S/2", input_size=16, in_channels=1, num_classes=10, depth=args.depth,
                                       learn_sigma=False)
            path = Path(tempfile.mkdtemp()) / "DiT-S-2-stand-in.pt"
            torch.save(to_original_dit(stand_in), path)
        dit = from_original_dit(path)                            # heads from the registered width (384 -> 6)
    model = cf.wrap(dit, target_ratio=4)
    losses = train_wrapped(model, args.steps)
    info = cf.summary(model, torch.randn(4, 1, 16, 16), torch.full((4,), 500), torch.arange(4))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")
    return {"losses": losses, **info}


if __name__ == "__main__":
    main()
