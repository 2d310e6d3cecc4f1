"""chunkformer: dynamic chunking for diffusion transformers (DC-DiT).

    import torch, chunkformer as cf
    enc, router = cf.ChunkEncoder(4, dim=64), cf.Router(64)
    dec = cf.DeChunkDecoder(64, out_channels=8)
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 64)
    tokens = enc(x, c)                                  # (2, 256, 64)
    routed = router(tokens, grid=(16, 16))              # RouterOutput
    chunked = cf.Chunked.from_router(routed, tokens)    # the plan (packed by default) and what de-chunking needs
    plan = chunked.plan
    y = plan.chunk(tokens) + plan.position_embedding(64)  # (T, 64): run any backbone here
    assert dec(y, chunked, c).shape == (2, 8, 16, 16)

The top level holds the components, the models and their registry, ``wrap``, token merging, step
caching and the FLOP count; everything else is importable from its submodule (``chunkformer.grid``,
``chunkformer.budget``, ``chunkformer.dechunk``, ...). GPU fast paths for sampling live in
:mod:`chunkformer.kernels` (``kernels.apply(model)``).
"""

from . import merging
from .attention import chunk_attention
from .budget import TimestepAdaptiveBudget
from .caching import StepCache
from .dechunk import Chunked
from .flops import count_flops
from .models import DCDiT, DiT, create_model, list_models, load_weights, save_pretrained
from .plan import ChunkPlan
from .routing import Router, RouterOutput
from .scaffold import ChunkEncoder, DeChunkDecoder
from .wrapping import summary, unwrap, wrap

__version__ = "0.1.0"

__all__ = [
    "Router",
    "RouterOutput",
    "ChunkEncoder",
    "DeChunkDecoder",
    "ChunkPlan",
    "Chunked",
    "TimestepAdaptiveBudget",
    "chunk_attention",
    "DCDiT",
    "DiT",
    "create_model",
    "list_models",
    "load_weights",
    "save_pretrained",
    "wrap",
    "unwrap",
    "summary",
    "merging",
    "StepCache",
    "count_flops",
]
