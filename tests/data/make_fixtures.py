"""Regenerate ``tests/data/fixed_outputs.safetensors``: fixed-seed CPU outputs of three models.

    PYTHONPATH=. python tests/data/make_fixtures.py

A tiny DC-DiT-S, chunkformer.wrap() around diffusers' ``DiTTransformer2DModel`` and around the original DiT
layout (the stand-ins of ``tests/backbones.py``), each on fixed inputs at two token budgets ``rho``. Every
parameter is redrawn from a fixed seed, so no zero-initialised layer hides a path. ``tests/unit/test_fixtures.py``
compares the current code against the stored tensors.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for backbones.py

OUT = HERE / "fixed_outputs.safetensors"
RHOS = (0.0, 0.3)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every floating parameter from ``seed`` (weights std 0.05, vectors 0.02 around their init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * (0.05 if p.ndim > 1 else 0.02))
        for m in model.modules():  # the router's head: logits around 0, so about half the tokens are kept
            if type(m).__name__ == "Router" and m.kind == "predictability":
                head = m.scorer[-1]
                head.weight.mul_(20)
                head.bias.zero_()
    return model.eval()


def dcdit() -> torch.nn.Module:
    import chunkformer as cf

    torch.manual_seed(0)
    model = cf.create_model("DC-DiT-S", input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=64,
                            num_heads=2)
    return randomize(model, 1)


def wrapped(layout: str) -> torch.nn.Module:
    from backbones import OriginalLayoutDiT, tiny_diffusers_dit

    import chunkformer as cf

    torch.manual_seed(0)
    backbone = tiny_diffusers_dit(0) if layout == "diffusers" else OriginalLayoutDiT()
    return randomize(cf.wrap(backbone), 2)


MODELS = {"dcdit": dcdit, "diffusers": lambda: wrapped("diffusers"), "dit": lambda: wrapped("dit")}


def inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999])
    y = torch.tensor([0, 4, 9])
    return x, t, y


def outputs(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{f"{name}/rho{rho}": output}`` for each budget, on :func:`inputs`."""
    x, t, y = inputs()
    with torch.no_grad():
        return {f"{name}/rho{rho}": model(x, t, y, rho=rho).contiguous() for rho in RHOS}


def main() -> None:
    tensors = {}
    for name, build in MODELS.items():
        tensors.update(outputs(name, build()))
    save_file(tensors, OUT)
    print(f"wrote {len(tensors)} tensors to {OUT}")


if __name__ == "__main__":
    main()
