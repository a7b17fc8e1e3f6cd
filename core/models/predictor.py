"""Predictors: map the slots of frame t to the initial slots of frame t+1 (VideoSAUR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from core.models.weight_init import xavier_uniform_chunks
from core.registry import Registry

PREDICTORS = Registry("model.predictor")


ATTENTION_SCALES = ("published", "standard")


class SlotSelfAttention(nn.Module):
    """Multi-head self-attention over slots.

    ``attention_scale``:
      - ``published`` (default): logits = q k^T * sqrt(head_dim). The published SlotContrast /
        VideoSAUR ``Attention`` (martius-lab/slotcontrast@17b42b0 ``modules/networks.py``) sets
        ``scale = head_dim**-0.5`` and then computes ``q / scale``, i.e. it *multiplies* by
        sqrt(head_dim). A bug, but the code behind the published numbers, so it is the default.
      - ``standard``: logits = q k^T / sqrt(head_dim) (Vaswani et al. 2017).

    Initialisation as published: Xavier-uniform q, k, v (as three separate matrices) and output
    projections, zero biases.
    """

    def __init__(
        self, dim: int, n_heads: int = 4, dropout: float = 0.0, attention_scale: str = "published"
    ) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"predictor dim {dim} is not divisible by n_heads {n_heads}")
        if attention_scale not in ATTENTION_SCALES:
            raise ValueError(f"attention_scale {attention_scale!r} is not one of "
                             f"{', '.join(ATTENTION_SCALES)}")
        self.n_heads, self.dropout = n_heads, dropout
        head_dim = dim // n_heads
        self.attention_scale = attention_scale
        self.scale = head_dim**0.5 if attention_scale == "published" else head_dim**-0.5
        self.qkv = xavier_uniform_chunks(nn.Linear(dim, 3 * dim), chunks=3)
        self.proj = xavier_uniform_chunks(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, D) -> (B, K, D)."""
        q, k, v = rearrange(
            self.qkv(x), "b k (three h d) -> three b h k d", three=3, h=self.n_heads
        )
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        return self.proj(rearrange(out, "b h k d -> b k (h d)"))


class PreNormBlock(nn.Module):
    """x + Attn(LN(x)); x + FFN(LN(x)), FFN = Linear(D, r*D) -> ReLU -> Linear(r*D, D)."""

    def __init__(
        self,
        dim: int,
        n_heads: int = 4,
        ffn_ratio: int = 4,
        dropout: float = 0.0,
        attention_scale: str = "published",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SlotSelfAttention(dim, n_heads, dropout, attention_scale)
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
        attention_scale: ``published`` (q k^T * sqrt(head_dim), the published code) or
            ``standard`` (q k^T / sqrt(head_dim)); see :class:`SlotSelfAttention`.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int = 4,
        ffn_ratio: int = 4,
        n_blocks: int = 1,
        dropout: float = 0.0,
        attention_scale: str = "published",
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            PreNormBlock(dim, n_heads, ffn_ratio, dropout, attention_scale)
            for _ in range(n_blocks)
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
