"""Writing random-weight checkpoints in the exact published DINO format (silicon-menagerie's
dino_say_vitb14.pth: a whole DINO training checkpoint), shared by the encoder and training tests."""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from core.models.menagerie import register_menagerie

FAKE = "dino_test_vitt14"  # a tiny menagerie-style timm model (patch 14 like ViT-B/14)
TINY = dict(patch_size=14, embed_dim=32, depth=2, num_heads=2)
if not timm.is_model(FAKE):
    register_menagerie(FAKE, "teacher", **TINY)


def dino_head_state(dim: int, out_dim: int = 64, bottleneck: int = 16) -> dict[str, torch.Tensor]:
    """DINOHead parameters (3-layer MLP + weight-normed last layer), prefixed ``head.``."""
    return {
        "head.mlp.0.weight": torch.randn(48, dim), "head.mlp.0.bias": torch.randn(48),
        "head.mlp.2.weight": torch.randn(48, 48), "head.mlp.2.bias": torch.randn(48),
        "head.mlp.4.weight": torch.randn(bottleneck, 48),
        "head.mlp.4.bias": torch.randn(bottleneck),
        "head.last_layer.weight_g": torch.ones(out_dim, 1),
        "head.last_layer.weight_v": torch.randn(out_dim, bottleneck),
    }


def write_dino_checkpoint(
    path: Path, vit: VisionTransformer, prefix: str = "backbone.", share_student: bool = False
) -> Path:
    """Save ``vit`` exactly as DINO's main_dino.py does (MultiCropWrapper teacher/student)."""
    sd = vit.state_dict()
    teacher = {prefix + k: v for k, v in sd.items()} | {
        prefix.replace("backbone.", "") + k: v for k, v in dino_head_state(vit.embed_dim).items()
    }
    student = teacher if share_student else {k: v.clone() for k, v in teacher.items()}
    args = argparse.Namespace(arch="vit_base", patch_size=14, out_dim=64, lr=5e-4, epochs=100,
                              data_path="/data/say", output_dir="/out", use_fp16=False)
    torch.save({
        "student": student, "teacher": teacher,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "weight_decay": 0.04,
                                                     "params": [0, 1]}]},
        "it": 1234, "args": args, "dino_loss": {"center": torch.zeros(1, 64)},
    }, path)
    return path


