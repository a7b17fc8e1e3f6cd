"""Slot attention on one frame. The loop over time lives in ``video.py``."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from core.models.weight_init import zero_biases
from core.registry import Registry

GROUPERS = Registry("model.grouper")


@GROUPERS.register()
class SlotAttention(nn.Module):
    """Iterative slot attention (Locatello et al. 2020) as used by VideoSAUR / SlotContrast.

    Per call: LayerNorm(inputs) -> k, v (computed once). Per iteration: ``s = LayerNorm(slots)``,
    q = s W_q; logits = q k^T * d^-0.5 (d = per-head width, ``slot_dim`` when ``heads == 1``);
    softmax over SLOTS; + ``eps``; renormalise over inputs (weighted mean of v);
    ``GRUCell(update, s)``; residual MLP ``s' + MLP(s')`` (LayerNorm, D -> mlp_ratio*D -> D, zero
    biases).

    The GRU's hidden state is the *normalised* slots ``s``, as in the published SlotContrast /
    VideoSAUR step (martius-lab/slotcontrast@17b42b0 ``modules/groupers.py``: ``slots =
    self.norm_slots(slots)`` overwrites the slots before the query and the GRU). Locatello et
    al.'s original passes the raw slots; with the same weights the two differ, and the published
    form is the one that produced the published numbers.

    Args:
        inp_dim: width of the (projected) input features.
        slot_dim: slot width D (also the k/q/v width).
        n_iters: iterations used when ``forward`` gets ``n_iters=None`` (frames t > 0).
        n_iters_first: iterations the video model uses on frame 0.
        eps: added to the attention before renormalising over inputs.
        mlp_ratio: hidden width of the residual MLP, in multiples of D.
        heads: attention heads; the returned mask is the mean over heads.
    """

    def __init__(
        self,
        inp_dim: int,
        slot_dim: int,
        n_iters: int = 3,
        n_iters_first: int = 3,
        eps: float = 1e-8,
        mlp_ratio: int = 4,
        heads: int = 1,
    ) -> None:
        super().__init__()
        if slot_dim % heads:
            raise ValueError(f"slot_dim {slot_dim} is not divisible by heads {heads}")
        for name, value in (("n_iters", n_iters), ("n_iters_first", n_iters_first)):
            if value < 1:
                raise ValueError(f"SlotAttention {name} must be >= 1, got {value}")
        self.inp_dim, self.slot_dim, self.heads = inp_dim, slot_dim, heads
        self.n_iters, self.n_iters_first, self.eps = n_iters, n_iters_first, eps
        self.scale = (slot_dim // heads) ** -0.5
        self.norm_inputs = nn.LayerNorm(inp_dim)
        self.to_k = nn.Linear(inp_dim, slot_dim, bias=False)
        self.to_v = nn.Linear(inp_dim, slot_dim, bias=False)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.to_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = nn.Sequential(
            nn.LayerNorm(slot_dim),
            nn.Linear(slot_dim, mlp_ratio * slot_dim),
            nn.ReLU(),
            nn.Linear(mlp_ratio * slot_dim, slot_dim),
        )
        zero_biases(self.mlp)

    def step(
        self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration. keys/values (B, H, N, d); returns new slots and the (B, K, N) mask."""
        B, K, D = slots.shape
        slots = self.norm_slots(slots)  # the published step: also the GRU's hidden state
        q = rearrange(self.to_q(slots), "b k (h d) -> b h k d", h=self.heads)
        logits = torch.einsum("bhkd,bhnd->bhkn", q, keys) * self.scale
        attn = logits.softmax(dim=-2)  # over slots
        weights = attn + self.eps
        weights = weights / weights.sum(dim=-1, keepdim=True)  # weighted mean over inputs
        updates = rearrange(
            torch.einsum("bhkn,bhnd->bhkd", weights, values), "b h k d -> b k (h d)"
        )
        new = self.gru(updates.reshape(B * K, D), slots.reshape(B * K, D)).reshape(B, K, D)
        return new + self.mlp(new), attn.mean(dim=1)

    def forward(
        self, inputs: torch.Tensor, slots: torch.Tensor, n_iters: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Group ``inputs`` (B, N, Din) into ``slots`` (B, K, D).

        Returns ``{"slots": (B, K, D), "masks": (B, K, N)}``. ``masks`` is the attention of the
        LAST iteration after the softmax over slots and before the +eps / renormalisation over
        inputs, so it sums to 1 over K (the reference's ``pre_norm_attn``). It is the attention
        of the slots that entered that last iteration, as in the reference.

        ``n_iters`` (default ``self.n_iters``) must be >= 1: with zero iterations there is no
        attention to return, so 0 is rejected rather than silently returning the input slots.
        """
        n_iters = self.n_iters if n_iters is None else n_iters
        if n_iters < 1:
            raise ValueError(f"SlotAttention needs n_iters >= 1, got {n_iters}")
        x = self.norm_inputs(inputs)
        keys = rearrange(self.to_k(x), "b n (h d) -> b h n d", h=self.heads)
        values = rearrange(self.to_v(x), "b n (h d) -> b h n d", h=self.heads)
        masks = slots.new_empty(0)
        for _ in range(n_iters):
            slots, masks = self.step(slots, keys, values)
        return {"slots": slots, "masks": masks}
