"""Frozen (or fine-tuned) ViT encoder: silicon-menagerie DINO/Mugs/MAE checkpoints or timm models.

Features are the output of one block (the last by default) BEFORE the final norm, prefix tokens
(CLS, registers) dropped, via timm's ``forward_intermediates``. Every backbone is built by
``timm.create_model`` (silicon-menagerie names are registered with timm in
:mod:`core.models.menagerie`); checkpoint files are only ever read from disk; nothing here
downloads except timm's own weights of a timm model named without a file.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import build_sincos2d_pos_embed
from timm.models import load_checkpoint
from torch import Tensor, nn

from core.errors import ConfigError
from core.models.menagerie import (
    backbone_filter,
    checkpoint_entry,
    checkpoint_file,
    read_checkpoint,
    short_error,
    weights_entry,
)
from core.registry import Registry

ENCODERS = Registry("model.encoder.backbone")
# model=vit: timm's ViT-B/16 architecture, whose arguments are VisionTransformer's defaults.
PLAIN_VIT = "vit_base_patch16_224"


def _timm_name(model: str, pretrained: bool) -> str:
    """The timm model to build for ``model``; ConfigError for an unknown name."""
    if model == "vit":
        if pretrained:
            raise ConfigError(
                "model.encoder.backbone.model=vit is a plain random-init ViT: set "
                "model.encoder.backbone.weights=random or name a pretrained model"
            )
        return PLAIN_VIT
    if not timm.is_model(model):
        hits = timm.list_models(f"*{max(model.split('_'), key=len)}*")
        close = difflib.get_close_matches(model, hits or timm.list_models(), n=3, cutoff=0.4)
        close = close or hits[:3]
        raise ConfigError(
            f"unknown encoder model {model!r}: not a silicon-menagerie name nor a timm model "
            f"(close timm names: {', '.join(close) or 'none'}); menagerie names look like "
            "dino_say_vitb14"
        )
    return model


def create_vit(model: str, pretrained: bool, checkpoint: str | Path | None, img_size: int,
               overrides: dict[str, Any]) -> tuple[nn.Module, Path | None]:
    """``timm.create_model`` for the encoder: (the ViT without head, the weights file or None).

    A silicon-menagerie model's file (:func:`core.models.menagerie.checkpoint_file`) is loaded
    by timm itself (``pretrained_cfg_overlay=dict(file=...)``). A timm model with a ``checkpoint``
    file gets it after building, through ``timm.models.load_checkpoint`` with the same strict
    filter (:func:`core.models.menagerie.backbone_filter`); without one, timm's own pretrained
    weights. The file is read first (memory-mapped), so a bad file fails before a big ViT is built.
    """
    name = _timm_name(model, pretrained)
    entry = weights_entry(name)
    path = checkpoint_file(name, checkpoint) if pretrained else None
    if path is not None:
        checkpoint_entry(read_checkpoint(path), path, entry)
    after = path is not None and entry is None  # a timm model's file: loaded once built
    overlay = dict(file=str(path)) if path is not None and entry is not None else None
    try:
        vit = timm.create_model(name, pretrained=pretrained and not after,
                                pretrained_cfg_overlay=overlay, num_classes=0, img_size=img_size,
                                **overrides)
    except TypeError as exc:
        raise ConfigError(f"timm model {name} cannot be built as a ViT encoder: {exc}") from None
    except ConfigError:
        raise
    except Exception as exc:
        if not pretrained or path is not None:
            raise
        raise ConfigError(
            f"pretrained weights for timm model {name} could not be loaded ({short_error(exc)}; "
            "no network?): pass model.encoder.backbone.checkpoint=PATH or set "
            "model.encoder.backbone.weights=random"
        ) from None
    if after:
        load_checkpoint(vit, str(path), use_ema=False, strict=True,
                        filter_fn=partial(backbone_filter, path=path))
    return vit, path


@ENCODERS.register()
class TimmEncoder(nn.Module):
    """ViT feature extractor: (N, 3, H, W) -> (N, n_patches, feat_dim).

    Args:
        model: a silicon-menagerie name (``dino_say_vitb14``...), a timm model name, or ``"vit"``
            (a plain timm VisionTransformer from ``vit_overrides``; random weights only).
        frozen: no grads, no_grad forward, and the ViT pinned in eval() whatever train() says.
        weights: ``"pretrained"`` (load from ``checkpoint`` / the local hub cache) or ``"random"``.
        checkpoint: checkpoint file or directory, see
            :func:`core.models.menagerie.resolve_checkpoint` (a timm model: the file itself).
        img_size: input side in pixels; checkpoints' position embeddings are resampled to it
            (by timm's ViT checkpoint filter).
        layer: 0-based block whose output is taken (negative counts from the end); ``None`` = last.
        gradient_checkpointing: timm grad checkpointing for fine-tuning.
        sincos_pos_embed: random weights only. 0 keeps timm's position embedding (truncated
            normal, std 0.02); a value ``s > 0`` replaces it by the fixed 2-D sine-cosine
            embedding of MAE (He et al. 2022; ``timm.layers.build_sincos2d_pos_embed``) times
            ``s``. A trained ViT's patch features say where each patch is; a random ViT's,
            whose patch tokens are ~40x larger than timm's initial position embedding, barely
            do (:func:`core.baselines.position_r2`), and slots made of them cannot say where
            their object is.
        **vit_overrides: extra VisionTransformer / timm.create_model kwargs (depth, embed_dim...).
    """

    def __init__(
        self,
        model: str,
        frozen: bool = True,
        weights: str = "pretrained",
        checkpoint: str | None = None,
        img_size: int = 224,
        layer: int | None = None,
        gradient_checkpointing: bool = False,
        sincos_pos_embed: float = 0.0,
        **vit_overrides: Any,
    ) -> None:
        super().__init__()
        if weights not in ("pretrained", "random"):
            raise ConfigError(f"model.encoder.backbone.weights={weights!r}: use pretrained|random")
        if sincos_pos_embed and weights != "random":
            raise ConfigError(
                "model.encoder.backbone.sincos_pos_embed replaces a random ViT's position "
                "embedding: it needs model.encoder.backbone.weights=random (a pretrained ViT "
                "keeps its own)"
            )
        if sincos_pos_embed < 0:
            raise ConfigError(
                f"model.encoder.backbone.sincos_pos_embed must be >= 0, got {sincos_pos_embed}"
            )
        self.model_name, self.frozen = model, frozen
        self.vit, self.checkpoint_path = create_vit(model, weights == "pretrained", checkpoint,
                                                    img_size, vit_overrides)
        # loading is strict: every tensor of the ViT came from the file
        self.loaded_tensors = len(self.vit.state_dict()) if self.checkpoint_path else 0
        for attr in ("forward_intermediates", "patch_embed", "blocks", "num_prefix_tokens"):
            if not hasattr(self.vit, attr):
                raise ConfigError(f"encoder model {model} is not a ViT (no {attr})")
        depth = len(self.vit.blocks)
        index = depth - 1 if layer is None else layer
        if not -depth <= index < depth:
            raise ConfigError(f"model.encoder.backbone.layer={layer}: the ViT has {depth} blocks")
        self.layer_index = index % depth
        if sincos_pos_embed:
            self._set_sincos_pos_embed(sincos_pos_embed)
        if gradient_checkpointing:
            self.vit.set_grad_checkpointing(True)
        if frozen:
            self.vit.requires_grad_(False)
        self.train(self.training)

    @torch.no_grad()
    def _set_sincos_pos_embed(self, scale: float) -> None:
        """pos_embed <- scale * 2-D sine-cosine embedding of the patch grid (prefix tokens: 0)."""
        vit = self.vit
        if getattr(vit, "pos_embed", None) is None:
            raise ConfigError(f"encoder model {self.model_name} has no position embedding to set")
        grid = build_sincos2d_pos_embed(list(self.grid_size), vit.embed_dim)  # (P, F)
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = torch.zeros_like(vit.pos_embed)
        pos[:, prefix:] = scale * grid.to(pos.dtype)
        vit.pos_embed.copy_(pos)

    @property
    def feat_dim(self) -> int:
        """Feature width F (the ViT's embed_dim)."""
        return int(self.vit.embed_dim)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) at ``img_size``."""
        return tuple(int(s) for s in self.vit.patch_embed.grid_size)  # type: ignore[return-value]

    @property
    def n_patches(self) -> int:
        """Number of output tokens per image (prefix tokens excluded)."""
        return math.prod(self.grid_size)

    @property
    def patch_size(self) -> int:
        """Patch side in pixels."""
        return int(self.vit.patch_embed.patch_size[0])

    def train(self, mode: bool = True) -> TimmEncoder:
        """Set train/eval mode; a frozen encoder's ViT always stays in eval()."""
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def _features(self, images: Tensor) -> Tensor:
        (feats,) = self.vit.forward_intermediates(
            images, indices=[self.layer_index], norm=False, output_fmt="NLC",
            intermediates_only=True, stop_early=True,
        )
        return feats

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, n_patches, feat_dim): block output before final norm, no CLS."""
        if not self.frozen:
            return self._features(images)
        if self.vit.training:
            self.vit.eval()
        with torch.no_grad():
            return self._features(images)

    def weights_hash(self) -> str:
        """Short sha256 over the ViT's state dict (names, dtypes, shapes, bytes): a cache key."""
        h = hashlib.sha256()
        for name, t in sorted(self.vit.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


def normalization_of(backbone: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the frames of a configured backbone (``model.encoder.backbone``) are
    normalised with: its pretrained statistics, or ImageNet's for random weights."""
    return backbone_normalization(backbone.model if backbone.weights == "pretrained" else None)


def backbone_normalization(name: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the backbone was trained with, read from timm's pretrained config.

    The silicon-menagerie names are registered with timm (:mod:`core.models.menagerie`) with
    ImageNet statistics, as their checkpoints were trained. ``None`` (a random-weight backbone)
    also gets ImageNet statistics.
    """
    if name is None:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    from timm.models import get_arch_name, get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        try:
            cfg = get_pretrained_cfg(get_arch_name(name))
        except (RuntimeError, ValueError):  # pragma: no cover - depends on timm's registry
            cfg = None
    if cfg is None:
        raise ConfigError(
            f"backbone {name!r} is unknown to timm: set dataset.mean and dataset.std explicitly"
        )
    return tuple(cfg.mean), tuple(cfg.std)
