"""Non-learned segmentations to score a slot model against, as soft masks at patch resolution.

Each function returns masks shaped like a model's, ``(B, T, K, h, w)`` on the patch grid, so
:class:`core.metrics.VideoARI` / :class:`core.metrics.VideoIoU` resize them to the ground truth
exactly as they resize the model's (bilinear, then argmax over K):

- :func:`kmeans_masks`: k-means with K clusters on the frozen backbone's patch features of each
  clip (all frames of the clip together, so a cluster keeps its identity over time);
- :func:`stripe_masks`: K fixed vertical stripes, the segmentation that knows nothing of the image;
- :func:`patch_oracle_masks`: the ground truth averaged over each patch, the best any model
  scoring masks on this patch grid can do.

:func:`position_r2` measures how much a backbone's features say about where each patch is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kmeans(x: Tensor, k: int, iters: int = 50, seed: int = 0) -> Tensor:
    """Lloyd's k-means on the rows of ``x`` (N, F) with k-means++ seeding; returns labels (N,).

    Deterministic for a given ``seed``. An empty cluster is re-seeded at the point farthest from
    its centre, so exactly ``min(k, distinct rows)`` clusters are in use when the data allow.
    """
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"kmeans needs a non-empty (N, F) tensor, got {tuple(x.shape)}")
    x = x.float()
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = min(k, len(x))
    centres = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):  # k-means++: next centre drawn with probability ~ squared distance
        d2 = torch.cdist(x, centres).min(dim=1).values.pow(2)
        if float(d2.sum()) == 0.0:
            break
        centres = torch.cat([centres, x[torch.multinomial(d2.cpu(), 1, generator=g)]])
    labels = torch.cdist(x, centres).argmin(dim=1)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=len(centres)).unsqueeze(1)
        empty = counts.squeeze(1) == 0
        new = torch.where(empty.unsqueeze(1), centres, sums / counts.clamp(min=1))
        if empty.any():  # re-seed empty clusters at the worst-fitted points
            worst = torch.cdist(x, new).min(dim=1).values.argsort(descending=True)
            new[empty] = x[worst[: int(empty.sum())]]
        new_labels = torch.cdist(x, new).argmin(dim=1)
        centres = new
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def kmeans_masks(features: Tensor, k: int, grid: tuple[int, int], seed: int = 0) -> Tensor:
    """k-means on each clip's patch features: ``features`` (B, T, P, F) -> one-hot (B, T, K, h, w).

    The T * P patch features of one clip are clustered together, so cluster ``j`` is the same
    segment in every frame (what video FG-ARI asks of a slot).
    """
    B, T, P, _ = features.shape
    h, w = grid
    if h * w != P:
        raise ValueError(f"grid {grid} does not hold {P} patches")
    out = features.new_zeros(B, T, k, h, w, dtype=torch.float32)
    for b in range(B):
        labels = kmeans(features[b].reshape(T * P, -1), k, seed=seed)
        one_hot = F.one_hot(labels, k).float().view(T, h, w, k).permute(0, 3, 1, 2)
        out[b] = one_hot
    return out


def stripe_masks(batch: int, frames: int, k: int, grid: tuple[int, int]) -> Tensor:
    """K vertical stripes of (nearly) equal width, the same in every frame: (B, T, K, h, w)."""
    h, w = grid
    column = torch.arange(w) * k // w  # stripe index of each patch column
    one_hot = F.one_hot(column, k).float().T  # (K, w)
    return one_hot[:, None, :].expand(k, h, w).expand(batch, frames, k, h, w).clone()


def patch_oracle_masks(true: Tensor, grid: tuple[int, int], n_ids: int | None = None) -> Tensor:
    """The ground truth ids (B, T, H, W) averaged over each patch: soft (B, T, n_ids, h, w).

    Scored like a model's masks, this is the ceiling of any model whose masks live on ``grid``.
    """
    B, T, H, W = true.shape
    h, w = grid
    if H % h or W % w:
        raise ValueError(f"masks of {H}x{W} do not split into a {h}x{w} grid")
    n = int(true.max()) + 1 if n_ids is None else n_ids
    one_hot = F.one_hot(true.long().flatten(0, 1), n).permute(0, 3, 1, 2).float()
    pooled = F.avg_pool2d(one_hot, kernel_size=(H // h, W // w))
    return pooled.view(B, T, n, h, w)


def position_r2(features: Tensor, grid: tuple[int, int]) -> float:
    """How linearly decodable a patch's position is from its feature: R^2 in [0, 1].

    Least squares from ``features`` (N, P, F) (+ a constant) to each patch's (row, column) on
    ``grid``; the mean of the two coefficients of determination. A trained ViT scores high; a
    random-weight one, whose position embedding is tiny next to its patch tokens, scores low.
    """
    N, P, Fdim = features.shape
    h, w = grid
    if h * w != P:
        raise ValueError(f"grid {grid} does not hold {P} patches")
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    target = torch.stack([rows.flatten(), cols.flatten()], dim=-1).double().repeat(N, 1)
    x = features.reshape(N * P, Fdim).double()
    x = torch.cat([x - x.mean(0), torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(x, target).solution
    residual = (x @ solution - target).pow(2).sum(0)
    total = (target - target.mean(0)).pow(2).sum(0)
    return float((1 - residual / total).mean())
