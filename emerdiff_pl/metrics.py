"""Unsupervised segmentation metrics (SPEC.md §4) as torchmetrics ``Metric``s, and the ``evaluate`` CLI.

Two protocols, reported separately because they are not comparable:

- dataset-wide Hungarian (STEGO / PiCIE, the paper's Table 1): one confusion matrix over all pixels of all
  images between global cluster ids and classes, one ``linear_sum_assignment``;
- per-image Hungarian (DiffSeg / DiffCut): matching per image, TP/FP/FN accumulated over the dataset, unmatched
  predicted segments never counted as FP. Far more lenient.

All scores are in percent (0–100), as in the papers' tables. Both metrics keep only summed integer states
(``dist_reduce_fx="sum"``), so they are exact under DDP.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric

from emerdiff_pl.shardio import ShardIndex, iter_samples, resize_labels_nearest

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


def global_hungarian_scores(confusion: np.ndarray) -> dict[str, Any]:
    """Scores of a (num_clusters × num_classes) pixel confusion matrix under one Hungarian assignment.

    Clusters and classes are matched one-to-one to maximise the matched pixels. A cluster left unmatched (more
    clusters than classes) predicts no class: its pixels count as false negatives of their true classes and
    as errors in pixel accuracy, never dropped. A class left unmatched (fewer clusters) gets IoU 0 if present.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    num_clusters, num_classes = confusion.shape
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    assignment = np.full(num_clusters, -1, dtype=np.int64)
    assignment[rows] = cols
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
    segments, seg_index = np.unique(pred, return_inverse=True)
    classes, cls_index = np.unique(target, return_inverse=True)
    inter = np.bincount(seg_index * len(classes) + cls_index, minlength=len(segments) * len(classes))
    inter = inter.reshape(len(segments), len(classes))
    seg_size, cls_size = inter.sum(1), inter.sum(0)
    iou = inter / (seg_size[:, None] + cls_size[None, :] - inter)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    keep = inter[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
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
    """Dataset-wide Hungarian mIoU (STEGO / PiCIE): one confusion matrix, one assignment (SPEC.md §4).

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

    def compute(self) -> dict[str, Tensor]:
        scores = global_hungarian_scores(self.confusion.cpu().numpy())
        return {
            "miou": torch.tensor(scores["miou"], dtype=torch.float64),
            "pixel_accuracy": torch.tensor(scores["pixel_accuracy"], dtype=torch.float64),
            "per_class_iou": torch.from_numpy(scores["per_class_iou"]),
            "assignment": torch.from_numpy(scores["assignment"]),
            "confusion": self.confusion.clone(),
        }


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
# evaluate CLI
# --------------------------------------------------------------------------------------------------------------


def _class_names(spec: str | None, num_classes: int) -> list[str]:
    from emerdiff_pl.viz import load_class_names

    names = load_class_names(spec, num_classes) if spec else None
    if names is None:
        return [str(i) for i in range(num_classes)]
    return list(names[:num_classes])


def _guess_num_clusters(pred_urls: str, pred_field: str, num_classes: int) -> tuple[int, str]:
    """Global-protocol cluster count from the first prediction's JSON (relabel info, else num_masks)."""
    for sample in iter_samples(pred_urls, fields={"json"}):
        meta = sample.get("json")
        if not isinstance(meta, dict):
            break
        relabel = meta.get("relabel")
        if isinstance(relabel, dict) and "num_classes" in relabel:
            return int(relabel["num_classes"]), "relabel.num_classes of the prediction JSON"
        hparams = meta.get("hparams") if isinstance(meta.get("hparams"), dict) else {}
        num_masks = hparams.get("num_masks", meta.get("num_masks"))
        if num_masks is not None and pred_field in ("seg.png", "lowres.png"):
            return max(num_classes, int(num_masks)), "num_masks of the prediction JSON (per-image ids!)"
        break
    return num_classes, "--num-classes"


def save_confusion_image(
    confusion: np.ndarray, assignment: np.ndarray, class_names: Sequence[str], path: str, title: str = ""
) -> None:
    """Row-normalised confusion (ground-truth class × cluster), clusters ordered by their matched class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_clusters, num_classes = confusion.shape
    matched = {int(c): k for k, c in enumerate(assignment) if c >= 0}
    order = [matched[c] for c in range(num_classes) if c in matched]
    order += [k for k in range(num_clusters) if k not in order]
    table = confusion[order].T.astype(np.float64)  # classes × clusters
    table = table / np.maximum(table.sum(1, keepdims=True), 1)
    size = (max(6.0, 0.25 * len(order) + 3.5), max(5.0, 0.25 * num_classes + 2.0))
    fig, ax = plt.subplots(figsize=size)
    im = ax.imshow(table, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(num_classes), [f"{i} {n}" for i, n in enumerate(class_names)], fontsize=7)
    labels = [f"{k}" + ("" if assignment[k] >= 0 else "*") for k in order]
    ax.set_xticks(range(len(order)), labels, fontsize=7, rotation=90)
    ax.set_xlabel("predicted cluster (ordered by matched class; * = unmatched)")
    ax.set_ylabel("ground-truth class")
    ax.set_title(title or "confusion, row-normalised")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _format_table(results: dict[str, Any], class_names: Sequence[str]) -> str:
    lines = []
    protocols = [p for p in ("global", "per_image") if p in results]
    head = "  ".join(f"{'IoU ' + p:>14}" for p in protocols)
    lines.append(f"{'class':<24}{head}" + ("  matched cluster" if "global" in results else ""))
    for c, name in enumerate(class_names):
        cells = []
        for p in protocols:
            v = results[p]["per_class_iou"][c]
            cells.append(f"{'—' if v is None else f'{v:.2f}':>14}")
        extra = ""
        if "global" in results:
            clusters = [k for k, a in enumerate(results["global"]["assignment"]) if a == c]
            extra = f"  {clusters[0] if clusters else '—'}"
        lines.append(f"{str(c) + ' ' + name:<24.24}" + "  ".join(cells) + extra)
    lines.append("-" * len(lines[0]))
    for key, label in (("miou", "mIoU"), ("pixel_accuracy", "pixel accuracy")):
        cells = "  ".join(f"{results[p][key]:>14.2f}" for p in protocols)
        lines.append(f"{label:<24}{cells}")
    return "\n".join(lines)


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else round(float(v), 4) for v in values]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl evaluate",
        description="Score pseudo-labels against ground truth (SPEC.md §4). Predictions and ground truth are "
        "matched by sample key; keys found on one side only are reported. Predictions are resized to the "
        "ground-truth size with nearest neighbour. Scores are in percent. Writes report.json, table.txt and "
        "confusion.png (global protocol) into --out.",
    )
    parser.add_argument(
        "--pred", required=True, help="prediction shards, e.g. 'relabelled/shard-{000000..000009}.tar'"
    )
    parser.add_argument(
        "--gt", required=True, help="ground-truth shards with <key>.gt.png (uint8, 255 = ignore)"
    )
    parser.add_argument(
        "--num-classes", type=int, required=True, help="number of ground-truth classes (27 for *-27)"
    )
    parser.add_argument(
        "--num-clusters",
        type=int,
        default=None,
        help="number of global cluster ids in the predictions (global protocol); default: from the prediction "
        "JSON (relabel.num_classes), else --num-classes",
    )
    parser.add_argument(
        "--protocol",
        choices=["global", "per-image", "both"],
        default="global",
        help="global: one confusion matrix and one assignment over the dataset (STEGO/PiCIE, the paper's "
        "Table 1); per-image: matching per image, more lenient (DiffSeg/DiffCut); both (default: global)",
    )
    parser.add_argument("--pred-field", default="seg.png", help="prediction label field (default seg.png)")
    parser.add_argument("--gt-field", default="gt.png", help="ground-truth label field (default gt.png)")
    parser.add_argument(
        "--ignore-index", type=int, default=255, help="ground-truth id to ignore (default 255)"
    )
    parser.add_argument(
        "--class-names",
        default=None,
        help="class names for the table: cocostuff27, cityscapes27, toyworld, or a text file (one name a line)",
    )
    parser.add_argument(
        "--out", required=True, help="output folder for report.json, table.txt, confusion.png"
    )
    parser.add_argument(
        "--crop",
        type=int,
        default=None,
        help="score STEGO's view instead of the full image: short side resized to N (nearest), centre crop "
        "N×N (STEGO/PiCIE use 320); default: full ground-truth resolution",
    )
    parser.add_argument("--limit", type=int, default=None, help="score only the first N predictions")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    names = _class_names(args.class_names, args.num_classes)
    protocols = ["global", "per-image"] if args.protocol == "both" else [args.protocol]
    num_clusters, clusters_from = args.num_clusters, "--num-clusters"
    if "global" in protocols and num_clusters is None:
        num_clusters, clusters_from = _guess_num_clusters(args.pred, args.pred_field, args.num_classes)
        if "per-image" in clusters_from:
            print(
                f"warning: predictions look like per-image cluster ids ({args.pred_field} without relabel info); "
                "the global protocol needs dataset-wide ids: run `emerdiff-pl relabel` first",
                file=sys.stderr,
            )
    metrics: dict[str, Metric] = {}
    if "global" in protocols:
        metrics["global"] = GlobalHungarianIoU(args.num_classes, num_clusters, ignore_index=args.ignore_index)
    if "per-image" in protocols:
        metrics["per_image"] = PerImageHungarianIoU(args.num_classes, ignore_index=args.ignore_index)

    gt_index = ShardIndex(args.gt, fields={args.gt_field})
    seen: set[str] = set()
    pred_only: list[str] = []
    duplicates: list[str] = []
    no_field: list[str] = []
    resized = 0
    samples = iter_samples(args.pred, fields={args.pred_field})
    for sample in tqdm(samples, desc="evaluate", unit="img", dynamic_ncols=True):
        if args.limit is not None and len(seen) >= args.limit:
            break
        key = sample["__key__"]
        if key in seen:
            duplicates.append(key)
            continue
        seen.add(key)
        if args.pred_field not in sample:
            no_field.append(key)
            continue
        if key not in gt_index or args.gt_field not in gt_index.fields(key):
            pred_only.append(key)
            continue
        target = gt_index.get(key, fields={args.gt_field})[args.gt_field]
        pred = sample[args.pred_field]
        if pred.shape != target.shape:
            pred = resize_labels_nearest(pred, target.shape)
            resized += 1
        if args.crop is not None:
            pred, target = short_side_center_crop(pred, args.crop), short_side_center_crop(target, args.crop)
        p, t = torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(target.astype(np.int64))
        for metric in metrics.values():
            metric.update(p, t)
    gt_index.close()
    gt_keys = [k for k in gt_index if args.gt_field in gt_index.fields(k)]
    gt_only = [k for k in gt_keys if k not in seen] if args.limit is None else []
    evaluated = len(seen) - len(pred_only) - len(no_field)
    if evaluated == 0 and no_field:
        raise KeyError(
            f"no prediction in {args.pred!r} has the field {args.pred_field!r} (e.g. sample {no_field[0]!r}); "
            "set --pred-field to one of the label fields the shards hold (seg.png, lowres.png, …)"
        )
    if evaluated == 0:
        raise ValueError(
            f"no prediction key of {args.pred!r} is in the ground truth {args.gt!r} "
            f"(e.g. prediction {pred_only[:3]} vs ground truth {gt_keys[:3]}): are these the same images?"
        )
    for what, keys in (
        ("in the predictions only", pred_only),
        ("in the ground truth only", gt_only),
        ("repeated in the predictions (first one scored)", duplicates),
    ):
        if keys:
            print(f"warning: {len(keys)} key(s) {what}, not scored, e.g. {keys[:5]}", file=sys.stderr)
    if no_field:
        print(
            f"warning: {len(no_field)} prediction(s) without {args.pred_field!r}, e.g. {no_field[:5]}",
            file=sys.stderr,
        )

    results: dict[str, Any] = {}
    for name, metric in metrics.items():
        out = _as_numpy(metric.compute())
        entry: dict[str, Any] = {
            "miou": out["miou"],
            "pixel_accuracy": out["pixel_accuracy"],
            "per_class_iou": _nan_to_none(out["per_class_iou"]),
        }
        if name == "global":
            confusion = out["confusion"].reshape(num_clusters, args.num_classes)
            entry["assignment"] = out["assignment"].tolist()
            entry["num_clusters"] = num_clusters
            entry["num_clusters_from"] = clusters_from
            unmatched = confusion[out["assignment"] < 0].sum()
            entry["unmatched_cluster_pixel_fraction"] = float(unmatched / max(confusion.sum(), 1))
            entry["confusion"] = confusion.tolist()
        else:
            entry.update({k: out[k].tolist() for k in ("tp", "fp", "fn")})
        results[name] = entry

    os.makedirs(args.out, exist_ok=True)
    report = {
        "units": "percent",
        "pred": args.pred,
        "gt": args.gt,
        "pred_field": args.pred_field,
        "gt_field": args.gt_field,
        "num_classes": args.num_classes,
        "ignore_index": args.ignore_index,
        "class_names": names,
        "images_evaluated": evaluated,
        "predictions_resized_to_gt": resized,
        "crop": args.crop,
        "keys": {
            "pred_only": len(pred_only),
            "gt_only": len(gt_only),
            "duplicate_pred": len(duplicates),
            "pred_without_field": len(no_field),
            "examples_pred_only": pred_only[:20],
            "examples_gt_only": gt_only[:20],
        },
        **results,
    }
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    table = _format_table(results, names)
    header = f"{evaluated} images scored ({args.pred} vs {args.gt}), scores in percent"
    with open(os.path.join(args.out, "table.txt"), "w", encoding="utf-8") as f:
        f.write(header + "\n" + table + "\n")
    if "global" in results:
        save_confusion_image(
            np.asarray(results["global"]["confusion"]),
            np.asarray(results["global"]["assignment"]),
            names,
            os.path.join(args.out, "confusion.png"),
            title=f"dataset-wide Hungarian: mIoU {results['global']['miou']:.2f}",
        )
    print(header)
    print(table)
    print(f"wrote {os.path.join(args.out, 'report.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
