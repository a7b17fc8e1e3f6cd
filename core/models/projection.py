"""Feature projection: maps frozen encoder features (F) to the slot-attention input width."""

from __future__ import annotations

import torch
from torch import nn

from core.models.weight_init import zero_biases
from core.registry import Registry

PROJECTIONS = Registry("model.encoder.output_transform")


@PROJECTIONS.register("MLP")
class FeatureMLP(nn.Module):
    """LayerNorm(F) -> Linear(F, hidden) -> ReLU -> Linear(hidden, outp), zero biases (as the
    published ``two_layer_mlp``).

    Args:
        inp_dim: feature width F of the encoder output.
        outp_dim: output width (the slot-attention input width).
        hidden_dim: hidden width; ``None`` means ``2 * inp_dim`` as in the reference.
        layer_norm: apply the initial LayerNorm (the reference does).
    """

    def __init__(
        self,
        inp_dim: int,
        outp_dim: int,
        hidden_dim: int | None = None,
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        hidden = 2 * inp_dim if hidden_dim is None else hidden_dim
        self.inp_dim, self.outp_dim, self.hidden_dim = inp_dim, outp_dim, hidden
        self.norm: nn.Module = nn.LayerNorm(inp_dim) if layer_norm else nn.Identity()
        self.fc1 = nn.Linear(inp_dim, hidden)
        self.fc2 = nn.Linear(hidden, outp_dim)
        zero_biases(self)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., F) -> (..., outp_dim)."""
        return self.fc2(torch.relu(self.fc1(self.norm(features))))
