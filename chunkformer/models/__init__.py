"""DiT and DC-DiT models, the size registry and checkpoints."""

from .checkpoint import clean_state_dict, load_weights, save_pretrained
from .dcdit import DCDiT
from .dit import DiT, DiTBlock, ForwardInfo
from .registry import MODEL_SIZES, create_model, list_models

__all__ = [
    "DCDiT",
    "DiT",
    "DiTBlock",
    "ForwardInfo",
    "MODEL_SIZES",
    "clean_state_dict",
    "create_model",
    "list_models",
    "load_weights",
    "save_pretrained",
]
