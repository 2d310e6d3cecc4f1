"""How much faster is chunkformer's DC-DiT-XL sampling step than the authors' release (AMD-AGI/DynamicChunkingDiT)?

    python benchmarks/vs_release.py --reference /path/to/DynamicChunkingDiT --size 256   # GPU: results/vs_release_256_<card>.json
    python benchmarks/vs_release.py --reference /path/to/DynamicChunkingDiT --tiny       # CPU smoke run (nothing written)

The release is imported from a local checkout (``--reference`` or ``$CHUNKFORMER_DCDIT_REFERENCE``;
nothing is downloaded) and runs unmodified, except that flash-attn, which it imports, is replaced
by exact stand-ins defined here: variable-length attention by one SDPA call when every sample has
the same length (the forced budget below guarantees it; a per-sample loop otherwise), packed
attention by SDPA, and flash-attn's fused RMSNorm by torch's ``rms_norm`` in fp32. Its model is
built from its own config classes at DiT-XL widths (1152 wide, 28 blocks, 16 heads, conv
scaffold at d/4, fp32 router and de-chunk; sigma 1 at 256px, 2 at 512px) and runs eager under
bf16 autocast, as its sampler does. Its router is biased to keep every token and its tail drop
set to ``1 - (1 - rho) / 4``, so a quarter of the grid times ``1 - rho`` is kept.

Ours: DC-DiT-XL through ``torch.compile`` in fixed-capacity mode at the same kept counts (rounded
up to a multiple of 8, so ours keeps a few tokens more), and chunkformer's DiT-XL/2 (compiled) as
the common yardstick. Rows: rho 0 / 0.2 / 0.4 and Lite-CFG (conditional pass at rho 0,
unconditional at rho 0.9; DiT: two full passes). Columns: ms of the release and of ours, ours'
speed-up over the release, and each one's speed-up over DiT-XL/2 (printed as a table). Batch 64 at
256px, 16 at 512px.
``--fill-capacity`` builds ours with ``fill_capacity=True`` (the same tokens; attention unmasked).
"""

import argparse
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from common import bucket, card_name, checkout_on_path, save_result, step_ms

import chunkformer as cf

SCORER_BIAS = "hnet.routing_module.residual_scorer.3.bias"  # the release router's last conv bias


# ------------------------------------------------------------------------------------- flash-attn stand-ins
def _sdpa(q, k, v):
    """``(B, N, H, d)`` each -> ``(B, N, H, d)``."""
    return F.scaled_dot_product_attention(*(a.transpose(1, 2) for a in (q, k, v))).transpose(1, 2)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
            causal=False, **_):
    """flash-attn's ``flash_attn_varlen_func`` on packed ``(T, H, d)`` q, k, v, computed by SDPA per sequence."""
    if causal or dropout_p or softmax_scale is not None:
        raise NotImplementedError("the stand-in covers DC-DiT's non-causal, dropout-free attention only")
    n = cu_seqlens_q.numel() - 1
    if q.shape[0] == n * max_seqlen_q:  # every sequence has the longest length: one batched call, no sync
        shape = (n, max_seqlen_q, *q.shape[1:])
        return _sdpa(q.reshape(shape), k.reshape(shape), v.reshape(shape)).reshape(q.shape)
    out, cu = torch.empty_like(q), cu_seqlens_q.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        out[a:b] = _sdpa(q[None, a:b], k[None, a:b], v[None, a:b])[0]
    return out


def _qkvpacked(qkv, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """flash-attn's ``flash_attn_qkvpacked_func``: ``(B, N, 3, H, d) -> (B, N, H, d)`` by SDPA."""
    if causal or dropout_p or softmax_scale is not None:
        raise NotImplementedError("the stand-in covers DC-DiT's non-causal, dropout-free attention only")
    return _sdpa(*qkv.unbind(2))  # (B, N, 3, H, d) -> (B, N, H, d)


def _unpad(hidden, mask, *_):
    """flash-attn's ``unpad_input``: ``(B, N, ...)`` and a ``(B, N)`` mask -> ``(kept, ...)``, flat index, cu_seqlens, longest, lengths."""
    mask = mask.bool()
    lengths = mask.sum(-1, dtype=torch.int32)
    index = mask.flatten().nonzero().flatten()
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return hidden.flatten(0, 1)[index], index, cu, int(lengths.max()), lengths


def _pad(hidden, index, batch, seqlen):
    """flash-attn's ``pad_input``: the inverse of ``_unpad``, zeros where the mask was false."""
    out = hidden.new_zeros(batch * seqlen, *hidden.shape[1:])
    out[index] = hidden
    return out.reshape(batch, seqlen, *hidden.shape[1:])


class _RMSNorm(torch.nn.Module):
    """flash-attn's fused RMSNorm interface (weight only), computed by ``F.rms_norm`` in fp32."""

    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        h = x.float() if residual is None else x.float() + residual.float()
        y = F.rms_norm(h, (h.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
        return (y, h if residual_in_fp32 else h.to(x.dtype)) if prenorm else y


def import_release(root: Path):
    """The release's ``config`` and ``models`` modules, with the flash-attn stand-ins installed."""
    if not (root / "models.py").is_file() or not (root / "config.py").is_file():
        raise FileNotFoundError(f"{root} does not look like a checkout of AMD-AGI/DynamicChunkingDiT "
                                "(no models.py / config.py); pass --reference or set CHUNKFORMER_DCDIT_REFERENCE")
    names = ("flash_attn", "flash_attn.bert_padding", "flash_attn.ops", "flash_attn.ops.triton",
             "flash_attn.ops.triton.layer_norm")
    mods = {n: types.ModuleType(n) for n in names}
    for name, mod in mods.items():
        mod.__path__ = []
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    mods["flash_attn"].flash_attn_varlen_func = _varlen
    mods["flash_attn"].flash_attn_qkvpacked_func = _qkvpacked
    mods["flash_attn.bert_padding"].unpad_input = _unpad
    mods["flash_attn.bert_padding"].pad_input = _pad
    mods["flash_attn.ops.triton.layer_norm"].RMSNorm = _RMSNorm
    checkout_on_path(root)  # a --target install of timm may sit in _vendor
    import config as release_config
    import models as release_models

    return release_config, release_models


def build_release(release_config, release_models, latent: int, tiny: bool, device):
    """The release's DC-DiT at XL widths (or tiny ones), eager, its router biased to keep every token."""
    width, depth, heads = (128, 2, 2) if tiny else (1152, 28, 16)
    hnet = release_config.HNetConfig(arch_layout=["c2", [f"D{depth}"], "c2"], d_model=[width, width],
                                     num_heads=[heads, heads], enc_dec_dim_factor=[4, None],
                                     dechunk_kernel_sigma=max(1.0, latent / 32), fp32_router_dechunk=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = release_models.create_dit(model_config=release_config.ModelConfig(hnet=hnet, mlp_ratio=4.0),
                                          input_size=latent, in_channels=4, num_classes=1000,
                                          class_dropout_prob=0.1, learn_sigma=True)
    state = model.state_dict()
    if SCORER_BIAS not in state:
        raise KeyError(f"the release's router has no {SCORER_BIAS!r}: its layout changed; update SCORER_BIAS")
    with torch.no_grad():
        state[SCORER_BIAS].fill_(30.0)  # keep every token; the tail drop sets the budget
    return model.eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, default=os.environ.get("CHUNKFORMER_DCDIT_REFERENCE"),
                    help="local checkout of AMD-AGI/DynamicChunkingDiT")
    ap.add_argument("--size", type=int, choices=(256, 512), default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="small models on the CPU, eager (a smoke run)")
    ap.add_argument("--fill-capacity", action="store_true",
                    help="ours with fill_capacity=True: the same tokens, attention without a key mask")
    ap.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/<name>.json)")
    args = ap.parse_args(argv)
    if args.reference is None:
        ap.error("pass --reference PATH (a local checkout of the release) or set CHUNKFORMER_DCDIT_REFERENCE")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    latent, batch = args.size // 8, {256: 64, 512: 16}[args.size]
    sizes, reps = {}, args.reps
    if args.tiny:
        latent, batch, reps, sizes = 8, 2, 1, dict(hidden_size=128, depth=2, num_heads=2)
    L = latent * latent
    compile_ = (lambda m: m) if args.tiny or device.type != "cuda" else torch.compile
    release_config, release_models = import_release(args.reference.resolve())
    release = build_release(release_config, release_models, latent, args.tiny, device)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    null = torch.full_like(y, 1000)
    torch.manual_seed(0)
    dit = cf.create_model("DiT-XL/2", input_size=latent, **sizes).to(device).eval()
    torch.manual_seed(0)
    ours = cf.create_model("DC-DiT-XL", input_size=latent, plan_mode="fixed", capacity=L // 4,
                           fill_capacity=args.fill_capacity, **sizes)
    ours = ours.to(device).eval()
    torch.nn.init.constant_(ours.router.scorer[-1].bias, 30.0)  # keep everything; capacity is the budget

    def release_step(labels, rho):
        return release(x, t, labels, tail_dropping_fraction=1 - (1 - rho) / 4)

    rows = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        dit_fn, ours_fn = compile_(dit), compile_(ours)
        dit_ms = step_ms(lambda: dit_fn(x, t, y), reps)
        dit_cfg_ms = step_ms(lambda: (dit_fn(x, t, y), dit_fn(x, t, null)), reps)
        for rho in (0.0, 0.2, 0.4):
            _, info = release(x, t, y, return_chunking_info=True, tail_dropping_fraction=1 - (1 - rho) / 4)
            kept = int(info[0].boundary_mask.sum(-1).max())
            ref_ms = step_ms(lambda: release_step(y, rho), reps)
            ours.set_plan(capacity=bucket(L / 4 * (1 - rho)))
            our_ms = step_ms(lambda: ours_fn(x, t, y), reps)
            rows.append({"row": f"rho={rho:g}", "release_kept": kept, "ours_kept": ours.capacity,
                         "release_ms": ref_ms, "ours_ms": our_ms, "dit_ms": dit_ms})
        caps = (bucket(L / 4), bucket(L / 4 * 0.1))

        def ours_lite():
            ours.set_plan(capacity=caps[0])
            ours_fn(x, t, y)
            ours.set_plan(capacity=caps[1])
            ours_fn(x, t, null)

        rows.append({"row": "Lite-CFG (0 / 0.9)", "release_kept": L // 4, "ours_kept": caps[0],
                     "release_ms": step_ms(lambda: (release_step(y, 0.0), release_step(null, 0.9)), reps),
                     "ours_ms": step_ms(ours_lite, reps), "dit_ms": dit_cfg_ms})
    for r in rows:
        r["ours_over_release"] = r["release_ms"] / r["ours_ms"]
        r["release_over_dit"], r["ours_over_dit"] = r["dit_ms"] / r["release_ms"], r["dit_ms"] / r["ours_ms"]
    card = card_name() if device.type == "cuda" else "cpu"
    print(f"\n{card}, torch {torch.__version__}, {args.size}px (latent {latent}x{latent}), batch {batch}, bf16 autocast; "
          f"release eager, ours and DiT-XL/2 {'eager' if compile_ is not torch.compile else 'compiled'}"
          f"{'; ours filled (fill_capacity=True)' if args.fill_capacity else ''}")
    print("| row | kept (release / ours) | release ms | ours ms | ours / release | release vs DiT-XL/2 | ours vs DiT-XL/2 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['release_kept']} / {r['ours_kept']} | {r['release_ms']:.2f} | {r['ours_ms']:.2f} "
              f"| {r['ours_over_release']:.2f}x | {r['release_over_dit']:.2f}x | {r['ours_over_dit']:.2f}x |")
    config = f"{args.size}" + ("_filled" if args.fill_capacity else "")
    return save_result("vs_release", config, card, out=args.out, write=not args.tiny, size=args.size, batch=batch, reference=str(args.reference),
                       fill_capacity=args.fill_capacity, rows=rows)


if __name__ == "__main__":
    main()
