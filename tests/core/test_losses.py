"""Tests for core.losses against brute-force loops and the reference formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError
from core.losses import LOSSES, FeatureReconstructionLoss, SlotSlotContrastLoss

B, T, K, D = 3, 4, 5, 8


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def brute_force_ss(slots: torch.Tensor, tau: float, batch_contrast: bool) -> float:
    """Python loops: each slot (b, k) of frame t+1 picks its match among the slots of frame t."""
    s = F.normalize(slots.double(), dim=-1)
    n_b, n_t, n_k, _ = s.shape
    total, count = 0.0, 0
    for t in range(n_t - 1):
        for b in range(n_b):
            for k in range(n_k):
                anchor = s[b, t + 1, k]
                videos = range(n_b) if batch_contrast else [b]
                logits = [float(anchor @ s[c, t, j]) / tau for c in videos for j in range(n_k)]
                positive = float(anchor @ s[b, t, k]) / tau
                total += -(positive - math.log(sum(math.exp(x) for x in logits)))
                count += 1
    return total / count


def reference_ss(slots: torch.Tensor, tau: float, batch_contrast: bool) -> torch.Tensor:
    """martius-lab/slotcontrast ``Slot_Slot_Contrastive_Loss.forward``, restated."""
    slots = F.normalize(slots, p=2.0, dim=-1)
    if batch_contrast:
        slots = torch.cat(slots.split(1), dim=-2)
    ss = slots[:, :-1] @ slots[:, 1:].transpose(-2, -1) / tau
    n, t, s, _ = ss.shape
    ss = ss.reshape(n * t, s, s)
    return nn.CrossEntropyLoss()(ss, torch.eye(s).expand(n * t, s, s))


@pytest.mark.parametrize("batch_contrast", [True, False])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ss_matches_brute_force_and_reference(batch_contrast: bool, tau: float) -> None:
    slots = torch.randn(B, T, K, D)
    loss = SlotSlotContrastLoss(temperature=tau, batch_contrast=batch_contrast)
    value = loss({"slots": slots})
    assert value.ndim == 0
    assert value.item() == pytest.approx(brute_force_ss(slots, tau, batch_contrast), abs=1e-5)
    torch.testing.assert_close(value, reference_ss(slots, tau, batch_contrast))


def test_batch_contrast_adds_negatives() -> None:
    slots = torch.randn(B, T, K, D)
    with_batch = SlotSlotContrastLoss(temperature=0.1, batch_contrast=True)({"slots": slots})
    within = SlotSlotContrastLoss(temperature=0.1, batch_contrast=False)({"slots": slots})
    assert with_batch > within  # more negatives in every denominator


def test_consistent_slots_beat_permuted_slots() -> None:
    base = torch.randn(B, 1, K, D).expand(B, T, K, D)
    consistent = base + 0.01 * torch.randn(B, T, K, D)
    shuffled = torch.stack([consistent[:, t, torch.randperm(K)] for t in range(T)], dim=1)
    shuffled[:, 1] = consistent[:, 1].roll(1, dims=1)  # make sure frame 1 really changed
    loss = SlotSlotContrastLoss(temperature=0.1)
    assert loss({"slots": consistent}) < 0.1
    assert loss({"slots": consistent}) < loss({"slots": shuffled}) - 1.0


def test_temperature_scaling() -> None:
    base = torch.randn(B, 1, K, D).expand(B, T, K, D)
    values = [
        SlotSlotContrastLoss(temperature=tau)({"slots": base}).item() for tau in (0.05, 0.1, 1.0)
    ]
    assert values[0] < values[1] < values[2]  # perfectly consistent: sharper is better
    random = torch.randn(B, T, K, D)
    hot = SlotSlotContrastLoss(temperature=1e6)({"slots": random}).item()
    assert hot == pytest.approx(math.log(B * K), abs=1e-4)  # uniform over all B*K candidates
    hot_within = SlotSlotContrastLoss(temperature=1e6, batch_contrast=False)({"slots": random})
    assert hot_within.item() == pytest.approx(math.log(K), abs=1e-4)


def test_ss_needs_two_frames() -> None:
    with pytest.raises(ValueError, match="ep_length >= 2"):
        SlotSlotContrastLoss(temperature=0.1)({"slots": torch.randn(B, 1, K, D)})


def test_ss_gradient_reaches_slots() -> None:
    slots = torch.randn(B, T, K, D, requires_grad=True)
    SlotSlotContrastLoss(temperature=0.1)({"slots": slots}).backward()
    assert slots.grad is not None and slots.grad.abs().sum() > 0


def test_feature_reconstruction_is_mse_without_feature_grad() -> None:
    recon = torch.randn(B, T, 16, D, requires_grad=True)
    feats = torch.randn(B, T, 16, D, requires_grad=True)
    loss = FeatureReconstructionLoss()({"reconstruction": recon, "features": feats})
    torch.testing.assert_close(loss, F.mse_loss(recon, feats))
    loss.backward()
    assert feats.grad is None and recon.grad is not None
    with pytest.raises(ValueError, match="differ"):
        FeatureReconstructionLoss()({"reconstruction": recon, "features": feats[:, :1]})


def test_loss_registry() -> None:
    assert {"MSELoss", "FeatureReconstruction", "SlotSlotContrastLoss"} <= set(LOSSES.names)
    assert isinstance(LOSSES.build("MSELoss"), FeatureReconstructionLoss)
    assert isinstance(LOSSES.build("FeatureReconstruction"), FeatureReconstructionLoss)
    ss = LOSSES.build("SlotSlotContrastLoss", temperature=0.2, batch_contrast=False)
    assert ss.temperature == 0.2 and not ss.batch_contrast
    with pytest.raises(ConfigError, match="valid: FeatureReconstruction, MSELoss"):
        LOSSES.build("SlotContrast")
