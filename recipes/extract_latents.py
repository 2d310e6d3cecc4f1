"""Encode an image folder into a latent cache with a local diffusers ``AutoencoderKL``.

    python -m recipes.extract_latents --images data/imagenet/train --vae models/sd-vae-ft-ema \\
        --out data/in256-latents --image-size 256
    python -m recipes.train --recipe DC-DiT-XL data.dataset=latents data.path=data/in256-latents

The VAE is loaded from a local directory (``AutoencoderKL.from_pretrained(path)``; nothing
is downloaded). Images are center-cropped and resized to ``--image-size``, scaled to
``[-1, 1]``, encoded (the posterior mean, or a sample with ``--sample``) and multiplied by
the scale factor (``--scale``, default: the VAE config's ``scaling_factor``, 0.18215 for
SD-VAE). Writes ``latents.safetensors`` (``latents`` float16 ``(N, 4, s/8, s/8)``,
``labels`` int64) and ``meta.json`` (VAE path, scale factor, normalisation, image size,
class names, count); training reads the cache, sampling decodes with the same VAE.
"""

import argparse
import json
import os
from pathlib import Path

import torch

__all__ = ["main", "extract", "decode"]


def _load_vae(path: str, device):
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("latent extraction needs diffusers: pip install 'chunkformer[latents]'") from None
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--vae must be a local AutoencoderKL directory (config.json + weights), got {path!r}")
    return AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()


@torch.no_grad()
def extract(images: str, vae_path: str, out: str, *, image_size: int = 256, batch_size: int = 32,
            scale: float | None = None, sample: bool = False, device=None, limit: int = 0) -> dict:
    """Encode ``images`` (an ImageFolder) into ``out``; returns the metadata written to ``meta.json``."""
    from safetensors.torch import save_file
    from torchvision import datasets, transforms
    from tqdm.auto import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = _load_vae(vae_path, device)
    scale = float(scale if scale is not None else getattr(vae.config, "scaling_factor", 0.18215))
    tf = transforms.Compose([
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])
    dataset = datasets.ImageFolder(images, transform=tf)
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    latents, labels = [], []
    for x, y in tqdm(loader, desc="encode", disable=not os.isatty(2)):
        dist = vae.encode(x.to(device)).latent_dist
        z = dist.sample() if sample else dist.mean
        latents.append((z * scale).half().cpu())
        labels.append(y)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "latents.safetensors.tmp"
    save_file({"latents": torch.cat(latents).contiguous(), "labels": torch.cat(labels).contiguous()}, str(tmp))
    tmp.replace(root / "latents.safetensors")
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    meta = {
        "vae": str(Path(vae_path).resolve()), "scale_factor": scale, "posterior": "sample" if sample else "mean",
        "normalisation": "pixels in [-1, 1] (x / 127.5 - 1) before encoding; latents stored multiplied by scale_factor",
        "image_size": image_size, "num_images": int(sum(len(b) for b in labels)),
        "num_classes": len(base.classes), "classes": base.classes, "images": str(Path(images).resolve()),
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


@torch.no_grad()
def decode(latents: torch.Tensor, cache_dir: str, *, device=None, batch_size: int = 16) -> torch.Tensor:
    """Latents (scaled, as cached) -> images in ``[-1, 1]`` with the VAE recorded in ``meta.json``."""
    meta = json.loads((Path(cache_dir) / "meta.json").read_text())
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = _load_vae(meta["vae"], device)
    outs = [vae.decode(z.to(device).float() / meta["scale_factor"]).sample.float().cpu()
            for z in latents.split(batch_size)]
    return torch.cat(outs).clamp(-1, 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m recipes.extract_latents", description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True, help="ImageFolder root (one sub-folder per class)")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory")
    p.add_argument("--out", required=True, help="output cache directory")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--scale", type=float, default=None, help="latent scale factor (default: the VAE's)")
    p.add_argument("--sample", action="store_true", help="sample the posterior instead of its mean")
    p.add_argument("--limit", type=int, default=0)
    args = p.parse_args(argv)
    meta = extract(args.images, args.vae, args.out, image_size=args.image_size, batch_size=args.batch_size,
                   scale=args.scale, sample=args.sample, limit=args.limit)
    print(f"wrote {meta['num_images']} latents to {args.out} (scale {meta['scale_factor']})")
    return meta


if __name__ == "__main__":
    main()
