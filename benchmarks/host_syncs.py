"""Host syncs and dispatched ops per forward / training step, counted on any device (CPU is fine).

    python benchmarks/host_syncs.py                       # MNIST-S sizes: DiT-S/2 vs DC-DiT-S per plan mode
    python benchmarks/host_syncs.py --out benchmarks/results/host_syncs_cpu.json

On a GPU a host sync stalls the launch queue and every dispatched op is at least one kernel
launch; at small sizes (32x32, width 384) the step is bound by these, not by FLOPs. The
counts do not depend on the device, so this runs anywhere. ``value checks`` are the NaN /
budget-range / timestep and label range checks (``chunkformer.value_checks``); the sampling hot path
turns them off.
"""

import argparse
import json
import platform
import shlex
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chunkformer as cf  # noqa: E402


class OpCounter(TorchDispatchMode):
    """Every op that reaches the dispatcher below autograd (views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def measure(model, x, t, y, kwargs: dict) -> dict:
    model.train()
    model(x, t, y, **kwargs)  # warm-up (lazy init, caches)
    row = {}
    for checks in (True, False):
        with cf.value_checks(checks), cf.count_host_syncs() as fwd:
            out = model(x, t, y, **kwargs)
        with cf.value_checks(checks), cf.count_host_syncs() as bwd:
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
    ap.add_argument("--out", type=Path, default=None)
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
    result = {"device": "cpu (counts do not depend on the device)", "torch": torch.__version__,
              "python": platform.python_version(), "command": "python " + shlex.join(sys.argv), "batch": B,
              "rows": rows}
    print(f"MNIST-S sizes (32x32x1, width 384, 12 blocks), batch {B}, training mode, rho 0.2 for DC-DiT\n")
    print("| model | host syncs fwd / bwd | without value checks | dispatched ops fwd / bwd |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['syncs_fwd']} / {r['syncs_bwd']} | {r['syncs_fwd_unchecked']} / "
              f"{r['syncs_bwd_unchecked']} | {r['ops_fwd']} / {r['ops_bwd']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
