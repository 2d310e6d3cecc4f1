"""How fast does DC-DiT train against DiT of the same width, and how much memory does it take?

    python benchmarks/train_speed.py --compile    # GPU, about 3 min: writes results/train_speed_256_compiled_<card>.json
    python benchmarks/train_speed.py              # eager (the recipes' packed plans): train_speed_256_eager_<card>.json
    python benchmarks/train_speed.py --compile --size digits   # the digit study's S models: ..._digits_compiled_<card>.json
    python benchmarks/train_speed.py --compile --cuda-graphs   # compiled with mode='reduce-overhead'
    python benchmarks/train_speed.py --tiny       # CPU smoke run (nothing written)
    python benchmarks/train_speed.py --account    # CPU, about 1 min: where a training step's FLOPs, memory and ops go
                                                  # writes results/train_speed_account_cpu.json
    python benchmarks/train_speed.py --profile --size digits --cuda-graphs --steps 20   # GPU, about 6 min: where a
                                                  # compiled step's time goes: results/train_speed_profile_digits_<card>.json
    python benchmarks/train_speed.py --profile --size digits --prefix-attention --channels-last   # the same with
                                                  # training fast paths: ..._profile_digits_prefix_channels_last_<card>.json
    python benchmarks/train_speed.py --profile --size digits --fill   # filled plans: attention without a mask
    python benchmarks/train_speed.py --ab --size digits --steps 20   # GPU, about 3 min: DC-DiT plain and with
                                                  # each training fast path, one process: ..._ab_digits_<card>
                                                  # (--size 256: DC-DiT-XL, five XL-size models held at once)
    python benchmarks/train_speed.py --attention --size digits --steps 20   # GPU, under a minute: one attention
                                                  # layer, DiT's against DC-DiT's key-masked: ..._attention_digits_<card>.json

Training throughput (forward + backward + AdamW) and peak memory.

DC-DiT-B / DC-DiT-XL against DiT-B/2 / DiT-XL/2 at 256px (32x32 latents), batch 64 (``--size digits``:
DC-DiT-S against DiT-S/2 on the digit study's 32x32x1 images, batch 256), bf16 autocast, fused AdamW,
eager (the recipes' training path: packed plans, default attention backend). The DC-DiT router is
biased to keep every token and a tail drop of 0.75 leaves a quarter of the grid, the budget rule a
trained DC-DiT with N = 4 follows, so both models see as many backbone tokens. Per width: the DiT,
DC-DiT, DC-DiT with ``checkpoint_scaffold`` and ``checkpoint_blocks = 4`` (the encoder, the router and the
first four blocks recomputed in backward), compiled also DC-DiT under an activation memory budget of 0.9
(recipes' ``train.memory_budget``: the compiled step recomputes in backward every activation it can without
a matmul), and DC-DiT's scaffold alone (no blocks), whose time against
DC-DiT's is the scaffold's share of the step, printed beside its share of the FLOPs. Columns: images/s, the
measured and the FLOP-predicted speed-up over the DiT of the same width (training FLOPs taken as 3x the
forward's), their ratio, and peak memory; on a GPU, one more step then gives the memory allocated at its
start, the peak during and the memory left after each phase (forward, backward, update): where the peak
falls, and what the forward leaves held for backward. ``--compile`` compiles every model, DC-DiT in
fixed-capacity mode; ``--cuda-graphs`` replays them from CUDA graphs.

``--account`` times nothing and needs no GPU: it takes one training step (bf16 autocast, forward, loss,
backward) of DiT-XL/2 and DC-DiT-XL at 256px, batch 64, and of the digit study's DiT-S/2 and DC-DiT-S
(32x32x1, batch 256), DC-DiT with fixed-capacity plans of a quarter of the grid, apart per component
(conditioning, embed, encoder, router, plan/pack, backbone, de-chunk, decoder, loss): training FLOPs per
image, the memory the forward leaves held for backward (on fake tensors, so no memory is used), and the aten
ops dispatched forward / backward (each at least one kernel launch on a GPU, eager); per model, the step's
peak memory with the weights and AdamW's moments (:class:`PeakMemory`). A third column per size
turns on ``checkpoint_scaffold`` and ``checkpoint_blocks = 4``. Then, on toy sizes of the same models (the
counts do not depend on size): graph breaks and recompiles of ``torch.compile`` over four steps of
multi-budget ``rho`` (a ``(B,)`` tensor, as the recipe passes it), and host syncs of a forward and backward
with and without value checks.

``--profile`` (DiT and DC-DiT of one width, the models, inputs and precision above, ``rho`` a ``(B,)`` tensor of
the multi-budget draws) looks at one compiled training step three ways: each component (conditioning, embed,
encoder, router, plan/pack, backbone, de-chunk, decoder, loss) compiled on its own and timed forward + backward on
the inputs it sees in a real step, beside its share of the step's FLOPs, and AdamW's update; the whole step,
compiled (and replayed from CUDA graphs with ``--cuda-graphs``); and a ``torch.profiler`` profile of the compiled
step: kernels per step, the GPU's busy time against the wall-clock (well below 100%: a launch-bound step), and GPU
time by kind of kernel (GEMM, attention, convolution, generated Triton, other).

``--ab`` (the same models and inputs) compiles DC-DiT plain and with each training fast path (channels-last
conv weights, the backbone's key-masked attention through FlexAttention, both) beside the DiT in one process,
and times all of them in interleaved rounds: compiled step times move by a few percent from process to
process, more than some of these paths change them.
"""

import argparse
import math
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from common import card_name, save_result, step_ms

import chunkformer as cf
from chunkformer import kernels
from chunkformer._typing import value_checks
from chunkformer.dechunk import Chunked
from chunkformer.hostsync import count_host_syncs
from chunkformer.plan import ChunkPlan
from chunkformer.routing import RouterOutput
from recipes.parallel import with_memory_budget


def _loss(out):
    return out.float().square().mean()


def training_step(model, opt, x, t, y, **kw):
    """One training step of ``model`` (or a compiled one) as a closure: bf16 autocast on a GPU, forward, loss,
    backward, ``opt``'s update. ``step(mark)`` calls ``mark(phase)`` after each phase ("forward", "backward",
    "update")."""
    def step(mark=lambda phase: None):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            out, info = model(x, t, y, return_info=True, **kw)
            loss = _loss(out) + 0.03 * info.ratio_loss
        mark("forward")
        loss.backward()
        mark("backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("update")
    return step


class MemoryPhases:
    """``mark`` for :func:`training_step`'s closure on a CUDA device: GiB allocated when the step starts, then
    per phase the most allocated during it (``<phase> peak``) and what it leaves allocated
    (``after <phase>``): where a step's peak falls, and how much the forward leaves held for backward."""

    def __init__(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.gib = {"start": torch.cuda.memory_allocated() / 2**30}

    def __call__(self, phase: str) -> None:
        torch.cuda.synchronize()
        self.gib[f"{phase} peak"] = torch.cuda.max_memory_allocated() / 2**30
        self.gib[f"after {phase}"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()


def throughput(model, x, t, y, steps: int, **kw) -> tuple[float, float, dict | None]:
    """(images per second, peak memory in GiB, :class:`MemoryPhases` of one more step on a GPU, else None) of
    ``steps`` training steps after a warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=x.is_cuda)  # (a compiled model shares them)
    step = training_step(model, opt, x, t, y, **kw)
    seconds, peak = time_steps(step, steps, x.is_cuda)
    phases = None
    if x.is_cuda:
        step(mark := MemoryPhases())
        phases = mark.gib
    return x.shape[0] * steps / seconds, peak, phases


def time_steps(step, steps: int, cuda: bool, warmup: int = 3) -> tuple[float, float]:
    """(seconds for ``steps`` calls of ``step`` after ``warmup`` calls, peak memory in GiB or NaN off CUDA)."""
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


# ------------------------------------------------------------------------------------ the CPU account
COMPONENTS = ("conditioning", "embed", "encoder", "router", "plan/pack", "backbone", "de-chunk", "decoder", "loss",
              "other")
FLOP_COMPONENTS = {"embed": "embed", "conditioning": "conditioning", "encoder": "encoder", "router": "router",
                   "chunk": "plan/pack", "backbone attention": "backbone", "backbone MLP": "backbone",
                   "backbone modulation": "backbone", "merging": "backbone", "de-chunk": "de-chunk",
                   "decoder": "decoder", "final layer": "decoder", "other": "other"}
AFTER = {"router": "plan/pack", "de-chunk": "loss"}  # what the model's own code does after a component


def component_modules(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    """Which submodule of a DiT or DC-DiT belongs to which component of the account."""
    if getattr(model, "supports_chunking", False):
        named = {"conditioning": [model.t_embedder, model.y_embedder], "embed": [model.encoder.embed],
                 "encoder": [*model.encoder.blocks, model.encoder.norm], "router": [model.router],
                 "backbone": [*model.blocks, model.norm], "de-chunk": [model.decoder],
                 "decoder": [*model.decoder.blocks, model.decoder.norm, model.decoder.final]}
    else:
        named = {"conditioning": [model.t_embedder, model.y_embedder], "embed": [model.x_embedder],
                 "backbone": [*model.blocks], "decoder": [model.final_layer]}
    return {m: name for name, ms in named.items() for m in ms}


class Account(TorchFunctionMode):
    """Per component of one training step: aten ops dispatched forward and backward, and the memory held for backward.

    Module hooks say which component runs; ops outside every component's module belong to the one that ran
    last (:data:`AFTER` maps the router to plan/pack and the de-chunk to the loss). A backward op belongs to
    the component whose forward made the autograd node running it (recomputation included). :meth:`held`: the
    bytes of every storage made in the forward that is still alive, by the component that made it; the
    parameters are left out, autocast's low-precision weight copies are not (they are held too).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.stack, self.base = model, [], "embed"
        self.fwd_ops, self.bwd_ops = Counter(), Counter()
        self.nodes: dict = {}  # autograd node -> component
        self.made: dict = {}  # storage -> (component, bytes)
        self.params = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
        self.dispatch = _Dispatch(self)

    @property
    def label(self) -> str:
        return self.stack[-1] if self.stack else self.base

    def __enter__(self):
        def pre(module, args):
            self.stack.append(names[module])

        def post(module, args, out):
            name = self.stack.pop()
            if not self.stack and name != "conditioning":
                self.base = AFTER.get(name, name)

        names = component_modules(self.model)
        self.handles = [h for m in names for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
        self.dispatch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.dispatch.__exit__(*exc)
        for h in self.handles:
            h.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        todo = [t.grad_fn for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:  # label the autograd nodes this call made (the walk stops at nodes labelled before)
            node = todo.pop()
            if node is not None and node not in self.nodes:
                self.nodes[node] = self.label
                todo.extend(n for n, _ in node.next_functions)
        return out

    def loss(self) -> None:
        """Ops from here on belong to the loss."""
        self.base = "loss"

    def held(self) -> Counter:
        """Bytes per component of the forward's storages still alive."""
        out = Counter()
        for ref, (label, nbytes) in self.made.items():
            if not ref.expired():
                out[label] += nbytes
        return out


class _Dispatch(TorchDispatchMode):
    def __init__(self, account: Account) -> None:
        super().__init__()
        self.account = account

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        acc, node = self.account, torch._C._current_autograd_node()
        if node is not None:
            acc.bwd_ops[acc.nodes.get(node, "other")] += 1
            return func(*args, **(kwargs or {}))
        acc.fwd_ops[acc.label] += 1
        out = func(*args, **(kwargs or {}))
        for ref, nbytes in _new_storages(out, acc.made, acc.params):
            acc.made[ref] = (acc.label, nbytes)
        return out


def _new_storages(out, *known):
    """``(storage, bytes)`` of each of ``out``'s tensors whose storage is in none of ``known`` (containers of
    ``StorageWeakRef``), each storage once as long as the caller records it before taking the next."""
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor):
            ref = StorageWeakRef(t.untyped_storage())
            if not any(ref in k for k in known):
                yield ref, t.untyped_storage().nbytes()


CHECKPOINT_BLOCKS = 4  # recomputed beside the scaffold: simulated eager, DC-DiT-XL peaks under DiT-XL/2
CHECKPOINTED = f" + checkpoint_scaffold + {CHECKPOINT_BLOCKS} blocks"  # the checkpointed variant's suffix
MEMORY_BUDGET = 0.9  # compiled: every activation the partitioner can recompute without a matmul is recomputed
BUDGETED = f" + memory_budget {MEMORY_BUDGET}"  # the budgeted variant's suffix (compiled runs only)


def _build(name: str, size: dict, checkpoint: bool, fixed: bool = True, *, fast: dict | None = None,
           **sizes) -> torch.nn.Module:
    """A seeded model in training mode; a DC-DiT's router biased to keep every token, in fixed-capacity mode
    (a quarter of the grid) when ``fixed``; ``checkpoint`` recomputes its scaffold and first blocks in
    backward. ``fast``: the training fast paths (``prefix``, ``channels_last``, ``fill``: booleans), by
    default the command line's flags."""
    fast = {"prefix": _PREFIX_ATTENTION, "channels_last": _CHANNELS_LAST, "fill": _FILL, **(fast or {})}
    torch.manual_seed(0)
    fixed = ({"plan_mode": "fixed", "capacity": size["latent"] ** 2 // 4, "fill_capacity": fast["fill"]}
             if fixed and name.startswith("DC") else {})
    model = cf.create_model(name, input_size=size["latent"], in_channels=size["channels"],
                            num_classes=size["classes"], **fixed, **sizes).train()
    if model.supports_chunking:
        torch.nn.init.constant_(model.router.scorer[-1].bias, 30.0)  # keep all: the capacity is the budget
        model.checkpoint_scaffold = checkpoint
        model.checkpoint_blocks = min(CHECKPOINT_BLOCKS, len(model.blocks)) if checkpoint else 0
        if fast["prefix"]:  # --prefix-attention: the backbone's masked attention through FlexAttention
            kernels.apply(model, norms=False, taps=False, gemm=False, gelu=False, attention=True, force=True)
    if fast["channels_last"]:  # --channels-last: conv weights NHWC, the (B, L, C) tokens' layout as a grid
        model.to(memory_format=torch.channels_last)
    return model


_PREFIX_ATTENTION = _CHANNELS_LAST = _FILL = False


def _variant(args) -> str:
    """The result name's suffix for the training fast-path flags."""
    return ("_prefix" if args.prefix_attention else "") + ("_channels_last" if args.channels_last else "") + (
        "_fill" if args.fill else "")


def _inputs(size: dict, batch: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, size["channels"], size["latent"], size["latent"], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t, torch.randint(0, size["classes"], (batch,), generator=g)


def _step(model, x, t, y, rho: float, acc: Account | None = None) -> torch.Tensor:
    """One training step's forward, loss and backward, as the recipe runs it compiled (``rho`` a (B,) tensor)."""
    kw = {"rho": torch.full((x.shape[0],), rho)} if model.supports_chunking else {}
    out, info = model(x, t, y, return_info=True, **kw)
    if acc is not None:
        acc.loss()
    loss = _loss(out) + 0.03 * info.ratio_loss
    held = acc.held() if acc is not None else None
    loss.backward()
    return held


class PeakMemory(TorchDispatchMode):
    """The most bytes alive at once over the ops run under it: every storage an op makes counts from then
    until it is freed (parameters left out). On fake tensors, a step's peak without allocating it."""

    def __init__(self, params: set) -> None:
        super().__init__()
        self.params, self.live, self.now, self.peak = params, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [r for r in self.live if r.expired()]:
            self.now -= self.live.pop(ref)
        for ref, nbytes in _new_storages(out, self.live, self.params):
            self.live[ref] = nbytes
            self.now += nbytes
        self.peak = max(self.peak, self.now)
        return out


def simulated_peak(name: str, size: dict, batch: int, checkpoint: bool = False, **sizes) -> float:
    """GiB at the peak of one eager training step (bf16 autocast, forward, loss, backward) on fake tensors,
    with the fp32 weights and AdamW's two moments: what ``torch.cuda.max_memory_allocated`` sees, allocator
    slack aside."""
    with FakeTensorMode():
        model = _build(name, size, checkpoint, **sizes)
        peak = PeakMemory({StorageWeakRef(p.untyped_storage()) for p in model.parameters()})
        with value_checks(False), torch.autocast("cpu", dtype=torch.bfloat16), peak:
            _step(model, *_inputs(size, batch), rho=0.0)
        return (peak.peak + 12 * sum(p.numel() for p in model.parameters())) / 2**30


def account(name: str, size: dict, batch: int, checkpoint: bool = False, **sizes) -> dict:
    """One column of the account: FLOPs, held memory and ops per component (see the module docstring)."""
    real = _build(name, size, False, **{**sizes, "depth": 1})  # FLOPs per image; the backbone's scale with depth
    with torch.no_grad():
        flops = cf.count_flops(real, *_inputs(size, 1)).by_component
    del real
    with FakeTensorMode():  # shapes and dtypes only: paper sizes cost no memory
        model = _build(name, size, checkpoint, **sizes)
        blocks = len(model.blocks)
        acc = Account(model)
        with value_checks(False), torch.autocast("cpu", dtype=torch.bfloat16), acc:
            held = _step(model, *_inputs(size, batch), rho=0.0, acc=acc)
        state = 16 * sum(p.numel() for p in model.parameters())  # fp32 weights, grads and AdamW's two moments
    rows = {}
    for c in COMPONENTS:
        f = sum(v for k, v in flops.items() if FLOP_COMPONENTS.get(k, "other") == c)
        rows[c] = {"train_gflops_per_image": 3 * f * (blocks if c == "backbone" else 1) / 1e9,
                   "held_gib": held[c] / 2**30, "ops_fwd": acc.fwd_ops[c], "ops_bwd": acc.bwd_ops[c]}
    return {"model": name + (CHECKPOINTED if checkpoint else ""), "batch": batch, "components": rows,
            "state_gib": state / 2**30, "held_gib": sum(r["held_gib"] for r in rows.values()),
            "train_gflops_per_image": sum(r["train_gflops_per_image"] for r in rows.values()),
            "ops_fwd": sum(acc.fwd_ops.values()), "ops_bwd": sum(acc.bwd_ops.values())}


class _Partitioned(Exception):
    """Raised by :func:`compiled_held`'s forward compiler once the partition is known, so nothing runs."""


def compiled_held(name: str, size: dict, batch: int, checkpoint: bool = False, budget: float = 1.0,
                  **sizes) -> float:
    """GiB a compiled training step keeps for backward: the tensors that AOT autograd's min-cut partitioner
    (inductor's) saves from the forward graph, parameters excluded, under the activation memory ``budget``
    (:func:`recipes.parallel.with_memory_budget`). Found by tracing alone (bf16 autocast on the CPU, the
    account's plans); the weights are built for real."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    model = _build(name, size, checkpoint, **sizes)
    saved = []

    def forward_compiler(gm, _inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        for node in outputs:
            v = node.meta.get("val") if isinstance(node, torch.fx.Node) and node.op != "placeholder" else None
            if isinstance(v, torch.Tensor):  # a broadcast dimension (stride 0) takes no memory
                saved.append(math.prod(n for n, st in zip(v.shape, v.stride()) if st) * v.element_size())
        raise _Partitioned

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=forward_compiler,
                                     partition_fn=min_cut_rematerialization_partition)

    torch._dynamo.reset()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            compiled = with_memory_budget(torch.compile(model, backend=backend), budget)
            _step(compiled, *_inputs(size, batch), rho=0.0)
    except Exception:  # torch.compile wraps _Partitioned in its own error
        if not saved:
            raise
    finally:
        torch._dynamo.reset()
    return sum(saved) / 2**30


def compile_counts(name: str, checkpoint: bool = False, steps: int = 4) -> dict:
    """Graph breaks and graphs compiled by ``torch.compile`` over ``steps`` training steps of a toy-size model,
    ``rho`` drawn as the recipe's multi-budget training does; host syncs of a forward and backward."""
    import torch._dynamo as dynamo

    size = {"latent": 16, "channels": 4, "classes": 10}
    model = _build(name, size, checkpoint, depth=2, hidden_size=64, num_heads=2)
    x, t, y = _inputs(size, 2)
    graphs = []

    def backend(gm, example_inputs):  # runs the captured graph as it is: only the count matters
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend=backend)
    first = None
    budget = cf.budget.TimestepAdaptiveBudget()
    for step in range(steps):
        _step(compiled, x, t, y, rho=budget.fractions[step % len(budget.fractions)])
        first = len(graphs) if first is None else first
    breaks = sum(dynamo.utils.counters["graph_break"].values())
    dynamo.reset()
    syncs = {}
    for checks in (True, False):
        with value_checks(checks), count_host_syncs() as found:
            _step(model, x, t, y, rho=0.2)
        syncs["host_syncs" if checks else "host_syncs_unchecked"] = found.total
    return {"graph_breaks": breaks, "graphs_first_step": first, "recompiles": len(graphs) - first, **syncs}


ACCOUNT_SIZES = {"256px": ({"latent": 32, "channels": 4, "classes": 1000}, 64, "XL", "XL/2"),
                 "digits": ({"latent": 32, "channels": 1, "classes": 10}, 256, "S", "S/2")}


def run_account(args) -> dict:
    """``--account``: the per-component tables and the compile / host-sync counts."""
    tiny = dict(depth=2, hidden_size=64, num_heads=2) if args.tiny else {}
    results = {}
    for label, (size, batch, dc, dit) in ACCOUNT_SIZES.items():
        batch = 2 if args.tiny else batch
        cols = []
        for name, ck in ((f"DiT-{dit}", False), (f"DC-DiT-{dc}", False), (f"DC-DiT-{dc}", True)):
            cols.append(account(name, size, batch, checkpoint=ck, **tiny))
            cols[-1]["compiled_held_gib"] = compiled_held(name, size, batch, ck, **tiny)
            if not ck:  # what the compiled step keeps under recipes' train.memory_budget
                cols[-1]["compiled_held_budget_gib"] = compiled_held(name, size, batch, budget=MEMORY_BUDGET,
                                                                     **tiny)
            cols[-1]["peak_gib"] = simulated_peak(name, size, batch, ck, **tiny)
        results[label] = cols
        print(f"\n{label}, batch {batch}, bf16 autocast, one training step (fake tensors: nothing is allocated)")
        print("| component | " + " | ".join(c["model"] for c in cols) + " |")
        print("|---|" + "---|" * len(cols))
        for comp in COMPONENTS:
            cells = [c["components"][comp] for c in cols]
            if not any(r["ops_fwd"] + r["ops_bwd"] for r in cells):
                continue
            print(f"| {comp} | " + " | ".join(_cell(r) for r in cells) + " |")
        print("| **total** | " + " | ".join(_cell(c) for c in cols) + " |")
        print("| weights, grads, AdamW | " + " | ".join(f"{c['state_gib']:.2f} GiB" for c in cols) + " |")
        compiled = " | ".join(f"{c['compiled_held_gib']:.2f} GiB" for c in cols)
        print(f"| held for backward, compiled | {compiled} |")
        budgeted = " | ".join(f"{c['compiled_held_budget_gib']:.2f} GiB" if "compiled_held_budget_gib" in c
                              else "-" for c in cols)
        print(f"| held for backward, compiled, memory budget {MEMORY_BUDGET} | {budgeted} |")
        peaks = " | ".join(f"{c['peak_gib']:.2f} GiB" for c in cols)
        print(f"| peak, eager, with weights and AdamW | {peaks} |")
    counts = {}
    for name, checkpoint in (("DiT-S/2", False), ("DC-DiT-S", False), ("DC-DiT-S", True)):
        key = name + (CHECKPOINTED if checkpoint else "")
        counts[key] = compile_counts(name, checkpoint)
    print("\n| toy size, compiled training | graph breaks | graphs, first step | recompiles, 3 more steps "
          "| host syncs fwd+bwd | without value checks |\n|---|---|---|---|---|---|")
    for key, r in counts.items():
        print(f"| {key} | {r['graph_breaks']} | {r['graphs_first_step']} | {r['recompiles']} | {r['host_syncs']} "
              f"| {r['host_syncs_unchecked']} |")
    return save_result("train_speed", "account", "cpu", out=args.out, write=not args.tiny, account=results,
                       compiled=counts)


def _cell(r: dict) -> str:
    """``GFLOPs/img · GiB held · ops fwd+bwd`` of one component."""
    return f"{r['train_gflops_per_image']:.1f} · {r['held_gib']:.2f} · {r['ops_fwd']}+{r['ops_bwd']}"


SIZES = {  # --size: (widths, the account's size of those models, default batch)
    "256": (("B", "XL"), ACCOUNT_SIZES["256px"][0], 64),
    "digits": (("S",), ACCOUNT_SIZES["digits"][0], 256),  # the digit study's models
}


def training_rows(width: str, size: dict, x, t, y, steps: int, *, compile: bool, cuda_graphs: bool,
                  sizes: dict) -> list[dict]:
    """DiT, DC-DiT, DC-DiT with its scaffold and first blocks checkpointed, and DC-DiT's scaffold alone (no
    blocks) of one width: images/s, training GFLOPs per image (3x the forward's) and peak memory of each."""
    rows = []
    variants = [(f"DiT-{width}/2", {}), (f"DC-DiT-{width}", {}),
                (f"DC-DiT-{width}{CHECKPOINTED}", {}), (f"DC-DiT-{width} scaffold only", {"depth": 0})]
    if compile:  # torch.compile's activation memory budget: recipes' train.memory_budget
        variants.insert(3, (f"DC-DiT-{width}{BUDGETED}", {}))
    for label, extra in variants:
        name = label.split(" ")[0]
        ck = label.endswith(CHECKPOINTED)
        model = _build(name, size, ck, fixed=compile, **{**sizes, **extra}).to(x.device)
        # the router keeps every token; eager, a tail drop of 3/4 leaves the budget (fixed mode: the capacity)
        kw = {"rho": 0.75} if model.supports_chunking and not compile else {}
        flops = cf.count_flops(model, x, t, y, **kw).per_sample * 3  # forward + backward
        run = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None) if compile else model
        if label.endswith(BUDGETED):
            run = with_memory_budget(run, MEMORY_BUDGET)
        ips, peak, phases = throughput(run, x, t, y, steps, **kw)
        rows.append({"model": label, "images_per_s": ips, "train_gflops_per_image": flops / 1e9,
                     "peak_gib": peak, **({"memory_gib": phases} if phases else {})})
        del model, run
        if x.is_cuda:
            torch.cuda.empty_cache()
    dit = rows[0]
    for r in rows:
        r["measured_speedup"] = r["images_per_s"] / dit["images_per_s"]
        r["flop_speedup"] = dit["train_gflops_per_image"] / r["train_gflops_per_image"]
        r["ratio"] = r["measured_speedup"] / r["flop_speedup"]  # share of the FLOP-predicted speed-up realised
    dc, scaffold = rows[1], rows[-1]  # the scaffold's share of DC-DiT's step time beside its FLOP share
    dc["scaffold_time_share"] = dc["images_per_s"] / scaffold["images_per_s"]
    dc["scaffold_flop_share"] = scaffold["train_gflops_per_image"] / dc["train_gflops_per_image"]
    return rows


# ---------------------------------------------------------------------- --profile: where the time goes
KINDS = {  # kernel name fragments (lower case) -> kind; the first match wins
    "attention": ("flash", "fmha", "attention", "sdpa"),
    "convolution": ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd"),
    "GEMM": ("gemm", "cutlass", "nvjet", "xmma", "sm90", "sm80", "cublas", "matmul"),
    "generated Triton": ("triton",),
}


# ---------------------------------------------------------------------------------- the step in stages
def dcdit_stages(model, rho: torch.Tensor) -> list:
    """DC-DiT's forward and loss as stages ``(component, fn(values) -> new values, inputs)``: tensors only
    cross a boundary, so each stage compiles and runs backward on its own (``DCDiT.forward``, unrolled)."""
    enc, dec = model.encoder, model.decoder
    grid, capacity, fill = model.grid, model.capacity, model.fill_capacity

    def routed(v):
        return RouterOutput(probs=v["probs"], mask=v["mask"], natural_mask=v["natural"], confidence=v["conf"],
                            grid=grid, batch_size=[v["probs"].shape[0]])

    def plan(v):
        return ChunkPlan(order=v["order"], lengths=v["lengths"], grid=grid, width=capacity, mode="fixed",
                         full=fill, batch_size=[v["order"].shape[0]])

    def route(v):
        r = model.router(v["tokens"], grid, rho=rho)
        return {"probs": r.probs, "mask": r.mask, "natural": r.natural_mask, "conf": r.confidence}

    def pack(v):
        p = ChunkPlan.from_router(routed(v), mode="fixed", capacity=capacity, fill=fill)
        pos = p.take(model.position_table(grid, v["tokens"].device)).to(v["tokens"].dtype)
        return {"order": p.order, "lengths": p.lengths, "h": p.chunk(v["tokens"]) + pos}

    def dechunk(v):
        chunked = Chunked(plan=plan(v), probs=v["probs"], confidence=v["conf"], tokens=v["tokens"],
                          batch_size=[v["probs"].shape[0]])
        return {"z": dec.merge(v["hb"], chunked).to(v["tokens"].dtype)}

    def decode(v):
        h = cf.grid.to_grid(v["z"], grid)
        for block in dec.blocks:
            h = block(h, v["c"])
        return {"out": cf.grid.to_grid(dec.final(dec.norm(cf.grid.to_tokens(h)), v["c"]), grid)}

    return [
        ("conditioning", lambda v: {"c": model.condition(v["t"], v["y"])[1]}, ("t", "y")),
        ("embed", lambda v: {"e": enc.embed(v["x"])}, ("x",)),
        ("encoder", lambda v: {"tokens": _encode(enc, v["e"], v["c"])}, ("e", "c")),
        ("router", route, ("tokens",)),
        ("plan/pack", pack, ("probs", "mask", "natural", "conf", "tokens")),
        ("backbone", lambda v: {"hb": model.norm(model.run_backbone(v["h"], v["c"], plan(v)))},
         ("h", "c", "order", "lengths")),
        ("de-chunk", dechunk, ("hb", "order", "lengths", "probs", "conf", "tokens")),
        ("decoder", decode, ("z", "c")),
        ("loss", lambda v: {"loss": _loss(v["out"]) + 0.03 * model.budget.ratio_loss(routed(v))},
         ("out", "probs", "mask", "natural", "conf")),
    ]


def _encode(enc, h, c):
    for block in enc.blocks:
        h = block(h, c)
    return enc.norm(cf.grid.to_tokens(h))


def dit_stages(model, rho=None) -> list:
    """DiT's forward and loss as stages (see :func:`dcdit_stages`)."""

    def backbone(v):
        h = v["h"]
        for block in model.blocks:
            h = block(h, v["c"])
        return {"hb": h}

    return [
        ("conditioning", lambda v: {"c": model.t_embedder(v["t"]) + model.y_embedder(v["y"], v["t"].shape[0],
                                                                                     v["t"].device)}, ("t", "y")),
        ("embed", lambda v: {"h": model.x_embedder(v["x"]).flatten(2).transpose(1, 2) + model.pos_table.to(
            v["x"].dtype)}, ("x",)),
        ("backbone", backbone, ("h", "c")),
        ("decoder", lambda v: {"out": model.unpatchify(model.final_layer(v["hb"], v["c"]), v["x"].shape[2:])},
         ("hb", "c", "x")),
        ("loss", lambda v: {"loss": _loss(v["out"])}, ("out",)),
    ]


# ------------------------------------------------------------------------------------------- timing
def stage_times(model, stages, values: dict, reps: int, cuda: bool, compile: bool):
    """Yield ``(component, ms)`` per forward + backward of each stage, compiled on its own (``compile``), on the
    step's own inputs."""
    params = list(model.parameters())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    for name, fn, inputs in stages:
        args = {k: values[k].detach().requires_grad_(values[k].requires_grad) for k in inputs}
        with autocast:
            out = fn(args)  # eager: which outputs carry a gradient, and grads of their shape
        grads = {k: torch.randn_like(o) for k, o in out.items() if o.requires_grad}
        run = torch.compile(fn) if compile else fn

        def step():
            res = run(args)
            if grads:
                torch.autograd.backward([res[k] for k in grads], [grads[k] for k in grads])
            for p in params:
                p.grad = None
            for a in args.values():
                a.grad = None

        with autocast:
            yield name, step_ms(step, reps, gpu_clock=cuda)


def run_values(stages, values: dict, cuda: bool) -> dict:
    """Run the stages eagerly, in order, from ``x``, ``t`` and ``y``: every value a stage passes on."""
    values = dict(values)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for _, fn, inputs in stages:
            values.update(fn({k: values[k] for k in inputs}))
    return values


def kernel_profile(step, steps: int) -> dict:
    """Kernels per step, GPU busy time against wall-clock, and GPU time by kind of kernel, over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = step_ms(step, steps, warmup=0, gpu_clock=True) * steps  # warmed up above, outside the profile
    kinds, kernels, count = Counter(), Counter(), 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or "memcpy" in e.name.lower() or "memset" in e.name.lower():
            continue
        count += 1
        kinds[_kind(e.name)] += e.device_time_total / 1e3  # us -> ms
        kernels[e.name[:100]] += e.device_time_total / 1e3
    busy = sum(kinds.values())
    return {"kernels_per_step": count / steps, "busy_ms_per_step": busy / steps, "wall_ms_per_step": wall / steps,
            "busy_fraction": busy / wall, "ms_per_step_by_kind": {k: v / steps for k, v in kinds.most_common()},
            "top_kernels_ms_per_step": {k: v / steps for k, v in kernels.most_common(25)}}


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, frags in KINDS.items() if any(f in low for f in frags)), "other")


class Subject:
    """One model of ``--profile``: built and seeded as the timed rows build theirs, with a step's inputs."""

    def __init__(self, name: str, size: dict, batch: int, tiny: dict, fast: dict | None = None) -> None:
        self.cuda = torch.cuda.is_available()
        device = torch.device("cuda" if self.cuda else "cpu")
        self.name, self.model = name, _build(name, size, False, fast=fast, **tiny).to(device)
        self.x, self.t, self.y = (v.to(device) for v in _inputs(size, batch))
        fractions = cf.budget.TimestepAdaptiveBudget().fractions  # rho: the multi-budget draws, a (B,) tensor
        chunking = self.model.supports_chunking
        self.kw = {"rho": torch.tensor([fractions[i % len(fractions)] for i in range(batch)], device=device)
                   } if chunking else {}
        with torch.no_grad():
            report = cf.count_flops(self.model, self.x, self.t, self.y, **self.kw)
        share = Counter()
        for k, v in report.by_component.items():
            share[FLOP_COMPONENTS.get(k, "other")] += v / report.total
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=self.cuda)
        self.result = {"model": name, "batch": batch, "train_gflops_per_image": 3 * report.per_sample / 1e9,
                       "flop_share": dict(share), "step_ms": {}, "component_ms": {}}

    def whole_step(self, reps: int, mode: str | None = None, profile: bool = False) -> None:
        """Time the whole step compiled (``mode``: torch.compile's), and profile its kernels."""
        key = ("compiled" + (" + CUDA graphs" if mode == "reduce-overhead" else "")) if self.cuda else "eager"
        torch.compiler.reset()
        run = torch.compile(self.model, mode=mode) if self.cuda else self.model
        step = training_step(run, self.opt, self.x, self.t, self.y, **self.kw)
        self.result["step_ms"][key] = ms = step_ms(step, reps, gpu_clock=self.cuda)
        print(f"{self.name}: whole step, {key}: {ms:.2f} ms", flush=True)
        if profile and self.cuda:
            self.result["profile"] = prof = kernel_profile(step, 5)
            print(f"{self.name}: {prof['kernels_per_step']:.0f} kernels per step, GPU busy "
                  f"{prof['busy_fraction']:.0%} of {prof['wall_ms_per_step']:.2f} ms", flush=True)

    def components(self, reps: int) -> None:
        """Time each component on its own (compiled on a GPU) and AdamW's update."""
        model = self.model
        stages = (dcdit_stages if model.supports_chunking else dit_stages)(model, self.kw.get("rho"))
        values = run_values(stages, {"x": self.x, "t": self.t, "y": self.y}, self.cuda)
        times = self.result["component_ms"]
        for name, ms in stage_times(model, stages, values, reps, self.cuda, compile=self.cuda):
            times[name] = times.get(name, 0.0) + ms
            print(f"{self.name}: {name}: {ms:.2f} ms", flush=True)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        times["AdamW"] = step_ms(self.opt.step, reps, gpu_clock=self.cuda)
        self.opt.zero_grad(set_to_none=True)
        self.result["parts_ms"] = sum(times.values())


def run_profile(args) -> dict:
    """``--profile``: each component's time beside its FLOP share, the whole step, the kernel profile."""
    size, batch, dc, dit = ACCOUNT_SIZES["256px" if args.size == "256" else args.size]
    tiny = dict(depth=2, hidden_size=64, num_heads=2) if args.tiny else {}
    size, batch, reps = ({**size, "latent": 16}, 2, 2) if args.tiny else (size, args.batch or batch, args.steps)
    subjects = [Subject(n, size, batch, tiny) for n in (f"DiT-{dit}", f"DC-DiT-{dc}")]
    for s in subjects:  # most telling first: each figure is printed as soon as it is measured
        s.whole_step(reps, profile=True)
    if args.cuda_graphs and subjects[0].cuda:
        for s in subjects:
            s.whole_step(reps, mode="reduce-overhead")
    if not args.no_components:
        for s in reversed(subjects):
            s.components(reps)
    rows = [s.result for s in subjects]
    card = card_name() if subjects[0].cuda else "cpu"
    print_profile(rows, card, args.size, batch)
    return save_result("train_speed", f"profile_{args.size}{_variant(args)}", card, out=args.out,
                       write=not args.tiny, batch=batch, rows=rows)


def print_profile(rows: list[dict], card: str, size: str, batch: int) -> None:
    """``--profile``'s tables: components beside their FLOP share, whole steps, the kernel profile."""
    print(f"\n{card}, torch {torch.__version__}, {size}, batch {batch}, ms per training step"
          + (", each component compiled on its own" if card != "cpu" else ", eager"))
    comps = [c for c in (*COMPONENTS, "AdamW") if any(c in r["component_ms"] for r in rows)]
    if comps:
        print("| component | " + " | ".join(f"{r['model']} ms | time | FLOPs" for r in rows) + " |")
        print("|---|" + "---|---|---|" * len(rows))
        for comp in comps:
            cells = []
            for r in rows:
                ms = r["component_ms"].get(comp)
                cells.append("- | - | -" if ms is None else f"{ms:.2f} | {ms / r['parts_ms']:.1%} | "
                             f"{r['flop_share'].get(comp, 0.0):.1%}")
            print(f"| {comp} | " + " | ".join(cells) + " |")
        print("| **parts' sum** | " + " | ".join(f"{r['parts_ms']:.2f} | | " for r in rows) + " |")
    dit, dc = rows
    predicted = dit["train_gflops_per_image"] / dc["train_gflops_per_image"]
    for key in dit["step_ms"]:
        measured = dit["step_ms"][key] / dc["step_ms"][key]
        print(f"whole step, {key}: DiT {dit['step_ms'][key]:.2f} ms, DC-DiT {dc['step_ms'][key]:.2f} ms: DC-DiT at "
              f"{measured:.2f}x DiT's speed, FLOPs predict {predicted:.2f}x (ratio {measured / predicted:.2f})")
    if "profile" not in dit:
        return
    print("\n| kernel profile, compiled step | " + " | ".join(r["model"] for r in rows) + " |\n|---|---|---|")
    for key in ("kernels_per_step", "busy_ms_per_step", "wall_ms_per_step", "busy_fraction"):
        print(f"| {key} | " + " | ".join(f"{r['profile'][key]:.3g}" for r in rows) + " |")
    for kind in [*KINDS, "other"]:
        print(f"| GPU ms, {kind} | " + " | ".join(
            f"{r['profile']['ms_per_step_by_kind'].get(kind, 0.0):.2f}" for r in rows) + " |")
    for r in rows:
        print(f"\n{r['model']}: the kernels with the most GPU time, ms per step")
        for k, ms in list(r["profile"]["top_kernels_ms_per_step"].items())[:15]:
            print(f"  {ms:7.3f}  {k}")


# ---------------------------------------------------------------------- --ab: the training fast paths, A/B
FAST_PATHS = {  # --ab's DC-DiT variants: _build's fast-path settings
    "plain": {},
    "channels-last": {"channels_last": True},
    "prefix attention": {"prefix": True},
    "channels-last + prefix attention": {"channels_last": True, "prefix": True},
}


def run_ab(args) -> dict:
    """``--ab``: the DiT and the DC-DiT of one width, DC-DiT plain and with each training fast path
    (:data:`FAST_PATHS`), compiled in one process and timed in ``--rounds`` interleaved rounds of ``--steps``
    steps each (every model once a round), so that process and card are the same for all: each one's median
    step time, its speed against the DiT's in the same rounds, and that speed against its FLOP prediction."""
    size, batch, dc, dit = ACCOUNT_SIZES["256px" if args.size == "256" else args.size]
    tiny = dict(depth=2, hidden_size=64, num_heads=2) if args.tiny else {}
    if args.tiny:
        size, batch, reps = {**size, "latent": 16}, 2, 1
    else:
        batch, reps = args.batch or batch, args.steps
    kernels.set_prefix_attention(True)  # process-wide, but only the models patched for it consult it
    subjects = [Subject(f"DiT-{dit}", size, batch, tiny)]
    subjects += [Subject(f"DC-DiT-{dc}", size, batch, tiny, fast=fast) for fast in FAST_PATHS.values()]
    labels = [subjects[0].name] + [f"{subjects[1].name}, {label}" for label in FAST_PATHS]
    cuda = subjects[0].cuda
    steps = [training_step(torch.compile(s.model) if cuda else s.model, s.opt, s.x, s.t, s.y, **s.kw)
             for s in subjects]
    times = [[] for _ in subjects]
    for r in range(args.rounds):
        for i, step in enumerate(steps):
            times[i].append(step_ms(step, reps, warmup=3 if r == 0 else 1, gpu_clock=cuda))
        last = ", ".join(f"{ms[-1]:.2f}" for ms in times)
        print(f"round {r + 1} of {args.rounds}: {last} ms", flush=True)
    dit_ms, dit_flops = times[0], subjects[0].result["train_gflops_per_image"]
    rows = []
    for label, s, ms in zip(labels, subjects, times):
        speed = statistics.median(d / m for d, m in zip(dit_ms, ms))  # against the DiT in the same round
        predicted = dit_flops / s.result["train_gflops_per_image"]
        rows.append({"model": label, "step_ms": statistics.median(ms), "rounds_ms": ms, "speedup": speed,
                     "flop_speedup": predicted, "ratio": speed / predicted,
                     "train_gflops_per_image": s.result["train_gflops_per_image"]})
    card = card_name() if cuda else "cpu"
    print(f"\n{card}, torch {torch.__version__}, {args.size}, batch {batch}, "
          f"{'compiled' if cuda else 'eager'}, median of {args.rounds} rounds of {reps} steps")
    print(f"| model | ms per step | speed-up over {subjects[0].name} | FLOPs predict | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['step_ms']:.2f} | {r['speedup']:.2f}x | {r['flop_speedup']:.2f}x | "
              f"{r['ratio']:.2f} |")
    return save_result("train_speed", f"ab_{args.size}", card, out=args.out, write=not args.tiny, batch=batch,
                       rounds=args.rounds, rows=rows)


# ---------------------------------------------------------------------- --attention: the backbone's attention
ATTENTION_SHAPES = {  # --size: (batch, heads, head dim, DiT tokens, DC-DiT slots, the kept lengths' range)
    "digits": (256, 6, 64, 256, 320, (170, 280)),  # the study's compiled arm: capacity 320, routers keep 17-27%
    "256": (64, 16, 72, 256, 256, (180, 256)),  # XL at 256px, a quarter of the grid
}


def attention_rows(size: str, reps: int, tiny: bool = False) -> list[dict]:
    """One attention layer forward + backward (bf16 on a GPU), ms: DiT's (unmasked, SDPA's choice); DC-DiT's
    key-masked attention as its training step runs it (:func:`chunkformer.attention.masked_sdpa`), and through
    FlexAttention with a block mask from the kept lengths (``kernels.prefix_attention``, compiled)."""
    from chunkformer.attention import masked_sdpa
    from chunkformer.kernels.prefix_attention import prefix_attention

    B, H, D, n_dit, slots, (lo, hi) = ATTENTION_SHAPES[size]
    if tiny:
        B, H, n_dit, slots, lo, hi = 2, 2, 16, 20, 5, 20
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(lo, hi + 1, (B,), generator=g).to(device)
    keep = (torch.arange(slots, device=device) < lengths[:, None])[:, None, None]

    def layer(n, attend):
        q, k, v = (torch.randn(B, H, n, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        grad = torch.randn(B, H, n, D, generator=g).to(device, dtype)
        return lambda: torch.autograd.backward(attend(q, k, v), grad)

    flex = torch.compile(prefix_attention) if cuda else prefix_attention
    variants = [("DiT: unmasked", n_dit, lambda q, k, v: masked_sdpa(q, k, v, None)),
                ("DC-DiT: key mask, SDPA", slots, lambda q, k, v: masked_sdpa(q, k, v, keep)),
                ("DC-DiT: FlexAttention block mask", slots, lambda q, k, v: flex(q, k, v, lengths))]
    if not cuda:  # FlexAttention has no CPU backward: a smoke run times its forward

        def forward_only(q, k, v):
            return flex(q.detach(), k.detach(), v.detach(), lengths).requires_grad_()
        variants[2] = (variants[2][0] + " (forward)", slots, forward_only)
    rows = []
    for label, n, attend in variants:
        ms = step_ms(layer(n, attend), reps, gpu_clock=cuda)
        rows.append({"variant": label, "tokens": n, "ms": ms})
        print(f"{label:<40}{n:>7}{ms:>10.3f}", flush=True)
    return rows


def run_attention(args) -> dict:
    """``--attention``: the backbone's attention layer alone, DiT against DC-DiT's masked variants."""
    B, H, D, *_ = ATTENTION_SHAPES[args.size]
    card = card_name() if torch.cuda.is_available() else "cpu"
    print(f"{card}, torch {torch.__version__}, --size {args.size}: batch {B}, {H} heads of {D}, one attention "
          "layer forward + backward, ms\n" + f"{'variant':<40}{'tokens':>7}{'ms':>10}")
    rows = attention_rows(args.size, 2 if args.tiny else args.steps, tiny=args.tiny)
    return save_result("train_speed", f"attention_{args.size}", card, out=args.out, write=not args.tiny,
                       batch=B, heads=H, head_dim=D, rows=rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=tuple(SIZES), default="256",
                    help="256: B and XL at 256px (32x32x4 latents); digits: S on the digit study's 32x32x1 images")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 at 256px, 256 for digits")
    ap.add_argument("--widths", default=None, help="comma-separated model widths of --size to run (default: all, "
                    "B,XL at 256px, S for digits)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every model; DC-DiT in fixed-capacity mode (capacity L/4, static shapes)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="with --compile: mode='reduce-overhead' (forward and backward replayed from CUDA graphs)")
    ap.add_argument("--profile", action="store_true",
                    help="GPU: each component compiled and timed on its own beside its FLOP share, the whole compiled "
                         "step (with --cuda-graphs also from CUDA graphs) and its kernel profile")
    ap.add_argument("--no-components", action="store_true", help="with --profile: the whole step only")
    ap.add_argument("--prefix-attention", action="store_true",
                    help="DC-DiT's key-masked backbone attention through FlexAttention in compiled training steps "
                         "(chunkformer.kernels.set_prefix_attention), with --compile or --profile")
    ap.add_argument("--channels-last", action="store_true",
                    help="every model's conv weights in channels-last memory format (the scaffold's grids are "
                         "channels-last views of its tokens), with --compile or --profile")
    ap.add_argument("--fill", action="store_true",
                    help="DC-DiT's fixed plans filled to the capacity (fill_capacity=True): every slot "
                         "holds a token, so the backbone's attention needs no key mask; with --compile or "
                         "--profile")
    ap.add_argument("--attention", action="store_true",
                    help="one backbone attention layer, forward + backward: DiT's against DC-DiT's key-masked one "
                         "through SDPA and through FlexAttention (kernels.set_prefix_attention)")
    ap.add_argument("--ab", action="store_true",
                    help="GPU: DiT, and DC-DiT plain and with each training fast path (channels-last, prefix "
                         "attention, both), compiled in one process and timed in interleaved rounds")
    ap.add_argument("--rounds", type=int, default=5, help="with --ab: timing rounds (median)")
    ap.add_argument("--account", action="store_true",
                    help="CPU: FLOPs, held memory and ops per component, graph breaks, recompiles, host syncs")
    ap.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/<name>.json)")
    args = ap.parse_args(argv)
    global _PREFIX_ATTENTION, _CHANNELS_LAST, _FILL
    _PREFIX_ATTENTION, _CHANNELS_LAST, _FILL = args.prefix_attention, args.channels_last, args.fill
    kernels.set_prefix_attention(args.prefix_attention)  # process-wide: off again for a run without the flag
    if args.account:
        return run_account(args)
    if args.batch is not None and args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.profile:
        return run_profile(args)
    if args.ab:
        if args.rounds < 1:
            ap.error(f"--rounds must be >= 1, got {args.rounds}")
        return run_ab(args)
    if args.attention:
        return run_attention(args)
    if args.cuda_graphs and not args.compile:
        ap.error("--cuda-graphs needs --compile (or --profile)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    widths, size, batch = SIZES[args.size]
    if args.widths is not None:
        unknown = set(args.widths.split(",")) - set(widths)
        if unknown:
            ap.error(f"--widths {args.widths}: --size {args.size} has widths {','.join(widths)}")
        widths = tuple(w for w in widths if w in args.widths.split(","))
    batch, steps = (2, 2) if args.tiny else (args.batch or batch, args.steps)
    size = {**size, "latent": 16} if args.tiny else size
    sizes = dict(depth=2, hidden_size=64, num_heads=2) if args.tiny else {}
    x, t, y = (v.to(device) for v in _inputs(size, batch))
    rows = [r for width in widths for r in training_rows(width, size, x, t, y, steps, compile=args.compile,
                                                          cuda_graphs=args.cuda_graphs, sizes=sizes)]
    latent, channels = size["latent"], size["channels"]
    card = card_name() if device.type == "cuda" else "cpu"
    mode = ("torch.compile" + (" + CUDA graphs" if args.cuda_graphs else "") + ", DC-DiT fixed capacity"
            if args.compile else "eager")
    print(f"\n{card}, torch {torch.__version__}, {args.size} ({channels}x{latent}x{latent}), batch {batch}, {mode}, "
          + ("bf16 autocast, " if device.type == "cuda" else "fp32, ") + "fused AdamW")
    print(f"{'model':<44}{'img/s':>9}{'GFLOPs/img':>12}{'speed-up':>10}{'FLOP pred':>10}{'ratio':>7}"
          f"{'peak GiB':>10}")
    for r in rows:
        print(f"{r['model']:<44}{r['images_per_s']:>9.1f}{r['train_gflops_per_image']:>12.2f}"
              f"{r['measured_speedup']:>10.2f}{r['flop_speedup']:>10.2f}{r['ratio']:>7.2f}{r['peak_gib']:>10.2f}")
    if any("memory_gib" in r for r in rows):  # where each step's peak falls
        phases = ("start", "forward peak", "after forward", "backward peak", "after backward", "update peak")
        print(f"\nGiB allocated, one step\n{'model':<44}" + "".join(f"{p:>15}" for p in phases))
        for r in rows:
            print(f"{r['model']:<44}" + "".join(f"{r['memory_gib'][p]:>15.2f}" for p in phases))
    for r in rows:
        if "scaffold_time_share" in r:
            print(f"{r['model']}: the scaffold takes {r['scaffold_time_share']:.1%} of the step's time for "
                  f"{r['scaffold_flop_share']:.1%} of its FLOPs")
    config = f"{latent * 8 if args.size == '256' else args.size}_{'compiled' if args.compile else 'eager'}"
    config += "_cudagraphs" if args.cuda_graphs else ""
    config += _variant(args)
    config += "" if args.widths is None else "_" + "_".join(widths).lower()
    return save_result("train_speed", config, card, out=args.out, write=not args.tiny, batch=batch,
                       compiled=args.compile, cuda_graphs=args.cuda_graphs, rows=rows)


if __name__ == "__main__":
    main()
