"""Checkpoint interop: original DiT layout, diffusers, and the authors' DC-DiT release."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from backbones import OriginalLayoutDiT, tiny_diffusers_dit

import chunkformer as cf
from chunkformer.models.interop import (
    from_diffusers,
    from_original_dit,
    from_reference_dcdit,
    reference_dcdit_config,
    reference_dcdit_key_map,
    to_diffusers,
    to_original_dit,
)

REFERENCE_KEYS = Path(__file__).resolve().parents[1] / "data" / "reference_dcdit_keys.json"


def inputs(B=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, size, size, generator=g), torch.randint(0, 1000, (B,), generator=g),
            torch.randint(0, 10, (B,), generator=g))


def test_original_dit_layout_loads_into_chunkformer_dit_and_back():
    src = OriginalLayoutDiT(hidden_size=32, num_heads=2).eval()
    x, t, y = inputs()
    with torch.no_grad():
        expected = src(x, t, y)
        ours = from_original_dit(src.state_dict(), num_heads=2).eval()
        assert ours.patch_size == 2 and ours.grid == (8, 8) and len(ours.blocks) == 2
        assert torch.allclose(ours(x, t, y), expected, atol=1e-5)
        back = to_original_dit(ours)
        assert set(back) == set(src.state_dict())
        fresh = OriginalLayoutDiT(hidden_size=32, num_heads=2).eval()
        fresh.load_state_dict(back)
        assert torch.allclose(fresh(x, t, y), expected, atol=1e-5)


def test_original_dit_from_a_local_file_with_a_training_checkpoint_wrapper(tmp_path):
    src = OriginalLayoutDiT().eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "ema": src.state_dict()}, path)
    ours = from_original_dit(path, num_heads=2).eval()
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.allclose(ours(x, t, y), src(x, t, y), atol=1e-5)
    with pytest.raises(ValueError, match="num_heads"):
        from_original_dit(src.state_dict())  # hidden 32 is no registered size: heads unknown
    learned = dict(src.state_dict(), pos_embed=torch.randn_like(src.pos_embed))
    with pytest.raises(ValueError, match="sin-cos"):
        from_original_dit(learned, num_heads=2)
    with pytest.raises(KeyError, match="original-DiT"):
        from_original_dit({"weight": torch.zeros(1)})


def test_diffusers_dit_loads_into_chunkformer_dit_and_back():
    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel

    src = tiny_diffusers_dit().eval()
    x, t, y = inputs()
    with torch.no_grad():
        expected = src(x, timestep=t, class_labels=y).sample
        ours = from_diffusers(src).eval()
        assert ours.blocks[0].norm2.eps == src.config.norm_eps and ours.t_embedder.freq_shift == 1
        assert torch.allclose(ours(x, t, y), expected, atol=1e-5)
        config, state = to_diffusers(ours)
        fresh = DiTTransformer2DModel(**config).eval()
        fresh.load_state_dict(state)  # strict: every key, nothing extra
        assert torch.allclose(fresh(x, timestep=t, class_labels=y).sample, expected, atol=1e-5)


def test_diffusers_per_block_embedders_that_differ_are_refused_by_default():
    pytest.importorskip("diffusers")
    src = tiny_diffusers_dit()
    with torch.no_grad():
        src.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.weight.add_(1.0)
    with pytest.raises(ValueError, match="per_block_embedders"):
        from_diffusers(src)
    assert isinstance(from_diffusers(src, per_block_embedders="first"), cf.DiT)


@pytest.mark.parametrize("name", ["small", "small_nofactor", "B-N4", "XL-N4"])
def test_reference_dcdit_keys_map_one_to_one_onto_chunkformer_dcdit(name):
    entry = json.loads(REFERENCE_KEYS.read_text())["configs"][name]
    shapes = {k: tuple(v["shape"]) for k, v in entry["keys"].items()}
    config = reference_dcdit_config(shapes, num_heads=2 if name.startswith("small") else None)
    model = cf.DCDiT(**config, device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping = reference_dcdit_key_map(shapes)
    assert sorted(mapping.values()) == sorted(ours)  # every one of our keys, exactly once
    for theirs, mine in mapping.items():
        assert shapes[theirs] == ours[mine], (theirs, mine)
    assert set(shapes) - set(mapping) == {"pos_embed"}  # recomputed from coordinates
    assert entry["num_parameters"] - shapes["pos_embed"][1] * shapes["pos_embed"][2] == sum(
        v.numel() for v in model.state_dict().values())


def test_reference_dcdit_release_numerics():
    """Same outputs as the release itself. Needs its code at CHUNKFORMER_DCDIT_REFERENCE: a folder
    with run_reference.py (see docs/wrap.md, "Checking against the release"); skipped otherwise."""
    root = os.environ.get("CHUNKFORMER_DCDIT_REFERENCE")
    if not root or not (Path(root) / "run_reference.py").is_file():
        pytest.skip("set CHUNKFORMER_DCDIT_REFERENCE to a folder holding the release and run_reference.py")
    sys.path.insert(0, root)
    import run_reference as R

    ref = R.build_model("small_nofactor")
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if k != "pos_embed" else v
             for k, v in ref.state_dict().items()}
    state["hnet.routing_module.residual_scorer.3.bias"] = torch.tensor([-0.2])  # keep about 40%
    ours = from_reference_dcdit(state, num_heads=2).eval()
    x, t, y = inputs()
    for rho in (0.0, 0.3):
        expected = R.run_reference(state, x, t, y, config="small_nofactor", bf16_attention=False, tail_dropping_fraction=rho)
        with torch.no_grad():
            out, info = ours(x, t, y, rho=rho, return_info=True)
        assert 8 < info.kept.float().mean() < 60
        assert torch.allclose(out, expected, atol=1e-5)
