"""Video object-segmentation metrics: FG-ARI and mBO, as in SAVi / VideoSAUR / SlotContrast.

Inputs are integer id maps of shape ``(B, T, H, W)``: ``true`` holds ground-truth instance ids
(0 = background), ``pred`` holds predicted segment (slot) ids. Ids are arbitrary non-negative
integers; they need not be contiguous. All pixels of all frames of one video form ONE point set,
so a slot must keep following the same object through time to score well.

Conventions (shared by the functional API and the accumulating classes):

* A background-only video (no foreground pixel) has FG-ARI 1.0, as has a video with a single
  foreground pixel: the ARI denominator is zero and sklearn's convention (1.0) is used.
* For mBO such a video is NaN; ``VideoIoU`` skips NaN videos, as the references do.
* An object id absent from a video is not an object of that video and does not enter its mean.
* An IoU whose union is empty is 0 (cannot happen for a present object; kept for safety).
* A slot that switches objects mid-video lowers the video ARI below 1.0, while the per-frame
  ARI (``fg_ari_per_frame``) of every frame stays 1.0: per-frame scores ignore consistency.

Everything runs on the input's device (CPU or CUDA); only the Hungarian assignment of
``mbo(..., matching="hungarian")`` goes through scipy on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from core.names import METRIC_ARI, METRIC_MBO
from core.registry import Registry

MATCHINGS = ("overlap", "hungarian")
METRICS = Registry("val_metrics")


def _check_ids(pred: Tensor, true: Tensor) -> None:
    for name, x in (("pred", pred), ("true", true)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be an id map (B, T, H, W), got shape {tuple(x.shape)}")
        if x.is_floating_point() or x.is_complex():
            raise ValueError(f"{name} must hold integer ids, got dtype {x.dtype}")
    if pred.shape != true.shape:
        raise ValueError(f"pred and true shapes differ: {tuple(pred.shape)} vs {tuple(true.shape)}")


def _check_matching(matching: str) -> None:
    if matching not in MATCHINGS:
        raise ValueError(f"matching must be one of {', '.join(MATCHINGS)}; got {matching!r}")


def _compact(ids: Tensor, keep_zero: bool) -> tuple[Tensor, int]:
    """Map ids to 0..n-1 keeping their order; with ``keep_zero`` id 0 stays 0 even if absent."""
    flat = ids.reshape(-1)
    if keep_zero:
        flat = torch.cat([flat.new_zeros(1), flat])
    uniq, inverse = torch.unique(flat, return_inverse=True)
    if keep_zero:
        inverse = inverse[1:]
    return inverse.reshape(ids.shape), uniq.numel()


def _contingency(pred: Tensor, true: Tensor) -> Tensor:
    """Per-video contingency counts ``(B, C, K)`` in float64: row = true id, column = pred id."""
    _check_ids(pred, true)
    B = true.shape[0]
    pred, true = pred.long(), true.long()
    if true.numel() == 0:
        return torch.zeros(B, 1, 1, dtype=torch.float64, device=true.device)
    t_min, t_max, p_min, p_max = torch.stack([*torch.aminmax(true), *torch.aminmax(pred)]).tolist()
    if t_min < 0 or p_min < 0:
        raise ValueError(f"ids must be non-negative, got min true {t_min}, min pred {p_min}")
    C, K = t_max + 1, p_max + 1
    n_bins = B * C * K
    if n_bins > max(true.numel(), 1 << 16):  # sparse / large ids: compact them first
        true, C = _compact(true, keep_zero=True)
        pred, K = _compact(pred, keep_zero=False)
    offset = torch.arange(B, device=true.device).view(B, 1, 1, 1) * (C * K)
    index = torch.add(pred, true, alpha=K).add_(offset)  # video * C * K + true * K + pred
    counts = torch.bincount(index.reshape(-1), minlength=B * C * K)
    return counts.view(B, C, K).to(torch.float64)


def _ari_from_contingency(n: Tensor) -> Tensor:
    """Adjusted Rand index (Hubert-Arabie) per video from ``(B, C, K)`` counts, sklearn-exact.

    Uses sklearn's pair-confusion form; a zero denominator (one cluster on both sides, all
    singletons, fewer than two points) gives 1.0.
    """
    total = n.sum(dim=(1, 2))
    sum_sq = (n * n).sum(dim=(1, 2))
    rows_sq = n.sum(dim=2).pow(2).sum(dim=1)  # sum of squared true-class sizes
    cols_sq = n.sum(dim=1).pow(2).sum(dim=1)  # sum of squared pred-cluster sizes
    tp = sum_sq - total
    fp = cols_sq - sum_sq
    fn = rows_sq - sum_sq
    tn = total * total - fp - fn - sum_sq
    num = 2.0 * (tp * tn - fn * fp)
    den = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    perfect = (den == 0) | ((fp == 0) & (fn == 0))
    return torch.where(perfect, torch.ones_like(num), num / torch.where(perfect, 1.0, den))


def fg_ari(pred: Tensor, true: Tensor, *, ignore_background: bool = True) -> Tensor:
    """Foreground adjusted Rand index per video, ``(B,)`` float64.

    All ``T*H*W`` pixels of a video form one point set; pixels whose true id is 0 are dropped
    (unless ``ignore_background=False``, which scores all pixels with 0 as an ordinary object).
    Equals ``sklearn.metrics.adjusted_rand_score(true[fg], pred[fg])`` per video. A video with
    no foreground pixel scores 1.0. A slot switching objects mid-video lowers this score.
    """
    n = _contingency(pred, true)
    if ignore_background:
        n = n[:, 1:]
    return _ari_from_contingency(n)


def _iou_matrix(n: Tensor) -> Tensor:
    """IoU ``(B, C, K)`` of every true object with every predicted segment over the volume."""
    true_size = n.sum(dim=2, keepdim=True)
    pred_size = n.sum(dim=1, keepdim=True)  # all pixels of a segment, background included
    union = true_size + pred_size - n
    return torch.where(union > 0, n / union.clamp_min(1.0), torch.zeros_like(n))


def mbo(
    pred: Tensor, true: Tensor, matching: str = "overlap", *, ignore_background: bool = True
) -> Tensor:
    """Mean best overlap per video, ``(B,)`` float64.

    For each true foreground object present in the video, the IoU with each predicted segment is
    taken over the whole ``T*H*W`` volume (a segment counts all its pixels, background included).
    ``"overlap"``: best IoU per object over all segments. ``"hungarian"``: one-to-one assignment
    maximising total IoU (scipy, on CPU); objects left without a segment score 0. The result is
    the mean over present objects; a video without a foreground object is NaN (skip it when
    averaging). ``ignore_background=False`` counts id 0 as an object too.
    """
    _check_matching(matching)
    n = _contingency(pred, true)
    iou = _iou_matrix(n)
    present = n.sum(dim=2) > 0
    if ignore_background:
        present[:, 0] = False
    if matching == "overlap":
        best = iou.max(dim=2).values
        return (best * present).sum(dim=1) / present.sum(dim=1)  # 0 / 0 -> NaN
    iou_np, present_np = iou.cpu().numpy(), present.cpu().numpy()
    out = np.full(iou_np.shape[0], np.nan)
    for b, (scores, mask) in enumerate(zip(iou_np, present_np, strict=True)):
        scores = scores[mask]
        if scores.shape[0]:
            rows, cols = linear_sum_assignment(scores, maximize=True)
            out[b] = scores[rows, cols].sum() / scores.shape[0]
    return torch.from_numpy(out).to(pred.device)


def _per_frame(pred: Tensor, true: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
    _check_ids(pred, true)
    B, T, H, W = true.shape
    return pred.reshape(B * T, 1, H, W), true.reshape(B * T, 1, H, W), (B, T)


def fg_ari_per_frame(pred: Tensor, true: Tensor, *, ignore_background: bool = True) -> Tensor:
    """FG-ARI of every frame as its own point set, ``(B, T)`` float64 (see ``fg_ari``)."""
    p, t, bt = _per_frame(pred, true)
    return fg_ari(p, t, ignore_background=ignore_background).view(bt)


def mbo_per_frame(
    pred: Tensor, true: Tensor, matching: str = "overlap", *, ignore_background: bool = True
) -> Tensor:
    """mBO of every frame as its own volume, ``(B, T)`` float64; NaN for frames without objects."""
    p, t, bt = _per_frame(pred, true)
    return mbo(p, t, matching, ignore_background=ignore_background).view(bt)


def soft_to_ids(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Soft slot masks ``(B, T, K, h, w)`` -> id map ``(B, T, H, W)`` (long) at ``size=(H, W)``.

    Bilinear resize (``align_corners=False``, no antialias), then argmax over slots, as the
    references do.
    """
    if masks.ndim != 5:
        raise ValueError(f"masks must have shape (B, T, K, h, w), got {tuple(masks.shape)}")
    if not masks.is_floating_point():
        raise ValueError(f"masks must be floating point, got dtype {masks.dtype}")
    B, T, K, h, w = masks.shape
    flat = masks.reshape(B * T, K, h, w)
    if (h, w) != tuple(size):
        flat = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return flat.argmax(dim=1).view(B, T, *flat.shape[-2:])


def _as_ids(pred: Tensor, true: Tensor) -> Tensor:
    if pred.ndim == 5 and pred.is_floating_point() and true.ndim == 4:
        return soft_to_ids(pred, (true.shape[-2], true.shape[-1]))
    return pred


class _VideoMean:
    """Running mean of a per-video score; sum and count live on the CPU as Python numbers."""

    name = ""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget all accumulated videos."""
        self._sum = 0.0
        self._count = 0

    def _scores(self, pred: Tensor, true: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, pred: Tensor, true: Tensor) -> None:
        """Add a batch: ``pred`` is ids ``(B, T, H, W)`` or soft masks ``(B, T, K, h, w)``."""
        scores = self._scores(_as_ids(pred, true), true)
        valid = ~torch.isnan(scores)
        total, count = torch.stack([scores.nansum(), valid.sum().to(scores.dtype)]).tolist()
        self._sum += total
        self._count += int(count)

    def compute(self) -> float:
        """Mean over accumulated (non-NaN) videos; ``nan`` if no video was seen."""
        return self._sum / self._count if self._count else float("nan")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, videos={self._count})"


@METRICS.register()
class VideoARI(_VideoMean):
    """Accumulating video FG-ARI (``fg_ari``), logged as ``METRIC_ARI``.

    ``ignore_background=False`` scores all pixels, treating id 0 as an ordinary object.
    """

    name = METRIC_ARI

    def __init__(self, ignore_background: bool = True) -> None:
        self.ignore_background = ignore_background
        super().__init__()

    def _scores(self, pred: Tensor, true: Tensor) -> Tensor:
        return fg_ari(pred, true, ignore_background=self.ignore_background)


@METRICS.register()
class VideoIoU(_VideoMean):
    """Accumulating video mBO (``mbo``), logged as ``METRIC_MBO``; videos without objects skipped.

    ``matching`` is ``"overlap"`` or ``"hungarian"``; ``ignore_background=False`` includes id 0.
    """

    name = METRIC_MBO

    def __init__(self, matching: str = "overlap", ignore_background: bool = True) -> None:
        _check_matching(matching)
        self.matching = matching
        self.ignore_background = ignore_background
        super().__init__()

    def _scores(self, pred: Tensor, true: Tensor) -> Tensor:
        return mbo(pred, true, self.matching, ignore_background=self.ignore_background)
