"""Unsupervised segmentation metrics (docs/method.md) as torchmetrics ``Metric``s; the CLI is
``emerdiff_pl.commands.evaluate``.

Two matching protocols, reported separately because they are not comparable:

- dataset-wide Hungarian (STEGO / PiCIE, the paper's Table 1): one confusion matrix over all pixels of all
  images between global cluster ids and classes, one ``linear_sum_assignment``;
- per-image Hungarian (DiffSeg / DiffCut): matching per image, TP/FP/FN accumulated over the dataset, unmatched
  predicted segments never counted as FP. Far more lenient.

Beside mIoU, under either matching: the boundary F-score (:class:`BoundaryFScore`, a pixel tolerance), which
measures how well the masks are delineated. And the paper's second protocol (its Table 2), which needs no
matching: :class:`ConceptIoU` names pixels by the nearest class concept embedding (dataset-wide or per-image
concepts).

All scores are in percent (0–100), as in the papers' tables. The Hungarian and boundary metrics keep only
summed integer states (``dist_reduce_fx="sum"``), so they are exact under DDP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric

from emerdiff_pl.fields import IGNORE_CLASS
from emerdiff_pl.labelmaps import boundaries, ids_beyond_classes, resize_labels_nearest

# --------------------------------------------------------------------------------------------------------------
# scores from accumulated counts
# --------------------------------------------------------------------------------------------------------------


def _iou_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, total: int) -> dict[str, Any]:
    """Per-class IoU (NaN where the class has no ground-truth pixel), mean over present classes, accuracy."""
    present = (tp + fn) > 0
    denom = tp + fp + fn
    iou = np.full(tp.shape, np.nan, dtype=np.float64)
    iou[present] = 100.0 * tp[present] / denom[present]
    miou = float(iou[present].mean()) if present.any() else math.nan
    accuracy = 100.0 * float(tp.sum()) / total if total > 0 else math.nan
    return {"miou": miou, "pixel_accuracy": accuracy, "per_class_iou": iou}


def hungarian_match(scores: np.ndarray) -> np.ndarray:
    """Row → column (−1: unmatched) of the one-to-one matching that maximises the summed ``scores`` (rows ×
    columns: pixels a cluster shares with a class, or their IoU). The one Hungarian matcher of every protocol
    here and of the ground-truth colours of ``show``; pairs with a zero score may be matched."""
    rows, cols = linear_sum_assignment(scores, maximize=True)
    assignment = np.full(np.shape(scores)[0], -1, dtype=np.int64)
    assignment[rows] = cols
    return assignment


def global_hungarian_scores(confusion: np.ndarray) -> dict[str, Any]:
    """Scores of a (num_clusters × num_classes) pixel confusion matrix under one Hungarian assignment.

    Clusters and classes are matched one-to-one to maximise the matched pixels. A cluster left unmatched (more
    clusters than classes) predicts no class: its pixels count as false negatives of their true classes and
    as errors in pixel accuracy, never dropped. A class left unmatched (fewer clusters) gets IoU 0 if present.
    """
    return assigned_scores(confusion, hungarian_match(np.asarray(confusion, dtype=np.int64)))


def assigned_scores(confusion: np.ndarray, assignment: np.ndarray) -> dict[str, Any]:
    """Scores of a (num_clusters × num_classes) pixel confusion matrix under a given cluster → class
    ``assignment`` (−1: unmatched; its pixels are false negatives of their true classes)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    num_clusters, num_classes = confusion.shape
    assignment = np.asarray(assignment, dtype=np.int64)
    rows = np.flatnonzero(assignment >= 0)
    cols = assignment[rows]
    tp = np.zeros(num_classes, dtype=np.int64)
    predicted = np.zeros(num_classes, dtype=np.int64)
    tp[cols] = confusion[rows, cols]
    predicted[cols] = confusion[rows].sum(1)
    gt = confusion.sum(0)
    total = int(confusion.sum())
    scores = _iou_scores(tp, predicted - tp, gt - tp, total)
    unmatched = assignment < 0
    scores.update(
        assignment=assignment,
        confusion=confusion,
        unmatched_cluster_pixels=int(confusion[unmatched].sum()),
        pixels=total,
    )
    return scores


def _match_segments(
    pred: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's Hungarian matching on IoU (flat, valid pixels only): segment ids, class ids, their
    intersection counts (segments × classes) and the matched (row, col) pairs, pairs with no overlap dropped."""
    segments, seg_index = np.unique(pred, return_inverse=True)
    classes, cls_index = np.unique(target, return_inverse=True)
    inter = np.bincount(seg_index * len(classes) + cls_index, minlength=len(segments) * len(classes))
    inter = inter.reshape(len(segments), len(classes))
    seg_size, cls_size = inter.sum(1), inter.sum(0)
    iou = inter / (seg_size[:, None] + cls_size[None, :] - inter)
    assignment = hungarian_match(iou)
    rows = np.flatnonzero(assignment >= 0)
    cols = assignment[rows]
    keep = inter[rows, cols] > 0
    return segments, classes, inter, rows[keep], cols[keep]


def per_image_matches(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """TP/FP/FN per class of one image under per-image Hungarian matching on IoU.

    Segments (distinct predicted ids on valid pixels) are matched one-to-one to the classes present in the
    image, maximising the summed IoU; pairs with no overlap are not matches. A matched segment's pixels outside
    its class are FP; class pixels outside its segment are FN; unmatched segments count only as FN of the
    classes they cover, never as FP.
    """
    pred = np.asarray(pred).reshape(-1)
    target = np.asarray(target).reshape(-1)
    valid = target != ignore_index
    pred, target = pred[valid].astype(np.int64), target[valid].astype(np.int64)
    tp = np.zeros(num_classes, dtype=np.int64)
    fp = np.zeros(num_classes, dtype=np.int64)
    fn = np.zeros(num_classes, dtype=np.int64)
    if target.size == 0:
        return tp, fp, fn, 0
    if target.min() < 0 or target.max() >= num_classes:
        bad = target[(target < 0) | (target >= num_classes)][0]
        raise ValueError(
            f"ground-truth id {bad} outside [0, {num_classes}) and not the ignore index {ignore_index}"
        )
    segments, classes, inter, rows, cols = _match_segments(pred, target)
    seg_size, cls_size = inter.sum(1), inter.sum(0)
    fn[classes] = cls_size
    tp[classes[cols]] = inter[rows, cols]
    fp[classes[cols]] = seg_size[rows] - inter[rows, cols]
    fn[classes[cols]] -= inter[rows, cols]
    return tp, fp, fn, int(target.size)


# --------------------------------------------------------------------------------------------------------------
# torchmetrics
# --------------------------------------------------------------------------------------------------------------


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape; resize the "
            "prediction to the ground-truth size (nearest) first"
        )
    if pred.is_floating_point() or target.is_floating_point():
        raise TypeError("pred and target must be integer label maps, not float tensors")


class GlobalHungarianIoU(Metric):
    """Dataset-wide Hungarian mIoU (STEGO / PiCIE): one confusion matrix, one assignment (docs/method.md).

    ``update(pred, target)``: integer tensors of the same shape; ``pred`` holds global cluster ids in
    ``[0, num_clusters)`` (default ``num_classes``), ``target`` class ids in ``[0, num_classes)`` or
    ``ignore_index``. ``compute()`` returns, in percent: ``miou`` (mean over classes with ground-truth pixels),
    ``pixel_accuracy``, ``per_class_iou`` (NaN for absent classes), plus ``assignment`` (cluster → class, -1 if
    unmatched) and ``confusion`` (clusters × classes). With more clusters than classes, the unmatched
    clusters' pixels count as wrong: false negatives of their true classes and errors in pixel accuracy.
    (As for every torchmetrics output, one-element tensors come back 0-d: with a single class or cluster.)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, num_clusters: int | None = None, ignore_index: int = 255, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.num_clusters = int(num_clusters) if num_clusters is not None else self.num_classes
        if self.num_clusters < 1:
            raise ValueError(f"num_clusters must be ≥ 1, got {num_clusters}")
        self.ignore_index = ignore_index
        self.add_state(
            "confusion",
            default=torch.zeros(self.num_clusters, self.num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_pair(pred, target)
        valid = target != self.ignore_index
        p = pred[valid].long().to(self.confusion.device)
        t = target[valid].long().to(self.confusion.device)
        if p.numel() == 0:
            return
        if int(p.min()) < 0 or int(p.max()) >= self.num_clusters:
            raise ValueError(
                f"predicted cluster id {int(p.max()) if int(p.max()) >= self.num_clusters else int(p.min())} "
                f"outside [0, {self.num_clusters}); set num_clusters to the number of global cluster ids "
                "(relabel per-image ids to global ids first)"
            )
        if int(t.min()) < 0 or int(t.max()) >= self.num_classes:
            bad = int(t.max()) if int(t.max()) >= self.num_classes else int(t.min())
            raise ValueError(
                f"ground-truth id {bad} outside [0, {self.num_classes}) and not the ignore index {self.ignore_index}"
            )
        counts = torch.bincount(p * self.num_classes + t, minlength=self.num_clusters * self.num_classes)
        self.confusion += counts.view(self.num_clusters, self.num_classes)

    def scores(self, confusion: np.ndarray) -> dict[str, Any]:
        """The scores of an accumulated confusion (the dataset-wide Hungarian assignment)."""
        return global_hungarian_scores(confusion)

    def compute(self) -> dict[str, Tensor]:
        scores = self.scores(self.confusion.cpu().numpy())
        return {
            "miou": torch.tensor(scores["miou"], dtype=torch.float64),
            "pixel_accuracy": torch.tensor(scores["pixel_accuracy"], dtype=torch.float64),
            "per_class_iou": torch.from_numpy(scores["per_class_iou"]),
            "assignment": torch.from_numpy(scores["assignment"]),
            "confusion": self.confusion.clone(),
        }


def named_assignment(num_classes: int) -> np.ndarray:
    """The assignment of named output: class id c is class c; the extra row (predicted 255, ignore) no class."""
    return np.array([*range(num_classes), -1], dtype=np.int64)


def named_ids(pred: Tensor, num_classes: int) -> Tensor:
    """Named predictions → rows of :func:`named_assignment`: class ids as they are, 255 (ignore) → C; a ValueError
    for any other id ≥ C."""
    pred = pred.long()
    bad = ids_beyond_classes(pred, num_classes)
    if bad:
        raise ValueError(
            f"predicted class ids {bad} are ≥ the {num_classes} classes of the output ({IGNORE_CLASS} = ignore)"
        )
    return torch.where(pred == IGNORE_CLASS, num_classes, pred)


class NamedIoU(GlobalHungarianIoU):
    """Supervised mIoU of named output (``model.classifier``): predicted class ids against the ground truth, no
    matching. A predicted 255 (ignore: a classifier threshold) predicts no class, so its pixels are false
    negatives of their true classes; ground-truth ``ignore_index`` pixels are left out. ``compute()`` returns
    what :class:`GlobalHungarianIoU`'s does, with the fixed :func:`named_assignment` (``confusion``: (C + 1) × C)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs):
        super().__init__(num_classes, num_classes + 1, ignore_index=ignore_index, **kwargs)

    def update(self, pred: Tensor, target: Tensor) -> None:
        super().update(named_ids(pred, self.num_classes), target)

    def scores(self, confusion: np.ndarray) -> dict[str, Any]:
        return assigned_scores(confusion, named_assignment(self.num_classes))


class PerImageHungarianIoU(Metric):
    """Per-image Hungarian mIoU (DiffSeg / DiffCut style): segments matched per image, counts summed.

    ``update(pred, target)``: one image (H×W) or a batch (B×H×W) of integer maps; ``pred`` may hold any
    non-negative segment ids (they need not be global). See :func:`per_image_matches` for how one image is
    scored; unmatched predicted segments are never FP. ``compute()`` returns ``miou``, ``pixel_accuracy``
    and ``per_class_iou`` (percent, NaN for absent classes), and the summed ``tp``, ``fp``, ``fn``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        for name in ("tp", "fp", "fn"):
            self.add_state(
                name, default=torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum"
            )
        self.add_state("pixels", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_pair(pred, target)
        if pred.ndim == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)
        if pred.ndim != 3:
            raise ValueError(f"expected H×W or B×H×W label maps, got shape {tuple(pred.shape)}")
        for p, t in zip(pred.cpu().numpy(), target.cpu().numpy(), strict=True):
            tp, fp, fn, pixels = per_image_matches(p, t, self.num_classes, self.ignore_index)
            self.tp += torch.from_numpy(tp).to(self.tp.device)
            self.fp += torch.from_numpy(fp).to(self.fp.device)
            self.fn += torch.from_numpy(fn).to(self.fn.device)
            self.pixels += pixels
            self.images += 1

    def compute(self) -> dict[str, Tensor]:
        tp, fp, fn = (s.cpu().numpy() for s in (self.tp, self.fp, self.fn))
        scores = _iou_scores(tp, fp, fn, int(self.pixels))
        return {
            "miou": torch.tensor(scores["miou"], dtype=torch.float64),
            "pixel_accuracy": torch.tensor(scores["pixel_accuracy"], dtype=torch.float64),
            "per_class_iou": torch.from_numpy(scores["per_class_iou"]),
            "tp": self.tp.clone(),
            "fp": self.fp.clone(),
            "fn": self.fn.clone(),
        }


def hungarian_miou(
    preds: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    num_classes: int,
    num_clusters: int | None = None,
    protocol: str = "global",
    ignore_index: int = 255,
) -> dict[str, Any]:
    """Score lists of label maps (numpy) in one call; predictions are resized (nearest) to their target's size.

    ``protocol`` is ``"global"`` (default; ``num_clusters`` defaults to ``max(num_classes, max pred id + 1)``)
    or ``"per-image"``. Returns the metric's dict with numpy arrays and Python floats (percent).
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions but {len(targets)} targets")
    preds = [
        resize_labels_nearest(np.asarray(p), np.asarray(t).shape) for p, t in zip(preds, targets, strict=True)
    ]
    if protocol == "global":
        if num_clusters is None:
            top = max((int(p.max()) + 1 for p in preds if p.size), default=0)
            num_clusters = max(num_classes, top)
        metric: Metric = GlobalHungarianIoU(num_classes, num_clusters, ignore_index=ignore_index)
    elif protocol in ("per-image", "per_image"):
        metric = PerImageHungarianIoU(num_classes, ignore_index=ignore_index)
    else:
        raise ValueError(f"protocol must be 'global' or 'per-image', got {protocol!r}")
    for p, t in zip(preds, targets, strict=True):
        metric.update(torch.from_numpy(p.astype(np.int64)), torch.from_numpy(np.asarray(t).astype(np.int64)))
    return _as_numpy(metric.compute())


_VECTOR_KEYS = ("per_class_iou", "assignment", "tp", "fp", "fn")


def _as_numpy(out: dict[str, Tensor]) -> dict[str, Any]:
    """Metric output as Python floats and numpy arrays, undoing torchmetrics' squeeze of one-element tensors."""
    result: dict[str, Any] = {}
    for key, value in out.items():
        if key in _VECTOR_KEYS:
            result[key] = value.cpu().numpy().reshape(-1)
        elif key == "confusion":
            result[key] = value.cpu().numpy().reshape(-1, value.shape[-1] if value.ndim == 2 else 1)
        else:
            result[key] = float(value)
    return result


def short_side_center_crop(labels: np.ndarray, size: int) -> np.ndarray:
    """STEGO's evaluation view: resize (nearest) so the short side is ``size``, then centre-crop size×size."""
    h, w = labels.shape
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    resized = resize_labels_nearest(labels, (new_h, new_w))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


# --------------------------------------------------------------------------------------------------------------
# boundary F-score
# --------------------------------------------------------------------------------------------------------------


def _disk(tolerance: int) -> Tensor:
    r = torch.arange(-tolerance, tolerance + 1)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= tolerance**2).float()[None, None]


def _near(maps: Tensor, tolerance: int) -> Tensor:
    """(N, H, W) bool → (N, H, W) bool: within `tolerance` px (Euclidean) of a True pixel of the same map."""
    if tolerance == 0 or maps.shape[0] == 0:
        return maps
    x = torch.nn.functional.conv2d(maps.float().unsqueeze(1), _disk(tolerance), padding=tolerance)
    return x.squeeze(1) > 0.5


def boundary_hits(
    pred: Tensor, target: Tensor, tolerance: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One image's boundary counts between every predicted segment and every ground-truth class.

    The boundary of a mask is its pixels with a 4-neighbour outside it (:func:`~emerdiff_pl.labelmaps.boundaries`
    on both sides). Returns (segment ids S, class ids C,
    ``pred_hit`` S×C: boundary pixels of segment s within ``tolerance`` px of class c's boundary, ``gt_hit``
    S×C: boundary pixels of class c within tolerance of segment s's boundary, ``pred_total`` S, ``gt_total``
    C). Pixels within 1 px of an ignored ground-truth pixel count on neither side.
    """
    valid = target != ignore_index
    keep = ~_near((~valid)[None], 1)[0]
    segments, pred_idx = torch.unique(pred, return_inverse=True)
    classes, gt_idx = torch.unique(target[valid], return_inverse=True)
    gt_full = torch.full_like(target, -1)
    gt_full[valid] = gt_idx
    pred_edge = torch.from_numpy(boundaries(pred.cpu().numpy(), both_sides=True)).to(keep.device) & keep
    gt_edge = torch.from_numpy(boundaries(target.cpu().numpy(), both_sides=True)).to(keep.device) & keep
    s, c = len(segments), len(classes)
    pred_bnd = torch.nn.functional.one_hot(pred_idx, s).permute(2, 0, 1).bool() & pred_edge  # (S, H, W)
    gt_bnd = (gt_full[None] == torch.arange(c)[:, None, None]) & gt_edge  # (C, H, W)
    near_pred, near_gt = _near(pred_bnd, tolerance), _near(gt_bnd, tolerance)
    pred_hit = pred_bnd.flatten(1).float() @ near_gt.flatten(1).float().T  # (S, C)
    gt_hit = near_pred.flatten(1).float() @ gt_bnd.flatten(1).float().T  # (S, C)
    return (
        segments,
        classes,
        pred_hit.round().long(),
        gt_hit.round().long(),
        pred_bnd.flatten(1).sum(1),
        gt_bnd.flatten(1).sum(1),
    )


def _boundary_f(pred_hit: np.ndarray, pred_total: np.ndarray, gt_hit: np.ndarray, gt_total: np.ndarray):
    """Per-class precision, recall, F (percent) from matched counts; NaN where a class has no boundary."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pred_total > 0, 100.0 * pred_hit / np.maximum(pred_total, 1), 0.0)
        recall = np.where(gt_total > 0, 100.0 * gt_hit / np.maximum(gt_total, 1), 0.0)
        f = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    absent = gt_total == 0
    for a in (precision, recall, f):
        a[absent] = np.nan
    return precision, recall, f


class BoundaryFScore(Metric):
    """Boundary F-score per class (Csurka et al. 2013's BF, dataset-accumulated) after Hungarian matching.

    Each class's predicted mask is the segment matched to it: ``protocol="global"`` matches dataset-wide
    cluster ids to classes once, on the accumulated pixel confusion (as :class:`GlobalHungarianIoU`; or pass
    ``assignment`` to ``compute``); ``"per-image"`` matches per image on IoU (as :class:`PerImageHungarianIoU`).
    Precision: the matched mask's boundary pixels within ``tolerance`` px of the class's ground-truth
    boundary; recall: the reverse; both summed over images, then F = 2PR / (P + R) per class. ``compute()``
    returns ``boundary_f`` (mean F over classes with ground-truth boundary pixels), ``precision`` and
    ``recall`` (their means) and ``per_class_f`` (NaN where a class has no boundary), in percent. An
    unmatched class scores 0. States are sums, exact under DDP.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        num_clusters: int | None = None,
        tolerance: int = 2,
        protocol: str = "global",
        ignore_index: int = 255,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if protocol not in ("global", "per-image"):
            raise ValueError(f"protocol must be 'global' or 'per-image', got {protocol!r}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be ≥ 0 pixels, got {tolerance}")
        self.num_classes, self.protocol = int(num_classes), protocol
        self.num_clusters = int(num_clusters) if num_clusters is not None else self.num_classes
        self.tolerance, self.ignore_index = int(tolerance), ignore_index
        c = self.num_classes
        if protocol == "global":
            k = self.num_clusters
            for name in ("confusion", "pred_hit", "gt_hit"):
                self.add_state(name, default=torch.zeros(k, c, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("pred_total", default=torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
        else:
            for name in ("pred_hit", "gt_hit", "pred_total"):
                self.add_state(name, default=torch.zeros(c, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("gt_total", default=torch.zeros(c, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_pair(pred, target)
        if pred.ndim == 3:
            for p, t in zip(pred, target, strict=True):
                self.update(p, t)
            return
        if pred.ndim != 2:
            raise ValueError(f"expected H×W or B×H×W label maps, got shape {tuple(pred.shape)}")
        pred, target = pred.long().cpu(), target.long().cpu()
        valid = target != self.ignore_index
        if not valid.any():
            return
        t = target[valid]
        if int(t.min()) < 0 or int(t.max()) >= self.num_classes:
            bad = int(t.max()) if int(t.max()) >= self.num_classes else int(t.min())
            raise ValueError(
                f"ground-truth id {bad} outside [0, {self.num_classes}) and not the ignore index {self.ignore_index}"
            )
        segments, classes, pred_hit, gt_hit, pred_total, gt_total = boundary_hits(
            pred, target, self.tolerance, self.ignore_index
        )
        dev = self.gt_total.device
        self.gt_total[classes.to(dev)] += gt_total.to(dev)
        if self.protocol == "global":
            if int(segments.min()) < 0 or int(segments.max()) >= self.num_clusters:
                raise ValueError(
                    f"predicted cluster ids must be in [0, {self.num_clusters}), got {int(segments.min())}.."
                    f"{int(segments.max())}; set num_clusters (relabel per-image ids to global ids first)"
                )
            rows, cols = segments[:, None].to(dev), classes[None, :].to(dev)
            self.pred_hit[rows, cols] += pred_hit.to(dev)
            self.gt_hit[rows, cols] += gt_hit.to(dev)
            self.pred_total[segments.to(dev)] += pred_total.to(dev)
            counts = torch.bincount(
                pred[valid] * self.num_classes + t, minlength=self.num_clusters * self.num_classes
            )
            self.confusion += counts.view(self.num_clusters, self.num_classes).to(dev)
            return
        seg_ids, cls_ids, _, r, c = _match_segments(pred[valid].numpy(), t.numpy())
        # _match_segments' ids are the sorted unique ids, as torch.unique's: map its rows/cols to positions
        seg_pos = torch.searchsorted(segments, torch.from_numpy(seg_ids[r]))
        cls_pos = torch.searchsorted(classes, torch.from_numpy(cls_ids[c]))
        matched = classes[cls_pos].to(dev)
        self.pred_hit[matched] += pred_hit[seg_pos, cls_pos].to(dev)
        self.gt_hit[matched] += gt_hit[seg_pos, cls_pos].to(dev)
        self.pred_total[matched] += pred_total[seg_pos].to(dev)

    def compute(self, assignment: Tensor | np.ndarray | None = None) -> dict[str, Tensor]:
        """Scores; ``assignment`` (cluster → class, −1 unmatched; global protocol) overrides the own matching."""
        c = self.num_classes
        gt_total = self.gt_total.cpu().numpy()
        if self.protocol == "global":
            if assignment is None:
                assignment = global_hungarian_scores(self.confusion.cpu().numpy())["assignment"]
            assignment = np.asarray(assignment).reshape(-1)
            pred_hit, gt_hit, pred_total = np.zeros(c), np.zeros(c), np.zeros(c)
            ph, gh, pt = (s.cpu().numpy() for s in (self.pred_hit, self.gt_hit, self.pred_total))
            for k, cls in enumerate(assignment):
                if cls >= 0:
                    pred_hit[cls], gt_hit[cls], pred_total[cls] = ph[k, cls], gh[k, cls], pt[k]
        else:
            pred_hit, gt_hit, pred_total = (
                s.cpu().numpy() for s in (self.pred_hit, self.gt_hit, self.pred_total)
            )
        precision, recall, f = _boundary_f(pred_hit, pred_total, gt_hit, gt_total)
        present = ~np.isnan(f)

        def mean(a: np.ndarray) -> Tensor:
            return torch.tensor(float(a[present].mean()) if present.any() else math.nan, dtype=torch.float64)

        return {
            "boundary_f": mean(f),
            "precision": mean(precision),
            "recall": mean(recall),
            "per_class_f": torch.from_numpy(f),
        }


# --------------------------------------------------------------------------------------------------------------
# concept-embedding protocol
# --------------------------------------------------------------------------------------------------------------


def _mask_class_areas(
    masks: Tensor, target: Tensor, num_masks: int, num_classes: int, ignore_index: int
) -> Tensor:
    """(K, C) pixel counts of each mask id per ground-truth class, valid pixels only."""
    valid = target != ignore_index
    m, t = masks[valid].long(), target[valid].long()
    if m.numel() and (int(m.min()) < 0 or int(m.max()) >= num_masks):
        raise ValueError(
            f"mask id {int(m.max())} has no row in the {num_masks} mask embeddings: the concept protocol needs "
            "the per-image mask ids of the predict output (seg.png / lowres.png), not relabelled global ids"
        )
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(
            f"ground-truth id outside [0, {num_classes}) and not the ignore index {ignore_index}"
        )
    counts = torch.bincount(m * num_classes + t, minlength=num_masks * num_classes)
    return counts.view(num_masks, num_classes)


def _nearest_concept(embeddings: Tensor, concepts: Tensor, available: Tensor) -> Tensor:
    """Each embedding's nearest concept by cosine similarity, among the available ones → (K,) class ids."""
    e = torch.nn.functional.normalize(embeddings.double(), dim=1)
    c = torch.nn.functional.normalize(concepts.double(), dim=1)
    sim = e @ c.T
    sim[:, ~available] = -math.inf
    return sim.argmax(1)


class ConceptIoU(Metric):
    """mIoU under the concept-embedding protocol (the paper's Table 2): classes named by embeddings, no matching.

    ``update(masks, target, embeddings)``: one image's mask ids (H, W) in [0, K) (``<key>.seg.png`` or the
    low-res map resized to the target, per-image ids), its class ids (H, W), and its mask embeddings (K, D).
    Every pixel carries its mask's embedding. Each ground-truth class's concept is the mean embedding of its
    pixels, and each pixel takes the class of the nearest concept (cosine). ``concepts="dataset"``: one
    concept per class over all pixels of all images (pixel-weighted), the assignment made at ``compute()``;
    ``"image"``: concepts from each image's own pixels, choosing only among the classes in that image (far
    more lenient: it knows which classes are present). Returns ``miou``, ``pixel_accuracy``,
    ``per_class_iou`` (percent, NaN for absent classes) and ``confusion`` (predicted class × class).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, concepts: str = "dataset", ignore_index: int = 255, **kwargs):
        super().__init__(**kwargs)
        if concepts not in ("dataset", "image"):
            raise ValueError(f"concepts must be 'dataset' or 'image', got {concepts!r}")
        self.num_classes, self.concepts, self.ignore_index = int(num_classes), concepts, ignore_index
        c = self.num_classes
        self.add_state("confusion", default=torch.zeros(c, c, dtype=torch.long), dist_reduce_fx="sum")
        if concepts == "dataset":
            self.add_state("areas", default=[], dist_reduce_fx="cat")  # per image (K, C)
            self.add_state("embeddings", default=[], dist_reduce_fx="cat")  # per image (K, D)

    def update(self, masks: Tensor, target: Tensor, embeddings: Tensor) -> None:
        _check_pair(masks, target)
        if masks.ndim != 2 or embeddings.ndim != 2:
            raise ValueError(
                f"expected one image: masks H×W and embeddings K×D, got {tuple(masks.shape)} and "
                f"{tuple(embeddings.shape)}"
            )
        areas = _mask_class_areas(
            masks.cpu(), target.cpu(), embeddings.shape[0], self.num_classes, self.ignore_index
        )
        if self.concepts == "dataset":
            self.areas.append(areas.to(self.confusion.device))
            self.embeddings.append(embeddings.to(self.confusion.device))
            return
        self._assign(areas, embeddings.cpu(), areas.sum(0) > 0, self._concepts([areas], [embeddings.cpu()]))

    @staticmethod
    def _concepts(areas: list[Tensor], embeddings: list[Tensor]) -> Tensor:
        """(C, D) mean embedding of each class's pixels."""
        sums = sum(a.double().T @ e.double() for a, e in zip(areas, embeddings, strict=True))
        count = sum(a.sum(0) for a in areas).double()
        return sums / count.clamp_min(1)[:, None]

    def _assign(self, areas: Tensor, embeddings: Tensor, available: Tensor, concepts: Tensor) -> None:
        used = areas.sum(1) > 0
        if not used.any():
            return
        cls = _nearest_concept(embeddings[used], concepts, available.cpu())
        conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        conf.index_add_(0, cls, areas[used].cpu())
        self.confusion += conf.to(self.confusion.device)

    def compute(self) -> dict[str, Tensor]:
        confusion = self.confusion.clone()
        if self.concepts == "dataset":
            # a list per image; after a DDP sync one tensor concatenated along K (masks are independent)
            areas = self.areas if isinstance(self.areas, list) else [self.areas]
            embs = self.embeddings if isinstance(self.embeddings, list) else [self.embeddings]
            areas, embs = [a.cpu() for a in areas], [e.cpu() for e in embs]
            if areas:
                concepts = self._concepts(areas, embs)
                available = sum(a.sum(0) for a in areas) > 0
                saved, self.confusion = self.confusion, torch.zeros_like(self.confusion)
                for a, e in zip(areas, embs, strict=True):
                    self._assign(a, e, available, concepts)
                confusion, self.confusion = self.confusion + saved, saved
        conf = confusion.cpu().numpy()
        tp = np.diag(conf)
        scores = _iou_scores(tp, conf.sum(1) - tp, conf.sum(0) - tp, int(conf.sum()))
        return {
            "miou": torch.tensor(scores["miou"], dtype=torch.float64),
            "pixel_accuracy": torch.tensor(scores["pixel_accuracy"], dtype=torch.float64),
            "per_class_iou": torch.from_numpy(scores["per_class_iou"]),
            "confusion": torch.from_numpy(conf),
        }
