"""Feature reconstruction loss (``loss_featrec``; DINOSAUR, Seitzer et al., ICLR 2023)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.losses.base import LOSSES
from core.models.video import FEATURES, RECONSTRUCTION


@LOSSES.register("FeatureReconstruction")
@LOSSES.register("MSELoss")
class FeatureReconstructionLoss(nn.Module):
    """MSE between the decoder's reconstruction and the (detached) encoder features.

    Mean over every element (B, T, P, F); no gradient ever reaches the features.
    """

    def __init__(self, pred_key: str = RECONSTRUCTION, target_key: str = FEATURES) -> None:
        super().__init__()
        self.pred_key, self.target_key = pred_key, target_key

    def forward(self, outputs: dict[str, Any]) -> torch.Tensor:
        """Return the scalar loss for a model output dict."""
        pred, target = outputs[self.pred_key], outputs[self.target_key]
        if pred.shape != target.shape:
            raise ValueError(
                f"reconstruction {tuple(pred.shape)} and features {tuple(target.shape)} differ"
            )
        return F.mse_loss(pred, target.detach())
