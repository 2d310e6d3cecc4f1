"""Upcycling: a DC-DiT from a pretrained DiT, warmed up by distilling the frozen original.

    dit = load_pretrained("runs/dit-s/final")                # local: chunkformer dir, original-DiT .pt, diffusers folder
    student, teacher = upcycle(dit, target_ratio=4)          # blocks from dit, embedders frozen, LayerNorm adaptor
    out, info = student(x_t, t, y, return_info=True, block_outputs=True, label_drop=drop)
    loss = diffusion_loss(out) + teacher.distillation_loss(info, x_t, t, y, label_drop=drop)   # warm-up steps
    # ... then ordinary diffusion training (block_outputs=False, no teacher)

What changes against the pretrained DiT: the patch embedding and output layer give way to
the P = 1 conv encoder / router / de-chunker / decoder (new, trained); the blocks are the
DiT's (a copy: the source model stays as it was) and train; the timestep and label embedders
are the DiT's, frozen; a LayerNorm adaptor (trainable) sits between them and the scaffold.

Distillation target: each student block's output at a kept token matches the frozen DiT's
same block's output at the patch holding that token (MSE, averaged over blocks).
"""

import copy
from pathlib import Path

import torch
from torch import nn

from .adapters import BackboneAdapter, find_adapter
from .grid import raster_index
from .wrapping import ChunkWrapper, wrap

__all__ = ["upcycle", "DistillationTeacher", "load_pretrained"]


def load_pretrained(source: "str | Path | nn.Module", **kwargs) -> nn.Module:
    """A pretrained DiT from a local path: a chunkformer ``save_pretrained`` folder, a diffusers
    ``DiTTransformer2DModel`` folder, or an original-DiT-layout ``.pt`` / ``.safetensors``
    (``kwargs`` go to the converter, e.g. ``num_heads``). Modules pass through."""
    from .models import create_model
    from .models.interop import from_original_dit, load_state_dict

    if isinstance(source, nn.Module):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: upcycling starts from a local checkpoint")
    if path.is_dir() and (path / "config.json").is_file():
        import json

        config = json.loads((path / "config.json").read_text())
        if config.get("class") in ("DiT",):
            return create_model(str(path), **kwargs)
        if config.get("_class_name") == "DiTTransformer2DModel":
            from diffusers import DiTTransformer2DModel

            return DiTTransformer2DModel.from_pretrained(str(path), local_files_only=True)
        raise ValueError(f"{path}/config.json describes {config.get('class') or config.get('_class_name')!r}, "
                         "not a DiT that can be upcycled")
    state = load_state_dict(path)
    if "x_embedder.proj.weight" in state:
        return from_original_dit(state, **kwargs)
    raise ValueError(f"{path}: unrecognised checkpoint layout (expected original-DiT keys such as x_embedder.proj.weight)")


class DistillationTeacher(nn.Module):
    """A frozen copy of the pretrained DiT that returns each block's output on the patch grid."""

    def __init__(self, model: nn.Module, adapter: "str | type[BackboneAdapter] | None" = None) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.adapter = find_adapter(self.model, adapter)
        self.patch_size = self.adapter.patch_size

    def train(self, mode: bool = True) -> "DistillationTeacher":
        return super().train(False)  # always eval: no label dropout, no dropout

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                label_drop: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each block's output ``(B, L_patch, d)`` for the noisy input ``x`` ``(B, C, *grid)``."""
        cond = self.adapter.condition(t, y, label_drop)
        h = self.adapter.patch_tokens(self.model, x)  # (B, L_patch, d)
        outs = []
        for i in range(len(self.adapter.blocks)):
            h = self.adapter.run_block(i, h, cond, None)
            outs.append(h)
        return outs

    def distillation_loss(self, info, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                          label_drop: torch.Tensor | None = None) -> torch.Tensor:
        """MSE between the student's block outputs (``info.block_outputs``, from
        ``student(..., return_info=True, block_outputs=True)``) and this teacher's at the patch
        holding each kept token; mean over kept tokens and blocks. Pass the same ``label_drop``."""
        if not info.block_outputs:
            raise ValueError("call the student with return_info=True, block_outputs=True to distil")
        targets = self(x, t, y, label_drop)
        if len(targets) != len(info.block_outputs):
            raise ValueError(f"student has {len(info.block_outputs)} blocks, teacher {len(targets)}")
        plan = info.plan
        patch_grid = tuple(s // self.patch_size for s in plan.grid)
        idx = raster_index(plan.coords.long() // self.patch_size, patch_grid)  # (B, M) patch of each slot
        valid = plan.valid  # (B, M)
        total = 0.0
        for student, teacher in zip(info.block_outputs, targets):
            target = torch.take_along_dim(teacher, idx[..., None], dim=1).to(student.dtype)  # (B, M, d)
            if plan.mode == "packed":
                total = total + (student - plan.pack(target)).float().square().mean()
            else:
                err = (student - target).float().square().mean(-1)  # (B, M)
                total = total + (err * valid).sum() / valid.sum().clamp_min(1)
        return total / len(targets)


def upcycle(source: "str | Path | nn.Module", target_ratio: float = 4.0, *,
            adapter: "str | type[BackboneAdapter] | None" = None, load_kwargs: dict | None = None,
            **wrap_kwargs) -> tuple[ChunkWrapper, DistillationTeacher]:
    """``(student, teacher)``: a DC-DiT built on a pretrained DiT's blocks, and the frozen DiT.

    The student owns a copy of the blocks (the source model is left as it was), freezes the
    timestep / label embedders and conditions the scaffold through a trainable LayerNorm.
    ``wrap_kwargs`` go to :func:`chunkformer.wrap`.
    """
    model = load_pretrained(source, **(load_kwargs or {}))
    teacher = DistillationTeacher(model, adapter)
    wrap_kwargs.setdefault("cond_adaptor", True)
    student = wrap(model, target_ratio, adapter=adapter, share_blocks=False, freeze_embedders=True, **wrap_kwargs)
    return student, teacher
