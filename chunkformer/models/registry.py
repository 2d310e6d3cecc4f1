"""Named model sizes and ``create_model``.

    model = create_model("DC-DiT-S", input_size=32, num_classes=10)
    model = create_model("DiT-XL/2")
    model = create_model("runs/my-model")      # a save_pretrained directory
    list_models()                              # ['DC-DiT-B', ..., 'DiT-XL/8']

Sizes (d / heads / depth; DC-DiT scaffold width d/4 with 2 + 2 conv blocks):
S 384/6/12, B 768/12/12, L 1024/16/24, XL 1152/16/28.
"""

import json
from pathlib import Path

from torch import nn

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_weights, verify_manifest
from .dcdit import DCDiT
from .dit import DiT

__all__ = ["create_model", "list_models", "MODEL_SIZES", "MODEL_CLASSES"]

MODEL_SIZES: dict[str, dict] = {
    "S": {"hidden_size": 384, "num_heads": 6, "depth": 12},
    "B": {"hidden_size": 768, "num_heads": 12, "depth": 12},
    "L": {"hidden_size": 1024, "num_heads": 16, "depth": 24},
    "XL": {"hidden_size": 1152, "num_heads": 16, "depth": 28},
}
MODEL_CLASSES: dict[str, type[nn.Module]] = {"DiT": DiT, "DCDiT": DCDiT}

_REGISTRY: dict[str, tuple[type[nn.Module], dict]] = {}
for _size, _shape in MODEL_SIZES.items():
    for _patch in (2, 4, 8):
        _REGISTRY[f"DiT-{_size}/{_patch}"] = (DiT, {**_shape, "patch_size": _patch})
    _REGISTRY[f"DC-DiT-{_size}"] = (DCDiT, dict(_shape))
# the CPU demo's size (recipes' tiny-cpu): 0.4M parameters, a quarter-million-step toy, not a paper size;
# a router this small starts keeping almost nothing and orients under the keep gradient (docs/routing.md)
_REGISTRY["DC-DiT-tiny"] = (DCDiT, {"hidden_size": 64, "num_heads": 4, "depth": 4, "gate_grad": "keep"})


def list_models(pattern: str = "") -> list[str]:
    """Registered model names containing ``pattern``, sorted."""
    return sorted(name for name in _REGISTRY if pattern in name)


def create_model(name: str, *, pretrained: str | Path | None = None, device=None, dtype=None, **overrides) -> nn.Module:
    """Build a registered model (``"DC-DiT-S"``, ``"DiT-XL/2"``, ...) or load a saved one.

    ``name`` may also be a directory written by :func:`~chunkformer.save_pretrained`
    (``config.json`` + ``model.safetensors``). ``overrides`` replace config entries
    (``input_size``, ``in_channels``, ``num_classes``, ``learn_sigma``, ``router``,
    ``target_ratio``, ...). ``pretrained`` loads weights from a file or directory.
    """
    path = Path(name)
    if (path / CONFIG_NAME).is_file():
        verify_manifest(path, [CONFIG_NAME])  # the weights are checked as they load
        config = json.loads((path / CONFIG_NAME).read_text())
        cls = MODEL_CLASSES[config.pop("class")]
        config.update(overrides)
        model = cls(**config, device=device, dtype=dtype)
        if (path / WEIGHTS_NAME).is_file():
            load_weights(model, path / WEIGHTS_NAME)
    else:
        if name not in _REGISTRY:
            close = [n for n in _REGISTRY if name.lower().replace("_", "-") in n.lower()]
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(f"unknown model {name!r}.{hint} Registered: {list_models()}")
        cls, config = _REGISTRY[name]
        try:
            model = cls(**{**config, **overrides}, device=device, dtype=dtype)
        except TypeError as err:
            raise TypeError(f"bad override for {name}: {err}") from None
    if pretrained is not None:
        load_weights(model, pretrained)
    return model
