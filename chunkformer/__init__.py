"""chunkformer: dynamic chunking for diffusion transformers (DC-DiT).

    import torch, chunkformer as cf
    enc, router = cf.ChunkEncoder(4, dim=64), cf.Router(64)
    dec = cf.DeChunkDecoder(64, out_channels=8)
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 64)
    tokens = enc(x, c)                                  # (2, 256, 64)
    routed = router(tokens, grid=(16, 16))              # RouterOutput
    plan = cf.ChunkPlan.from_router(routed)             # packed by default
    y = plan.chunk(tokens) + plan.position_embedding(64)  # (T, 64): run any backbone here
    assert dec(y, plan, routed, tokens, c).shape == (2, 8, 16, 16)
"""

from ._typing import TYPECHECK, value_checks
from .adapters import BackboneAdapter, Conditioning, UnsupportedModelError, register_adapter
from .attention import chunk_attention
from . import merging, short_attention
from .budget import TimestepAdaptiveBudget, ratio_loss, tail_drop
from .caching import StepCache
from .dechunk import dechunk, smooth_dense, smooth_windowed, ste_ones
from .flops import FlopReport, count_flops, sampling_tflops
from .grid import grid_coords, sincos_embed, to_grid, to_tokens
from .hostsync import count_host_syncs
from .norms import set_norm_kernels
from .models import DCDiT, DiT, create_model, list_models, load_weights, save_pretrained, set_fused_gelu
from .plan import ChunkPlan, nearest_kept
from .precision import set_fp32_router_dechunk
from .routing import Router, RouterOutput
from .scaffold import ChunkEncoder, DeChunkDecoder, FinalLayer, ResBlock
from .short_attention import set_short_attention
from .tapconv import TapConv2d, conv3x3_taps, set_taps_narrowing
from .wrapping import ChunkWrapper, summary, unwrap, wrap

__version__ = "0.1.0"

__all__ = [
    "TYPECHECK",
    "value_checks",
    "count_host_syncs",
    "DCDiT",
    "DiT",
    "create_model",
    "count_flops",
    "sampling_tflops",
    "FlopReport",
    "list_models",
    "load_weights",
    "save_pretrained",
    "ChunkEncoder",
    "ChunkPlan",
    "DeChunkDecoder",
    "FinalLayer",
    "ResBlock",
    "TapConv2d",
    "conv3x3_taps",
    "set_taps_narrowing",
    "set_norm_kernels",
    "Router",
    "RouterOutput",
    "TimestepAdaptiveBudget",
    "chunk_attention",
    "dechunk",
    "grid_coords",
    "nearest_kept",
    "ratio_loss",
    "sincos_embed",
    "smooth_dense",
    "smooth_windowed",
    "ste_ones",
    "tail_drop",
    "to_grid",
    "to_tokens",
    "wrap",
    "unwrap",
    "summary",
    "ChunkWrapper",
    "BackboneAdapter",
    "Conditioning",
    "UnsupportedModelError",
    "register_adapter",
    "merging",
    "short_attention",
    "set_short_attention",
    "set_fused_gelu",
    "StepCache",
    "set_fp32_router_dechunk",
]
