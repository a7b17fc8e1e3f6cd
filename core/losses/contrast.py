"""Slot-slot temporal contrast (``loss_ss``; Manasyan et al., CVPR 2025, "Temporally Consistent
Object-Centric Learning by Contrasting Slots")."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from core.losses.base import LOSSES
from core.models.video import SLOTS


@LOSSES.register()
class SlotSlotContrastLoss(nn.Module):
    """InfoNCE between the slots of consecutive frames; positive = same slot of the same video.

    Slots (B, T, K, D) are L2-normalised; for every pair (t, t+1) the B*K slots (ordered video
    by video) give ``logits[i, j] = s_t[i] . s_{t+1}[j] / tau``. As in the reference, whose
    ``nn.CrossEntropyLoss`` on a (N, S, S) tensor takes dim 1 as the class dimension, each slot j
    of frame t+1 is classified among the slots i of frame t (softmax over i) with target i = j.
    The loss is the mean over the (T-1) * B * K anchors (= the mean over the T-1 pairs).

    Args:
        temperature: tau (> 0; the config's validation rejects other values before any model is
            built, and the default, 0.1, lives in the config schema alone).
        batch_contrast: negatives from every video in the batch (True, the paper's setting) or
            only from the anchor's own video (other videos' logits are masked with -inf).
        key: output key holding the slot-attention slots (B, T, K, D).
    """

    def __init__(
        self, temperature: float, batch_contrast: bool = True, key: str = SLOTS
    ) -> None:
        super().__init__()
        self.temperature, self.batch_contrast, self.key = temperature, batch_contrast, key

    def forward(self, outputs: dict[str, Any]) -> torch.Tensor:
        """Return the scalar loss for a model output dict (uses ``outputs[key]``)."""
        slots = outputs[self.key]
        if slots.ndim != 4:
            raise ValueError(f"slots must be (B, T, K, D), got {tuple(slots.shape)}")
        B, T, K, _ = slots.shape
        if T < 2:
            raise ValueError(
                f"SlotSlotContrastLoss (loss_ss) contrasts consecutive frames and needs clips of "
                f"at least 2 frames (ep_length >= 2), got T={T}"
            )
        s = rearrange(F.normalize(slots, p=2.0, dim=-1), "b t k d -> t (b k) d")
        # logits[t, j, i] = s_{t+1}[j] . s_t[i]: rows are anchors at t+1, classes the slots at t.
        logits = torch.bmm(s[1:], s[:-1].transpose(1, 2)) / self.temperature
        if not self.batch_contrast:
            video = torch.arange(B, device=slots.device).repeat_interleave(K)
            other = video[:, None] != video[None, :]
            logits = logits.masked_fill(other, float("-inf"))
        targets = torch.arange(B * K, device=slots.device).repeat(T - 1)
        return F.cross_entropy(logits.flatten(0, 1), targets)
