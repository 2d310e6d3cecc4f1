"""Tiny backbones in other projects' layouts, for wrap / interop tests.

Built here from chunkformer's parts under the module names those layouts use (the names
and forward signatures are facts about the layouts; no foreign code is reproduced).
"""

import torch
from einops import rearrange
from torch import nn

import chunkformer as cf
from chunkformer.models.dit import DiTBlock, TimestepEmbedder


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class LabelTable(nn.Module):
    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels, train: bool):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class OutputLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final(x) * (1 + scale[:, None]) + shift[:, None])


class OpaqueAttention(nn.Module):
    """Self-attention whose internals chunkformer does not know (no ``qkv`` / ``num_heads``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.inner = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x, plan=None):
        return self.inner(x, x, x, need_weights=False)[0]


class OriginalLayoutDiT(nn.Module):
    """The original DiT release's module layout and ``forward(x, t, y)``, at toy size."""

    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                 num_classes=10, learn_sigma=True, opaque_attention=False) -> None:
        super().__init__()
        self.in_channels, self.patch_size = in_channels, patch_size
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_heads = num_heads
        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelTable(num_classes, hidden_size, 0.1)
        side = input_size // patch_size
        table = cf.grid.sincos_embed(cf.grid.grid_coords((side, side)), hidden_size)[None]
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads) for _ in range(depth))
        if opaque_attention:
            for block in self.blocks:
                block.attn = OpaqueAttention(hidden_size, num_heads)
        self.final_layer = OutputLayer(hidden_size, patch_size**2 * self.out_channels)
        for p in self.parameters():  # no zero-init anywhere: every path shows in the output
            if p.requires_grad:
                nn.init.normal_(p, std=0.05) if p.ndim > 1 else nn.init.normal_(p, std=0.02)

    def forward(self, x, t, y):
        H = x.shape[-2] // self.patch_size
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        return rearrange(h, "b (h w) (p q c) -> b c (h p) (w q)", h=H, p=self.patch_size, q=self.patch_size)


class TinyCustomBackbone(nn.Module):
    """Not a DiT layout at all: torch encoder layers with an additive conditioning vector."""

    def __init__(self, dim=32, depth=2, num_classes=10) -> None:
        super().__init__()
        self.time = nn.Linear(1, dim)
        self.label = nn.Embedding(num_classes + 1, dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True) for _ in range(depth)
        )


class TinyCustomAdapter(cf.adapters.BackboneAdapter):
    name = "tiny-custom"
    requires = ("layers", "time", "label")

    def __init__(self, model) -> None:
        super().__init__(model, blocks="layers")
        self.time, self.label = model.time, model.label
        self.hidden_size, self.in_channels, self.out_channels, self.grid = 32, 4, 4, (8, 8)
        self.num_classes, self.class_dropout = 10, 0.1

    def condition(self, t, y, label_drop=None):
        y = torch.full_like(t, 10, dtype=torch.long) if y is None else y
        vector = self.time(t.float()[:, None] / 1000) + self.label(y)
        return cf.adapters.Conditioning(vector, t, y)

    def run_block(self, index, h, cond, plan):
        return self.blocks[index](h + cond.vector[:, None])  # (B, M, d): pad slots are real tokens


def tiny_diffusers_dit(seed: int = 0):
    """diffusers' DiTTransformer2DModel from a tiny config (random weights, no download)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05 if p.ndim > 1 else 0.02)
        # converted DiT checkpoints carry one embedder, copied into every block
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    return model


def call(model, x, t, y):
    """One forward in the model's own calling convention."""
    if hasattr(model, "transformer_blocks"):
        return model(x, timestep=t, class_labels=y).sample
    return model(x, t, y)

