"""A class-conditional DiT in the original release's module layout, in plain PyTorch (no chunkformer).

The module names and the ``forward(x, t, y)`` signature are those of the original DiT release
(and of forks that keep them, SiT and fast-DiT among them), so its state dict loads their
checkpoints and ``chunkformer.wrap`` drives it through the original-layout (``"dit"``) adapter:

    x_embedder.proj      Conv2d(C, d, P, stride=P): patches -> tokens
    pos_embed            (1, L, d) fixed 2D sin-cos table (a frozen parameter)
    t_embedder.mlp       Linear(256, d), SiLU, Linear(d, d) on sinusoidal timestep features
    y_embedder           embedding_table (num_classes + 1 rows: the last is the dropped label)
    blocks[i]            norm1, attn (qkv, proj, num_heads), norm2, mlp (fc1, fc2),
                         adaLN_modulation (SiLU, Linear(d, 6 d)): adaLN-Zero
    final_layer          norm_final, adaLN_modulation (SiLU, Linear(d, 2 d)), linear -> P*P*out

Written for the examples from the layout's description; the modulation and output projections
start at zero (adaLN-Zero), so an untrained model predicts zeros.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OriginalLayoutDiT"]


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``(n,)`` positions -> ``(n, dim)``: sines then cosines at ``dim / 2`` geometric frequencies."""
    freqs = 10000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_table(side: int, dim: int) -> torch.Tensor:
    """``(side * side, dim)`` table in raster order: the column's features, then the row's."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([_sincos_1d(cols.flatten(), dim // 2), _sincos_1d(rows.flatten(), dim // 2)], dim=1).float()


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """``(B,)`` timesteps -> ``(B, dim)``: cosines then sines at ``dim / 2`` geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def _shift_scale(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, L, d)
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, d)
        return self.mlp(timestep_features(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:  # (B,) -> (B, d)
        if train and self.dropout_prob > 0:
            dropped = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
            labels = labels.masked_fill(dropped, self.num_classes)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and the default ``d_head ** -0.5`` scale."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, L, d)
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Attention and MLP, each on a shifted and scaled LayerNorm of its input and gated by ``c`` (adaLN-Zero)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, L, d), (B, d)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(_shift_scale(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(_shift_scale(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_shift_scale(self.norm_final(x), shift, scale))


class OriginalLayoutDiT(nn.Module):
    """``forward(x (B, C, H, W), t (B,), y (B,)) -> (B, out, H, W)``; ``out = 2 C`` with ``learn_sigma``."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True) -> None:
        super().__init__()
        if input_size % patch_size or hidden_size % 4 or hidden_size % num_heads:
            raise ValueError(f"need input_size % patch_size == 0 and hidden_size divisible by 4 and num_heads, got "
                             f"{input_size}, {patch_size}, {hidden_size}, {num_heads}")
        self.in_channels, self.patch_size, self.num_heads = in_channels, patch_size, num_heads
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        side = input_size // patch_size
        self.pos_embed = nn.Parameter(sincos_2d_table(side, hidden_size)[None], requires_grad=False)
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform linears and patch projection, N(0, 0.02) embeddings, zero biases; the modulation
        and output projections zero (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for linear in self.t_embedder.mlp[0], self.t_embedder.mlp[2]:
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for linear in self.final_layer.adaLN_modulation[-1], self.final_layer.linear:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        P = self.patch_size
        h = self.x_embedder(x) + self.pos_embed  # (B, L, d)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, d)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)  # (B, L, P * P * out)
        h = h.view(B, H // P, W // P, P, P, self.out_channels)
        return h.permute(0, 5, 1, 3, 2, 4).reshape(B, self.out_channels, H, W)

    @classmethod
    def from_state_dict(cls, state: dict, *, num_heads: int | None = None) -> "OriginalLayoutDiT":
        """The model a state dict in this layout describes, with its weights; ``num_heads`` defaults to
        ``hidden_size // 64`` (the released sizes)."""
        w = state["x_embedder.proj.weight"]  # (d, C, P, P)
        hidden, in_channels, P = w.shape[0], w.shape[1], w.shape[2]
        side = math.isqrt(state["pos_embed"].shape[1])
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        out = state["final_layer.linear.weight"].shape[0] // (P * P)
        rows = state["y_embedder.embedding_table.weight"].shape[0]
        model = cls(input_size=side * P, patch_size=P, in_channels=in_channels, hidden_size=hidden, depth=depth,
                    num_heads=num_heads or max(1, hidden // 64), num_classes=rows - 1, class_dropout_prob=0.1,
                    mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden, learn_sigma=out == 2 * in_channels)
        model.load_state_dict(state)
        return model
