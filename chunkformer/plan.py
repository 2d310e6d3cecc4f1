"""ChunkPlan: which tokens each sample keeps, and how to move tokens in and out.

A plan is the only object that knows which token came from where. It stores, per
sample, a permutation ``order`` of the ``L`` grid positions (kept tokens first, in
raster order, then the rest by descending keep probability) and the kept count
``lengths``. Everything else is derived:

* ``gather``: ``(B, L, d)`` grid tokens -> ``(B, M, d)`` slots; slot ``j < lengths[b]``
  holds kept token ``j`` of sample ``b``; slots beyond hold the next most probable
  *real* tokens, so a backbone that knows nothing about masks still sees sensible input.
* ``pack`` / ``unpack``: ``(B, M, d)`` <-> ``(T, d)``, ``T = sum(lengths)``; samples
  are contiguous runs delimited by ``cu_seqlens`` (varlen attention, no padding compute).
* ``plug_back``: ``(B, M, d)`` -> ``(B, L, d)``; every grid position takes the value
  of its nearest kept token (Euclidean on the grid; ties go to the earliest in raster order).

Three batching modes decide what :meth:`ChunkPlan.chunk` returns:

============  ======================  ==================================================
mode          chunk(x) shape          use
============  ======================  ==================================================
``packed``    ``(T, d)``              default; varlen attention via ``cu_seqlens``
``padded``    ``(B, max_len, d)``     any backbone unmodified; pad slots are real tokens
``fixed``     ``(B, capacity, d)``    static shapes for torch.compile / CUDA graphs
============  ======================  ==================================================

``packed`` and ``padded`` read ``max(lengths)`` once when the plan is built (one
host sync); ``fixed`` never syncs: a sample that keeps more than ``capacity`` tokens
loses its least probable ones. ``packed`` and ``padded`` take ``capacity`` too, as an
upper bound (the same rule) that caps memory when a router keeps too much, e.g. early
in training; lengths still vary below it.

Plans concatenate like tensors (``torch.cat([cond_plan, uncond_plan])`` for CFG)
and index like tensors (``plan[:4]``).
"""

import math
from typing import Literal

import torch
from tensordict import tensorclass
from torch.utils.weak import WeakIdKeyDictionary

from ._typing import Bool, Float, Int, Tensor, check_finite, typechecked, value_checks_enabled
from .grid import GridShape, check_grid, grid_coords, sincos_table

__all__ = ["ChunkPlan", "PlanMode", "PLAN_MODES", "nearest_kept"]

PlanMode = Literal["packed", "padded", "fixed"]
PLAN_MODES: tuple[str, ...] = ("packed", "padded", "fixed")


@tensorclass
class ChunkPlan:
    """Per-sample token selection over a grid; see the module docstring.

    Attributes:
        order: ``(B, L)`` int64 permutation of grid positions: kept ones first in raster
            order, then the rest by descending keep probability.
        lengths: ``(B,)`` int64 kept tokens per sample (``<= width``).
        grid: grid shape the positions index into.
        width: slots per sample ``M`` in the chunked ``(B, M, d)`` layout.
        mode: ``"packed"``, ``"padded"`` or ``"fixed"``.
        full: every slot holds a kept token (a ``fill``-ed fixed plan): attention needs no mask.
    """

    order: torch.Tensor
    lengths: torch.Tensor
    grid: tuple
    width: int
    mode: str
    full: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mask(
        cls,
        mask: Bool[Tensor, "batch tokens"],
        probs: Float[Tensor, "batch tokens"] | None = None,
        *,
        grid: GridShape,
        mode: PlanMode = "packed",
        capacity: int | None = None,
        fill: bool = False,
    ) -> "ChunkPlan":
        """Build a plan from a boundary mask (``True`` = keep) over a grid.

        ``probs`` orders the tokens that are not kept (pad slots) and, with a
        ``capacity``, chooses which kept tokens survive when a sample keeps more.
        Without it, pad slots follow raster order. ``fill`` (fixed mode): a sample that
        keeps fewer than ``capacity`` tokens also keeps its most probable other ones, so
        every sample keeps exactly ``capacity`` and the plan is ``full``.
        """
        return _build_plan(mask, probs, grid=grid, mode=mode, capacity=capacity, fill=fill)

    @classmethod
    def from_router(
        cls, out, *, mode: PlanMode = "packed", capacity: int | None = None, fill: bool = False
    ) -> "ChunkPlan":
        """Build a plan from a :class:`~chunkformer.routing.RouterOutput`."""
        # the router has checked its probabilities already: no second device round trip here
        return _build_plan(out.mask, out.probs, grid=out.grid, mode=mode, capacity=capacity, fill=fill, check=False)

    @classmethod
    def cat(cls, plans: "list[ChunkPlan]") -> "ChunkPlan":
        """Concatenate plans along the batch (for CFG); same grid and mode required."""
        plans = list(plans)
        first = plans[0]
        for p in plans[1:]:
            if p.grid != first.grid:
                raise ValueError(f"cannot concatenate plans over grids {first.grid} and {p.grid}")
            if p.mode != first.mode:
                raise ValueError(f"cannot concatenate plans of modes {first.mode!r} and {p.mode!r}")
            if first.mode == "fixed" and p.width != first.width:
                raise ValueError(
                    f"cannot concatenate fixed-capacity plans of capacities {first.width} and {p.width}"
                )
        plan = cls(
            order=torch.cat([p.order for p in plans]),
            lengths=torch.cat([p.lengths for p in plans]),
            grid=first.grid,
            width=max(p.width for p in plans),
            mode=first.mode,
            full=all(p.full for p in plans),
            batch_size=[sum(p.batch_size[0] for p in plans)],
        )
        totals = [p._derived(("total",), lambda: None) for p in plans]
        if all(t is not None for t in totals):  # known on the host: packing the whole stays sync-free
            plan._derived(("total",), lambda: sum(totals))
        return plan

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.cat:
            kwargs = kwargs or {}
            tensors = kwargs.get("tensors", args[0] if args else None)
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim != 0:
                raise ValueError("ChunkPlans concatenate along the batch (dim=0) only")
            return cls.cat(tensors)
        return NotImplemented

    # ------------------------------------------------------------------ derived geometry
    @property
    def num_tokens(self) -> int:
        """``L``: tokens in the full grid."""
        return self.order.shape[-1]

    @property
    def positions(self) -> Int[Tensor, "batch width"]:
        """Raster position of every slot, ``(B, M)``."""
        return self.order[:, : self.width]

    def _derived(self, key: tuple, make):
        """``make()``, computed once per plan (the blocks of one forward share it): index
        tensors that every block would otherwise rebuild, a dozen small kernels each."""
        if torch.compiler.is_compiling():  # the compiler dedupes these itself
            return make()
        store = _DERIVED.get(self.lengths)
        if store is None:
            store = _DERIVED[self.lengths] = {}
        key = (*key, self.width, self.order.shape[-1])
        if key not in store:
            store[key] = make()
        return store[key]

    @property
    def valid(self) -> Bool[Tensor, "batch width"]:
        """``(B, M)``: slot ``j`` of sample ``b`` holds a kept token (not padding)."""
        return self._derived(("valid",), lambda: torch.arange(self.width, device=self.order.device)
                             < self.lengths[:, None])

    @property
    def coords(self) -> Float[Tensor, "batch width ndim"]:
        """Original grid coordinates of every slot, ``(B, M, ndim)`` float."""
        table = grid_coords(self.grid, device=self.order.device)  # (L, ndim)
        return table[self.positions]

    @property
    def cu_seqlens(self) -> Int[Tensor, "batch_plus_one"]:
        """``(B + 1,)`` int32 offsets of each sample's run in the packed sequence."""
        return self._derived(("cu_seqlens",), lambda: torch.nn.functional.pad(self.lengths.cumsum(0), (1, 0))
                             .to(torch.int32))

    @property
    def kept_mask(self) -> Bool[Tensor, "batch tokens"]:
        """``(B, L)`` bool: which grid positions are kept."""
        m = torch.zeros(self.order.shape, dtype=torch.bool, device=self.order.device)
        return m.scatter(1, self.positions, self.valid)

    def segment_ids(self) -> Int[Tensor, "total"]:
        """``(T,)`` sample index of every packed token."""
        B = self.lengths.shape[0]
        return torch.repeat_interleave(torch.arange(B, device=self.lengths.device), self.lengths)

    # ------------------------------------------------------------------ moving tokens
    @typechecked
    def gather(self, x: Float[Tensor, "batch tokens dim"]) -> Float[Tensor, "batch width dim"]:
        """``(B, L, d)`` -> ``(B, M, d)``: kept tokens first (raster order), real tokens as padding."""
        self._check_tokens(x)
        B, M = self.positions.shape
        return _select_rows(x.reshape(-1, x.shape[-1]), self._flat_positions()).view(B, M, x.shape[-1])

    @typechecked
    def place(self, y: Float[Tensor, "batch width dim"]) -> Float[Tensor, "batch tokens dim"]:
        """``(B, M, d)`` -> ``(B, L, d)``: each slot's row at its grid position, zeros elsewhere (the
        transpose of :meth:`gather`)."""
        B, L = self.order.shape
        d = y.shape[-1]
        return y.new_zeros(B * L, d).index_copy(0, self._flat_positions(), y.reshape(-1, d)).view(B, L, d)

    @typechecked
    def pack(self, x: Float[Tensor, "batch width dim"], total: int | None = None) -> Float[Tensor, "total dim"]:
        """``(B, M, d)`` -> ``(T, d)``: drop padding, samples contiguous.

        Without ``total`` (``T = sum(lengths)``) this uses the total read when the plan was
        built, or reads it from the device (one host sync); with it, it is a plain gather
        (callers that hold a packed tensor know ``T``).
        """
        if total is None:
            total = self._derived(("total",), lambda: None)
        if total is None:
            return x[self.valid]
        return _select_rows(x.reshape(-1, x.shape[-1]), self._flat_index(total))

    @typechecked
    def unpack(self, x: Float[Tensor, "total dim"]) -> Float[Tensor, "batch width dim"]:
        """``(T, d)`` -> ``(B, M, d)`` with zeros in the padding slots; inverse of :meth:`pack`
        (no host sync: ``T`` is ``x``'s length). ``x`` must hold ``sum(lengths)`` rows: checked against the total
        the plan read when it was built, else (a device read) unless inside ``value_checks(False)``."""
        B = self.lengths.shape[0]
        total = self._derived(("total",), lambda: None)
        if total is None and value_checks_enabled() and not x.is_meta:
            total = int(self.lengths.sum())
        if total is not None and x.shape[0] != total:
            raise ValueError(f"unpack needs the plan's {total} packed tokens (sum of lengths) as (total, dim), "
                             f"got {tuple(x.shape)}: was x packed by another plan?")
        out = x.new_zeros(B * self.width, x.shape[-1]).index_copy(0, self._flat_index(x.shape[0]), x)
        return out.view(B, self.width, x.shape[-1])

    def _flat_positions(self) -> Tensor:
        """``(B * M,)`` row of every slot's grid position in the flattened ``(B * L)`` tokens. Moving tokens
        by flat rows keeps this index, not one broadcast over the channels, for the backward pass."""
        return _flat_rows(self.positions, self.num_tokens)

    def _flat_index(self, total: int) -> Tensor:
        """``(T,)`` position of every packed token in the flattened ``(B * M)`` slots."""
        return self._derived(("flat_index", total), lambda: self._make_flat_index(total))

    def _make_flat_index(self, total: int) -> Tensor:
        B, dev = self.lengths.shape[0], self.lengths.device
        seg = torch.repeat_interleave(torch.arange(B, device=dev), self.lengths, output_size=total)  # (T,)
        start = self.cu_seqlens[:-1].long()  # (B,)
        return seg * self.width + torch.arange(total, device=dev) - start[seg]

    def chunk(self, x: Float[Tensor, "batch tokens dim"]) -> Tensor:
        """Grid tokens -> what the backbone runs on: ``(T, d)`` if packed, else ``(B, M, d)``."""
        out = self.gather(x)
        return self.pack(out) if self.mode == "packed" else out

    def unchunk(self, y: Tensor) -> Float[Tensor, "batch width dim"]:
        """Backbone output -> ``(B, M, d)`` slots (inverse layout of :meth:`chunk`)."""
        return self.unpack(y) if self.mode == "packed" else y

    @typechecked
    def plug_back(self, y: Float[Tensor, "batch width dim"]) -> Float[Tensor, "batch tokens dim"]:
        """``(B, M, d)`` -> ``(B, L, d)``: every position takes its nearest kept token's value."""
        B = self.lengths.shape[0]
        if y.ndim != 3 or y.shape[0] != B or y.shape[1] != self.width:
            raise ValueError(f"plug_back needs (batch={B}, width={self.width}, dim) slots (the plan's "
                             f"unchunk layout), got {tuple(y.shape)}")
        rows = _flat_rows(self.nearest(), self.width)  # (B * L,) nearest kept slot, flattened
        return y.reshape(-1, y.shape[-1]).index_select(0, rows).view(B, -1, y.shape[-1])

    def nearest(self) -> Int[Tensor, "batch tokens"]:
        """``(B, L)`` slot index of each grid position's nearest kept token."""
        return nearest_kept(self.coords, self.valid, self.grid)

    def position_embedding(self, dim: int) -> Tensor:
        """Sin-cos embedding of the kept tokens' original coordinates, in :meth:`chunk`'s layout.

        Computed once per grid position (``L`` rows) and gathered: eager, ``B M / L`` times fewer sines
        than one per slot. ``torch.compile`` inlines a table computed per call into the gather again, so
        a model that runs compiled keeps its table (DiT and DC-DiT: the buffer ``pos_table``) and calls
        :meth:`take`."""
        return self.take(sincos_table(self.grid, dim, device=self.order.device))

    def take(self, table: Float[Tensor, "tokens dim"]) -> Tensor:
        """Each slot's row of a per-grid-position ``(L, d)`` table (a position embedding), in
        :meth:`chunk`'s layout: ``(T, d)`` packed, else ``(B, M, d)``."""
        if table.ndim != 2 or table.shape[0] != self.num_tokens:
            raise ValueError(f"table must be (tokens={self.num_tokens}, dim): one row per position of grid "
                             f"{self.grid}, got shape {tuple(table.shape)}")
        rows = table[self.positions]  # (B, M, d)
        return self.pack(rows) if self.mode == "packed" else rows

    # ------------------------------------------------------------------ helpers
    def _check_tokens(self, x: Tensor) -> None:
        B, L = self.order.shape
        if x.ndim != 3 or x.shape[0] != B or x.shape[1] != L:
            raise ValueError(
                f"expected grid tokens of shape (batch={B}, tokens={L}, dim) for grid {self.grid}, "
                f"got {tuple(x.shape)}"
            )


def _build_plan(
    mask: Tensor, probs: Tensor | None, *, grid: GridShape, mode: str, capacity: int | None, fill: bool = False,
    check: bool = True,
) -> ChunkPlan:
    grid = check_grid(grid)
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (batch, tokens) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    B, L = mask.shape
    if L != math.prod(grid):
        raise ValueError(f"mask has {L} tokens but grid {grid} holds {math.prod(grid)}")
    if mode not in PLAN_MODES:
        raise ValueError(f"mode must be one of {PLAN_MODES}, got {mode!r}")
    if probs is None:
        probs = mask.float()
    elif probs.shape != mask.shape:
        raise ValueError(f"probs {tuple(probs.shape)} must match mask {tuple(mask.shape)}")
    elif check:
        check_finite("probs", probs)
    probs = probs.detach().float()
    pos = torch.arange(L, device=mask.device, dtype=torch.float32)

    if mode == "fixed" and capacity is None:
        raise ValueError(f"mode='fixed' needs capacity in [1, {L}] (tokens per sample), got None")
    if fill and mode != "fixed":
        raise ValueError(f"fill=True keeps exactly `capacity` tokens per sample: it needs mode='fixed', got {mode!r}")
    if capacity is not None:
        if not 1 <= capacity <= L:
            raise ValueError(f"capacity must be in [1, {L}] (tokens per sample), got {capacity}")
        # rank the kept tokens by probability (sync-free; ties to earlier positions), then, with `fill`,
        # the others the same way; keep the first `capacity`
        if fill:  # two stable sorts: by probability, then kept before not kept
            by_prob = torch.argsort(-probs, dim=1, stable=True)
            ranked = by_prob.gather(1, torch.argsort((~mask).gather(1, by_prob).to(torch.uint8), dim=1, stable=True))
        else:
            ranked = torch.argsort(torch.where(mask, -probs, torch.inf), dim=1, stable=True)
        ranks = torch.arange(L, device=mask.device).expand(B, L)
        rank = torch.empty_like(ranks).scatter(1, ranked, ranks)
        mask = (rank < capacity) if fill else mask & (rank < capacity)

    # kept: raster order first (keys < -1), then the rest by descending probability (keys in [-1, 0])
    key = torch.where(mask, pos - L - 1.0, -probs)
    order = torch.argsort(key, dim=1, stable=True)
    lengths = mask.sum(1)
    if mode == "fixed" or not B:
        return ChunkPlan(order=order, lengths=lengths, grid=grid, width=capacity if mode == "fixed" else 1,
                         mode=mode, full=fill, batch_size=[B])
    return _synced_plan(order, lengths, grid, mode, B)


@torch.compiler.disable
def _synced_plan(order: Tensor, lengths: Tensor, grid: tuple, mode: str, B: int) -> ChunkPlan:
    """A packed / padded plan, sized by the host sync it needs. Eager under ``torch.compile`` (the sync breaks
    the graph anyway): dynamo 2.11 failed to trace this tensorclass's construction in the resumed frame."""
    longest, total = torch.stack([lengths.max(), lengths.sum()]).tolist()  # the one host sync of a plan
    plan = ChunkPlan(order=order, lengths=lengths, grid=grid, width=max(longest, 1), mode=mode, batch_size=[B])
    plan._derived(("total",), lambda: total)  # later packs gather without asking the device again
    return plan


class _SelectRows(torch.autograd.Function):
    """``x.index_select(0, index)`` for an index without repeats, whose backward copies the
    gradient into place (``index_copy``) instead of adding it (``index_add``): no atomics, which
    made ``pack``'s backward a large share of a training step (docs/performance.md)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy(0, index, grad), None


def _flat_rows(index: Tensor, stride: int) -> Tensor:
    """``(B, K)`` per-sample row indices into ``(B, stride, ...)`` -> ``(B * K,)`` rows of its flattened
    ``(B * stride, ...)``."""
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * stride).flatten()


def _select_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` (distinct) of ``x``; differentiable without atomics."""
    return _SelectRows.apply(x, index) if x.requires_grad else x.index_select(0, index)


# per-plan derived index tensors, keyed by the plan's `lengths` tensor (by identity, dropped with it)
_DERIVED: WeakIdKeyDictionary = WeakIdKeyDictionary()

DENSE_NEAREST_MAX_TOKENS = 32 * 32  # "auto" uses the brute force up to this many grid positions on CUDA (eager)
DENSE_NEAREST_MAX_PAIRS = 2**24  # ... and up to this many (sample, position, slot) distances; also its chunk size

_INT32_KEY_LIMIT = 2**31 - 1  # largest key nearest_kept keeps in int32 (tests lower it)


@typechecked
def nearest_kept(
    coords: Float[Tensor, "batch width ndim"],
    valid: Bool[Tensor, "batch width"],
    grid: GridShape,
    *,
    block: int = 4096,
    method: str = "auto",
) -> Int[Tensor, "batch tokens"]:
    """Slot index of the nearest valid slot for every grid position.

    Exact squared Euclidean distances on integer coordinates; ties go to the lowest
    slot (for a plan: the earliest raster position). A sample with no valid slot maps
    everything to slot 0. Valid slots must sit on grid positions; padding slots
    (``valid=False``) may hold anything.

    Rank-1 and rank-2 grids use a separable exact transform: ``O(B * L * H)`` work for
    an ``(H, W)`` grid, memory ``O(B * block * H)`` (``block`` grid positions per step).
    Rank 3 falls back to the brute-force :func:`_nearest_kept_dense`, ``O(B * L * M)``.
    No host syncs either way. ``method``: ``"separable"``, ``"dense"`` or ``"auto"`` (dense for
    rank 3, and for grids of up to :data:`DENSE_NEAREST_MAX_TOKENS` positions on CUDA outside
    ``torch.compile``, where its one matmul-like pass beats the separable form's ~20 small
    kernels (docs/performance.md), as long as the ``B * L * M``
    distances stay under :data:`DENSE_NEAREST_MAX_PAIRS`: a training batch of 256 at 32x32 with
    1024 slots would need gigabytes; separable everywhere else).
    """
    grid = tuple(grid)
    if method not in ("auto", "separable", "dense"):
        raise ValueError(f"method must be 'auto', 'separable' or 'dense', got {method!r}")
    if method == "auto":
        method = _auto_nearest_method(grid, tuple(valid.shape), coords.device)
    if method == "dense" or len(grid) > 2:
        return _nearest_kept_dense(coords, valid, grid, block=block)
    H, W = (1, *grid) if len(grid) == 1 else grid
    B, M = valid.shape
    dev = coords.device
    # candidates compare by one integer key, (squared distance, slot) lexicographic:
    # d2 * M + slot with slot < M. Rows without a kept token get d2 = big (above any real
    # distance), decoding to slot 0. int32 when the largest key fits (faster), else int64.
    big = (H - 1) ** 2 + (W - 1) ** 2 + 1
    dtype = torch.int32 if (big + (H - 1) ** 2 + 1) * M <= _INT32_KEY_LIMIT else torch.int64

    # raster index of each slot (pads parked at 0 with sentinel slot M: they never win)
    c = coords.round().long()  # (B, M, ndim)
    pos = c[..., 0] if len(grid) == 1 else c[..., 0] * W + c[..., 1]  # (B, M)
    pos = torch.where(valid, pos, 0).clamp(0, H * W - 1)
    slot = torch.arange(M, device=dev, dtype=dtype).expand(B, M)
    slot = torch.where(valid, slot, M)  # (B, M)
    # lowest valid slot at each position, M where none
    slot_at = torch.full((B, H * W), M, dtype=dtype, device=dev)
    slot_at = slot_at.scatter_reduce(1, pos, slot, "amin").view(B, H, W)

    # row pass: nearest kept column in the same row, left (<= x) and right (>= x); the
    # equidistant candidates of a row are at most these two, so their min key is exact
    kept = slot_at < M  # (B, H, W)
    x = torch.arange(W, device=dev)
    left = torch.where(kept, x, -1).cummax(-1).values  # (B, H, W), -1: none
    right = torch.where(kept, x, W).flip(-1).cummin(-1).values.flip(-1)  # (B, H, W), W: none
    lc, rc = left.clamp(min=0), right.clamp(max=W - 1)
    key_l = ((x - lc) ** 2).to(dtype) * M + slot_at.gather(-1, lc)
    key_l = torch.where(left >= 0, key_l, big * M)  # (B, H, W)
    key_r = ((rc - x) ** 2).to(dtype) * M + slot_at.gather(-1, rc)
    key_r = torch.where(right < W, key_r, big * M)  # (B, H, W)
    row_key = torch.minimum(key_l, key_r)  # (B, H, W): equidistant -> lower slot
    if H == 1:
        return (row_key % M).view(B, W).long()

    # column pass: min over source rows r of (y - r)^2 * M + row_key[r], target rows in blocks;
    # keys are distinct per slot, so the min (unlike an argmin) needs no tie order
    r = torch.arange(H, device=dev)
    rows = max(1, block // W)
    out = []
    for y0 in range(0, H, rows):
        y = torch.arange(y0, min(y0 + rows, H), device=dev)
        dy2 = ((y[:, None] - r[None, :]) ** 2).to(dtype) * M  # (h, H)
        key = row_key[:, None, :, :] + dy2[None, :, :, None]  # (B, h, H, W)
        out.append(key.amin(2) % M)  # (B, h, W)
    return torch.cat(out, dim=1).view(B, H * W).long()


def _auto_nearest_method(grid: tuple[int, ...], slots: tuple[int, int], device: torch.device) -> str:
    """``nearest_kept(method="auto")``'s choice for a ``grid`` and ``(B, M)`` slots on ``device``."""
    small = (math.prod(grid) <= DENSE_NEAREST_MAX_TOKENS and torch.device(device).type == "cuda"
             and math.prod(slots) * math.prod(grid) <= DENSE_NEAREST_MAX_PAIRS)
    return "dense" if len(grid) > 2 or (small and not torch.compiler.is_compiling()) else "separable"


def _nearest_kept_dense(
    coords: Tensor, valid: Tensor, grid: GridShape, *, block: int = 4096
) -> Tensor:
    """Brute-force :func:`nearest_kept`: ``(B, block, M)`` distances per step, any rank.

    Reference for the separable path and the rank-3 implementation. ``block`` shrinks so that
    one step holds at most :data:`DENSE_NEAREST_MAX_PAIRS` distances.
    """
    points = grid_coords(grid, device=coords.device)  # (L, ndim)
    block = max(1, min(block, DENSE_NEAREST_MAX_PAIRS // max(1, valid.numel())))
    out = []
    for start in range(0, points.shape[0], block):
        p = points[start : start + block]  # (l, ndim)
        d2 = ((p[None, :, None, :] - coords[:, None, :, :]) ** 2).sum(-1)  # (B, l, M)
        d2 = d2.masked_fill(~valid[:, None, :], torch.inf)
        out.append(d2.argmin(-1))  # first minimum: lowest slot
    return torch.cat(out, dim=1)
