"""Tests for core.models: shapes, invariances, exact formulas, gradients and a one-batch overfit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.losses import FeatureReconstructionLoss, SlotSlotContrastLoss
from core.models.decoder import DECODERS, MLPDecoder
from core.models.initializers import INITIALIZERS, FixedLearnedInit, RandomInit
from core.models.predictor import PREDICTORS, IdentityPredictor, TransformerPredictor
from core.models.projection import PROJECTIONS, FeatureMLP
from core.models.slot_attention import GROUPERS, SlotAttention
from core.models.video import OUTPUT_KEYS, SlotVideoModel

B, T, K, D, P, FD = 2, 3, 4, 16, 16, 24  # FD = feature width F


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class PatchEncoder(nn.Module):
    """Frozen stand-in encoder: 4x4 conv patchifier, (N, 3, 16, 16) -> (N, 16, FD)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, FD, kernel_size=4, stride=4)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)


def make_model(
    encoder: nn.Module | None = None, init: str = "FixedLearnedInit", **kw
) -> SlotVideoModel:
    return SlotVideoModel(
        encoder=encoder,
        projection=FeatureMLP(FD, D),
        initializer=INITIALIZERS.build(init, n_slots=K, dim=D),
        grouper=SlotAttention(D, D, n_iters=2, n_iters_first=3),
        predictor=TransformerPredictor(D, n_heads=4),
        decoder=MLPDecoder(D, FD, hidden_dims=(32, 32), n_patches=P),
        **kw,
    )


def test_projection_and_initializer_shapes() -> None:
    mlp = FeatureMLP(FD, D)
    assert mlp.hidden_dim == 2 * FD and isinstance(mlp.norm, nn.LayerNorm)
    assert mlp(torch.randn(B, T, P, FD)).shape == (B, T, P, D)
    assert isinstance(FeatureMLP(FD, D, hidden_dim=8, layer_norm=False).norm, nn.Identity)
    fixed = FixedLearnedInit(K, D)(B)
    assert fixed.shape == (B, K, D) and torch.equal(fixed[0], fixed[1])
    rand = RandomInit(K, D).eval()
    s = rand(B)
    assert s.shape == (B, K, D) and not torch.allclose(s[0], s[1])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(rand(B, generator=g1), rand(B, generator=g2))
    rand(B).sum().backward()
    assert rand.mean.grad is not None and rand.log_sigma.grad is not None


def test_slot_attention_shapes_masks_and_single_kv() -> None:
    sa = SlotAttention(D, D)
    calls = []
    sa.to_k.register_forward_hook(lambda *a: calls.append(1))
    out = sa(torch.randn(B, P, D), torch.randn(B, K, D))
    assert out["slots"].shape == (B, K, D) and out["masks"].shape == (B, K, P)
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(B, P))
    assert len(calls) == 1  # k (and v) computed once per call, not per iteration
    multi = SlotAttention(D, D, heads=2)(torch.randn(B, P, D), torch.randn(B, K, D))
    torch.testing.assert_close(multi["masks"].sum(1), torch.ones(B, P))


def test_slot_attention_n_iters(monkeypatch: pytest.MonkeyPatch) -> None:
    sa = SlotAttention(D, D, n_iters=2)
    steps = []
    orig = sa.step
    monkeypatch.setattr(sa, "step", lambda *a: steps.append(1) or orig(*a))
    x, s = torch.randn(B, P, D), torch.randn(B, K, D)
    sa(x, s)
    assert len(steps) == 2
    sa(x, s, n_iters=5)
    assert len(steps) == 7
    with pytest.raises(ValueError, match="n_iters"):
        sa(x, s, n_iters=0)


def test_slot_attention_permutation_equivariance() -> None:
    sa = SlotAttention(D, D, heads=2)
    x, s = torch.randn(B, P, D), torch.randn(B, K, D)
    perm = torch.randperm(K)
    a, b = sa(x, s), sa(x, s[:, perm])
    torch.testing.assert_close(b["slots"], a["slots"][:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b["masks"], a["masks"][:, perm], atol=1e-5, rtol=1e-5)


def test_predictor_equivariance_and_identity() -> None:
    pred = TransformerPredictor(D, n_heads=4, n_blocks=2).eval()
    s = torch.randn(B, K, D)
    perm = torch.randperm(K)
    assert pred(s).shape == (B, K, D)
    torch.testing.assert_close(pred(s[:, perm]), pred(s)[:, perm], atol=1e-5, rtol=1e-5)
    assert IdentityPredictor(dim=D)(s) is s


def manual_decoder(dec: MLPDecoder, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsplit decoder by hand: MLP(slot + pos), softmax alpha over slots, weighted sum."""
    h = slots[:, :, None, :] + dec.pos_embed
    for i, layer in enumerate(dec.layers):
        h = h @ layer.weight.T + layer.bias
        h = torch.relu(h) if i < len(dec.layers) - 1 else h
    patches, alpha = h[..., :-1], h[..., -1]
    masks = torch.softmax(alpha, dim=1)
    return (masks[..., None] * patches).sum(1), masks


def test_decoder_split_equals_unsplit_and_manual() -> None:
    dec = MLPDecoder(D, FD, hidden_dims=(32, 32, 32), n_patches=P, split_first_layer=True)
    with torch.no_grad():
        dec.pos_embed.normal_()  # make the position term matter
    slots = torch.randn(B, K, D)
    split = dec(slots)
    assert split["reconstruction"].shape == (B, P, FD) and split["masks"].shape == (B, K, P)
    torch.testing.assert_close(split["masks"].sum(1), torch.ones(B, P))
    dec.split_first_layer = False
    unsplit = dec(slots)
    for key in ("reconstruction", "masks"):
        torch.testing.assert_close(split[key], unsplit[key], atol=1e-5, rtol=1e-5)
    recon, masks = manual_decoder(dec, slots)
    torch.testing.assert_close(unsplit["reconstruction"], recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unsplit["masks"], masks, atol=1e-5, rtol=1e-5)
    other = MLPDecoder(D, FD, hidden_dims=(32, 32, 32), n_patches=P, split_first_layer=False)
    assert other.state_dict().keys() == dec.state_dict().keys()


def expected_shapes() -> dict[str, tuple[int, ...]]:
    return {
        "features": (B, T, P, FD), "slots": (B, T, K, D), "predicted_slots": (B, T, K, D),
        "attn_masks": (B, T, K, P), "decoder_masks": (B, T, K, P), "reconstruction": (B, T, P, FD),
    }  # fmt: skip


def test_video_model_shapes_video_and_features() -> None:
    model = make_model(PatchEncoder())
    out = model({"video": torch.randn(B, T, 3, 16, 16)})
    assert set(out) == set(OUTPUT_KEYS)
    assert {k: tuple(v.shape) for k, v in out.items()} == expected_shapes()
    assert not out["features"].requires_grad
    torch.testing.assert_close(out["predicted_slots"][:, 0], model.initializer(B))
    torch.testing.assert_close(out["attn_masks"].sum(2), torch.ones(B, T, P))
    model.encoder = None
    out2 = model({"features": out["features"]})
    torch.testing.assert_close(out2["reconstruction"], out["reconstruction"])
    with pytest.raises(ValueError, match="video"):
        model({})


def test_video_model_iterations(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    seen: list[int | None] = []
    steps: list[int] = []
    grouper = model.grouper
    fwd, step = grouper.forward, grouper.step
    monkeypatch.setattr(
        grouper, "forward", lambda x, s, n_iters=None: seen.append(n_iters) or fwd(x, s, n_iters)
    )
    monkeypatch.setattr(grouper, "step", lambda *a: steps.append(1) or step(*a))
    feats = torch.randn(B, T, P, FD)
    model({"features": feats})
    assert seen == [3, None, None] and len(steps) == 3 + 2 + 2
    model.n_iters, model.n_iters_first = 1, 2
    seen.clear(), steps.clear()
    model({"features": feats})
    assert seen == [2, 1, 1] and len(steps) == 4


@pytest.mark.parametrize("init", ["FixedLearnedInit", "RandomInit"])
def test_video_model_gradients(init: str) -> None:
    model = make_model(PatchEncoder(), init=init)
    out = model({"video": torch.randn(B, T, 3, 16, 16)})
    loss = FeatureReconstructionLoss()(out) + 0.5 * SlotSlotContrastLoss(temperature=0.1)(out)
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    for part in ("projection", "initializer", "grouper", "predictor", "decoder"):
        for name, p in getattr(model, part).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{part}.{name}"


def test_gradient_checkpointing_is_exact() -> None:
    model = make_model()
    feats = torch.randn(B, T, P, FD)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        out = model({"features": feats})
        FeatureReconstructionLoss()(out).backward()
        grads.append([p.grad.clone() for p in model.decoder.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_registries_build_and_reject_unknown() -> None:
    assert isinstance(PROJECTIONS.build("MLP", inp_dim=FD, outp_dim=D), FeatureMLP)
    assert isinstance(GROUPERS.build("SlotAttention", inp_dim=D, slot_dim=D), SlotAttention)
    assert isinstance(PREDICTORS.build("TransformerPredictor", dim=D), TransformerPredictor)
    assert isinstance(PREDICTORS.build("Identity", dim=D), IdentityPredictor)
    assert isinstance(DECODERS.build("MLPDecoder", inp_dim=D, outp_dim=FD), MLPDecoder)
    assert isinstance(INITIALIZERS.build("RandomInit", n_slots=K, dim=D), RandomInit)
    with pytest.raises(ConfigError, match="valid: FixedLearnedInit, RandomInit"):
        INITIALIZERS.build("FixedInit", n_slots=K, dim=D)
    with pytest.raises(ConfigError, match="does not take n_slot"):
        GROUPERS.build("SlotAttention", inp_dim=D, slot_dim=D, n_slot=3)


def test_overfit_one_batch() -> None:
    """150 Adam steps on one fixed batch: featrec + 0.5 * ss falls to < 50% (about 27% here)."""
    model = make_model()
    model.decoder = MLPDecoder(D, FD, hidden_dims=(64, 64), n_patches=P)
    feats = torch.randn(4, T, P, FD)
    featrec, ss = FeatureReconstructionLoss(), SlotSlotContrastLoss(temperature=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(150):
        out = model({"features": feats})
        rec, con = featrec(out), ss(out)
        loss = rec + 0.5 * con
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((loss.item(), rec.item()))
    (first, rec0), (last, rec1) = history[0], history[-1]
    assert math.isfinite(last) and last < 0.5 * first, history[::25]
    assert rec1 < 0.85 * rec0, history[::25]  # the reconstruction itself learns, not only ss
