"""Decoders: reconstruct the frozen encoder features from slots."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.models.weight_init import zero_biases
from core.registry import Registry

DECODERS = Registry("model.decoder")


@DECODERS.register()
class MLPDecoder(nn.Module):
    """Spatial-broadcast MLP decoder (VideoSAUR / DINOSAUR).

    Each slot is broadcast to the N patch positions, a learned position embedding (1, 1, N, D) is
    added, and an MLP D -> h1 -> ReLU -> ... -> F + 1 decodes every (slot, position) pair. The
    last channel is alpha: ``masks = softmax(alpha over slots)``,
    ``reconstruction = sum_k masks_k * patches_k``.

    With ``split_first_layer`` the first layer is computed as ``(W slot + b) + W pos``: the same
    function as ``Linear(slot + pos)`` with the same parameters (so checkpoints are identical),
    but the slot term is computed per slot (not per slot and patch) and the position term once.

    Args:
        inp_dim: slot width D.
        outp_dim: feature width F to reconstruct.
        hidden_dims: widths of the hidden layers.
        n_patches: number of patch positions N.
        split_first_layer: use the decomposed first layer (an execution choice only).
    """

    def __init__(
        self,
        inp_dim: int,
        outp_dim: int,
        hidden_dims: Sequence[int] = (1024, 1024, 1024),
        n_patches: int = 256,
        split_first_layer: bool = True,
    ) -> None:
        super().__init__()
        self.inp_dim, self.outp_dim, self.n_patches = inp_dim, outp_dim, n_patches
        self.split_first_layer = split_first_layer
        dims = [inp_dim, *hidden_dims, outp_dim + 1]
        self.layers = zero_biases(
            nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        )
        # published initialisation: N(0, 1/D) position embedding, PyTorch-default weights with
        # zero biases (martius-lab/slotcontrast@17b42b0 modules/decoders.py::MLPDecoder)
        self.pos_embed = nn.Parameter(torch.randn(1, 1, n_patches, inp_dim) * inp_dim**-0.5)

    def first_layer(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, K, D) -> (B, K, N, h1): the first Linear applied to slot + position embedding."""
        first = self.layers[0]
        if self.split_first_layer:
            per_slot = F.linear(slots, first.weight, first.bias).unsqueeze(2)  # (B, K, 1, h1)
            return per_slot + F.linear(self.pos_embed, first.weight)  # + (1, 1, N, h1)
        return first(slots.unsqueeze(2) + self.pos_embed)

    def forward(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """slots (B, K, D) -> ``{"reconstruction": (B, N, F), "masks": (B, K, N)}``."""
        h = self.first_layer(slots)
        for layer in self.layers[1:]:
            h = layer(torch.relu(h))
        patches, alpha = h.split((self.outp_dim, 1), dim=-1)
        masks = alpha.softmax(dim=1)  # (B, K, N, 1), over slots
        reconstruction = (patches * masks).sum(dim=1)
        return {"reconstruction": reconstruction, "masks": masks.squeeze(-1)}
