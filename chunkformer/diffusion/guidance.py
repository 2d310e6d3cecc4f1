"""``model_fn`` closures for the samplers: plain conditional, and classifier-free guidance.

Classifier-free guidance runs one batched forward on ``[x; x]`` with labels
``[y; null]`` and extrapolates the prediction away from the unconditional one,
``eps = eps_u + scale (eps_c - eps_u)``, over **all** ``C`` prediction channels (DiT's
reference sampler guides only the first 3 of 4). The learned-variance channels are the
conditional branch's. Lite-CFG (DC-DiT) runs the unconditional half at its own tail
drop, e.g. ``rho = 0.9``: ``rho`` becomes the per-sample ``(2B,)`` tensor
``[rho] * B + [uncond_rho] * B``.

    fn = guided_model_fn(model, y, scale=1.5, rho=0.0, uncond_rho=0.9, on_info=log_kept)
    samples = diffusion.sample(fn, (B, 4, 32, 32), steps=250)
"""

from collections.abc import Callable

import torch

from .._typing import Tensor
from .gaussian import ModelFn

__all__ = ["guided_model_fn", "model_fn"]

Rho = "float | Tensor | None"


def _chunks(model) -> bool:
    return bool(getattr(model, "supports_chunking", False))


def _check_rho_supported(model, **rhos) -> None:
    """A model that does not chunk keeps every token: refuse a budget it would ignore."""
    if _chunks(model):
        return
    for name, r in rhos.items():  # checked once, when the closure is built
        if r is not None and bool(torch.as_tensor(r).ne(0).any()):
            raise ValueError(
                f"{type(model).__name__} does not chunk (supports_chunking is False), so it cannot honour "
                f"{name}={r!r}; pass None or 0, or sample a DC-DiT"
            )


def _per_sample(rho: "float | Tensor", batch: int, device: torch.device) -> Tensor:
    if torch.is_tensor(rho):
        return rho.to(device=device, dtype=torch.float32).expand(batch)
    return torch.full((batch,), float(rho), device=device)


def _forward(model, x: Tensor, t: Tensor, y: "Tensor | None", rho, on_info) -> Tensor:
    kwargs = {"rho": rho} if rho is not None and _chunks(model) else {}
    if on_info is None:
        return model(x, t, y, **kwargs)
    out, info = model(x, t, y, return_info=True, **kwargs)
    on_info(info)
    return out


def model_fn(model, y: "Tensor | None", rho: Rho = None, on_info: Callable | None = None) -> ModelFn:
    """``fn(x, t) = model(x, t, y, rho=rho)`` without guidance; ``on_info(info)`` after each forward.

    ``rho`` (float or ``(B,)``) reaches only models with ``supports_chunking``; ``None`` leaves
    the model's own default (a DC-DiT's budget schedule, or its natural choice).
    """
    _check_rho_supported(model, rho=rho)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return _forward(model, x, t, None if y is None else y.to(x.device), rho, on_info)

    return fn


def guided_model_fn(
    model,
    y: Tensor,
    *,
    scale: float,
    null_class: int | None = None,
    rho: Rho = None,
    uncond_rho: Rho = None,
    learn_sigma: bool = True,
    in_channels: int | None = None,
    on_info: Callable | None = None,
) -> ModelFn:
    """Classifier-free guidance closure ``fn(x, t) -> (B, out, *grid)`` for the samplers.

    Args:
        model: follows the forward contract ``model(x, t, y, rho=..., return_info=True)``.
        y: ``(B,)`` class labels.
        scale: guidance scale; ``1`` is the conditional model alone and skips the
            unconditional half (whatever ``uncond_rho`` says: it could not change the result).
        null_class: the null label; ``None`` reads ``model.null_class``.
        rho: conditional tail drop (float or ``(B,)``); ``None`` is the model's default.
        uncond_rho: Lite-CFG's unconditional tail drop. Without it both halves share ``rho``.
            With it and ``rho=None``, the conditional half follows ``model.budget.rho_at(t)``.
        learn_sigma: the model outputs ``2C`` channels, epsilon then the variance's ``v``.
        in_channels: ``C``; ``None`` takes it from ``x``.
        on_info: called with each forward's ``ForwardInfo``; for a guided batch its
            ``kept`` is ``(2B,)``, conditional half first.
    """
    _check_rho_supported(model, rho=rho, uncond_rho=uncond_rho)
    if scale == 1:
        return model_fn(model, y, rho=rho, on_info=on_info)
    if y is None:
        raise ValueError("classifier-free guidance needs labels y; for an unconditional model use scale=1")
    null = getattr(model, "null_class", None) if null_class is None else null_class
    if null is None:
        raise ValueError(
            "classifier-free guidance needs a null label: pass null_class=, or use a model trained with "
            "label dropout (model.null_class)"
        )

    def fn(x: Tensor, t: Tensor) -> Tensor:
        B = x.shape[0]
        labels = y.to(x.device)
        labels = torch.cat([labels, torch.full_like(labels, null)])  # (2B,): [y; null]
        if uncond_rho is not None:  # Lite-CFG: each half at its own budget
            budget = getattr(model, "budget", None)
            cond = (
                _per_sample(rho, B, x.device)
                if rho is not None
                else (budget.rho_at(t) if budget is not None else torch.zeros(B, device=x.device))
            )
            both = torch.cat([cond.float(), _per_sample(uncond_rho, B, x.device)])  # (2B,)
        elif torch.is_tensor(rho):
            both = torch.cat([_per_sample(rho, B, x.device)] * 2)
        else:
            both = rho
        out = _forward(model, torch.cat([x, x]), torch.cat([t, t]), labels, both, on_info)  # (2B, out, *grid)
        C = x.shape[1] if in_channels is None else in_channels
        want = 2 * C if learn_sigma else C
        if out.shape[1] != want:
            raise ValueError(f"model output has {out.shape[1]} channels, want {want} ({C=}, {learn_sigma=})")
        cond, uncond = out[:B], out[B:]
        eps = uncond[:, :C] + scale * (cond[:, :C] - uncond[:, :C])  # every prediction channel
        return torch.cat([eps, cond[:, C:]], dim=1)  # conditional variance channels

    return fn
