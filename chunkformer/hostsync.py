"""Count the operations that make the host wait for the device.

On CUDA a kernel launch returns at once; reading a value back (``.item()``, ``if tensor:``,
a boolean-mask index whose output size depends on the data) blocks the host until the
GPU has caught up, and the launch queue runs dry. ``count_host_syncs`` records every such
operation in a block of code on any device (on the CPU too, where nothing waits), so a
test can hold a hot path to zero without a GPU:

    with value_checks(False), count_host_syncs() as syncs:  # chunkformer._typing.value_checks
        model(x, t, y)                                   # a fixed-capacity DC-DiT
    assert syncs.total == 0, syncs.by_site

What counts: ``aten._local_scalar_dense`` (``.item()``, ``bool()``, ``int()``, ``float()``),
``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``,
``index`` / ``index_put`` with a boolean index, and ``Tensor.tolist`` / ``Tensor.numpy``.
``.cpu()`` / ``.to("cpu")`` are not seen when the tensors already live there; on CUDA
``torch.cuda.set_sync_debug_mode("warn")`` catches those as well.
"""

import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_host_syncs", "HostSyncs"]

_ALWAYS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
           "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default"}
_BOOL_INDEXED = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"}


def _is_sync(func, args, kwargs) -> bool:
    name = str(func)
    if name in _ALWAYS:
        return True
    if name == "aten.repeat_interleave.Tensor" or name == "aten.repeat_interleave.self_Tensor":
        return kwargs.get("output_size") is None
    if name in _BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    return False


@dataclass
class HostSyncs:
    """What :func:`count_host_syncs` saw: ``total`` and a count per ``"op @ file:line"`` site."""

    by_site: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_site.values())


def _site() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "torch/" not in f.filename and f.filename != __file__]
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


class _SyncMode(TorchDispatchMode):
    def __init__(self, record: HostSyncs) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.record.by_site[f"{func} @ {_site()}"] += 1
        return func(*args, **kwargs)


_READBACKS = {torch.Tensor.tolist: "Tensor.tolist", torch.Tensor.numpy: "Tensor.numpy"}


class _ReadbackMode(TorchFunctionMode):
    """``tolist`` / ``numpy`` read the data without an aten op on the CPU: seen one level up."""

    def __init__(self, record: HostSyncs) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READBACKS:
            self.record.by_site[f"{_READBACKS[func]} @ {_site()}"] += 1
        return func(*args, **(kwargs or {}))


class count_host_syncs:
    """Context manager: ``with count_host_syncs() as syncs: ...``, then ``syncs.total`` / ``syncs.by_site``."""

    def __init__(self) -> None:
        self.record = HostSyncs()
        self._modes = (_ReadbackMode(self.record), _SyncMode(self.record))

    def __enter__(self) -> HostSyncs:
        for mode in self._modes:
            mode.__enter__()
        return self.record

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
