"""Parameter initialisation shared by the trainable modules.

The published SlotContrast / VideoSAUR code (martius-lab/slotcontrast@17b42b0,
``modules/utils.py::init_parameters`` with ``weight_init="default"``) keeps PyTorch's default
weight initialisation of every ``nn.Linear`` in its MLPs but sets their biases to zero; its
predictor attention uses Xavier-uniform projections (see :func:`xavier_uniform_chunks`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def zero_biases(module: nn.Module) -> nn.Module:
    """Set the bias of every ``nn.Linear`` inside ``module`` to zero (weights untouched)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return module


@torch.no_grad()
def xavier_uniform_chunks(linear: nn.Linear, chunks: int = 1) -> nn.Linear:
    """Xavier-uniform weights with the output rows taken as ``chunks`` separate matrices, zero bias.

    A fused q/k/v projection ``Linear(d, 3d)`` is initialised as three ``Linear(d, d)``: bound
    ``sqrt(6 / (fan_out / chunks + fan_in))`` (the published ``Attention.init_parameters``).
    """
    fan_out, fan_in = linear.weight.shape
    bound = math.sqrt(6.0 / (fan_out // chunks + fan_in))
    nn.init.uniform_(linear.weight, -bound, bound)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear
