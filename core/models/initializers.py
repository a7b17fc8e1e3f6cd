"""Slot initializers: the slots frame 0 starts from."""

from __future__ import annotations

import math

import torch
from torch import nn

from core.registry import Registry

INITIALIZERS = Registry("model.initializer")


@INITIALIZERS.register()
class FixedLearnedInit(nn.Module):
    """One learned (1, K, D) parameter, the same for every video.

    Initialised from N(0, D^-1) as in the reference (std ``dim ** -0.5``).
    """

    def __init__(self, n_slots: int, dim: int) -> None:
        super().__init__()
        self.n_slots, self.dim = n_slots, dim
        self.slots = nn.Parameter(torch.randn(1, n_slots, dim) * dim**-0.5)

    def forward(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return (B, K, D): the parameter expanded over the batch (``generator`` is unused)."""
        del generator
        return self.slots.expand(batch_size, -1, -1)


@INITIALIZERS.register()
class RandomInit(nn.Module):
    """Slots sampled per video from a learned diagonal Gaussian N(mean, exp(log_sigma)^2).

    Sampling also happens in eval mode (as in the references): pass a ``torch.Generator``
    (on the parameters' device) for reproducible slots.
    """

    def __init__(self, n_slots: int, dim: int, initial_std: float | None = None) -> None:
        super().__init__()
        self.n_slots, self.dim = n_slots, dim
        std = dim**-0.5 if initial_std is None else initial_std
        self.mean = nn.Parameter(torch.zeros(1, 1, dim))
        self.log_sigma = nn.Parameter(torch.full((1, 1, dim), math.log(std)))

    def forward(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return (B, K, D) fresh samples (reparameterised: gradients reach mean and sigma)."""
        noise = torch.randn(
            batch_size,
            self.n_slots,
            self.dim,
            generator=generator,
            device=self.mean.device,
            dtype=self.mean.dtype,
        )
        return self.mean + noise * self.log_sigma.exp()
