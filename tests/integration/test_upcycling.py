"""Upcycling: a DC-DiT on a pretrained DiT's blocks, distilled from the frozen original."""

import json

import pytest
import torch
from backbones import OriginalLayoutDiT
from test_recipes import TINY, needs_digits, run_train

import chunkformer as cf
from chunkformer.routing import RouterOutput
from chunkformer.upcycling import DistillationTeacher, load_pretrained, upcycle


def tiny_dit(patch=2, seed=0):
    torch.manual_seed(seed)
    model = cf.create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=32,
                            num_heads=2, patch_size=patch)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def inputs(B=3):
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, 4, 8, 8, generator=g), torch.randint(0, 1000, (B,), generator=g), torch.randint(0, 10, (B,), generator=g)


def test_upcycle_copies_blocks_freezes_embedders_and_adds_an_adaptor():
    dit = tiny_dit()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    student, teacher = upcycle(dit)
    assert student.blocks[0] is not dit.blocks[0]
    assert torch.equal(student.blocks[0].attn.qkv.weight, dit.blocks[0].attn.qkv.weight)
    assert not any(p.requires_grad for m in student.backbone.embedders() for p in m.parameters())
    assert isinstance(student.cond_adaptor, torch.nn.LayerNorm) and student.cond_adaptor.weight.requires_grad
    assert not any(p.requires_grad for p in teacher.parameters())
    torch.nn.init.normal_(student.decoder.final.linear.weight, std=0.05)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    x, t, y = inputs()
    student(x, t, y).square().mean().backward()
    assert student.backbone.t_embedder.mlp[0].weight.grad is None  # frozen
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())  # the source is untouched
    assert cf.unwrap(student) is dit


class FixedTokens(torch.nn.Module):
    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.tokens = tokens

    def forward(self, x, c):
        return self.tokens


class FixedRouter(torch.nn.Module):
    """Keeps exactly the given (L,) mask in every sample."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.keep = keep

    def forward(self, tokens, grid, rho=0.0):
        B = tokens.shape[0]
        mask = self.keep.expand(B, -1).clone()
        p = mask.float()
        return RouterOutput(probs=p, mask=mask, natural_mask=mask, confidence=torch.ones_like(p), grid=tuple(grid),
                            batch_size=[B])


@pytest.mark.parametrize(("layout", "patch"), [("chunkformer", 1), ("chunkformer", 2), ("dit", 2)])
def test_distillation_loss_is_zero_when_the_student_sees_the_teachers_tokens(layout, patch):
    """Keep one P=1 token per patch (its top-left pixel) and feed the teacher's patch tokens:
    the student's sequence is then the teacher's, so every block output matches its target."""
    dit = tiny_dit(patch) if layout == "chunkformer" else OriginalLayoutDiT(hidden_size=32, num_heads=2)
    student, teacher = upcycle(dit)
    student.eval()
    x, t, y = inputs()
    grid = cf.grid.grid_coords((8, 8)).long()
    keep = ((grid % patch) == 0).all(-1)  # (64,)
    student.router = FixedRouter(keep)
    patch_tokens = teacher.adapter.patch_tokens(teacher.model, x)  # (B, 64 / P^2, d), with positions
    coords = cf.grid.grid_coords((8 // patch, 8 // patch))
    no_pos = patch_tokens - student.backbone.position_embedding(coords)
    full = torch.zeros(3, 64, 32)
    full[:, keep] = no_pos
    student.encoder = FixedTokens(full)  # the student's tokens at the kept pixels are the teacher's
    with torch.no_grad():
        _, info = student(x, t, y, return_info=True, block_outputs=True)
        loss = teacher.distillation_loss(info, x, t, y)
        assert info.kept.tolist() == [64 // patch**2] * 3
        assert loss < 1e-10
        # and the targets are not trivially zero: a perturbed student is far off
        info.block_outputs[0] = info.block_outputs[0] + 0.1
        assert teacher.distillation_loss(info, x, t, y) > 1e-4


def test_distillation_warm_up_lowers_the_block_loss():
    student, teacher = upcycle(tiny_dit())
    torch.nn.init.constant_(student.router.scorer[-1].bias, 0.5)
    x, t, y = inputs(4)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-3)
    drop = torch.zeros(4, dtype=torch.bool)

    def loss_fn():
        _, info = student(x, t, y, return_info=True, block_outputs=True, label_drop=drop)
        return teacher.distillation_loss(info, x, t, y, drop)

    first = loss_fn().item()
    for _ in range(30):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.5 * first


def test_load_pretrained_from_local_paths(tmp_path):
    dit = tiny_dit()
    cf.save_pretrained(dit, tmp_path / "ours")
    assert isinstance(load_pretrained(tmp_path / "ours"), cf.DiT)
    src = OriginalLayoutDiT(hidden_size=32, num_heads=2)
    torch.save(src.state_dict(), tmp_path / "orig.pt")
    assert isinstance(load_pretrained(tmp_path / "orig.pt", num_heads=2), cf.DiT)
    with pytest.raises(FileNotFoundError, match="local"):
        load_pretrained(tmp_path / "missing")
    cf.save_pretrained(cf.create_model("DC-DiT-S", depth=1, input_size=8, num_classes=2), tmp_path / "dc")
    with pytest.raises(ValueError, match="not a DiT"):
        load_pretrained(tmp_path / "dc")
    with pytest.raises(ValueError, match="distil"):
        DistillationTeacher(dit).distillation_loss(
            student_info(dit), *inputs())


def student_info(dit):
    student, _ = upcycle(dit)
    return student(*inputs(), return_info=True)[1]  # no block outputs asked for


@needs_digits
def test_upcycling_recipe_distils_then_trains(tmp_path):
    base = run_train(tmp_path, "train.steps=2", "model.name=DiT-S/2", "model.overrides.learn_sigma=false",
                     name="dit")
    assert (base / "final" / "config.json").is_file()
    args = [a for a in TINY if not a.startswith("model.")]
    run = run_train(tmp_path, "train.steps=4", "model.overrides={}", f"upcycle.source={base / 'final'}",
                    "upcycle.distill_steps=2", *args, name="up")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["distill"] > 0 and lines[-1]["distill"] == 0  # log_every=2: steps 1-2 distil, 3-4 do not
    with pytest.raises(AssertionError, match="wrap"):
        run_train(tmp_path, "train.steps=1", "model.overrides.depth=3", f"upcycle.source={base / 'final'}",
                  name="bad")
