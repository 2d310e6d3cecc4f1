"""Figures people would rather look at than read (matplotlib, PNG).

* :func:`save_image_grid`: samples as one PNG (torchvision).
* :func:`plot_boundary_maps`: the paper's figure: ``x_t`` above, the router's kept tokens
  below, one column per timestep, % kept in each column's title.
* :func:`plot_kept_vs_timestep`: kept fraction against timestep over many samples.
* :func:`plot_flops_by_component`: where a forward pass spends its FLOPs.
* :func:`plot_pareto`: FID against TFLOPs per image across budgets (the elastic curve).

matplotlib is imported lazily (``pip install chunkformer[viz]``) with the Agg backend.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = [
    "save_image_grid",
    "plot_boundary_maps",
    "plot_kept_vs_timestep",
    "plot_flops_by_component",
    "plot_pareto",
]


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'chunkformer[viz]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


def save_image_grid(images: torch.Tensor, path: str | Path, *, nrow: int | None = None,
                    value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """Save ``(N, C, H, W)`` images in ``value_range`` as one PNG grid."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = images.shape[0]
    nrow = nrow or max(1, int(round(n**0.5)))
    lo, hi = value_range
    save_image(((images.float() - lo) / (hi - lo)).clamp(0, 1), path, nrow=nrow, padding=1)
    return path


def plot_boundary_maps(
    x_t: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    timesteps: Sequence[float],
    path: str | Path,
    *,
    probs: Sequence[torch.Tensor] | None = None,
    title: str = "",
) -> Path:
    """Paper-style boundary maps for ``n`` samples at ``k`` timesteps.

    ``x_t[j]``: ``(n, C, H, W)`` noisy inputs at ``timesteps[j]``; ``masks[j]``: ``(n, H*W)``
    kept tokens (or ``probs[j]`` to show probabilities instead of the binary map).
    Rows: per sample, ``x_t`` above its map; columns: timesteps with % kept in the title.
    """
    plt = _plt()
    k, n = len(timesteps), x_t[0].shape[0]
    H, W = x_t[0].shape[-2:]
    fig, axes = plt.subplots(2 * n, k, figsize=(1.4 * k, 2.8 * n), squeeze=False)
    for j, t in enumerate(timesteps):
        kept = masks[j].float().mean().item()
        axes[0, j].set_title(f"t={t:g}\n{kept:.0%} kept", fontsize=8)
        for i in range(n):
            img = x_t[j][i].float()
            img = img[0] if img.shape[0] == 1 else img[:3].permute(1, 2, 0)
            axes[2 * i, j].imshow(img.cpu().clamp(-1.5, 1.5).numpy(), cmap="gray")
            shown = (probs[j][i] if probs is not None else masks[j][i].float()).reshape(H, W)
            axes[2 * i + 1, j].imshow(shown.cpu().numpy(), cmap="magma", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_kept_vs_timestep(
    timesteps: torch.Tensor, kept_fraction: torch.Tensor, path: str | Path, *, bins: int = 20,
    label: str = "", title: str = "kept tokens vs timestep",
) -> Path:
    """Scatter of per-sample kept fraction against timestep, with the binned mean and a 10-90% band."""
    plt = _plt()
    t = timesteps.float().flatten().cpu()
    f = kept_fraction.float().flatten().cpu()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.scatter(t.numpy(), f.numpy(), s=3, alpha=0.25, color="tab:blue")  # numpy: matplotlib's own array type
    edges = torch.linspace(float(t.min()), float(t.max()) + 1e-6, bins + 1)
    centers, means, lo, hi = [], [], [], []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = f[(t >= a) & (t < b)]
        if sel.numel():
            centers.append(float((a + b) / 2))
            means.append(float(sel.mean()))
            lo.append(float(sel.quantile(0.1)))
            hi.append(float(sel.quantile(0.9)))
    ax.plot(centers, means, color="tab:red", label=label or "mean")
    ax.fill_between(centers, lo, hi, color="tab:red", alpha=0.15)
    ax.set_xlabel("timestep (noisier to the right)")
    ax.set_ylabel("fraction of tokens kept")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_flops_by_component(by_component: Mapping[str, float], path: str | Path, *, title: str = "",
                            xlabel: str = "GFLOPs per forward") -> Path:
    """Horizontal bars of GFLOPs per component (zero entries omitted); ``by_component`` holds the FLOPs of
    one forward (e.g. :attr:`FlopReport.by_component` divided by its batch); say which in ``title``."""
    plt = _plt()
    items = [(k, v / 1e9) for k, v in by_component.items() if v > 0]
    fig, ax = plt.subplots(figsize=(5, 0.35 * len(items) + 1))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:purple")
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title or "FLOPs by component, per forward", fontsize=9)
    return _save(fig, path)


def plot_pareto(curves: Mapping[str, Sequence[tuple[float, float, str]]], path: str | Path, *,
                title: str = "elastic inference") -> Path:
    """FID (y) against TFLOPs per image (x); ``curves[name] = [(tflops, fid, label), ...]``.

    Label parts (``", "``-separated) shared by every point of a curve go to its legend entry; the rest
    annotate the points, slanted so neighbouring labels do not run together.
    """
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        pts = sorted(points)
        parts = [lab.split(", ") for _, _, lab in pts]
        common = [part for part in parts[0] if all(part in other for other in parts)] if len(pts) > 1 else []
        legend = name + (f" ({', '.join(common)})" if common else "")
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=legend)
        for (x, y, _), lab in zip(pts, parts):
            text = ", ".join(part for part in lab if part not in common)
            ax.annotate(text, (x, y), fontsize=7, xytext=(2, 4), textcoords="offset points", rotation=35,
                        color=line.get_color())
    ax.margins(x=0.12, y=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel("TFLOPs per image")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)
