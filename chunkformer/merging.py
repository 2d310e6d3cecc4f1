"""Token merging inside the backbone, on dense or chunked token sequences.

Chunking drops *predictable* tokens once per step; merging folds *redundant* ones inside
each block: before attention (and optionally the MLP) each sample's most similar tokens
are averaged into one, and afterwards every folded token takes the output of the token it
was folded into (bipartite soft matching as in ToMe, with a spatial split as in tomesd;
written here from the papers).

    import torch, chunkformer as cf
    model = cf.create_model("DC-DiT-S", input_size=16, in_channels=4, num_classes=10)
    cf.merging.apply(model, ratio=0.5)          # every block folds half of each sample's tokens
    out, info = model(torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2]), return_info=True)
    cf.merging.remove(model)                    # the exact original model again
    assert info.merged.shape == (len(model.blocks), 2)  # tokens folded per block and sample

How one block merges, per sample, over the ``n`` tokens that sample has:

1. *Split.* Cells of ``s`` grid positions per axis are laid over the tokens' **original
   grid coordinates**; in each occupied cell one token is a destination (a random one, or
   the first in raster order with ``random_dst=False``), the others are sources. On a dense
   grid ``s = stride``; on a chunked sequence ``s = round(stride * (L / n) ** (1 / ndim))``,
   so a cell holds about ``stride ** ndim`` tokens whatever the kept fraction.
2. *Match.* Each source finds its most similar destination (cosine of the block's input).
3. *Merge.* The ``r = min(floor(ratio * n), sources)`` best-matched sources are averaged
   into their destinations (each merged token remembers its size); attention runs on the
   ``n - r`` tokens left, with ``proportional=True`` adding ``log(size)`` to its logits.
4. *Unmerge.* Each folded source takes its destination's output; the residual stream keeps
   every token.

Tokens never cross samples: every step works per sample, on that sample's own tokens, so
per-sample lengths of packed sequences are respected (a sample with too few tokens simply
merges fewer). ``ratio`` may be a float, one float per block, or ``ratio(block, t)``
returning a float or a per-sample ``(B,)`` tensor (a schedule over blocks and timesteps).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .grid import check_grid, grid_coords
from .plan import ChunkPlan

__all__ = ["apply", "remove", "is_applied", "TokenMerge", "bipartite_merge", "MergedAttention", "MergedMlp"]

Ratio = float | Sequence[float] | Callable[[int, torch.Tensor], "float | torch.Tensor"]


# ---------------------------------------------------------------------------- one merge
@dataclass
class TokenMerge:
    """Which tokens of a block fold into which, and how to move values both ways.

    Slots are the ``(B, M, d)`` layout of the block's tokens (``M = L`` on a dense grid).

    Attributes:
        keep: ``(B, M')`` slot of each merged token (first ``lengths[b]`` are real).
        target: ``(B, M)`` merged-token index each slot's output comes from.
        into: ``(B, M)`` slot each slot's value is summed into (itself unless folded).
        sizes: ``(B, M')`` tokens averaged into each merged token (>= 1).
        lengths: ``(B,)`` merged tokens per sample, ``n - r``.
        removed: ``(B,)`` tokens folded away per sample, ``r``.
        plan: the merged tokens' plan (``None`` for a dense, uniform merge).
        source: the block's own plan (``None`` on a dense grid).
        flops: multiply-adds x 2 of the similarity search.
        total: tokens of the block's packed input (lets :meth:`unmerge` re-pack without a sync).
    """

    keep: torch.Tensor
    target: torch.Tensor
    into: torch.Tensor
    sizes: torch.Tensor
    lengths: torch.Tensor
    removed: torch.Tensor
    plan: ChunkPlan | None
    source: ChunkPlan | None
    flops: float
    total: int | None = None

    def _slots(self, x: torch.Tensor) -> torch.Tensor:
        return self.source.unpack(x) if self.source is not None and self.source.mode == "packed" else x

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Block tokens (the source layout) -> merged tokens (the merged plan's layout)."""
        return self.merge_slots(self._slots(x))

    def merge_slots(self, xs: torch.Tensor) -> torch.Tensor:
        """:meth:`merge` from tokens already in ``(B, M, d)`` slots."""
        acc = torch.zeros_like(xs).scatter_add_(1, self.into[..., None].expand_as(xs), xs)
        merged = torch.take_along_dim(acc, self.keep[..., None], dim=1)  # (B, M', d) sums
        merged = merged / self.sizes[..., None].to(merged.dtype)
        return self.plan.pack(merged) if self.plan is not None and self.plan.mode == "packed" else merged

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Merged outputs -> one output per block token (folded tokens copy their destination's)."""
        ys = self.plan.unpack(y) if self.plan is not None and self.plan.mode == "packed" else y  # (B, M', d)
        out = torch.take_along_dim(ys, self.target[..., None], dim=1)  # (B, M, d)
        if self.source is not None and self.source.mode == "packed":
            return self.source.pack(out, total=self.total)
        return out

    def key_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """``log(size)`` per merged token, in the merged layout (proportional attention)."""
        bias = self.sizes.log().to(dtype)  # (B, M')
        if self.plan is not None and self.plan.mode == "packed":
            return self.plan.pack(bias[..., None])[:, 0]  # (T',)
        return bias


_stride_tables: dict = {}


def _cell_size(n: int, grid: tuple[int, ...], stride: int) -> int:
    L = math.prod(grid)
    return max(1, round(stride * (L / max(n, 1)) ** (1 / len(grid))))


def _cells(n: int, grid: tuple[int, ...], stride: int) -> int:
    s = _cell_size(n, grid, stride)
    return math.prod(-(-g // s) for g in grid)


def _stride_table(grid: tuple[int, ...], stride: int, device: torch.device) -> torch.Tensor:
    """``s(n)`` for ``n = 0..L``, built on the host so that device and host bounds agree exactly."""
    key = (grid, stride, device)
    if key not in _stride_tables:
        _stride_tables[key] = torch.tensor([_cell_size(k, grid, stride) for k in range(math.prod(grid) + 1)],
                                           device=device)
    return _stride_tables[key]


def _merge_indices(metric, valid, coords, key, table, rate, *, grid: tuple[int, ...], D: int, width_out: int):
    """The tensor part of :func:`bipartite_merge` (no host syncs; ``torch.compile``-able)."""
    B, M, _ = metric.shape
    n = valid.sum(1)
    # 1. split: one destination per occupied cell (lowest key), the other tokens are sources
    cell = coords.long() // table[n][:, None, None]  # (B, M, ndim)
    cell_id = sum(cell[..., k] * math.prod(grid[k + 1:]) for k in range(len(grid)))  # (B, M) in [0, L)
    key = torch.where(valid, key, torch.inf)
    best = torch.full((B, math.prod(grid)), torch.inf, device=valid.device).scatter_reduce(1, cell_id, key, "amin")
    is_dst = valid & (key == best.gather(1, cell_id))
    is_src = valid & ~is_dst
    # 2. match each source to its most similar destination (destinations compacted to D slots)
    dst_idx = torch.argsort((~is_dst).to(torch.uint8), dim=1, stable=True)[:, :D]  # (B, D) slots
    dst_ok = torch.take_along_dim(is_dst, dst_idx, dim=1)
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    sim = m @ torch.take_along_dim(m, dst_idx[..., None], dim=1).transpose(1, 2)  # (B, M, D)
    score, match = sim.masked_fill(~dst_ok[:, None, :], -torch.inf).max(-1)  # (B, M)
    score = torch.where(is_src, score, -torch.inf)
    # 3. fold the r best-matched sources, r = min(floor(ratio n), sources); float64 like the host bounds
    r = torch.minimum(torch.floor(rate * n.double()).long(), is_src.sum(1))  # (B,)
    order = torch.argsort(-score, dim=1, stable=True)
    slots = torch.arange(M, device=valid.device).expand(B, M)
    rank = torch.empty_like(order).scatter_(1, order, slots)
    folded = is_src & (rank < r[:, None])
    into = torch.where(folded, torch.take_along_dim(dst_idx, match, dim=1), slots)
    retained = valid & ~folded
    # 4. where every slot's value goes and comes back from
    keep = torch.argsort((~retained).to(torch.uint8), dim=1, stable=True)[:, :width_out]  # (B, M')
    new_index = (torch.cumsum(retained.long(), 1) - 1).clamp_min(0)  # merged index of retained slots
    target = torch.where(valid, torch.take_along_dim(new_index, into, dim=1), 0)
    sizes = torch.zeros(B, M, device=valid.device).scatter_add_(1, into, valid.float())
    sizes = torch.take_along_dim(sizes, keep, dim=1).clamp_min(1.0)
    return keep, target, into, sizes, n - r, r, retained


_compiled_indices = None


def bipartite_merge(
    metric: torch.Tensor,
    valid: torch.Tensor,
    coords: torch.Tensor,
    grid: tuple[int, ...],
    ratio: "float | torch.Tensor",
    *,
    stride: int = 2,
    generator: torch.Generator | None = None,
    source: ChunkPlan | None = None,
    compile: bool = False,
) -> TokenMerge:
    """Plan a merge of each sample's tokens (see the module docstring).

    Args:
        metric: ``(B, M, d)`` features to compare (the block's input, in slots).
        valid: ``(B, M)`` real tokens (the rest are padding and never merged or kept).
        coords: ``(B, M, ndim)`` original grid coordinates of every slot.
        grid: the grid ``coords`` index into.
        ratio: fraction of each sample's tokens to fold away, float or ``(B,)``.
        stride: cell size on a dense grid (2 = tomesd's 2x2 windows).
        generator: picks random destinations; ``None`` takes the first in raster order.
        source: the block's plan; ``None`` for a dense ``(B, L, d)`` sequence.
        compile: run the index computation through ``torch.compile`` (fewer kernel launches).
    """
    global _compiled_indices
    grid = check_grid(grid)
    B, M, d = metric.shape
    dense = source is None
    # host bounds (no device sync): D destination slots, M' merged slots. floor(ratio n) is
    # monotone in n, and a sample short of sources keeps at most D destinations.
    width = M if dense else source.width
    D = max(1, min(width, _cells(width, grid, stride)))
    per_sample = torch.is_tensor(ratio)
    if dense and not per_sample:
        width_out = M - min(math.floor(float(ratio) * M), M - _cells(M, grid, stride))
    else:
        low = float(ratio.double().min()) if per_sample else float(ratio)
        width_out = min(width, max(width - math.floor(low * width), D))
    if generator is not None:
        key = torch.rand(B, M, device=valid.device, generator=generator)
    else:
        key = torch.arange(M, device=valid.device, dtype=torch.float32).expand(B, M)
    rate = ratio.to(valid.device).double().expand(B) if per_sample else torch.full(
        (B,), float(ratio), dtype=torch.float64, device=valid.device)
    fn = _merge_indices
    if compile:
        if _compiled_indices is None:
            _compiled_indices = torch.compile(_merge_indices, dynamic=True)
        fn = _compiled_indices
    with torch.no_grad():
        keep, target, into, sizes, lengths, r, retained = fn(
            metric, valid, coords, key, _stride_table(grid, stride, valid.device), rate,
            grid=grid, D=D, width_out=width_out)
    out_plan = None
    if not dense or per_sample:
        if dense:  # per-sample ratios on a dense grid: an every-token plan in fixed mode
            plan = ChunkPlan.from_mask(valid, grid=grid, mode="fixed", capacity=M)
        else:
            plan = source
        rest = torch.nn.functional.pad((~retained).to(torch.uint8), (0, plan.num_tokens - M), value=1)
        new_order = torch.take_along_dim(plan.order, torch.argsort(rest, dim=1, stable=True), dim=1)
        out_plan = ChunkPlan(order=new_order, lengths=lengths, grid=plan.grid, width=width_out,
                             mode=_merged_mode(plan.mode, valid.device), batch_size=[B])
    return TokenMerge(keep=keep, target=target, into=into, sizes=sizes, lengths=lengths, removed=r,
                      plan=out_plan, source=source, flops=2.0 * B * M * D * d)


def _merged_mode(mode: str, device: torch.device) -> str:
    """Merged tokens of a packed plan stay packed only for flash-attn's varlen kernel; otherwise
    they go padded, which saves the pack/unpack round trips (and their host syncs) of sdpa."""
    if mode != "packed":
        return mode
    from .attention import _HAS_FLASH

    return "packed" if _HAS_FLASH and device.type == "cuda" else "padded"


# ---------------------------------------------------------------------------- patching
class _Context:
    """State shared by one ``apply``: settings, the grid and timestep of the current forward,
    and what each block removed."""

    def __init__(self, ratio: Ratio, stride: int, random_dst: bool, seed: int, proportional: bool,
                 num_blocks: int, compile: bool = False) -> None:
        self.ratio, self.stride, self.random_dst, self.seed = ratio, stride, random_dst, seed
        self.compile = compile
        self.proportional, self.num_blocks = proportional, num_blocks
        self.grid: tuple[int, ...] | None = None
        self.t: torch.Tensor | None = None
        self.removed: list[torch.Tensor] = []
        self._generators: dict = {}

    def ratio_for(self, block: int) -> "float | torch.Tensor":
        r = self.ratio
        if callable(r):
            r = r(block, self.t)
        elif not isinstance(r, (int, float)):
            r = r[block]
        _check_ratio(r)
        return r if torch.is_tensor(r) else float(r)

    def generator(self, device: torch.device) -> torch.Generator | None:
        if not self.random_dst:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]


def _check_ratio(r) -> None:
    if torch.is_tensor(r):
        if not torch.compiler.is_compiling() and not bool(((r >= 0) & (r <= 1)).all()):
            raise ValueError(f"merge ratios must lie in [0, 1] (no NaN), got {r.tolist()}")
    elif not (isinstance(r, (int, float)) and 0 <= r <= 1):
        raise ValueError(f"merge ratio must lie in [0, 1] (fraction of each sample's tokens to merge), got {r!r}")


class _Shared:
    """The merge one block's attention computed, for its MLP."""

    current: TokenMerge | None = None


class MergedAttention(nn.Module):
    """An attention module run on merged tokens: ``unmerge(attn(merge(x)))``.

    ``fn(inner, x, plan, key_bias)`` calls the wrapped module on any layout.
    """

    takes_plan = True

    def __init__(self, inner: nn.Module, fn: Callable, ctx: _Context, index: int, shared: _Shared) -> None:
        super().__init__()
        self.inner, self.fn, self.ctx, self.index, self.shared = inner, fn, ctx, index, shared
        self.last_flops = 0.0

    def forward(self, x: torch.Tensor, plan: ChunkPlan | None = None) -> torch.Tensor:
        ratio = self.ctx.ratio_for(self.index)
        self.last_flops = 0.0
        if not torch.is_tensor(ratio) and ratio == 0:  # exactly the unmerged block
            self.shared.current = None
            self.ctx.removed.append(torch.zeros(x.shape[0] if plan is None else plan.lengths.shape[0],
                                                dtype=torch.long, device=x.device))
            return self.fn(self.inner, x, plan, None)
        if plan is None:
            grid = self.ctx.grid
            if grid is None or math.prod(grid) != x.shape[1]:
                raise ValueError(
                    f"token merging on a dense sequence of {x.shape[1]} tokens needs its grid; apply merging to "
                    "the model you call (a DiT, DCDiT or wrap(...) result), not to a sub-module or a model "
                    f"whose blocks another model shares (grid seen: {grid})"
                )
            B = x.shape[0]
            valid = torch.ones(B, x.shape[1], dtype=torch.bool, device=x.device)
            coords = grid_coords(grid, device=x.device).expand(B, -1, -1)
            merge = bipartite_merge(x, valid, coords, grid, ratio, stride=self.ctx.stride,
                                    generator=self.ctx.generator(x.device), compile=self.ctx.compile)
        else:
            slots = plan.unpack(x) if plan.mode == "packed" else x
            merge = bipartite_merge(slots, plan.valid, plan.coords, plan.grid, ratio, stride=self.ctx.stride,
                                    generator=self.ctx.generator(x.device), source=plan, compile=self.ctx.compile)
            merge.total = x.shape[0] if plan.mode == "packed" else None
        self.shared.current = merge
        self.ctx.removed.append(merge.removed)
        self.last_flops = merge.flops
        bias = merge.key_bias(x.dtype) if self.ctx.proportional else None
        merged = merge.merge(x) if plan is None else merge.merge_slots(slots)  # slots: unpacked once
        return merge.unmerge(self.fn(self.inner, merged, merge.plan, bias))


class MergedMlp(nn.Module):
    """The MLP of a merged block, run on the tokens its attention merged."""

    def __init__(self, inner: nn.Module, shared: _Shared) -> None:
        super().__init__()
        self.inner, self.shared = inner, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merge = self.shared.current
        return self.inner(x) if merge is None else merge.unmerge(self.inner(merge.merge(x)))


def _ours(attn, x, plan, key_bias):
    return attn(x, plan, key_bias)


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, Callable, str]]:
    """``(block, attention attribute, call, mlp attribute)`` for every block merging can patch."""
    from .adapters import (
        ChunkformerDiTAdapter,
        DiffusersDiTAdapter,
        OriginalDiTAdapter,
        diffusers_attention,
        timm_attention,
    )
    from .models.dit import Attention, DiTBlock
    from .wrapping import ChunkWrapper

    if isinstance(model, ChunkWrapper):
        adapter = model.backbone
        if isinstance(adapter, ChunkformerDiTAdapter):
            return [(b, "attn", _ours, "mlp") for b in adapter.blocks]
        if isinstance(adapter, OriginalDiTAdapter) and adapter.attention_known:
            return [(b, "attn", timm_attention, "mlp") for b in adapter.blocks]
        if isinstance(adapter, DiffusersDiTAdapter) and adapter.attention_known:
            return [(b, "attn1", diffusers_attention, "ff") for b in adapter.blocks]
        raise TypeError(
            f"token merging cannot patch a wrapped backbone with adapter {adapter.name!r}"
            + ("" if adapter.attention_known else " whose attention chunkformer cannot restrict to each sample")
            + ": it supports the 'chunkformer', 'dit' and 'diffusers' adapters with a known attention"
        )
    found = [(b, "attn", _ours, "mlp") for b in model.modules()
             if isinstance(b, DiTBlock) and isinstance(b.attn, (Attention, MergedAttention))]
    if not found:
        raise TypeError(
            f"token merging found no block to patch in {type(model).__name__}: it patches chunkformer DiT/DC-DiT "
            "blocks and wrap(...) results; wrap a foreign DiT first (chunkformer.wrap)"
        )
    return found


def apply(
    model: nn.Module,
    ratio: Ratio = 0.5,
    *,
    stride: int = 2,
    merge_mlp: bool = False,
    proportional: bool = False,
    random_dst: bool = True,
    seed: int = 0,
    compile: bool = False,
) -> nn.Module:
    """Merge tokens around every block's attention (and MLP with ``merge_mlp=True``), in place.

    Args:
        model: a :class:`~chunkformer.DiT`, :class:`~chunkformer.DCDiT` or ``chunkformer.wrap``
            result (blocks a wrapper shares with its source model are patched for both).
        ratio: fraction of each sample's tokens folded away per block, in ``[0, 1]``; a float,
            one per block, or ``ratio(block_index, t) -> float | (B,) tensor``. ``0`` leaves a
            block exactly as it was.
        stride: cell size (grid positions per axis) on a dense grid; see the module docstring.
        merge_mlp: run the MLP on the merged tokens too (faster, coarser).
        proportional: size-weighted attention (``log(size)`` added to each key's logits).
        random_dst: random destination per cell (from a generator seeded with ``seed``);
            ``False`` takes each cell's first token in raster order (deterministic).
        compile: compute the merge indices through ``torch.compile`` (fewer kernel launches on
            GPU; compiles once per shape family).

    Returns ``model``. Applying again replaces the settings; :func:`remove` undoes it.
    """
    if is_applied(model):
        remove(model)
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int (grid positions per cell side), got {stride!r}")
    targets = _targets(model)
    if not callable(ratio) and not isinstance(ratio, (int, float)):
        ratio = [float(r) for r in ratio]
        if len(ratio) != len(targets):
            raise ValueError(f"got {len(ratio)} merge ratios for {len(targets)} blocks; give one per block")
        for r in ratio:
            _check_ratio(r)
    elif not callable(ratio):
        _check_ratio(ratio)
    ctx = _Context(ratio, stride, random_dst, seed, proportional, len(targets), compile)
    patched = []
    for i, (block, attn_name, fn, mlp_name) in enumerate(targets):
        shared = _Shared()
        setattr(block, attn_name, MergedAttention(getattr(block, attn_name), fn, ctx, i, shared))
        if merge_mlp:
            setattr(block, mlp_name, MergedMlp(getattr(block, mlp_name), shared))
        patched.append((block, attn_name, mlp_name if merge_mlp else None))

    def before(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        t = args[1] if len(args) > 1 else kwargs.get("t")
        P = getattr(module, "patch_size", 1)
        ctx.grid = tuple(s // P for s in x.shape[2:])
        ctx.t, ctx.removed = t, []

    def after(module, args, kwargs, output):
        if isinstance(output, tuple) and hasattr(output[1], "merged") and ctx.removed:
            output[1].merged = torch.stack(ctx.removed)  # (blocks, B)
        return output

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    model._token_merging = (patched, hooks, ctx)
    return model


def is_applied(model: nn.Module) -> bool:
    """Whether :func:`apply` patched ``model`` (and :func:`remove` has not undone it)."""
    return getattr(model, "_token_merging", None) is not None


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the original modules go back and the hooks are removed."""
    state = getattr(model, "_token_merging", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no token merging to remove (chunkformer.merging.apply it first)")
    patched, hooks, _ = state
    for block, attn_name, mlp_name in patched:
        setattr(block, attn_name, getattr(block, attn_name).inner)
        if mlp_name is not None:
            setattr(block, mlp_name, getattr(block, mlp_name).inner)
    for h in hooks:
        h.remove()
    del model._token_merging
    return model
