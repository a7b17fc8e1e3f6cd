"""Frozen (or fine-tuned) ViT encoder: silicon-menagerie DINO/Mugs/MAE checkpoints or timm models.

Features are the output of one block (the last by default) BEFORE the final norm, prefix tokens
(CLS, registers) dropped, via timm's ``forward_intermediates``. Checkpoints are
only ever read from disk (``torch.load(weights_only=True)``); nothing here downloads.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from core.errors import ConfigError
from core.registry import Registry

ENCODERS = Registry("model.encoder.backbone")
HUB_USER = "eminorhan"


@dataclass(frozen=True)
class MenagerieArch:
    """How to build and load one silicon-menagerie model: timm ViT kwargs + checkpoint entry."""

    vit: dict[str, Any] = field(hash=False)
    key: str  # top-level checkpoint entry holding the weights: "teacher" (dino/mugs), "model" (mae)


def _menagerie_archs() -> dict[str, MenagerieArch]:
    sizes = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}
    common = dict(mlp_ratio=4.0, qkv_bias=True, class_token=True, reg_tokens=0, num_classes=0,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))

    def arch(size: str, patch: int, key: str) -> MenagerieArch:
        dim, depth, heads = sizes[size]
        kw = dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, **common)
        return MenagerieArch(vit=kw, key=key)

    table: dict[str, MenagerieArch] = {}
    for data in ("say", "s", "a", "y", "imagenet100", "imagenet10", "imagenet3", "imagenet1"):
        table[f"dino_{data}_vitb14"] = arch("b", 14, "teacher")
    for alg, key in (("dino", "teacher"), ("mugs", "teacher"), ("mae", "model")):
        for data in ("say", "s", "a", "y"):
            for size in sizes:
                table[f"{alg}_{data}_vit{size}16"] = arch(size, 16, key)
    return table


MENAGERIE_ARCHS: dict[str, MenagerieArch] = _menagerie_archs()
# Pretraining-only parameters: DINO/Mugs heads, MAE decoder and mask token.
_DROP = re.compile(r"^(\w*head\.|decoder_|mask_token$)")


def _short(exc: BaseException) -> str:
    msg = str(exc)
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
        msg = msg.split(". Please use")[0]
    msg = " ".join(msg.split())[:160] or "empty"
    return f"{type(exc).__name__}: {msg}"


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"checkpoint {path} {what}: check the path or download it")
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Unsupported global" in str(exc):
            raise ConfigError(
                f"checkpoint {path} holds a pickled object that weights_only loading refuses "
                f"({_short(exc)}): re-save it as a plain state dict"
            ) from None
        raise ConfigError(
            f"checkpoint {path} is corrupt or not a torch checkpoint ({_short(exc)}): "
            "download it again"
        ) from None


def _clean(state: dict[str, Any]) -> dict[str, Tensor]:
    """Strip ``module.``; keep only ``backbone.*`` of a wrapped model (DINO MultiCropWrapper,
    Mugs_Wrapper), prefix stripped; drop pretraining-only keys (``head.*``, MAE decoder)."""
    out = {}
    for name, value in state.items():
        while name.startswith("module."):
            name = name.removeprefix("module.")
        out[name] = value
    if any(k.startswith("backbone.") for k in out):
        out = {k.removeprefix("backbone."): v for k, v in out.items() if k.startswith("backbone.")}
    return {k: v for k, v in out.items() if not _DROP.match(k)}


def load_menagerie_state_dict(path: str | Path, key: str = "teacher") -> dict[str, Tensor]:
    """Read the backbone weights from a silicon-menagerie training checkpoint.

    ``weights_only=True`` with ``argparse.Namespace`` allow-listed (the checkpoint pickles its
    ``args``); takes the ``key`` entry, strips ``module.``/``backbone.`` prefixes, drops
    ``head.*`` (and MAE ``decoder_*``/``mask_token``). ConfigError: missing/corrupt/foreign file.
    """
    path = Path(path).expanduser()
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), dict):
        top = ", ".join(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConfigError(
            f"checkpoint {path} has no {key!r} entry (top-level keys: {top}): "
            "is it a silicon-menagerie DINO checkpoint?"
        )
    return _clean(ckpt[key])


def _hub_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def _find_in_dir(root: Path, model_name: str) -> Path | None:
    fname = f"{model_name}.pth"
    for repo in (root, root / f"models--{HUB_USER}--{model_name}"):
        if (repo / fname).is_file():
            return repo / fname
        ref = repo / "refs" / "main"
        if ref.is_file():
            main = repo / "snapshots" / ref.read_text().strip() / fname
            if main.is_file():
                return main
        found = [p for p in repo.glob(f"snapshots/*/{fname}") if p.is_file()]
        if found:
            return max(found, key=lambda p: p.stat().st_mtime)
    return None


def resolve_checkpoint(model_name: str, checkpoint: str | os.PathLike | None) -> Path:
    """Find ``<model_name>.pth`` on disk; never downloads.

    ``checkpoint`` is the file itself, a directory holding it, a Hugging Face hub cache
    (the hub root, the ``models--eminorhan--<name>`` repo dir, or a snapshot dir), or ``None``
    to look in ``$HF_HUB_CACHE`` / ``$HF_HOME/hub`` / ``~/.cache/huggingface/hub``.
    """
    hint = (
        f"download {HUB_USER}/{model_name} (file {model_name}.pth) and pass "
        "model.encoder.backbone.checkpoint=PATH, or set model.encoder.backbone.weights=random"
    )
    if checkpoint is None:
        found = _find_in_dir(_hub_dir(), model_name)
        if found is None:
            raise ConfigError(f"no local checkpoint for {model_name} in {_hub_dir()}: {hint}")
        return found
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist: {hint}")
    found = _find_in_dir(path, model_name) if path.is_dir() else None
    if found is None:
        raise ConfigError(f"no {model_name}.pth in directory {path}: {hint}")
    return found


def _load_strict(vit: VisionTransformer, state: dict[str, Tensor], path: Path, name: str) -> int:
    """Load ``state`` strictly (pos_embed resampled to the model's grid); returns #tensors."""
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != vit.pos_embed.shape and pos.shape[-1] == vit.embed_dim:
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        side = math.isqrt(pos.shape[1] - prefix)
        if side * side == pos.shape[1] - prefix:
            state = dict(state, pos_embed=resample_abs_pos_embed(
                pos, list(vit.patch_embed.grid_size), [side, side], num_prefix_tokens=prefix))
    own = vit.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"checkpoint {path} does not fit model {name}: missing keys {missing[:3]}, "
            f"unexpected keys {unexpected[:3]}, shape mismatches {shapes[:3]} "
            f"(first 3 of each): wrong architecture?"
        )
    vit.load_state_dict(state, strict=True)
    return len(state)


def _timm_vit(name: str, pretrained: bool, img_size: int, overrides: dict[str, Any]) -> nn.Module:
    if not timm.is_model(name):
        hits = timm.list_models(f"*{max(name.split('_'), key=len)}*")
        close = difflib.get_close_matches(name, hits or timm.list_models(), n=3, cutoff=0.4)
        close = close or hits[:3]
        raise ConfigError(
            f"unknown encoder model {name!r}: not a silicon-menagerie name nor a timm model "
            f"(close timm names: {', '.join(close) or 'none'}); menagerie names look like "
            "dino_say_vitb14"
        )
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=img_size,
                                 **overrides)
    except TypeError as exc:
        raise ConfigError(f"timm model {name} cannot be built as a ViT encoder: {exc}") from None
    except Exception as exc:
        if not pretrained:
            raise
        raise ConfigError(
            f"pretrained weights for timm model {name} could not be loaded ({_short(exc)}; "
            "no network?): pass model.encoder.backbone.checkpoint=PATH or set "
            "model.encoder.backbone.weights=random"
        ) from None


@ENCODERS.register("TimmExtractor")
class TimmEncoder(nn.Module):
    """ViT feature extractor: (N, 3, H, W) -> (N, n_patches, feat_dim).

    Args:
        model: a silicon-menagerie name (``dino_say_vitb14``...), a timm model name, or ``"vit"``
            (a plain timm VisionTransformer from ``vit_overrides``; random weights only).
        frozen: no grads, no_grad forward, and the ViT pinned in eval() whatever train() says.
        weights: ``"pretrained"`` (load from ``checkpoint`` / the local hub cache) or ``"random"``.
        checkpoint: checkpoint file or directory, see :func:`resolve_checkpoint`.
        img_size: input side in pixels; checkpoints' position embeddings are resampled to it.
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
        self.checkpoint_path: Path | None = None
        self.loaded_tensors = 0
        pretrained = weights == "pretrained"
        if model in MENAGERIE_ARCHS:
            arch = MENAGERIE_ARCHS[model]
            if pretrained:  # read the file first: a bad path fails before building a big ViT
                self.checkpoint_path = resolve_checkpoint(model, checkpoint)
                state = load_menagerie_state_dict(self.checkpoint_path, arch.key)
            self.vit = VisionTransformer(img_size=img_size, **{**arch.vit, **vit_overrides})
            if pretrained:
                self.loaded_tensors = _load_strict(self.vit, state, self.checkpoint_path, model)
        elif model == "vit":
            if pretrained:
                raise ConfigError(
                    "model.encoder.backbone.model=vit is a plain random-init ViT: set "
                    "model.encoder.backbone.weights=random or name a pretrained model"
                )
            self.vit = VisionTransformer(img_size=img_size, num_classes=0, **vit_overrides)
        else:
            from_file = pretrained and checkpoint is not None
            self.vit = _timm_vit(model, pretrained and not from_file, img_size, vit_overrides)
            if from_file:
                self.checkpoint_path = Path(checkpoint).expanduser()
                ckpt = _torch_load(self.checkpoint_path)
                if isinstance(ckpt, dict):
                    ckpt = ckpt.get("state_dict", ckpt.get("model", ckpt))
                if not isinstance(ckpt, dict):
                    raise ConfigError(f"checkpoint {self.checkpoint_path} holds no state dict")
                self.loaded_tensors = _load_strict(self.vit, _clean(ckpt), self.checkpoint_path,
                                                   model)
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
