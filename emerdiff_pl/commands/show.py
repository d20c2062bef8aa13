"""``emerdiff-pl show``: a contact sheet of a pseudo-label run, one row per sample: image | overlay | low-res mask.

``emerdiff-pl show --input '<shards>' --out grid.png`` lets a person judge a run at a glance; with ``--gt`` each
predicted id takes the colour of the ground-truth class it is matched to. The pictures are :mod:`emerdiff_pl.viz`'s.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np

from emerdiff_pl.datasets import class_names
from emerdiff_pl.fields import (
    GT_FIELD,
    IGNORE_CLASS,
    JSON_FIELD,
    LOWRES_FIELD,
    OVERLAY_FIELD,
    SEG_FIELD,
    image_field_name,
)
from emerdiff_pl.labelmaps import boundaries, resize_labels_nearest
from emerdiff_pl.shardio import iter_samples
from emerdiff_pl.sources import image_of, open_images, open_labels
from emerdiff_pl.viz import BOUNDARY_COLOR, colorize, contact_sheet, display_ids, match_to_gt, overlay


def _find_image(sample: dict) -> np.ndarray | None:
    """The decoded input image a prediction sample carries (``writer.include_image``), if any."""
    value = sample.get(image_field_name(sample) or "")
    if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[2] == 3:
        return value
    return None


# --------------------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl show",
        description="Contact sheet of a pseudo-label run: one row per sample with image | overlay | low-res mask "
        "(and ground truth with --gt), plus a legend of the ids shown. Named output (model.classifier) is coloured "
        "by class, its legend names the classes. Otherwise, without --gt colours are fixed per id; "
        "with --gt each predicted id takes the colour of the ground-truth class it is matched to (Hungarian "
        "matching on shared pixels), so a region has one colour in both columns.",
    )
    parser.add_argument(
        "--input",
        required=True,
        help="prediction shards: a folder of *.tar, or 'out/shard-{000000..000003}.tar'",
    )
    parser.add_argument("--out", required=True, help="output image (PNG or JPEG by extension)")
    parser.add_argument(
        "--n", type=int, default=16, help="number of samples (rows), the first N (default 16)"
    )
    parser.add_argument(
        "--images",
        default=None,
        help="where the images are when the prediction shards carry none: the folder predict read "
        "(--data.folder) or its source shards (--data.urls)",
    )
    parser.add_argument(
        "--gt",
        default=None,
        help="optional ground truth, adds a column: shards with <key>.gt.png, or a folder of label PNGs named like "
        "the images (a.png for a.jpg)",
    )
    parser.add_argument(
        "--match",
        choices=("auto", "image", "dataset", "none"),
        default="auto",
        help="with --gt, how predicted ids get GT colours: per image (per-image cluster ids), over all rows "
        "(dataset-wide ids, e.g. relabel output), or none (fixed colour per id). auto: none for named output "
        "(model.classifier: ids are classes), dataset for relabelled shards, else image",
    )
    parser.add_argument(
        "--field", default=SEG_FIELD, help=f"label field drawn on the overlay (default {SEG_FIELD})"
    )
    parser.add_argument(
        "--lowres-field", default=LOWRES_FIELD, help=f"low-res label field (default {LOWRES_FIELD})"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1] (default 0.5)")
    parser.add_argument("--cell", type=int, default=192, help="cell height in pixels (default 192)")
    parser.add_argument(
        "--class-names",
        default=None,
        help="ground-truth class names for the legend (with --gt): cocostuff27, cityscapes27, toyworld, a comma "
        "list (a,b,c) or a text file with one name per line",
    )
    return parser


def _colour(labels: np.ndarray, ids: np.ndarray | None, ignore: int | None) -> np.ndarray:
    """Colourised labels: by their own id, or by the palette indices ``ids`` (GT-matched) when given."""
    if ids is None:
        return colorize(labels, ignore_index=ignore)
    return colorize(ids)


def _overlay_with(
    image: np.ndarray, labels: np.ndarray, ids: np.ndarray | None, alpha: float, ignore: int | None
) -> np.ndarray:
    """:func:`overlay` with colours from ``ids`` (boundaries still follow ``labels``)."""
    if ids is None:
        return overlay(image, labels, alpha=alpha, ignore_index=ignore)
    labels = resize_labels_nearest(np.asarray(labels), image.shape[:2])
    ids = resize_labels_nearest(np.asarray(ids), image.shape[:2])
    out = overlay(image, ids, alpha=alpha, draw_boundaries=False)
    out[boundaries(labels)] = BOUNDARY_COLOR
    return out


def _named(samples: list[dict], field: str) -> list[str] | None:
    """The class names of named output (predict with ``model.classifier``: ``field`` holds class ids), else None."""
    from emerdiff_pl.classifiers.names import named_classes

    if field != SEG_FIELD:
        return None
    return named_classes(samples[0].get(JSON_FIELD))


def main(argv: list[str] | None = None) -> int:
    """``emerdiff-pl show``: write the contact sheet; 0 on success, 2 for a bad argument."""
    args = build_parser().parse_args(argv)
    if args.n < 1:
        print(f"emerdiff-pl show: error: --n must be ≥ 1, got {args.n}", file=sys.stderr)
        return 2
    names = class_names(args.class_names) if args.class_names else None
    images = open_images(args.images) if args.images else None
    gts = open_labels(args.gt, GT_FIELD) if args.gt else None
    ignore = 255 if args.field == GT_FIELD else None  # showing ground-truth shards themselves

    samples = []
    for sample in itertools.islice(iter_samples(args.input), args.n):
        if args.field not in sample:
            raise ValueError(
                f"sample {sample['__key__']!r} in {sample['__url__']} has no {args.field!r} "
                f"(fields: {sorted(k for k in sample if not k.startswith('__'))}); pick one with --field"
            )
        samples.append(sample)
    if not samples:
        raise ValueError(f"no samples in {args.input!r}")
    labels_of = {s["__key__"]: gts.label(s["__key__"]) for s in samples} if gts is not None else {}
    gt_of = {key: label for key, label in labels_of.items() if label is not None}
    named = _named(samples, args.field)
    if named is not None:  # class ids: coloured by class, named in the legend, 255 = ignore (black)
        names, ignore = names or named, IGNORE_CLASS
    match = "none" if named is not None and args.match == "auto" else args.match
    if match == "auto":
        relabelled = all(isinstance(s.get(JSON_FIELD), dict) and "relabel" in s[JSON_FIELD] for s in samples)
        match = "dataset" if relabelled else "image"
    num_gt = max((int(g[g != 255].max()) + 1 for g in gt_of.values() if (g != 255).any()), default=0)
    if names:
        num_gt = max(num_gt, len(names))
    dataset_mapping = (
        match_to_gt([(s[args.field], gt_of[s["__key__"]]) for s in samples if s["__key__"] in gt_of])
        if match == "dataset" and gt_of
        else None
    )

    rows, row_labels, gt_seen, any_image = [], [], set(), False
    legend_ids: dict[int, str] = {}  # palette index → legend text, for the ids shown
    for sample in samples:
        key, labels = sample["__key__"], sample[args.field]
        image = _find_image(sample)
        if image is None and images is not None:
            image = image_of(images, key)
        any_image |= image is not None
        gt = gt_of.get(key)
        mapping = None
        if gt is not None and match != "none":
            mapping = dataset_mapping if dataset_mapping is not None else match_to_gt([(labels, gt)])
        ids = display_ids(labels, mapping, num_gt) if mapping is not None else None
        for pred in np.unique(labels).tolist():
            if pred == ignore:
                continue
            if mapping is None:
                named_ids = gts is None or named is not None
                name = names[pred] if names and named_ids and pred < len(names) else ""
                legend_ids.setdefault(pred, f"{pred} {name}".strip())
            elif pred in mapping:
                gt_class = mapping[pred]
                name = names[gt_class] if names and gt_class < len(names) else str(gt_class)
                legend_ids.setdefault(gt_class, f"= {name}")
            else:
                legend_ids.setdefault(num_gt + pred, f"{pred} unmatched")
        if image is not None:
            over = _overlay_with(image, labels, ids, args.alpha, ignore)
        elif OVERLAY_FIELD in sample and ids is None:
            over = sample[OVERLAY_FIELD]
        else:
            over = overlay(_colour(labels, ids, ignore), labels, alpha=0.0)
        lowres = sample.get(args.lowres_field)
        lowres_ids = (
            display_ids(lowres, mapping, num_gt) if lowres is not None and mapping is not None else None
        )
        cells = [
            (image, False) if image is not None else None,
            (over, False),
            (_colour(lowres, lowres_ids, None), True) if lowres is not None else None,
        ]
        if gts is not None:
            if gt is not None:
                gt_seen.update(np.unique(gt).tolist())
            cells.append((colorize(gt, ignore_index=255), True) if gt is not None else None)
        rows.append(cells)
        row_labels.append(key)
    if not any_image:
        print(
            "note: no image found (<key>.jpg in the prediction shards, or --images with the folder or shards "
            "predict read); the overlay column shows the colourised labels instead",
            file=sys.stderr,
        )
    matched = gts is not None and match != "none"
    titles = [
        "image",
        f"overlay ({args.field}{', GT colours' if matched else ''})",
        f"low-res ({args.lowres_field}{': mask ids, not classes' if named is not None else ''})",
    ]
    if gts is not None:
        titles.append(f"ground truth ({GT_FIELD})")
    section = (
        ("classes" if named is not None else "ids")
        + f" in {args.field}"
        + (f" (matched to GT per {'image' if match == 'image' else 'sheet'})" if matched else "")
    )
    legend = [(section, sorted(legend_ids.items())[:96])]
    if gt_seen:
        named = [
            (i, f"{i} {names[i] if names and i < len(names) else ''}".strip())
            for i in sorted(gt_seen - {255})
        ]
        legend.append(("ground-truth classes", named[:96]))
    sheet = contact_sheet(rows, titles, row_labels, legend, cell_height=args.cell)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(rows)} samples, {sheet.width}×{sheet.height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
