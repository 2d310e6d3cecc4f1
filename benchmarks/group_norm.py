"""GroupNorm + SiLU on channels-last scaffold grids: nn.GroupNorm against per-channel-sum formulations.

    python benchmarks/group_norm.py --out benchmarks/results/group_norm_h100.json

The scaffold's ResBlocks run ``SiLU(GroupNorm(32, C)(x))`` nine times per step on channels-last
bf16 grids (B, C, H, W) with C = 288 (and once at C = 1152), and the compiled pass runs at about
1 TB/s on an H100 (``scaffold_ops.py``): each (sample, group) is reduced over H * W positions of
9 channels, 18 contiguous bytes at a time. The formulations here reduce whole rows of C
contiguous channels instead (per-channel sums over the grid, then summed within each group), all
compiled:

* ``nn.GroupNorm`` (what the scaffold runs), eager and compiled;
* ``two-pass``: per-channel sums -> group means; per-channel sums of squared deviations from
  the group mean -> group variances; normalise + SiLU (three reads, one write);
* ``one-pass``: per-channel sums of x and x^2 in fp32 -> group mean and variance
  (E[x^2] - E[x]^2); normalise + SiLU (two reads, one write);
* ``Triton sums``: the one-pass statistics from a hand-written Triton kernel that reads
  (rows x 128-channel) tiles of the channels-last grid, split over the grid so every SM has work
  (``channel_sums``), then the same compiled finish and normalise + SiLU (a candidate for the
  scaffold, measured here first);
* ``chunkformer GroupNorm``: :class:`chunkformer.norms.GroupNorm` with its kernel path on (opt-in)
  (per-channel sums of ``x`` less each channel's first value, in channel blocks of 32 or 64 with the
  grid split for ~1024 programs, recombined into group statistics, normalised by inductor), compiled.

Columns: ms per call, effective bandwidth (one read and one write of the tensor per ms), and the
max relative error against fp64 GroupNorm + SiLU, for inputs with a per-channel offset of 0 and
of 10 standard deviations (where the one-pass variance cancels).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from einops import reduce

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import cuda_ms, graph_ms, save_result  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from chunkformer.norms import GroupNorm  # noqa: E402

SHAPES = ((64, 288, 32, 32), (64, 1152, 32, 32), (16, 288, 64, 64))
GROUPS, EPS = 32, 1e-5


def module_gn(norm: torch.nn.GroupNorm):
    return lambda x: F.silu(norm(x)).to(x.dtype)  # the cast autocast puts before the next conv


def _normalise(x, mean_g, var_g, weight, bias):
    """SiLU of x normalised by per-(sample, group) ``mean_g`` / ``var_g`` ``(B, G)``, then affine; x's dtype."""
    k = x.shape[1] // GROUPS
    scale = weight * torch.rsqrt(var_g + EPS).repeat_interleave(k, 1)  # (B, C)
    shift = bias - mean_g.repeat_interleave(k, 1) * scale
    return F.silu(x.float() * scale[:, :, None, None] + shift[:, :, None, None]).to(x.dtype)


def _from_moments(x, m1, m2, weight, bias):
    """One-pass statistics: group means of x (``m1``) and of x^2 (``m2``), ``(B, G)``."""
    return _normalise(x, m1, (m2 - m1 * m1).clamp_min(0), weight, bias)


def two_pass(weight, bias):
    def f(x):
        xf = x.float()
        mean_g = reduce(reduce(xf, "b c h w -> b c", "mean"), "b (g k) -> b g", "mean", g=GROUPS)
        centred = xf - mean_g.repeat_interleave(x.shape[1] // GROUPS, 1)[:, :, None, None]
        var_g = reduce(reduce(centred ** 2, "b c h w -> b c", "mean"), "b (g k) -> b g", "mean", g=GROUPS)
        return _normalise(x, mean_g, var_g, weight, bias)
    return f


def one_pass(weight, bias):
    def f(x):
        xf = x.float()
        m1 = reduce(reduce(xf, "b c h w -> b c", "mean"), "b (g k) -> b g", "mean", g=GROUPS)
        m2 = reduce(reduce(xf * xf, "b c h w -> b c", "mean"), "b (g k) -> b g", "mean", g=GROUPS)
        return _from_moments(x, m1, m2, weight, bias)
    return f


@triton.jit
def _channel_sums_kernel(X, S1, S2, HW, C, rows_per_split, SPLITS,
                         BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (sample, split, channel block): fp32 sums of x and x^2 over its rows of a (B, HW, C) grid."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, HW)
    acc1 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    base = X + b.to(tl.int64) * HW * C
    for r in range(start, end, BLOCK_HW):
        rows = r + tl.arange(0, BLOCK_HW)
        x = tl.load(base + rows[:, None] * C + cols[None, :], mask=(rows < end)[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)
        acc1 += x
        acc2 += x * x
    out = (b * SPLITS + split) * C + cols
    tl.store(S1 + out, tl.sum(acc1, 0), mask=c_ok)
    tl.store(S2 + out, tl.sum(acc2, 0), mask=c_ok)


def channel_sums(x: torch.Tensor, block_hw: int = 32, block_c: int = 128, programs: int = 1024):
    """``(B, C, H, W)`` channels-last -> fp32 ``(B, splits, C)`` partial sums of x and of x^2."""
    B, C = x.shape[:2]
    HW = x.numel() // (B * C)
    splits = max(1, min(-(-HW // block_hw), programs // (B * -(-C // block_c))))
    rows = -(-HW // splits)
    s1 = torch.empty(B, splits, C, device=x.device, dtype=torch.float32)
    s2 = torch.empty_like(s1)
    _channel_sums_kernel[(B, splits, -(-C // block_c))](x, s1, s2, HW, C, rows, splits,
                                                      BLOCK_HW=block_hw, BLOCK_C=block_c)
    return s1, s2


def triton_sums(weight, bias):
    @torch.compile
    def finish(x, s1, s2):
        n = x.numel() // x.shape[0] // GROUPS  # elements per group
        m1 = reduce(s1, "b s (g k) -> b g", "sum", g=GROUPS) / n
        m2 = reduce(s2, "b s (g k) -> b g", "sum", g=GROUPS) / n
        return _from_moments(x, m1, m2, weight, bias)

    def f(x):
        if not x.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("channel_sums reads a channels-last grid")
        return finish(x, *channel_sums(x))
    return f


def library_norm(norm: torch.nn.GroupNorm) -> GroupNorm:
    """:class:`chunkformer.norms.GroupNorm` with ``norm``'s weights and its Triton statistics on."""
    out = GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps).to(norm.weight.device)
    out.load_state_dict(norm.state_dict())
    out.use_kernel = True  # opt-in in the library
    return out


def kernel_sweep(dev) -> list[dict]:
    """GPU time (CUDA graphs) of the statistics alone: inductor's (the reduction of a compiled
    ``native_group_norm`` returning only mean and rstd) against ``channel_moments``' kernel at each tiling;
    of the normalising pass + SiLU alone, inductor's against ``scale_shift``'s kernel at each tiling; and of
    the whole GroupNorm + SiLU both ways."""
    from chunkformer import norms as gn

    rows = []
    for shape in SHAPES:
        B, C, H, W = shape
        x = torch.randn(shape, device=dev).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        norm = torch.nn.GroupNorm(GROUPS, C, eps=EPS).to(dev)
        nbytes = x.numel() * 2

        @torch.compile
        def inductor_stats(x, w=norm.weight, b=norm.bias):
            return torch.ops.aten.native_group_norm(x.float(), w, b, B, C, H * W, GROUPS, EPS)[1:]

        timed = {"inductor statistics (compiled native_group_norm)": (inductor_stats, nbytes),
                 "inductor GroupNorm + SiLU": (torch.compile(module_gn(norm)), 2 * nbytes),
                 "chunkformer GroupNorm + SiLU": (torch.compile(lambda x, n=library_norm(norm): n(x, silu=True)), 2 * nbytes),
                 "chunkformer statistics, default tiles": (gn.launch_channel_moments, nbytes)}
        centre, scale = torch.randn(B, C, device=dev), torch.rand(B, C, device=dev) + 0.5

        @torch.compile
        def inductor_apply(x, centre=centre, scale=scale, b=norm.bias):
            return F.silu((x.float() + centre[:, :, None, None]) * scale[:, :, None, None] + b[:, None, None]).to(x.dtype)

        timed["inductor normalising pass + SiLU"] = (inductor_apply, 2 * nbytes)
        timed["chunkformer scale_shift + SiLU, default tiles"] = (
            lambda x: gn.launch_scale_shift(x, centre, scale, norm.bias, True), 2 * nbytes)
        for block_c in sorted({32, 64, 128, min(triton.next_power_of_2(C), 512)}):
            for elems in (2048, 4096, 8192):
                for warps in (4, 8):
                    tiles = (max(1, elems // block_c), block_c, warps)
                    timed[f"apply {tiles[0]}x{block_c} w{warps}"] = (
                        lambda x, t=tiles: gn.launch_scale_shift(x, centre, scale, norm.bias, True, t), 2 * nbytes)
        for block_c in sorted({32, 64, 128, triton.next_power_of_2(C)}):
            for elems in (2048, 4096, 8192):
                if elems < block_c:
                    continue
                for warps in (4, 8):
                    for programs in (528, 1056, 2112):
                        tiles = gn.moment_tiles(B, H * W, C, block_c, elems, programs)
                        name = f"moments {tiles[0]}x{block_c} w{warps} ~{programs} programs"
                        timed[name] = (lambda x, t=tiles, w=warps: gn.launch_channel_moments(x, t, w), nbytes)
        for name, (fn, moved) in timed.items():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                ms = graph_ms(fn, 20, x)
            rows.append({"shape": list(shape), "variant": name, "graph_ms": ms, "tb_per_s": moved / (ms * 1e-3) / 1e12})
        swept = ("moments", "apply")  # the two tile sweeps: the best four of each are printed
        best = [r for kind in swept for r in sorted(
            (r for r in rows if r["shape"] == list(shape) and r["variant"].startswith(kind)), key=lambda r: r["graph_ms"])[:4]]
        for r in [r for r in rows if r["shape"] == list(shape) and not r["variant"].startswith(swept)] + best:
            print(f"{str(shape):<22} {r['variant']:<52} {r['graph_ms']:8.4f} ms {r['tb_per_s']:5.2f} TB/s", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--kernels", action="store_true",
                    help="instead: GPU time from CUDA graphs of the statistics alone, inductor's against "
                         "channel_moments' kernel at each tiling (and of the whole norm both ways)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    if args.kernels:
        return save_result(args.out, torch.cuda.get_device_name(), sweep=kernel_sweep(dev))
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 channels-last")
    for shape in SHAPES:
        C = shape[1]
        norm = torch.nn.GroupNorm(GROUPS, C, eps=EPS).to(dev)
        torch.nn.init.normal_(norm.weight, 1.0, 0.1)
        torch.nn.init.normal_(norm.bias, 0.0, 0.1)
        w, b = norm.weight.detach(), norm.bias.detach()
        variants = {"nn.GroupNorm eager": module_gn(norm), "nn.GroupNorm compiled": torch.compile(module_gn(norm)),
                    "two-pass compiled": torch.compile(two_pass(w, b)), "one-pass compiled": torch.compile(one_pass(w, b)),
                    "Triton sums + compiled apply": triton_sums(w, b),
                    "chunkformer GroupNorm compiled": torch.compile(module_gn(library_norm(norm)))}
        for offset in (0.0, 10.0):
            x = torch.randn(shape, device=dev)
            x = (x + offset * torch.randn(1, C, 1, 1, device=dev)).to(torch.bfloat16)
            x = x.contiguous(memory_format=torch.channels_last)
            ref = F.silu(F.group_norm(x.double(), GROUPS, w.double(), b.double(), EPS))
            for name, fn in variants.items():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    out = fn(x)
                    err = float(((out.double() - ref).abs().max() / ref.abs().max()))
                    t = cuda_ms(fn, 100, x) if offset == 0.0 else float("nan")
                row = {"shape": list(shape), "offset": offset, "variant": name, "ms": t, "rel_err": err,
                       "tb_per_s": 2 * x.numel() * 2 / (t * 1e-3) / 1e12 if offset == 0.0 else None}
                rows.append(row)
                print(f"{str(shape):<22} offset {offset:>4g}  {name:<24} "
                      + (f"{t:8.4f} ms {row['tb_per_s']:5.2f} TB/s" if offset == 0.0 else " " * 23)
                      + f"  rel err {err:.1e}", flush=True)
    save_result(args.out, torch.cuda.get_device_name(), rows=rows)


if __name__ == "__main__":
    main()
