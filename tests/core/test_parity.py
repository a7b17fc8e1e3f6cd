"""Parity with the published SlotContrast / VideoSAUR code, written down as formulas.

The published code is martius-lab/slotcontrast@17b42b0 (identical modules in
martius-lab/videosaur@5d09311). Nothing here imports or copies it: each test states the published
formula and checks our modules against a hand computation of it, with the same weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.models.decoder import MLPDecoder
from core.models.initializers import FixedLearnedInit
from core.models.predictor import TransformerPredictor
from core.models.projection import FeatureMLP
from core.models.slot_attention import SlotAttention
from core.models.video import SlotVideoModel
from core.training.module import lr_lambda


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def layer_norm(z: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm by hand: (z - mean) / sqrt(biased var + eps) * gamma + beta."""
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return (z - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def gru_cell(x: torch.Tensor, h: torch.Tensor, gru: nn.GRUCell) -> torch.Tensor:
    """GRUCell by hand (Cho et al. 2014, PyTorch's gate order r, z, n)."""
    w_ir, w_iz, w_in = gru.weight_ih.chunk(3)
    w_hr, w_hz, w_hn = gru.weight_hh.chunk(3)
    b_ir, b_iz, b_in = gru.bias_ih.chunk(3)
    b_hr, b_hz, b_hn = gru.bias_hh.chunk(3)
    r = torch.sigmoid(x @ w_ir.T + b_ir + h @ w_hr.T + b_hr)
    z = torch.sigmoid(x @ w_iz.T + b_iz + h @ w_hz.T + b_hz)
    n = torch.tanh(x @ w_in.T + b_in + r * (h @ w_hn.T + b_hn))
    return (1 - z) * n + z * h


def residual_mlp(s: torch.Tensor, mlp: nn.Sequential) -> torch.Tensor:
    """s + W2 relu(W1 LN(s) + b1) + b2."""
    ln, fc1, _, fc2 = mlp
    return s + torch.relu(layer_norm(s, ln) @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias


def randomize_norms(module: nn.Module) -> None:
    """Give every LayerNorm a non-trivial gamma / beta so that normalised != raw shows."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)


# ------------------------------------------------------------------ slot attention


def test_one_slot_one_iteration_by_hand() -> None:
    """K = 1: softmax over slots is 1 everywhere, so the update is the plain mean of the values,
    and the published step is ``s = LN(slots); h = GRU(mean(v), s); out = h + MLP(h)``."""
    dim, n = 4, 5
    sa = SlotAttention(dim, dim, n_iters=1)
    randomize_norms(sa)
    inputs = torch.randn(1, n, dim)
    slots = 3.0 * torch.randn(1, 1, dim) + 2.0  # far from normalised: raw and LN(slots) differ
    out = sa(inputs, slots, n_iters=1)

    values = layer_norm(inputs[0], sa.norm_inputs) @ sa.to_v.weight.T  # (N, D)
    update = values.mean(0, keepdim=True)  # attention 1 -> weights (1 + eps) / (N (1 + eps))
    hidden = layer_norm(slots[0], sa.norm_slots)  # the published GRU hidden state
    expected = residual_mlp(gru_cell(update, hidden, sa.gru), sa.mlp)
    torch.testing.assert_close(out["slots"][0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["masks"], torch.ones(1, 1, n))

    raw = residual_mlp(gru_cell(update, slots[0], sa.gru), sa.mlp)  # Locatello et al.'s form
    assert (raw - expected).abs().max() > 1e-2  # the test can tell the two forms apart


def published_slot_attention(sa: SlotAttention, inputs: torch.Tensor, slots: torch.Tensor,
                             n_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The published iteration as formulas, with explicit per-slot loops (one head)."""
    x = layer_norm(inputs, sa.norm_inputs)
    k, v = x @ sa.to_k.weight.T, x @ sa.to_v.weight.T  # (B, N, D)
    mask = None
    for _ in range(n_iters):
        s = layer_norm(slots, sa.norm_slots)
        q = s @ sa.to_q.weight.T
        logits = torch.einsum("bkd,bnd->bkn", q, k) / math.sqrt(q.shape[-1])
        mask = torch.softmax(logits, dim=1)  # over slots
        weights = (mask + sa.eps) / (mask + sa.eps).sum(-1, keepdim=True)  # over inputs
        new = []
        for i in range(slots.shape[1]):
            u = torch.einsum("bn,bnd->bd", weights[:, i], v)
            new.append(residual_mlp(gru_cell(u, s[:, i], sa.gru), sa.mlp))
        slots = torch.stack(new, dim=1)
    assert mask is not None
    return slots, mask


def test_slot_attention_matches_the_published_iteration() -> None:
    sa = SlotAttention(8, 6, n_iters=3)
    randomize_norms(sa)
    inputs, slots = torch.randn(2, 10, 8), torch.randn(2, 4, 6)
    out = sa(inputs, slots)
    want_slots, want_mask = published_slot_attention(sa, inputs, slots, 3)
    torch.testing.assert_close(out["slots"], want_slots, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["masks"], want_mask, atol=1e-6, rtol=1e-5)  # last iteration


# ------------------------------------------------------------------ predictor


def by_hand_block(block: nn.Module, x: torch.Tensor, n_heads: int, q_scale: float) -> torch.Tensor:
    """One pre-norm block: x + proj(softmax(q k^T * q_scale) v); x + FFN(LN(x))."""
    h = layer_norm(x, block.norm1)
    q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).chunk(3, dim=-1)
    split = lambda z: z.unflatten(-1, (n_heads, -1)).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    att = torch.softmax(q @ k.transpose(-1, -2) * q_scale, dim=-1)
    out = (att @ v).transpose(1, 2).flatten(2)
    x = x + out @ block.attn.proj.weight.T + block.attn.proj.bias
    fc1, _, _, fc2 = block.ffn
    return x + torch.relu(layer_norm(x, block.norm2) @ fc1.weight.T + fc1.bias) @ fc2.weight.T \
        + fc2.bias


@pytest.mark.parametrize(("scale", "power"), [("published", 0.5), ("standard", -0.5)])
def test_predictor_attention_scale(scale: str, power: float) -> None:
    """published: q / head_dim**-0.5 = q * sqrt(head_dim); standard: q / sqrt(head_dim)."""
    dim, heads = 16, 4
    pred = TransformerPredictor(dim, n_heads=heads, attention_scale=scale).eval()
    assert TransformerPredictor(dim).blocks[0].attn.attention_scale == "published"  # default
    randomize_norms(pred)
    x = torch.randn(2, 5, dim)
    head_dim = dim // heads
    torch.testing.assert_close(pred(x), by_hand_block(pred.blocks[0], x, heads, head_dim**power),
                               atol=1e-5, rtol=1e-5)
    other = by_hand_block(pred.blocks[0], x, heads, head_dim**-power)
    assert not torch.allclose(pred(x), other, atol=1e-3)


def test_predictor_rejects_unknown_scale() -> None:
    with pytest.raises(ValueError, match="published, standard"):
        TransformerPredictor(8, n_heads=2, attention_scale="sqrt")


# ------------------------------------------------------------------ initialisation


def uniform_bound_ok(w: torch.Tensor, bound: float) -> None:
    """Every weight inside +-bound and the spread of U(-bound, bound): std bound / sqrt(3)."""
    assert w.abs().max() <= bound + 1e-7
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_published_initialisation() -> None:
    feat, dim, n_patches = 96, 128, 256
    mlp = FeatureMLP(feat, dim)
    assert not mlp.fc1.bias.any() and not mlp.fc2.bias.any()
    uniform_bound_ok(mlp.fc1.weight, 1 / math.sqrt(feat))  # PyTorch default weights

    sa = SlotAttention(dim, dim)
    assert not sa.mlp[1].bias.any() and not sa.mlp[3].bias.any()
    assert sa.gru.bias_ih.any()  # the GRU keeps PyTorch's default, biases included

    dec = MLPDecoder(dim, feat, hidden_dims=(256, 256), n_patches=n_patches)
    assert all(not layer.bias.any() for layer in dec.layers)
    uniform_bound_ok(dec.layers[1].weight, 1 / math.sqrt(256))
    pos = dec.pos_embed.detach()
    assert pos.shape == (1, 1, n_patches, dim)
    assert pos.std().item() == pytest.approx(dim**-0.5, rel=0.03)  # randn * D**-0.5
    assert abs(pos.mean().item()) < 3 * dim**-0.5 / math.sqrt(pos.numel())

    attn = TransformerPredictor(dim, n_heads=4).blocks[0].attn
    # q, k and v are three Xavier-uniform (dim x dim) matrices: bound sqrt(6 / (dim + dim))
    for w in attn.qkv.weight.chunk(3):
        uniform_bound_ok(w, math.sqrt(6 / (2 * dim)))
    uniform_bound_ok(attn.proj.weight, math.sqrt(6 / (2 * dim)))
    assert not attn.qkv.bias.any() and not attn.proj.bias.any()
    ffn = TransformerPredictor(dim, n_heads=4).blocks[0].ffn
    assert ffn[0].bias.any()  # nn.TransformerEncoderLayer's FFN keeps PyTorch's default

    init = FixedLearnedInit(64, dim).slots.detach()
    assert init.std().item() == pytest.approx(dim**-0.5, rel=0.05)


# ------------------------------------------------------------------ the video loop


def test_video_loop_matches_the_published_scan() -> None:
    """t = 0: corrector(initializer, 3 iterations); t > 0: corrector(predictor(state), n_iters);
    the losses see the corrector's slots, the metrics the decoder's masks of every frame."""
    feat, dim, k, n, steps = 12, 8, 3, 9, 4
    model = SlotVideoModel(
        encoder=None, projection=FeatureMLP(feat, dim), initializer=FixedLearnedInit(k, dim),
        grouper=SlotAttention(dim, dim, n_iters=2, n_iters_first=3),
        predictor=TransformerPredictor(dim, n_heads=2),
        decoder=MLPDecoder(dim, feat, hidden_dims=(16,), n_patches=n),
        n_iters=2, n_iters_first=3,
    ).eval()
    features = torch.randn(2, steps, n, feat)
    out = model({"features": features})
    state = model.initializer(2)
    for t in range(steps):
        x = model.projection(features[:, t])
        slots, mask = published_slot_attention(model.grouper, x, state, 3 if t == 0 else 2)
        torch.testing.assert_close(out["slots"][:, t], slots, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["attn_masks"][:, t], mask, atol=1e-5, rtol=1e-5)
        decoded = model.decoder(slots)
        torch.testing.assert_close(out["decoder_masks"][:, t], decoded["masks"],
                                   atol=1e-5, rtol=1e-5)
        state = model.predictor(slots)


# ------------------------------------------------------------------ learning-rate schedule


def test_schedule_at_named_steps() -> None:
    """Published exp_decay_with_warmup (warm-up 2,500, decay to 0.5 at 100,000 steps)."""
    f = lambda step, decay="exponential": lr_lambda(step, 2500, decay, 0.5, 100_000)  # noqa: E731
    assert f(0) == 0.0  # the first update runs at lr 0, as published
    assert f(1) == pytest.approx(1 / 2500)
    assert f(1250) == pytest.approx(0.5)
    assert f(2499) == pytest.approx(2499 / 2500)
    assert f(2500) == 1.0
    assert f(51_250) == pytest.approx(0.5**0.5)  # halfway through the decay span
    assert f(100_000) == pytest.approx(0.5)
    assert f(197_500) == pytest.approx(0.25)
    assert f(51_250, "cosine") == pytest.approx(0.5)
    assert f(100_000, "cosine") == pytest.approx(0.0)
    assert f(150_000, "cosine") == pytest.approx(0.0)
    assert f(60_000, "none") == 1.0
    assert lr_lambda(0, 0, "exponential", 0.5, 100) == 1.0  # no warm-up
