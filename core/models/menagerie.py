"""silicon-menagerie ViTs as timm models, and the encoder's checkpoint files.

github.com/eminorhan/silicon-menagerie publishes DINO, Mugs and MAE ViTs trained on SAYCam (and
ImageNet subsets for DINO ViT-B/14) as whole training checkpoints ``<name>.pth`` on the Hugging
Face hub (``eminorhan/<name>``). Each name is registered here with timm's ``register_model``, so

    timm.create_model("dino_say_vitb14", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))

builds the ViT and loads the file through timm's ``load_pretrained``, whose filter
(:func:`backbone_filter`) takes the published format. No registered entry has a URL or hub id:
nothing here downloads. Checkpoints are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import argparse
import os
import re
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from core.errors import ConfigError

HUB_USER = "eminorhan"
# ViT-S/B/L: (embed_dim, depth, num_heads); the rest is the DINO/MAE ViT of the repository.
_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}
_COMMON = dict(mlp_ratio=4.0, qkv_bias=True, class_token=True, reg_tokens=0, num_classes=0,
               norm_layer=partial(nn.LayerNorm, eps=1e-6))
# Pretraining-only parameters: DINO/Mugs heads, MAE decoder and mask token.
_DROP = re.compile(r"^(\w*head\.|decoder_|mask_token$)")
# timm's register_model reads the pretrained config of each name from this module's default_cfgs.
default_cfgs: dict[str, dict[str, Any]] = {}
# name -> top-level checkpoint entry holding the weights: "teacher" (DINO/Mugs), "model" (MAE)
_ENTRY: dict[str, str] = {}


def register_menagerie(name: str, entry: str, **vit: Any) -> None:
    """Register ``name`` with timm: the repository's ViT (``vit`` sets patch_size, embed_dim,
    depth, num_heads) whose weights are the ``entry`` of a silicon-menagerie checkpoint
    (``pretrained_cfg_overlay=dict(file=...)`` loads one)."""
    default_cfgs[name] = dict(
        url="", num_classes=0, input_size=(3, 224, 224), mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier=None,
        origin_url=f"https://huggingface.co/{HUB_USER}/{name}",
    )
    _ENTRY[name] = entry

    def create(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return build_model_with_cfg(
            VisionTransformer, name, pretrained,
            pretrained_filter_fn=partial(backbone_filter, entry=entry),
            **{**_COMMON, **vit, **kwargs})

    create.__name__ = create.__qualname__ = name
    globals()[name] = register_model(create)  # register_model lists it in this module's __all__


def _register_published() -> None:
    for data in ("say", "s", "a", "y", "imagenet100", "imagenet10", "imagenet3", "imagenet1"):
        register_menagerie(f"dino_{data}_vitb14", "teacher", **_vit("b", 14))
    for alg, entry in (("dino", "teacher"), ("mugs", "teacher"), ("mae", "model")):
        for data in ("say", "s", "a", "y"):
            for size in _SIZES:
                register_menagerie(f"{alg}_{data}_vit{size}16", entry, **_vit(size, 16))


def _vit(size: str, patch: int) -> dict[str, Any]:
    dim, depth, heads = _SIZES[size]
    return dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads)


def weights_entry(name: str) -> str | None:
    """The checkpoint entry holding a silicon-menagerie model's weights; None: not one."""
    return _ENTRY.get(name)


# ----------------------------------------------------------------------------- finding the file


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


def checkpoint_file(model_name: str, checkpoint: str | os.PathLike | None) -> Path | None:
    """The weights file of ``model_name``: looked up (:func:`resolve_checkpoint`) for a
    silicon-menagerie name; for a timm model ``checkpoint`` as given (None: timm's own weights)."""
    if weights_entry(model_name) is not None:
        return resolve_checkpoint(model_name, checkpoint)
    return None if checkpoint is None else Path(checkpoint).expanduser()


# ----------------------------------------------------------------------------- reading the file


def short_error(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 160 characters of message."""
    msg = str(exc)
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
        msg = msg.split(". Please use")[0]
    msg = " ".join(msg.split())[:160] or "empty"
    return f"{type(exc).__name__}: {msg}"


def read_checkpoint(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with ``argparse.Namespace`` allow-listed (DINO pickles
    its ``args``); memory-mapped when the file is a zip archive, so tensors are not read until
    used. ConfigError (one line, naming the file): missing, a directory, corrupt, or pickling
    objects that weights_only loading refuses."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"checkpoint {path} {what}: check the path or download it")
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True,
                          mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        if "Unsupported global" in str(exc):
            raise ConfigError(
                f"checkpoint {path} holds a pickled object that weights_only loading refuses "
                f"({short_error(exc)}): re-save it as a plain state dict"
            ) from None
        raise ConfigError(
            f"checkpoint {path} is corrupt or not a torch checkpoint ({short_error(exc)}): "
            "download it again"
        ) from None


def checkpoint_entry(ckpt: Any, path: Path, key: str | None) -> dict[str, Any]:
    """The state dict in a checkpoint read by :func:`read_checkpoint`: its ``key`` entry (a
    silicon-menagerie model's :func:`weights_entry`); with ``key=None`` ``state_dict``, else
    ``model``, else the whole file (what timm's ``load_checkpoint(use_ema=False)`` takes)."""
    if key is None:
        state = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else ckpt
        if not isinstance(state, dict):
            raise ConfigError(f"checkpoint {path} holds no state dict")
        return state
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), dict):
        top = ", ".join(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConfigError(
            f"checkpoint {path} has no {key!r} entry (top-level keys: {top}): "
            "is it a silicon-menagerie DINO checkpoint?"
        )
    return ckpt[key]


def _backbone(state: dict[str, Any]) -> dict[str, Tensor]:
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
    """The backbone weights in a silicon-menagerie training checkpoint: its ``key`` entry
    (``teacher``: DINO/Mugs, ``model``: MAE), ``module.``/``backbone.`` prefixes stripped,
    ``head.*`` (and MAE ``decoder_*``/``mask_token``) dropped. ConfigError:
    missing/corrupt/foreign file."""
    path = Path(path).expanduser()
    return _backbone(checkpoint_entry(read_checkpoint(path), path, key))


# ----------------------------------------------------------------------------- into the model


def backbone_filter(state_dict: dict[str, Any], model: VisionTransformer,
                    entry: str | None = None, path: str | Path | None = None,
                    ) -> dict[str, Tensor]:
    """timm ``pretrained_filter_fn``: a checkpoint -> exactly ``model``'s state dict.

    Takes the ``entry`` (``teacher``) when the checkpoint holds it (timm's ``load_state_dict``
    has already taken an MAE file's ``model``), cleans it like :func:`load_menagerie_state_dict`,
    lets timm's ViT ``checkpoint_filter_fn`` resample ``pos_embed`` to the model's patch grid,
    and raises a one-line ConfigError naming ``path`` (default: the pretrained config's file)
    when keys or any other shape differ: loading stays strict.
    """
    if entry is not None and isinstance(state_dict.get(entry), dict):
        state_dict = state_dict[entry]
    state = _backbone(state_dict)
    out = checkpoint_filter_fn(state, model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    path = path if path is not None else cfg.get("file")
    own = model.state_dict()
    missing = [k for k in own if k not in out]
    unexpected = [k for k in out if k not in own]
    given = {k: state.get(k, v).shape for k, v in out.items()}  # before timm's filter
    shapes = [f"{k} {tuple(given[k])} vs {tuple(v.shape)}" for k, v in own.items()
              if k in out and (out[k].shape != v.shape
                               or (k != "pos_embed" and given[k] != v.shape))]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"checkpoint {path} does not fit model {cfg.get('architecture')}: missing keys "
            f"{missing[:3]}, unexpected keys {unexpected[:3]}, shape mismatches {shapes[:3]} "
            f"(first 3 of each): wrong architecture?"
        )
    return out


_register_published()
