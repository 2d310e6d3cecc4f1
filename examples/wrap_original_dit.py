"""Dynamic chunking for a DiT in the original release's layout (facebookresearch/DiT, SiT, fast-DiT).

The model is always an original-layout module, wrapped as it is through the ``"dit"`` adapter
(found by its module names):

* by default, the layout bundled in ``examples/_original_layout.py`` (plain PyTorch, random init);
* ``--checkpoint DiT-S-2.pt``: that definition with an original-layout state dict loaded (sizes read
  from the weights; ``--num-heads`` if the width is not ``64 x heads``);
* ``--dit-repo /path/to/DiT``: the original code's own ``models.DiT_models`` module.

    python examples/wrap_original_dit.py --steps 200        # the suite runs --steps 3 --depth 1
"""

import argparse
import sys
from pathlib import Path

import torch

import chunkformer as cf
from chunkformer.models.interop import load_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from _original_layout import OriginalLayoutDiT  # noqa: E402
from wrap_chunkformer_dit import train_wrapped  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--checkpoint", default="", help="an original-DiT-layout .pt / .safetensors (state dict or "
                                                    "training checkpoint) for 1 x 16 x 16 inputs, 10 classes")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads of --checkpoint (default width / 64)")
    p.add_argument("--dit-repo", default="", help="a checkout of the original DiT code, to wrap its module directly")
    p.add_argument("--depth", type=int, default=4, help="blocks of the bundled model")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.dit_repo:
        sys.path.insert(0, args.dit_repo)
        from models import DiT_models  # the original code's registry

        dit = DiT_models["DiT-S/2"](input_size=16, in_channels=1, num_classes=10, learn_sigma=False)
    elif args.checkpoint:
        dit = OriginalLayoutDiT.from_state_dict(load_state_dict(args.checkpoint), num_heads=args.num_heads)
    else:
        dit = OriginalLayoutDiT(input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=args.depth,
                                num_heads=4, num_classes=10, learn_sigma=False)
    model = cf.wrap(dit, target_ratio=4)  # the "dit" adapter: found by the original layout's module names
    losses = train_wrapped(model, args.steps)
    info = cf.summary(model, torch.randn(4, 1, 16, 16), torch.full((4,), 500), torch.arange(4))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")
    return {"losses": losses, **info}


if __name__ == "__main__":
    main()
