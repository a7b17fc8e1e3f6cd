"""Tests for core.baselines: k-means against scikit-learn, stripes, and the patch-grid oracle."""

from __future__ import annotations

import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from core.baselines import kmeans, kmeans_masks, patch_oracle_masks, stripe_masks
from core.metrics import VideoARI, VideoIoU


def blobs(n_per: int = 40, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, 6, generator=g) * 10
    labels = torch.arange(k).repeat_interleave(n_per)
    return centres[labels] + torch.randn(len(labels), 6, generator=g) * 0.5, labels


def test_kmeans_finds_separated_clusters_like_sklearn() -> None:
    x, truth = blobs()
    ours = kmeans(x, 4, seed=0)
    theirs = KMeans(4, n_init=10, random_state=0).fit_predict(x.numpy())
    assert adjusted_rand_score(truth, ours) == pytest.approx(1.0)
    assert adjusted_rand_score(theirs, ours) == pytest.approx(1.0)
    assert torch.equal(ours, kmeans(x, 4, seed=0))  # deterministic


def test_kmeans_more_clusters_than_points_and_duplicates() -> None:
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    labels = kmeans(x, 7)
    assert labels[0] == labels[1] != labels[2]
    with pytest.raises(ValueError, match="non-empty"):
        kmeans(torch.zeros(0, 3), 2)


def test_kmeans_masks_keep_a_cluster_over_time() -> None:
    """Two colours swap places between frames: a clip-level cluster follows each colour."""
    red, blue = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    f0 = torch.stack([red, red, blue, blue])
    f1 = torch.stack([blue, blue, red, red])
    feats = torch.stack([f0, f1])[None]  # (1, T=2, P=4, F=2)
    masks = kmeans_masks(feats, 2, (2, 2))
    assert masks.shape == (1, 2, 2, 2, 2)
    ids = masks.argmax(2).flatten(2)  # (1, 2, 4)
    assert torch.equal(ids[0, 0], ids[0, 1].flip(0))
    true = torch.tensor([[[1, 1, 2, 2], [2, 2, 1, 1]]]).view(1, 2, 2, 2)
    ari = VideoARI()
    ari.update(masks, true)
    assert ari.compute() == pytest.approx(1.0)


def test_stripes_and_oracle() -> None:
    s = stripe_masks(2, 3, 4, (2, 8))
    assert s.shape == (2, 3, 4, 2, 8)
    assert torch.equal(s.argmax(2)[0, 0, 0], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    true = torch.zeros(1, 2, 8, 8, dtype=torch.long)
    true[:, :, :4] = 1  # two objects, each exactly one row of patches of a 2x2 grid
    true[:, :, 4:] = 2
    oracle = patch_oracle_masks(true, (2, 2))
    assert oracle.shape == (1, 2, 3, 2, 2)
    ari, mbo = VideoARI(), VideoIoU()
    ari.update(oracle, true)
    mbo.update(oracle, true)
    assert ari.compute() == pytest.approx(1.0) and mbo.compute() == pytest.approx(1.0)
    corner = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    corner[..., :4, :4] = 1  # one patch of four: bilinear upsampling rounds its corner off
    mbo = VideoIoU()
    mbo.update(patch_oracle_masks(corner, (2, 2)), corner)
    assert 0.5 < mbo.compute() < 1.0  # the oracle's ceiling on a coarse grid is below 1
    with pytest.raises(ValueError, match="grid"):
        patch_oracle_masks(true, (3, 3))
