"""Training losses; importing this package registers every loss in ``LOSSES``."""

from core.losses.base import LOSSES
from core.losses.contrast import SlotSlotContrastLoss
from core.losses.reconstruction import FeatureReconstructionLoss

__all__ = ["LOSSES", "FeatureReconstructionLoss", "SlotSlotContrastLoss"]
