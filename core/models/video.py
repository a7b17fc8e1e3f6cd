"""The whole video model: frozen encoder -> projection -> slot attention over time -> decoder."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.names import FEATURES_KEY, VIDEO_KEY

# Batch keys (inputs).
VIDEO = VIDEO_KEY  # (B, T, 3, H, W)
# Output keys (FEATURES is also the input key for precomputed features).
FEATURES = FEATURES_KEY  # (B, T, P, F) encoder output, detached
SLOTS = "slots"  # (B, T, K, D) slot-attention output
PREDICTED_SLOTS = "predicted_slots"  # (B, T, K, D) initial slots of each frame
ATTN_MASKS = "attn_masks"  # (B, T, K, P) slot-attention masks (sum to 1 over K)
DECODER_MASKS = "decoder_masks"  # (B, T, K, P) decoder alpha masks (sum to 1 over K)
RECONSTRUCTION = "reconstruction"  # (B, T, P, F)
OUTPUT_KEYS = (FEATURES, SLOTS, PREDICTED_SLOTS, ATTN_MASKS, DECODER_MASKS, RECONSTRUCTION)


class SlotVideoModel(nn.Module):
    """VideoSAUR / SlotContrast: per-frame slot attention whose initial slots come from a predictor.

    Frame 0 starts from ``initializer(B)`` and runs ``n_iters_first`` iterations; frame t > 0
    starts from ``predictor(slots[t-1])`` and runs ``n_iters``. The decoder runs on all frames
    at once (B*T).

    Args:
        encoder: maps images (N, 3, H, W) to features (N, P, F); freezing (no_grad, eval) is the
            encoder's own business. May be ``None`` when batches carry precomputed ``features``.
        projection: (..., F) -> (..., Din).
        initializer: ``initializer(batch_size, generator=...)`` -> (B, K, D).
        grouper: ``grouper(inputs (B, P, Din), slots (B, K, D), n_iters=...)`` -> dict with
            ``"slots"`` (B, K, D) and ``"masks"`` (B, K, P).
        predictor: (B, K, D) -> (B, K, D).
        decoder: slots (N, K, D) -> dict with ``"reconstruction"`` (N, P, F), ``"masks"``.
        n_iters: iterations on frames t > 0; ``None`` -> the grouper's default.
        n_iters_first: iterations on frame 0; ``None`` -> ``grouper.n_iters_first`` if it has one.
        gradient_checkpointing: recompute the decoder in the backward pass (saves memory).
    """

    def __init__(
        self,
        encoder: nn.Module | None,
        projection: nn.Module,
        initializer: nn.Module,
        grouper: nn.Module,
        predictor: nn.Module,
        decoder: nn.Module,
        n_iters: int | None = None,
        n_iters_first: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = projection
        self.initializer = initializer
        self.grouper = grouper
        self.predictor = predictor
        self.decoder = decoder
        self.n_iters = n_iters
        self.n_iters_first = n_iters_first
        self.gradient_checkpointing = gradient_checkpointing

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        """Return features (B, T, P, F): ``batch["features"]`` if given, else the encoder's."""
        if batch.get(FEATURES) is not None:
            features = batch[FEATURES]
            if features.ndim != 4:
                raise ValueError(f"features must be (B, T, P, F), got {tuple(features.shape)}")
            if features.dtype in (torch.bfloat16, torch.float16):  # a feature cache's storage
                features = features.float()
            return features
        video = batch.get(VIDEO)
        if video is None:
            raise ValueError(f"batch needs {VIDEO!r} (B, T, 3, H, W) or {FEATURES!r} (B, T, P, F)")
        if self.encoder is None:
            raise ValueError("this model has no encoder: pass precomputed features instead")
        if video.ndim != 5:
            raise ValueError(f"video must be (B, T, 3, H, W), got {tuple(video.shape)}")
        B, T = video.shape[:2]
        return self.encoder(video.flatten(0, 1)).unflatten(0, (B, T))

    def decode(self, slots: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the decoder on (N, K, D) slots, checkpointed if configured and grad is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.decoder, slots, use_reentrant=False)
        return self.decoder(slots)

    def forward(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the model on a batch; returns a dict with the ``OUTPUT_KEYS`` (shapes above).

        ``generator`` is passed to the initializer (reproducible ``RandomInit`` samples).
        """
        features = self.encode(batch)
        B, T = features.shape[:2]
        projected = self.projection(features)
        n_first = self.n_iters_first
        if n_first is None:
            n_first = getattr(self.grouper, "n_iters_first", None)
        init = self.initializer(B, generator=generator)
        slots, inits, masks = [], [], []
        for t in range(T):
            if t > 0:
                init = self.predictor(slots[-1])
            out = self.grouper(projected[:, t], init, n_iters=n_first if t == 0 else self.n_iters)
            inits.append(init)
            slots.append(out["slots"])
            masks.append(out["masks"])
        all_slots = torch.stack(slots, dim=1)
        decoded = self.decode(all_slots.flatten(0, 1))
        return {
            FEATURES: features.detach(),
            SLOTS: all_slots,
            PREDICTED_SLOTS: torch.stack(inits, dim=1),
            ATTN_MASKS: torch.stack(masks, dim=1),
            DECODER_MASKS: decoded["masks"].unflatten(0, (B, T)),
            RECONSTRUCTION: decoded["reconstruction"].unflatten(0, (B, T)),
        }
