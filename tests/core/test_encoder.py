"""Tests for core.models.encoder and core.models.menagerie: the silicon-menagerie names as timm
models, checkpoint loading (real DINO format, random weights), checkpoint discovery, error
messages, feature extraction and the frozen contract."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
from dino_format import FAKE, TINY, dino_head_state, write_dino_checkpoint  # noqa: F401
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from core.baselines import position_r2
from core.errors import ConfigError
from core.models import encoder as enc_mod
from core.models.encoder import ENCODERS, TimmEncoder
from core.models.menagerie import (
    load_menagerie_state_dict,
    register_menagerie,
    resolve_checkpoint,
)

# tiny Mugs- and MAE-style entries (FAKE, the DINO one, is registered by dino_format)
for _name, _entry in (("mugs_test_vitt14", "teacher"), ("mae_test_vitt14", "model")):
    if not timm.is_model(_name):
        register_menagerie(_name, _entry, **TINY)


def tiny_vit(img_size: int = 224, **kw) -> VisionTransformer:
    """The FAKE architecture (a tiny dino_say_vitb14), random weights, built by timm."""
    return timm.create_model(FAKE, img_size=img_size, **kw)


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> tuple[Path, VisionTransformer]:
    torch.manual_seed(0)
    vit = tiny_vit()
    return write_dino_checkpoint(tmp_path / f"{FAKE}.pth", vit), vit


def manual_features(vit: VisionTransformer, x: torch.Tensor, layer: int) -> torch.Tensor:
    """patch_embed -> _pos_embed -> blocks[:layer+1], no final norm, prefix tokens dropped."""
    with torch.no_grad():
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for blk in vit.blocks[: layer + 1]:
            h = blk(h)
    return h[:, vit.num_prefix_tokens:]


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- real architecture


def test_dino_say_vitb14_random_checkpoint_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = VisionTransformer(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12,
                            qkv_bias=True, num_classes=0)
    path = write_dino_checkpoint(tmp_path / "dino_say_vitb14.pth", ref, share_student=True)
    enc = TimmEncoder("dino_say_vitb14", weights="pretrained", checkpoint=str(path))
    assert enc.loaded_tensors == 150 and len(load_menagerie_state_dict(path)) == 150
    assert (enc.feat_dim, enc.grid_size, enc.n_patches, enc.patch_size) == (768, (16, 16), 256, 14)
    assert enc.vit.pos_embed.shape == (1, 257, 768)
    x = torch.randn(1, 3, 224, 224)
    out = enc(x)
    ref.eval()
    with torch.no_grad():
        (want,) = ref.forward_intermediates(x, indices=[11], norm=False, output_fmt="NLC",
                                            intermediates_only=True)
    assert out.shape == (1, 256, 768)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert ENCODERS.get("TimmEncoder") is TimmEncoder


# ----------------------------------------------------------------------------- timm registry


PUBLISHED = {f"dino_{d}_vitb14" for d in ("say", "s", "a", "y", "imagenet100", "imagenet10",
                                         "imagenet3", "imagenet1")} | {
    f"{alg}_{d}_vit{size}16" for alg in ("dino", "mugs", "mae") for d in ("say", "s", "a", "y")
    for size in "sbl"}


def test_published_names_are_timm_models() -> None:
    assert len(PUBLISHED) == 44 and set(timm.list_models(module="menagerie")) >= PUBLISHED
    want = {"dino_say_vitb14": (14, 768, 12, 12), "mugs_a_vits16": (16, 384, 12, 6),
            "mae_y_vitl16": (16, 1024, 24, 16)}
    for name, (patch, dim, depth, heads) in want.items():
        with torch.device("meta"):
            vit = timm.create_model(name)
        assert (vit.patch_embed.patch_size[0], vit.embed_dim, len(vit.blocks),
                vit.blocks[0].attn.num_heads, vit.num_classes) == (patch, dim, depth, heads, 0)
        cfg = timm.models.get_pretrained_cfg(name)
        assert not cfg.has_weights and cfg.origin_url.endswith(f"eminorhan/{name}")
    with pytest.raises(RuntimeError, match="No pretrained weights"):  # nothing downloads
        timm.create_model(FAKE, pretrained=True)


def test_timm_create_model_loads_the_published_format(tiny_ckpt, tmp_path: Path) -> None:
    """timm's own loading + the registered filter: DINO teacher, MAE model, pos_embed resampled."""
    path, vit = tiny_ckpt
    got = timm.create_model(FAKE, pretrained=True, img_size=112,
                            pretrained_cfg_overlay=dict(file=str(path)))
    want = resample_abs_pos_embed(vit.pos_embed.detach(), [8, 8], [16, 16], num_prefix_tokens=1)
    torch.testing.assert_close(got.pos_embed.detach(), want)
    for k, v in vit.state_dict().items():
        assert k == "pos_embed" or torch.equal(got.state_dict()[k], v)
    mae = tmp_path / "mae.pth"
    torch.save({"model": vit.state_dict() | {"mask_token": torch.zeros(1, 1, 16),
                                              "decoder_embed.weight": torch.zeros(16, 32)},
                "epoch": 1, "args": argparse.Namespace(a=1)}, mae)
    got = timm.create_model("mae_test_vitt14", pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(mae)))
    assert all(torch.equal(got.state_dict()[k], v) for k, v in vit.state_dict().items())
    wrong = write_dino_checkpoint(tmp_path / "deeper.pth", tiny_vit(depth=3))
    with pytest.raises(ConfigError, match=f"{wrong} does not fit model {FAKE}"):
        timm.create_model(FAKE, pretrained=True, pretrained_cfg_overlay=dict(file=str(wrong)))


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("prefix", ["backbone.", "module.backbone."])
def test_load_strips_prefixes_and_drops_head(tmp_path: Path, prefix: str) -> None:
    vit = tiny_vit()
    path = write_dino_checkpoint(tmp_path / "c.pth", vit, prefix=prefix)
    sd = load_menagerie_state_dict(path)
    assert set(sd) == set(vit.state_dict())
    assert not any(k.startswith(("head.", "module.", "backbone.")) for k in sd)
    enc = TimmEncoder(FAKE, checkpoint=path)
    assert enc.loaded_tensors == len(vit.state_dict())
    for k, v in vit.state_dict().items():
        assert torch.equal(enc.vit.state_dict()[k], v)


def test_weights_only_needs_namespace_allowlist(tiny_ckpt) -> None:
    path, _ = tiny_ckpt
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(pickle.UnpicklingError, match="Namespace"):
            torch.load(path, map_location="cpu", weights_only=True)
        assert load_menagerie_state_dict(path)  # the loader allow-lists argparse.Namespace itself
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_arbitrary_pickles_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {}, "x": Evil()}, path)
    msg = one_line_error("weights_only", load_menagerie_state_dict, path)
    assert str(path) in msg


def _hub_layout(root: Path, src: Path, name: str = FAKE) -> Path:
    repo = root / f"models--eminorhan--{name}"
    (repo / "blobs").mkdir(parents=True)
    blob = repo / "blobs" / "0123abcd"
    blob.write_bytes(src.read_bytes())
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / f"{name}.pth").symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    return snap / f"{name}.pth"


def test_resolve_hub_cache_layouts(tmp_path: Path, tiny_ckpt, monkeypatch) -> None:
    src, vit = tiny_ckpt
    hub = tmp_path / "hf" / "hub"
    want = _hub_layout(hub, src)
    for given in (hub, hub / f"models--eminorhan--{FAKE}", want.parent, want, src.parent):
        assert resolve_checkpoint(FAKE, given) in (want, src)
    assert resolve_checkpoint(FAKE, hub) == want
    enc = TimmEncoder(FAKE, checkpoint=str(hub / f"models--eminorhan--{FAKE}"))
    assert enc.checkpoint_path == want
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert resolve_checkpoint(FAKE, None) == want
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    enc = TimmEncoder(FAKE, checkpoint=None)
    assert enc.checkpoint_path == want
    assert torch.equal(enc.vit.pos_embed, vit.pos_embed)


# ----------------------------------------------------------------------------- errors


def test_error_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    assert str(path) in one_line_error("does not exist", TimmEncoder, FAKE, checkpoint=str(path))
    assert str(path) in one_line_error("does not exist", load_menagerie_state_dict, path)


def test_error_corrupt_files(tmp_path: Path, tiny_ckpt) -> None:
    src, _ = tiny_ckpt
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for path in (junk, trunc, empty):
        msg = one_line_error("corrupt or not a torch checkpoint", TimmEncoder, FAKE,
                             checkpoint=str(path))
        assert str(path) in msg and "download it again" in msg


@pytest.mark.parametrize("kw", [dict(depth=3), dict(embed_dim=48, num_heads=2)])
def test_error_wrong_architecture(tmp_path: Path, kw) -> None:
    path = write_dino_checkpoint(tmp_path / "other.pth", tiny_vit(**kw))
    msg = one_line_error("does not fit model", TimmEncoder, FAKE, checkpoint=str(path))
    assert str(path) in msg and FAKE in msg and "wrong architecture?" in msg


def test_error_missing_teacher(tmp_path: Path) -> None:
    path = tmp_path / "mae_like.pth"
    torch.save({"model": tiny_vit().state_dict(), "epoch": 3}, path)
    msg = one_line_error("has no 'teacher' entry", TimmEncoder, FAKE, checkpoint=str(path))
    assert str(path) in msg and "model, epoch" in msg and "silicon-menagerie" in msg


def test_error_no_local_checkpoint(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    msg = one_line_error("no local checkpoint", TimmEncoder, "dino_say_vitb14")
    assert "download eminorhan/dino_say_vitb14 (file dino_say_vitb14.pth)" in msg
    assert "model.encoder.backbone.weights=random" in msg
    one_line_error(f"no {FAKE}.pth in directory", resolve_checkpoint, FAKE, tmp_path)


def test_error_unknown_and_bad_models(monkeypatch) -> None:
    msg = one_line_error("unknown encoder model", TimmEncoder, "vit_tiny_patch16_2244",
                         weights="random")
    assert "vit_tiny_patch16_224" in msg
    one_line_error("not a ViT|cannot be built", TimmEncoder, "resnet18", weights="random")
    one_line_error("weights=random", TimmEncoder, "vit", patch_size=8, embed_dim=16, depth=1,
                   num_heads=2)
    one_line_error("pretrained\\|random", TimmEncoder, FAKE, weights="imagenet")
    one_line_error("layer=5", TimmEncoder, FAKE, weights="random", layer=5)

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Cannot connect to huggingface.co")
        return real(*args, **kwargs)

    real = enc_mod.timm.create_model
    monkeypatch.setattr(enc_mod.timm, "create_model", offline)
    msg = one_line_error("could not be loaded", TimmEncoder, "vit_tiny_patch16_224", depth=1)
    assert "no network?" in msg and "checkpoint" in msg


def test_timm_model_from_checkpoint_file(tmp_path: Path) -> None:
    kw = dict(depth=2, embed_dim=32, num_heads=2, img_size=32)
    src = TimmEncoder("vit_tiny_patch16_224", weights="random", **kw)
    path = tmp_path / "timm.pth"
    sd = src.vit.state_dict() | {"head.weight": torch.randn(10, 32), "head.bias": torch.zeros(10)}
    torch.save({"state_dict": sd}, path)
    enc = TimmEncoder("vit_tiny_patch16_224", checkpoint=str(path), **kw)
    assert enc.weights_hash() == src.weights_hash()
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 4, 32)
    deeper = tmp_path / "deeper.pth"  # timm's load_checkpoint with the strict filter
    torch.save(TimmEncoder("vit_tiny_patch16_224", weights="random", **{**kw, "depth": 3})
               .vit.state_dict(), deeper)
    msg = one_line_error("does not fit model vit_tiny_patch16_224", TimmEncoder,
                         "vit_tiny_patch16_224", checkpoint=str(deeper), **kw)
    assert str(deeper) in msg and "blocks.2." in msg


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("layer", [None, 0, -1])
def test_features_match_manual_computation(tiny_ckpt, layer) -> None:
    path, _ = tiny_ckpt
    enc = TimmEncoder(FAKE, checkpoint=str(path), layer=layer)
    x = torch.randn(3, 3, 224, 224)
    out = enc(x)
    assert out.shape == (3, enc.n_patches, enc.feat_dim) == (3, 256, 32)
    idx = {None: 1, 0: 0, -1: 1}[layer]
    torch.testing.assert_close(out, manual_features(enc.vit, x, idx), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # CLS dropped; no final norm applied
        full = enc.vit.norm_pre(enc.vit._pos_embed(enc.vit.patch_embed(x)))
        for blk in enc.vit.blocks[: idx + 1]:
            full = blk(full)
    assert full.shape[1] == 257 and torch.allclose(out, full[:, 1:], atol=1e-5)
    assert not torch.allclose(out, enc.vit.norm(out), atol=1e-3)


def test_plain_vit_is_timm_vision_transformer_defaults() -> None:
    """model=vit (built as timm's ViT-B/16 entry) == VisionTransformer(**overrides), same draws."""
    kw = dict(patch_size=8, embed_dim=16, depth=2, num_heads=2)
    torch.manual_seed(0)
    enc = TimmEncoder("vit", weights="random", img_size=32, **kw)
    torch.manual_seed(0)
    want = VisionTransformer(img_size=32, num_classes=0, **kw).state_dict()
    got = enc.vit.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], v) for k, v in want.items())


def test_registers_are_dropped_too() -> None:
    enc = TimmEncoder("vit", weights="random", img_size=32, patch_size=8, embed_dim=16, depth=2,
                      num_heads=2, reg_tokens=4)
    assert enc.vit.num_prefix_tokens == 5
    x = torch.randn(2, 3, 32, 32)
    out = enc(x)
    assert out.shape == (2, 16, 16)
    torch.testing.assert_close(out, manual_features(enc.vit, x, 1), rtol=1e-5, atol=1e-5)


def test_other_img_size_resamples_pos_embed(tiny_ckpt) -> None:
    path, vit = tiny_ckpt
    enc = TimmEncoder(FAKE, checkpoint=str(path), img_size=112)
    assert enc.grid_size == (8, 8) and enc.n_patches == 64
    want = resample_abs_pos_embed(vit.pos_embed.detach(), [8, 8], [16, 16], num_prefix_tokens=1)
    torch.testing.assert_close(enc.vit.pos_embed.detach(), want)
    assert enc(torch.randn(2, 3, 112, 112)).shape == (2, 64, 32)


# ----------------------------------------------------------------------------- frozen / fine-tune


def test_frozen_contract(tiny_ckpt) -> None:
    path, _ = tiny_ckpt
    enc = TimmEncoder(FAKE, checkpoint=str(path), img_size=56)
    enc.train()
    assert enc.training and not enc.vit.training
    assert not any(m.training for m in enc.vit.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    x = torch.randn(2, 3, 56, 56, requires_grad=True)
    out = enc(x)
    assert out.grad_fn is None and not out.requires_grad
    enc.vit.train()  # even if someone flips the ViT directly, forward runs it in eval
    enc(x)
    assert not enc.vit.training


@pytest.mark.parametrize("ckpt", [False, True])
def test_finetune_grads_and_train_mode(ckpt) -> None:
    kw = dict(img_size=56, frozen=False, weights="random")
    enc = TimmEncoder(FAKE, gradient_checkpointing=ckpt, **kw)
    assert enc.vit.grad_checkpointing is ckpt
    enc.train()
    assert enc.vit.training
    enc.eval()
    assert not enc.vit.training
    enc.train()
    enc(torch.randn(2, 3, 56, 56)).square().mean().backward()
    grads = [p.grad for p in enc.vit.blocks.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_weights_hash(tiny_ckpt) -> None:
    path, _ = tiny_ckpt
    a = TimmEncoder(FAKE, checkpoint=str(path))
    b = TimmEncoder(FAKE, checkpoint=str(path))
    h = a.weights_hash()
    assert h == a.weights_hash() == b.weights_hash() and len(h) == 16
    with torch.no_grad():
        b.vit.blocks[0].attn.qkv.weight[0, 0] += 1e-3
    assert b.weights_hash() != h
    assert TimmEncoder(FAKE, weights="random").weights_hash() != h


def test_mugs_and_mae_layouts(tmp_path: Path) -> None:
    vit = tiny_vit()
    sd = vit.state_dict()
    mugs = {f"backbone.{k}": v for k, v in sd.items()} | {
        "instance_head.mlp.0.weight": torch.randn(8, 32),
        "group_head.last_layer.weight": torch.ones(1),
        "relation_blocks.0.norm1.weight": torch.ones(32), "mem.queue_k": torch.zeros(4, 32),
    }
    mae = sd | {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32),
                "decoder_blocks.0.norm1.weight": torch.ones(16), "decoder_pos_embed": torch.ones(1)}
    torch.save({"teacher": mugs, "student": mugs, "args": argparse.Namespace(a=1)},
               tmp_path / "mugs.pth")
    torch.save({"model": mae, "epoch": 1, "args": argparse.Namespace(a=1)}, tmp_path / "mae.pth")
    for name, file in (("mugs_test_vitt14", "mugs.pth"), ("mae_test_vitt14", "mae.pth")):
        enc = TimmEncoder(name, checkpoint=str(tmp_path / file))
        assert enc.loaded_tensors == len(sd)
        assert all(torch.equal(enc.vit.state_dict()[k], v) for k, v in sd.items())


def test_sincos_position_embedding_makes_position_decodable(tiny_ckpt) -> None:
    """A random ViT's features barely say where a patch is; with sincos_pos_embed they do."""
    kw = dict(weights="random", img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    torch.manual_seed(0)
    plain = TimmEncoder("vit", **kw)
    torch.manual_seed(0)
    sincos = TimmEncoder("vit", sincos_pos_embed=0.5, **kw)
    want = build_sincos2d_pos_embed([8, 8], 48) * 0.5
    torch.testing.assert_close(sincos.vit.pos_embed[0, 1:], want)  # CLS keeps a zero entry
    assert not sincos.vit.pos_embed[0, 0].any()
    assert sincos.weights_hash() != plain.weights_hash()  # a feature cache tells them apart
    images = torch.rand(16, 3, 64, 64)  # noise: nothing but the embedding says where a patch is
    r2_plain = position_r2(plain(images), (8, 8))
    r2_sincos = position_r2(sincos(images), (8, 8))
    assert r2_plain < 0.5 < 0.9 < r2_sincos, (r2_plain, r2_sincos)
    with pytest.raises(ConfigError, match="weights=random"):
        TimmEncoder(FAKE, checkpoint=str(tiny_ckpt[0]), sincos_pos_embed=1.0)
    with pytest.raises(ConfigError, match=">= 0"):
        TimmEncoder("vit", sincos_pos_embed=-1.0, **kw)
