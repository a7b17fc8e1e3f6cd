"""Tests for core.metrics against sklearn (ARI) and an independent numpy/scipy reference (mBO)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

from core.metrics import (
    METRIC_ARI,
    METRIC_MBO,
    VideoARI,
    VideoIoU,
    fg_ari,
    fg_ari_per_frame,
    mbo,
    mbo_per_frame,
    soft_to_ids,
)

TOL = 1e-6
MATCHINGS = ("overlap", "hungarian")


# ----------------------------------------------------------------------------- references


def ref_ari(pred: np.ndarray, true: np.ndarray, ignore_background: bool = True) -> np.ndarray:
    """sklearn ARI per video (first axis) on foreground pixels (or all pixels)."""
    out = []
    for p, t in zip(pred, true, strict=True):
        p, t = p.ravel(), t.ravel()
        keep = t != 0 if ignore_background else np.ones_like(t, dtype=bool)
        out.append(adjusted_rand_score(t[keep], p[keep]))
    return np.array(out)


def ref_mbo_video(p: np.ndarray, t: np.ndarray, matching: str, ignore_background: bool) -> float:
    objects = [c for c in np.unique(t) if not (ignore_background and c == 0)]
    segments = np.unique(p)
    if not objects:
        return math.nan
    iou = np.zeros((len(objects), len(segments)))
    for i, c in enumerate(objects):
        for j, k in enumerate(segments):
            tm, pm = t == c, p == k
            union = np.logical_or(tm, pm).sum()
            iou[i, j] = np.logical_and(tm, pm).sum() / union if union else 0.0
    if matching == "overlap":
        return float(iou.max(axis=1).mean())
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / len(objects))


def ref_mbo(
    pred: np.ndarray, true: np.ndarray, matching: str, ignore_background: bool = True
) -> np.ndarray:
    return np.array(
        [ref_mbo_video(p, t, matching, ignore_background) for p, t in zip(pred, true, strict=True)]
    )


# ----------------------------------------------------------------------------- cases


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    B, T = rng.integers(1, 5), rng.integers(1, 7)
    H, W = rng.integers(1, 13), rng.integers(1, 13)
    n_obj, n_pred = rng.integers(0, 7), rng.integers(1, 11)
    shape = (B, T, H, W)
    if rng.random() < 0.5:  # blocky, structured objects
        true = np.zeros(shape, dtype=np.int64)
        for obj in range(1, n_obj + 1):
            y0, x0 = rng.integers(0, H), rng.integers(0, W)
            y1, x1 = y0 + rng.integers(1, H + 1), x0 + rng.integers(1, W + 1)
            true[..., y0:y1, x0:x1] = obj
    else:
        true = rng.integers(0, n_obj + 1, size=shape)
    if rng.random() < 0.5:  # noisy copy of the truth
        pred = true % n_pred
        noise = rng.random(shape) < rng.random() * 0.5
        pred[noise] = rng.integers(0, n_pred, size=int(noise.sum()))
    else:
        pred = rng.integers(0, n_pred, size=shape)
    if rng.random() < 0.2:  # sparse / large ids, background stays 0
        true_map = np.concatenate([[0], rng.choice(1000, size=6, replace=False) + 1])
        true = true_map[true]
        pred = rng.choice(10**6, size=10, replace=False)[pred]
    return pred, true


def edge_cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    shape = (2, 3, 6, 6)
    two = np.zeros(shape, dtype=np.int64)
    two[..., :, :3] = 1
    two[..., 3:, 3:] = 2
    many = rng.integers(0, 7, size=shape)
    sparse_true = np.where(two == 1, 200, np.where(two == 2, 37, 0))
    one_pixel = np.zeros(shape, dtype=np.int64)
    one_pixel[:, 0, 0, 0] = 5
    mixed = two.copy()
    mixed[0] = 0  # first video background-only, second normal
    return [
        ("background only", rng.integers(0, 4, size=shape), np.zeros(shape, dtype=np.int64)),
        ("one object", rng.integers(0, 3, size=shape), (two == 1).astype(np.int64)),
        ("more slots than objects", rng.integers(0, 10, size=shape), two),
        ("more objects than slots", rng.integers(0, 2, size=shape), many),
        ("pred constant", np.full(shape, 3), many),
        ("pred equals true", many.copy(), many),
        ("sparse ids", np.where(two == 1, 5, 1000), sparse_true),
        ("huge ids, no background", np.where(two == 1, 7, 10**9), two + 10**9),
        ("single foreground pixel", rng.integers(0, 3, size=shape), one_pixel),
        ("mixed batch", rng.integers(0, 3, size=shape), mixed),
    ]


def all_cases(n_random: int = 220) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return edge_cases() + [(f"random {i}", *random_case(rng)) for i in range(n_random)]


CASES = all_cases()


# ----------------------------------------------------------------------------- FG-ARI


def test_fg_ari_matches_sklearn() -> None:
    for name, pred, true in CASES:
        got = fg_ari(torch.from_numpy(pred), torch.from_numpy(true))
        assert got.dtype == torch.float64 and got.shape == (pred.shape[0],), name
        np.testing.assert_allclose(got.numpy(), ref_ari(pred, true), atol=TOL, err_msg=name)


def test_ari_all_pixels_matches_sklearn() -> None:
    for name, pred, true in CASES[:80]:
        got = fg_ari(torch.from_numpy(pred), torch.from_numpy(true), ignore_background=False)
        np.testing.assert_allclose(got.numpy(), ref_ari(pred, true, False), atol=TOL, err_msg=name)


def test_fg_ari_edge_values() -> None:
    shape = (1, 2, 4, 4)
    background = torch.zeros(shape, dtype=torch.long)
    assert fg_ari(torch.randint(0, 5, shape), background).item() == 1.0
    true = torch.randint(0, 6, shape)
    assert fg_ari(true.clone(), true).item() == pytest.approx(1.0)
    assert fg_ari(torch.zeros(0, 2, 4, 4, dtype=torch.long), background[:0]).shape == (0,)


def test_slot_switching_lowers_video_ari_but_not_per_frame() -> None:
    # Two frames, object 1 on the left, object 2 on the right; the slots swap in frame 2.
    true = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    true[..., :2] = 1
    true[..., 2:] = 2
    pred = true.clone()
    pred[0, 1] = 3 - true[0, 1]
    assert fg_ari(pred, true).item() < 1.0
    assert adjusted_rand_score(true[true > 0].numpy(), pred[true > 0].numpy()) < 1.0
    assert torch.all(fg_ari_per_frame(pred, true) == 1.0)
    assert mbo(pred, true).item() == pytest.approx(1 / 3)  # each slot: 8 of 16 + 8 other pixels
    assert torch.all(mbo_per_frame(pred, true) == 1.0)


# ----------------------------------------------------------------------------- mBO


@pytest.mark.parametrize("matching", MATCHINGS)
def test_mbo_matches_reference(matching: str) -> None:
    for name, pred, true in CASES:
        got = mbo(torch.from_numpy(pred), torch.from_numpy(true), matching)
        assert got.dtype == torch.float64 and got.shape == (pred.shape[0],), name
        expected = ref_mbo(pred, true, matching)
        np.testing.assert_allclose(got.numpy(), expected, atol=TOL, equal_nan=True, err_msg=name)


@pytest.mark.parametrize("matching", MATCHINGS)
def test_mbo_with_background_object(matching: str) -> None:
    for name, pred, true in CASES[:80]:
        got = mbo(torch.from_numpy(pred), torch.from_numpy(true), matching, ignore_background=False)
        expected = ref_mbo(pred, true, matching, ignore_background=False)
        np.testing.assert_allclose(got.numpy(), expected, atol=TOL, equal_nan=True, err_msg=name)


def test_mbo_background_only_is_nan_and_hungarian_unmatched_is_zero() -> None:
    shape = (1, 2, 4, 4)
    assert math.isnan(mbo(torch.randint(0, 3, shape), torch.zeros(shape, dtype=torch.long)))
    true = torch.zeros(shape, dtype=torch.long)
    true[..., :2, :2], true[..., 2:, 2:] = 1, 2
    pred = torch.zeros(shape, dtype=torch.long)  # one segment for two objects
    assert mbo(pred, true, "overlap").item() == pytest.approx(0.25)
    assert mbo(pred, true, "hungarian").item() == pytest.approx(0.125)


# ----------------------------------------------------------------------------- oracle


def test_permuted_truth_scores_one() -> None:
    rng = np.random.default_rng(2)
    for _ in range(30):
        _, true = random_case(rng)
        if not true.any():
            continue
        perm = rng.permutation(true.max() + 5)
        pred, t = torch.from_numpy(perm[true]), torch.from_numpy(true)
        np.testing.assert_allclose(fg_ari(pred, t).numpy(), 1.0, atol=TOL)
        for matching in MATCHINGS:
            np.testing.assert_allclose(mbo(pred, t, matching).numpy(), 1.0, atol=TOL)


# ----------------------------------------------------------------------------- per frame


def test_per_frame_equals_single_frame_videos() -> None:
    for name, pred, true in CASES[:60]:
        p, t = torch.from_numpy(pred), torch.from_numpy(true)
        B, T = true.shape[:2]
        ari = fg_ari_per_frame(p, t)
        assert ari.shape == (B, T), name
        expected = ref_ari(pred.reshape(B * T, 1, *true.shape[2:]), true.reshape(B * T, 1, -1))
        np.testing.assert_allclose(ari.numpy().ravel(), expected, atol=TOL, err_msg=name)
        for matching in MATCHINGS:
            per_frame = mbo_per_frame(p, t, matching)
            for b in range(B):
                for f in range(T):
                    single = mbo(p[b : b + 1, f : f + 1], t[b : b + 1, f : f + 1], matching)
                    np.testing.assert_allclose(per_frame[b, f], single[0], equal_nan=True)


# ----------------------------------------------------------------------------- soft masks


def test_soft_to_ids_one_hot_round_trip() -> None:
    ids = torch.randint(0, 5, (2, 3, 8, 10))
    masks = F.one_hot(ids, 5).permute(0, 1, 4, 2, 3).float()
    masks = masks + 0.3 * torch.rand_like(masks)
    out = soft_to_ids(masks, (8, 10))
    assert out.dtype == torch.long and torch.equal(out, ids)


def test_soft_to_ids_resizes_bilinear_then_argmax() -> None:
    masks = torch.rand(2, 3, 4, 5, 7)
    out = soft_to_ids(masks, (16, 12))
    flat = F.interpolate(masks.flatten(0, 1), size=(16, 12), mode="bilinear", align_corners=False)
    assert out.shape == (2, 3, 16, 12)
    assert torch.equal(out, flat.argmax(dim=1).view(2, 3, 16, 12))
    # One-hot stripes upscaled x4: every output pixel weighs its own stripe >= 5/8, so ids repeat.
    low = torch.randint(0, 4, (1, 2, 1, 3)).expand(1, 2, 3, 3)
    up = soft_to_ids(F.one_hot(low, 4).permute(0, 1, 4, 2, 3).float(), (12, 12))
    assert torch.equal(up, low.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1))


# ----------------------------------------------------------------------------- accumulators


def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(4):
        pred, true = random_case(rng)
        out.append((torch.from_numpy(pred), torch.from_numpy(true)))
    true0 = torch.zeros(2, 2, 5, 5, dtype=torch.long)  # background-only videos
    out.append((torch.randint(0, 3, true0.shape), true0))
    return out


@pytest.mark.parametrize("ignore_background", [True, False])
def test_video_ari_accumulates(ignore_background: bool) -> None:
    metric = VideoARI(ignore_background=ignore_background)
    assert metric.name == METRIC_ARI == "val/ari"
    assert math.isnan(metric.compute())
    expected = []
    for pred, true in batches(3):
        metric.update(pred, true)
        expected.append(ref_ari(pred.numpy(), true.numpy(), ignore_background))
    assert metric.compute() == pytest.approx(np.concatenate(expected).mean(), abs=TOL)
    metric.reset()
    assert math.isnan(metric.compute())


@pytest.mark.parametrize("matching", MATCHINGS)
@pytest.mark.parametrize("ignore_background", [True, False])
def test_video_iou_accumulates_and_skips_nan(matching: str, ignore_background: bool) -> None:
    metric = VideoIoU(matching=matching, ignore_background=ignore_background)
    assert metric.name == METRIC_MBO == "val/mbo"
    expected = []
    for pred, true in batches(4):
        metric.update(pred, true)
        expected.append(ref_mbo(pred.numpy(), true.numpy(), matching, ignore_background))
    assert metric.compute() == pytest.approx(np.nanmean(np.concatenate(expected)), abs=TOL)
    metric.reset()
    assert math.isnan(metric.compute())


def test_accumulators_accept_soft_masks() -> None:
    true = torch.randint(0, 4, (3, 2, 16, 16))
    masks = torch.rand(3, 2, 6, 8, 8)
    ids = soft_to_ids(masks, (16, 16))
    ari, iou = VideoARI(), VideoIoU("hungarian")
    ari.update(masks, true)
    iou.update(masks, true)
    assert ari.compute() == pytest.approx(fg_ari(ids, true).mean().item())
    assert iou.compute() == pytest.approx(mbo(ids, true, "hungarian").nanmean().item())


# ----------------------------------------------------------------------------- validation


def test_input_validation() -> None:
    ids = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        fg_ari(ids[0], ids[0])
    with pytest.raises(ValueError, match="shapes differ"):
        fg_ari(ids, ids[:, :1])
    with pytest.raises(ValueError, match="non-negative"):
        mbo(ids - 1, ids)
    with pytest.raises(ValueError, match="integer ids"):
        fg_ari(ids.float(), ids)
    with pytest.raises(ValueError, match="overlap, hungarian"):
        mbo(ids, ids, "greedy")
    with pytest.raises(ValueError, match="overlap, hungarian"):
        VideoIoU(matching="greedy")
    with pytest.raises(ValueError, match="shape"):
        soft_to_ids(torch.rand(1, 2, 4, 4), (4, 4))
    with pytest.raises(ValueError, match="floating"):
        soft_to_ids(ids.unsqueeze(2), (4, 4))
    with pytest.raises(ValueError, match="shapes differ"):
        VideoARI().update(ids, ids[..., :2])


def test_uint8_masks_are_accepted() -> None:
    true = torch.randint(0, 4, (2, 2, 6, 6), dtype=torch.uint8)
    pred = torch.randint(0, 5, (2, 2, 6, 6), dtype=torch.int32)
    np.testing.assert_allclose(fg_ari(pred, true).numpy(), ref_ari(pred.numpy(), true.numpy()))


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    for name, pred, true in CASES[:40]:
        p, t = torch.from_numpy(pred), torch.from_numpy(true)
        got = fg_ari(p.cuda(), t.cuda())
        assert got.device.type == "cuda", name
        torch.testing.assert_close(got.cpu(), fg_ari(p, t), atol=TOL, rtol=0)
        for matching in MATCHINGS:
            got = mbo(p.cuda(), t.cuda(), matching)
            assert got.device.type == "cuda", name
            torch.testing.assert_close(got.cpu(), mbo(p, t, matching), equal_nan=True)
    metric = VideoIoU()
    metric.update(
        torch.rand(2, 2, 5, 4, 4, device="cuda"), torch.randint(0, 3, (2, 2, 8, 8)).cuda()
    )
    assert not math.isnan(metric.compute())
