"""Config -> model and losses, through the registries (names, never import paths)."""

from __future__ import annotations

import torch
from torch import nn

import core.losses  # noqa: F401  (registers the losses)
from core.config import Config
from core.config.schema import loss_settings
from core.errors import ConfigError
from core.losses.base import LOSSES
from core.models.decoder import DECODERS
from core.models.encoder import ENCODERS
from core.models.initializers import INITIALIZERS
from core.models.predictor import PREDICTORS
from core.models.projection import PROJECTIONS
from core.models.slot_attention import GROUPERS
from core.models.video import SlotVideoModel


def check_names(cfg: Config) -> None:
    """Every component name in the config is registered (fails with the valid names)."""
    m = cfg.model
    ENCODERS.get(m.encoder.backbone.name)
    PROJECTIONS.get(m.encoder.output_transform.name)
    INITIALIZERS.get(m.initializer.name)
    GROUPERS.get(m.grouper.name)
    PREDICTORS.get(m.predictor.name)
    DECODERS.get(m.decoder.name)
    for loss in m.losses.values():
        LOSSES.get(loss.name)


def build_encoder(cfg: Config) -> nn.Module:
    """The backbone of ``model.encoder.backbone`` at ``dataset.img_size``.

    A random-weight backbone is drawn from its own generator seeded with
    ``model.encoder.backbone.seed`` (not the run's seed): every trial of a sweep gets the same
    backbone, as it would the same pretrained weights, and so shares one feature cache.
    """
    b = cfg.model.encoder.backbone
    if b.weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(b.seed)
            return _build_encoder(cfg)
    return _build_encoder(cfg)


def _build_encoder(cfg: Config) -> nn.Module:
    b = cfg.model.encoder.backbone
    return ENCODERS.build(
        b.name,
        model=b.model,
        frozen=b.frozen,
        weights=b.weights,
        checkpoint=b.checkpoint,
        img_size=cfg.dataset.img_size,
        layer=b.layer,
        gradient_checkpointing=cfg.trainer.gradient_checkpointing and not b.frozen,
        sincos_pos_embed=b.sincos_pos_embed,
        **dict(b.vit),
    )


def _freeze(module: nn.Module, frozen: bool) -> nn.Module:
    if frozen:
        module.requires_grad_(False)
    return module


def build_model(cfg: Config, encoder: nn.Module | None = None) -> SlotVideoModel:
    """The whole video model. ``encoder`` may be passed in (already built) to share one."""
    check_names(cfg)
    m = cfg.model
    encoder = encoder if encoder is not None else build_encoder(cfg)
    feat_dim, n_patches = int(encoder.feat_dim), int(encoder.n_patches)
    if m.decoder.outp_dim != feat_dim:
        raise ConfigError(
            f"model.decoder.outp_dim={m.decoder.outp_dim} (globals.FEAT_DIM) but backbone "
            f"{m.encoder.backbone.model} gives {feat_dim}-dim features: set globals.FEAT_DIM="
            f"{feat_dim}"
        )
    ot = m.encoder.output_transform
    if ot.outp_dim != m.grouper.inp_dim:
        raise ConfigError(
            f"model.encoder.output_transform.outp_dim={ot.outp_dim} but model.grouper.inp_dim="
            f"{m.grouper.inp_dim}: they must be equal"
        )
    for section in ("initializer", "predictor", "decoder"):
        dim = getattr(m, section).dim if section != "decoder" else m.decoder.inp_dim
        if dim != m.grouper.slot_dim:
            raise ConfigError(
                f"model.{section} slot size {dim} differs from model.grouper.slot_dim="
                f"{m.grouper.slot_dim}: they must be equal (use globals.SLOT_DIM)"
            )
    projection = PROJECTIONS.build(
        ot.name, strict=False, inp_dim=feat_dim, outp_dim=ot.outp_dim,
        hidden_dim=ot.hidden_dim, layer_norm=ot.layer_norm,
    )
    g = m.grouper
    grouper = GROUPERS.build(
        g.name, strict=False, inp_dim=g.inp_dim, slot_dim=g.slot_dim, n_iters=g.n_iters,
        n_iters_first=g.n_iters_first, eps=g.eps, mlp_ratio=g.mlp_ratio,
    )
    i, p, d = m.initializer, m.predictor, m.decoder
    initializer = INITIALIZERS.build(i.name, strict=False, n_slots=i.n_slots, dim=i.dim)
    predictor = PREDICTORS.build(
        p.name, strict=False, dim=p.dim, n_heads=p.n_heads, ffn_ratio=p.ffn_ratio,
        n_blocks=p.n_blocks, attention_scale=p.attention_scale,
    )
    decoder = DECODERS.build(
        d.name, strict=False, inp_dim=d.inp_dim, outp_dim=d.outp_dim,
        hidden_dims=list(d.hidden_dims), n_patches=n_patches,
        split_first_layer=d.split_first_layer,
    )
    model = SlotVideoModel(
        encoder,
        projection,
        _freeze(initializer, i.frozen),
        _freeze(grouper, g.frozen),
        _freeze(predictor, p.frozen),
        _freeze(decoder, d.frozen),
        n_iters=g.n_iters,
        n_iters_first=g.n_iters_first,
        gradient_checkpointing=cfg.trainer.gradient_checkpointing,
    )
    model.grid_size = tuple(encoder.grid_size)  # type: ignore[assignment]
    return model


def build_losses(cfg: Config) -> nn.ModuleDict:
    """``{name: loss module}`` for every loss in ``model.losses``."""
    return nn.ModuleDict({name: LOSSES.build(loss.name, **loss_settings(loss))
                          for name, loss in cfg.model.losses.items()})
