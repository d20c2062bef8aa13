"""``emerdiff-pl evaluate``: score pseudo-label shards against ground truth (emerdiff_pl.metrics): ground-truth
shards (``<key>.gt.png``) or a folder of label PNGs named like the images predict read (``a.png`` for ``a.jpg``;
the matching rule: :mod:`emerdiff_pl.sources`).

Protocols (``--protocol``): ``global`` (dataset-wide Hungarian, the paper's Table 1), ``per-image``
(DiffSeg/DiffCut style, lenient), ``both``, ``concept`` (the paper's Table 2: nearest class concept
embedding, reported with dataset-wide and with per-image concepts), and ``named`` for named output
(``model.classifier``: class ids scored as they are, no matching; chosen by default for such output). Hungarian
and named protocols report the boundary F-score (``--boundary-tolerance`` px) beside mIoU. The table goes to stdout; ``--out`` adds report.json,
table.txt and confusion.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from emerdiff_pl.fields import EMB_FIELD, GT_FIELD, JSON_FIELD, LOWRES_FIELD, SEG_FIELD
from emerdiff_pl.labelmaps import resize_labels_nearest
from emerdiff_pl.shardio import iter_samples
from emerdiff_pl.sources import open_labels

if TYPE_CHECKING:
    from torchmetrics import Metric

    from emerdiff_pl.metrics import BoundaryFScore


def _class_names(spec: str | None, num_classes: int) -> list[str]:
    """``--class-names`` (:func:`~emerdiff_pl.datasets.class_names`), else the class ids as names."""
    if spec is None:
        return [str(i) for i in range(num_classes)]
    from emerdiff_pl.datasets import class_names

    return class_names(spec, num_classes, counted="--num-classes gives")


def _guess_num_clusters(pred_urls: str, pred_field: str, num_classes: int) -> tuple[int, str]:
    """Global-protocol cluster count from the first prediction's JSON (relabel info, else num_masks)."""
    for sample in iter_samples(pred_urls, fields={JSON_FIELD}):
        meta = sample.get(JSON_FIELD)
        if not isinstance(meta, dict):
            break
        relabel = meta.get("relabel")
        if isinstance(relabel, dict) and "num_classes" in relabel:
            return int(relabel["num_classes"]), "relabel.num_classes of the prediction JSON"
        hparams = meta.get("hparams") if isinstance(meta.get("hparams"), dict) else {}
        num_masks = hparams.get("num_masks", meta.get("num_masks"))
        if num_masks is not None and pred_field in (SEG_FIELD, LOWRES_FIELD):
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


_COLUMNS = (
    ("named", "per_class_iou", "IoU named"),
    ("named", "per_class_boundary_f", "BF named"),
    ("global", "per_class_iou", "IoU global"),
    ("global", "per_class_boundary_f", "BF global"),
    ("per_image", "per_class_iou", "IoU per-image"),
    ("per_image", "per_class_boundary_f", "BF per-image"),
    ("concept", "per_class_iou", "IoU concept"),
    ("concept_per_image", "per_class_iou", "IoU concept/img"),
)


def _format_table(results: dict[str, Any], class_names: Sequence[str], tolerance: int) -> str:
    """Per-class IoU (and boundary F) of every protocol run, then mIoU, boundary F and pixel accuracy."""
    cols = [(p, key, label) for p, key, label in _COLUMNS if p in results and key in results[p]]
    head = "  ".join(f"{label:>15}" for _, _, label in cols)
    lines = [f"{'class':<24}{head}" + ("  matched cluster" if "global" in results else "")]
    for c, name in enumerate(class_names):
        cells = []
        for p, key, _ in cols:
            v = results[p][key][c]
            cells.append(f"{'—' if v is None else f'{v:.2f}':>15}")
        extra = ""
        if "global" in results:
            clusters = [k for k, a in enumerate(results["global"]["assignment"]) if a == c]
            extra = f"  {clusters[0] if clusters else '—'}"
        lines.append(f"{str(c) + ' ' + name:<24.24}" + "  ".join(cells) + extra)
    lines.append("-" * len(lines[0]))
    for key, label in (
        ("miou", "mIoU"),
        ("boundary_f", f"boundary F ({tolerance} px)"),
        ("pixel_accuracy", "pixel accuracy"),
    ):
        cells = []
        for p, col_key, _ in cols:
            # one summary cell per protocol, under its first column
            first = next(k for q, k, _ in cols if q == p) == col_key
            v = results[p].get(key) if first else None
            cells.append(f"{'' if v is None else f'{v:.2f}':>15}")
        lines.append(f"{label:<24}" + "  ".join(cells))
    return "\n".join(lines)


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else round(float(v), 4) for v in values]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl evaluate",
        description="Score pseudo-labels against ground truth (docs/method.md). Predictions and ground truth are "
        "matched by sample key; keys found on one side only are reported. Predictions are resized to the "
        "ground-truth size with nearest neighbour. Scores are in percent. Prints the table; --out also writes "
        "report.json, table.txt and confusion.png (global protocol) there.",
    )
    parser.add_argument(
        "--pred", required=True, help="prediction shards, e.g. 'relabelled/shard-{000000..000009}.tar'"
    )
    parser.add_argument(
        "--gt",
        required=True,
        help="ground truth: shards with <key>.gt.png (uint8, 255 = ignore), or a folder of label PNGs (class ids, "
        "one channel) named like the images predict read: sub/a.png is the truth of sub/a.jpg (key sub/a_jpg) "
        "or of the shard sample sub/a",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="number of ground-truth classes (27 for *-27); named output (model.classifier) gives its own",
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
        choices=["global", "per-image", "both", "concept", "named"],
        default=None,
        help="named: predictions that are class ids (predict with model.classifier) against the ground truth, "
        "no matching, a predicted 255 a miss (the default for named output); global: one confusion matrix and one assignment over the dataset (STEGO/PiCIE, the paper's "
        "Table 1); per-image: matching per image, more lenient (DiffSeg/DiffCut); both; concept: the paper's "
        "Table 2, each pixel takes the class whose concept (mean embedding of the class's pixels) is nearest "
        "to its mask's embedding (<key>.emb.npy), with concepts over the whole dataset ('concept') and per "
        "image ('concept_per_image', lenient); needs the predict output's per-image mask ids, not relabelled "
        "ones (default: named for named output, else global)",
    )
    parser.add_argument(
        "--pred-field",
        default=None,
        help="prediction label field (default seg.png; lowres.png is resized to the ground truth with nearest)",
    )
    parser.add_argument(
        "--gt-field", default=GT_FIELD, help=f"ground-truth label field of --gt shards (default {GT_FIELD})"
    )
    parser.add_argument(
        "--ignore-index", type=int, default=255, help="ground-truth id to ignore (default 255)"
    )
    parser.add_argument(
        "--boundary-tolerance",
        type=int,
        default=2,
        help="boundary F: a boundary pixel counts as found within this many pixels (default 2)",
    )
    parser.add_argument(
        "--class-names",
        default=None,
        help="class names for the table: cocostuff27, cityscapes27, toyworld, a comma list (a,b,c) or a text "
        "file (one name a line); as many as --num-classes",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder for report.json, table.txt, confusion.png (default: the table on stdout only)",
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


def _named_protocol(args: argparse.Namespace, pred_field: str) -> tuple[str, list[str] | None]:
    """(the protocol, the output's class names or None): ``named`` by default for named output, whose class count
    is the output's (``--num-classes`` set to it, or checked against it); else ``global``, and
    ``--num-classes`` required."""
    from emerdiff_pl.classifiers.names import output_class_names

    names = output_class_names(args.pred) if pred_field == SEG_FIELD else None
    protocol = args.protocol or ("named" if names else "global")
    if protocol == "named" and names is None:
        raise ValueError(
            f"--protocol named scores class ids, but {args.pred!r} holds per-image mask ids (its <key>.json names "
            "no classifier): predict with --model.classifier, or pick another protocol"
        )
    if names is not None and args.num_classes not in (None, len(names)):
        raise ValueError(
            f"--num-classes {args.num_classes}, but the predictions name {len(names)} classes ({names[:5]}…)"
        )
    if names is not None:
        args.num_classes = len(names)
    if args.num_classes is None:
        raise ValueError("--num-classes is required (the ground truth's class count) for mask-id predictions")
    return protocol, names if args.class_names is None else None


def _check_concept_input(meta: Any, key: str) -> None:
    if isinstance(meta, dict) and isinstance(meta.get("relabel"), dict):
        raise ValueError(
            f"prediction {key!r} was relabelled to global ids; the concept protocol needs the per-image mask ids "
            "that index <key>.emb.npy: pass the predict output as --pred"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the ``evaluate`` subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    import torch  # here, not at the top: `evaluate --help` stays instant
    from tqdm import tqdm

    from emerdiff_pl.metrics import (
        BoundaryFScore,
        ConceptIoU,
        GlobalHungarianIoU,
        NamedIoU,
        PerImageHungarianIoU,
        _as_numpy,
        named_ids,
        short_side_center_crop,
    )

    pred_field = args.pred_field or SEG_FIELD
    args.protocol, output_names = _named_protocol(args, pred_field)
    names = output_names or _class_names(args.class_names, args.num_classes)
    protocols = {
        "both": ["global", "per-image"],
        "concept": ["concept"],
    }.get(args.protocol, [args.protocol])
    num_clusters, clusters_from = args.num_clusters, "--num-clusters"
    if "global" in protocols and num_clusters is None:
        num_clusters, clusters_from = _guess_num_clusters(args.pred, pred_field, args.num_classes)
        if "per-image" in clusters_from:
            print(
                f"warning: predictions look like per-image cluster ids ({pred_field} without relabel info); "
                "the global protocol needs dataset-wide ids: run `emerdiff-pl relabel` first",
                file=sys.stderr,
            )
    tol, ignore = args.boundary_tolerance, args.ignore_index
    if tol < 0:
        raise SystemExit("--boundary-tolerance must be ≥ 0")
    metrics: dict[str, Metric] = {}
    boundary: dict[str, BoundaryFScore] = {}
    if "named" in protocols:
        metrics["named"] = NamedIoU(args.num_classes, ignore_index=ignore)
        boundary["named"] = BoundaryFScore(args.num_classes, args.num_classes + 1, tol, "global", ignore)
    if "global" in protocols:
        metrics["global"] = GlobalHungarianIoU(args.num_classes, num_clusters, ignore_index=ignore)
        boundary["global"] = BoundaryFScore(args.num_classes, num_clusters, tol, "global", ignore)
    if "per-image" in protocols:
        metrics["per_image"] = PerImageHungarianIoU(args.num_classes, ignore_index=ignore)
        boundary["per_image"] = BoundaryFScore(args.num_classes, None, tol, "per-image", ignore)
    concept = "concept" in protocols
    if concept:
        metrics["concept"] = ConceptIoU(args.num_classes, "dataset", ignore)
        metrics["concept_per_image"] = ConceptIoU(args.num_classes, "image", ignore)

    truth = open_labels(args.gt, args.gt_field)
    seen: set[str] = set()
    pred_only: list[str] = []
    duplicates: list[str] = []
    no_field: list[str] = []
    resized = 0
    fields = {pred_field, EMB_FIELD, JSON_FIELD} if concept else {pred_field}
    samples = iter_samples(args.pred, fields=fields, labels={pred_field})  # read raw, whatever its name
    for sample in tqdm(samples, desc="evaluate", unit="img", dynamic_ncols=True, file=sys.stderr):
        if args.limit is not None and len(seen) >= args.limit:
            break
        key = sample["__key__"]
        if key in seen:
            duplicates.append(key)
            continue
        seen.add(key)
        if pred_field not in sample or (concept and EMB_FIELD not in sample):
            no_field.append(key)
            continue
        target = truth.label(key)
        if target is None:
            pred_only.append(key)
            continue
        pred = sample[pred_field]
        if pred.shape != target.shape:
            pred = resize_labels_nearest(pred, target.shape)
            resized += 1
        if args.crop is not None:
            pred, target = short_side_center_crop(pred, args.crop), short_side_center_crop(target, args.crop)
        p, t = torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(target.astype(np.int64))
        if concept:
            _check_concept_input(sample.get(JSON_FIELD), key)
            emb = torch.from_numpy(np.asarray(sample[EMB_FIELD], dtype=np.float32))
            for metric in metrics.values():
                metric.update(p, t, emb)
            continue
        for name, metric in metrics.items():
            metric.update(p, t)
            boundary[name].update(named_ids(p, args.num_classes) if name == "named" else p, t)
    truth.close()
    gt_only = truth.unmatched(seen) if args.limit is None else []
    evaluated = len(seen) - len(pred_only) - len(no_field)
    if evaluated == 0 and no_field:
        wanted = f"{pred_field!r}" + (f" and {EMB_FIELD!r}" if concept else "")
        raise KeyError(
            f"no prediction in {args.pred!r} has {wanted} (e.g. sample {no_field[0]!r}); "
            "set --pred-field to one of the label fields the shards hold (seg.png, lowres.png, …)"
        )
    if evaluated == 0:
        others = truth.unmatched(set())
        hint = (
            f"its ground truth is for other images (e.g. {others[:3]}): are these the same images?"
            if others
            else "it holds none: is --gt the ground truth (emerdiff-pl convert output, or a folder of label PNGs)?"
        )
        raise ValueError(
            f"no prediction of {args.pred!r} has ground truth in --gt {args.gt!r}: {truth.why_missing(pred_only[0])}; "
            + hint
        )
    for what, keys in (
        (f"in the predictions only ({truth.why_missing(pred_only[0])})" if pred_only else "", pred_only),
        ("in the ground truth only", gt_only),
        ("repeated in the predictions (first one scored)", duplicates),
    ):
        if keys:
            print(f"warning: {len(keys)} key(s) {what}, not scored, e.g. {keys[:5]}", file=sys.stderr)
    if no_field:
        print(
            f"warning: {len(no_field)} prediction(s) without {pred_field!r}"
            + (f" or {EMB_FIELD!r}" if concept else "")
            + f", not scored, e.g. {no_field[:5]}",
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
        if name == "named":
            entry["assignment"] = out["assignment"].tolist()
            entry["confusion"] = out["confusion"].reshape(args.num_classes + 1, args.num_classes).tolist()
        elif name == "global":
            confusion = out["confusion"].reshape(num_clusters, args.num_classes)
            entry["assignment"] = out["assignment"].tolist()
            entry["num_clusters"] = num_clusters
            entry["num_clusters_from"] = clusters_from
            unmatched = confusion[out["assignment"] < 0].sum()
            entry["unmatched_cluster_pixel_fraction"] = float(unmatched / max(confusion.sum(), 1))
            entry["confusion"] = confusion.tolist()
        elif name == "per_image":
            entry.update({k: out[k].tolist() for k in ("tp", "fp", "fn")})
        else:
            entry["concepts"] = "dataset" if name == "concept" else "image"
            entry["confusion"] = out["confusion"].reshape(args.num_classes, -1).tolist()
        if name in boundary:
            assignment = out["assignment"] if name in ("global", "named") else None
            bf = boundary[name].compute(assignment)
            entry["boundary_f"] = float(bf["boundary_f"])
            entry["boundary_precision"] = float(bf["precision"])
            entry["boundary_recall"] = float(bf["recall"])
            entry["per_class_boundary_f"] = _nan_to_none(bf["per_class_f"].numpy().reshape(-1))
            entry["boundary_tolerance_px"] = tol
        results[name] = entry

    table = _format_table(results, names, tol)
    header = f"{evaluated} images scored ({args.pred} vs {args.gt}), scores in percent"
    print(header)
    print(table)
    if args.out is None:
        return 0
    os.makedirs(args.out, exist_ok=True)
    report = {
        "units": "percent",
        "pred": args.pred,
        "gt": args.gt,
        "pred_field": pred_field,
        "gt_field": args.gt_field,
        "num_classes": args.num_classes,
        "ignore_index": ignore,
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
    with open(os.path.join(args.out, "table.txt"), "w", encoding="utf-8") as f:
        f.write(header + "\n" + table + "\n")
    for name, title in (("named", "named classes, no matching"), ("global", "dataset-wide Hungarian")):
        if name in results:
            save_confusion_image(
                np.asarray(results[name]["confusion"]),
                np.asarray(results[name]["assignment"]),
                names,
                os.path.join(args.out, "confusion.png"),
                title=f"{title}: mIoU {results[name]['miou']:.2f}",
            )
            break
    print(f"wrote {os.path.join(args.out, 'report.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
