"""Latent extraction with a local diffusers AutoencoderKL (tiny, random weights) and training on the cache."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="latent extraction needs the optional diffusers dependency")


def tiny_vae(path):
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.5,
    )
    vae.save_pretrained(path)
    return vae


def image_folder(root, n_per_class=3):
    from torchvision.utils import save_image

    g = torch.Generator().manual_seed(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            save_image(torch.rand(3, 20, 24, generator=g), root / cls / f"{i}.png")


def test_extract_then_train_source_then_decode(tmp_path):
    from recipes.data import build_source
    from recipes.extract_latents import decode, extract

    tiny_vae(tmp_path / "vae")
    image_folder(tmp_path / "images")
    meta = extract(str(tmp_path / "images"), str(tmp_path / "vae"), str(tmp_path / "cache"), image_size=16,
                   batch_size=4, device="cpu")
    assert meta["num_images"] == 6 and meta["num_classes"] == 2 and meta["scale_factor"] == 0.5
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["classes"] == ["cats", "dogs"]
    source = build_source("latents", str(tmp_path / "cache"))
    assert len(source) == 6 and source.sample_shape == (4, 8, 8) and source.num_classes == 2
    x, y = source.get(torch.tensor([0, 5]))
    assert y.tolist() == [0, 1]
    # the cache holds scale * posterior mean: decoding it with the same VAE gives images in [-1, 1]
    images = decode(x, str(tmp_path / "cache"), device="cpu")
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


def test_missing_vae_directory_is_named(tmp_path):
    from recipes.extract_latents import extract

    image_folder(tmp_path / "images", 1)
    with pytest.raises(FileNotFoundError, match="local AutoencoderKL directory"):
        extract(str(tmp_path / "images"), str(tmp_path / "nope"), str(tmp_path / "cache"))
