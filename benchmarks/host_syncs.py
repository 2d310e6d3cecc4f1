"""How often does a forward / training step make the host wait for the GPU, per plan mode?

    python benchmarks/host_syncs.py       # any device (the counts do not depend on it): writes results/host_syncs_s_<card>.json
    python benchmarks/host_syncs.py --batch 2 --out /tmp/syncs.json      # the same, as a quick smoke run

On a GPU a host sync stalls the launch queue and every dispatched op is at least one kernel
launch; at small sizes (32x32, width 384) the step is bound by these, not by FLOPs. The
counts do not depend on the device, so this runs anywhere. ``value checks`` are the NaN /
budget-range / timestep and label range checks (``chunkformer._typing.value_checks``); the sampling hot path turns them off. Prints a
markdown table: host syncs forward / backward, the same without value checks, and dispatched ops,
for DiT-S/2 and DC-DiT-S in packed, padded and fixed-capacity plan modes (MNIST sizes, 32x32x1).
"""

import argparse
import platform
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import card_name, save_result

import chunkformer as cf
from chunkformer._typing import value_checks
from chunkformer.hostsync import count_host_syncs


class OpCounter(TorchDispatchMode):
    """Every op that reaches the dispatcher below autograd (views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def measure(model, x, t, y, kwargs: dict) -> dict:
    """Host syncs (with and without value checks) and dispatched ops of one training-mode forward and backward."""
    model.train()
    model(x, t, y, **kwargs)  # warm-up (lazy init, caches)
    row = {}
    for checks in (True, False):
        with value_checks(checks), count_host_syncs() as fwd:
            out = model(x, t, y, **kwargs)
        with value_checks(checks), count_host_syncs() as bwd:
            out.float().square().mean().backward()
        row[f"syncs_fwd{'' if checks else '_unchecked'}"] = fwd.total
        row[f"syncs_bwd{'' if checks else '_unchecked'}"] = bwd.total
    with OpCounter() as fwd_ops:
        out = model(x, t, y, **kwargs)
    with OpCounter() as bwd_ops:
        out.float().square().mean().backward()
    row["ops_fwd"], row["ops_bwd"] = sum(fwd_ops.ops.values()), sum(bwd_ops.ops.values())
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/<name>.json)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    B = args.batch
    x, t, y = torch.randn(B, 1, 32, 32), torch.rand(B) * 999, torch.randint(0, 10, (B,))
    rows = {}
    rows["DiT-S/2"] = measure(cf.create_model("DiT-S/2", input_size=32, in_channels=1, num_classes=10), x, t, y, {})
    for mode in ("packed", "padded", "fixed"):
        kw = {"capacity": 256} if mode == "fixed" else {}
        model = cf.create_model("DC-DiT-S", input_size=32, in_channels=1, num_classes=10, plan_mode=mode,
                                attn_backend="sdpa", **kw)
        rows[f"DC-DiT-S {mode}"] = measure(model, x, t, y, {"rho": 0.2})
    print(f"MNIST-S sizes (32x32x1, width 384, 12 blocks), batch {B}, training mode, rho 0.2 for DC-DiT\n")
    print("| model | host syncs fwd / bwd | without value checks | dispatched ops fwd / bwd |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['syncs_fwd']} / {r['syncs_bwd']} | {r['syncs_fwd_unchecked']} / "
              f"{r['syncs_bwd_unchecked']} | {r['ops_fwd']} / {r['ops_bwd']} |")
    return save_result("host_syncs", "s", card_name(), out=args.out, python=platform.python_version(), batch=B,
                       rows=rows)


if __name__ == "__main__":
    main()
