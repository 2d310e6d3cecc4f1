"""Processes, devices and model wrapping for the recipes: one place owns DDP / FSDP2 / compile.

A plain ``python -m recipes.train`` runs one process (no launcher needed); under
``torchrun`` every process joins the group (NCCL on CUDA, gloo on CPU).
"""

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Dist", "init_distributed", "parallelize", "with_memory_budget", "unwrap", "barrier",
           "all_reduce_mean", "full_tensors", "model_state", "optimizer_state", "load_training_state"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed() -> Dist:
    """Join the process group if launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def parallelize(model: nn.Module, d: Dist, *, parallel: str = "ddp", compile: bool = False,
                memory_budget: float = 1.0) -> nn.Module:
    """Compile (optional) and wrap for data parallelism: ``"ddp"`` or ``"fsdp"`` (FSDP2, per block).
    ``memory_budget`` < 1 (with ``compile``): see :func:`with_memory_budget`."""
    if memory_budget != 1 and not compile:
        raise ValueError(f"memory_budget={memory_budget} applies to a compiled model: pass compile=True")
    if compile:
        model = with_memory_budget(torch.compile(model), memory_budget)
    if not d.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        inner = getattr(model, "_orig_mod", model)
        for block in inner.blocks:
            fully_shard(block)
        fully_shard(inner)
        return model
    if parallel != "ddp":
        raise ValueError(f"train.parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.local_rank] if d.device.type == "cuda" else None
    # position tables (DiT's and DC-DiT's `pos_table`) are a function of the config, equal on every rank: when
    # they are the only buffers, broadcasting them before each forward would be a collective for nothing
    tables_only = all(name.rsplit(".", 1)[-1] == "pos_table" for name, _ in model.named_buffers())
    # torch >= 2.13 names the per-forward sync `forward_sync_buffers` (`broadcast_buffers` is deprecated there);
    # either way the tables are still synced once at construction, which is harmless
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=ids, **{sync: not tables_only})


def with_memory_budget(compiled: nn.Module, budget: float) -> nn.Module:
    """``compiled`` (what ``torch.compile`` returned) with its training graphs partitioned under an activation
    memory budget: each forward graph keeps at most about ``budget`` (0 < budget <= 1) of the activations the
    default partition keeps for backward and recomputes the rest there, the cheapest by FLOPs first (pointwise
    and normalisation ops before any matmul). This is ``torch._functorch.config.activation_memory_budget``,
    set only while ``compiled`` runs a forward, where its graphs are traced and partitioned. The gradients are
    the same. ``budget`` = 1 returns ``compiled`` as it is."""
    if not 0 < budget <= 1:
        raise ValueError(f"memory_budget={budget}: a share of the activations, 0 < budget <= 1")
    if budget == 1:
        return compiled
    from torch._functorch import config

    patches = []

    def enter(module, args):
        patches.append(config.patch(activation_memory_budget=budget))
        patches[-1].__enter__()

    def leave(module, args, out):
        patches.pop().__exit__(None, None, None)

    compiled.register_forward_pre_hook(enter)
    compiled.register_forward_hook(leave, always_call=True)
    return compiled


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world
    return value


# ---------------------------------------------------------------------------- FSDP2-aware state
def _sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole tensors (all-gathered from FSDP2 shards where needed), e.g. for the EMA update."""
    from torch.distributed.tensor import DTensor

    return [t.full_tensor() if isinstance(t, DTensor) else t for t in tensors]


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module) -> dict:
    """A full, unsharded state dict (a collective under FSDP2: call it on every rank)."""
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_options())
    return unwrap(model).state_dict()


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """A full optimizer state dict (a collective under FSDP2: call it on every rank)."""
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=_options())
    return opt.state_dict()


def load_training_state(model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict, opt_sd: dict) -> None:
    """Load full state dicts into a (possibly FSDP2-sharded) model and its optimizer."""
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=options)
        set_optimizer_state_dict(model, opt, opt_sd, options=options)
        return
    unwrap(model).load_state_dict(model_sd)
    opt.load_state_dict(opt_sd)
