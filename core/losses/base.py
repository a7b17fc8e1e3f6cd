"""The loss registry, shared by the loss modules."""

from __future__ import annotations

from core.registry import Registry

LOSSES = Registry("model.losses")
