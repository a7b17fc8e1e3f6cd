"""Predictors: map the slots of frame t to the initial slots of frame t+1 (ANCHORS 1.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from core.registry import Registry

PREDICTORS = Registry("model.predictor")


class SlotSelfAttention(nn.Module):
    """Multi-head self-attention over slots with the correct 1/sqrt(head_dim) scaling.

    (The reference ``Attention`` multiplies by sqrt(head_dim) instead; this one does not.)
    """

    def __init__(self, dim: int, n_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"predictor dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, D) -> (B, K, D)."""
        q, k, v = rearrange(
            self.qkv(x), "b k (three h d) -> three b h k d", three=3, h=self.n_heads
        )
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj(rearrange(out, "b h k d -> b k (h d)"))


class PreNormBlock(nn.Module):
    """x + Attn(LN(x)); x + FFN(LN(x)), FFN = Linear(D, r*D) -> ReLU -> Linear(r*D, D)."""

    def __init__(self, dim: int, n_heads: int = 4, ffn_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SlotSelfAttention(dim, n_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_ratio * dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_ratio * dim, dim),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, D) -> (B, K, D)."""
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.ffn(self.norm2(x)))


@PREDICTORS.register()
class TransformerPredictor(nn.Module):
    """``n_blocks`` pre-norm transformer blocks over the K slots; permutation-equivariant.

    Args:
        dim: slot width D.
        n_heads: attention heads (D must be divisible by it).
        ffn_ratio: FFN hidden width in multiples of D.
        n_blocks: number of blocks (the reference uses 1).
        dropout: dropout on attention weights and residual branches (train mode only).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int = 4,
        ffn_ratio: int = 4,
        n_blocks: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            PreNormBlock(dim, n_heads, ffn_ratio, dropout) for _ in range(n_blocks)
        )

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, K, D) -> (B, K, D)."""
        for block in self.blocks:
            slots = block(slots)
        return slots


@PREDICTORS.register("Identity")
class IdentityPredictor(nn.Module):
    """No dynamics: frame t+1 starts from the slots of frame t. ``dim`` is accepted and ignored."""

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        """Return ``slots`` unchanged."""
        return slots
