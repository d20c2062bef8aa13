"""Pictures of label maps: a fixed colour palette, overlays with class boundaries, and the ``show`` contact sheet.

``emerdiff-pl show --input '<shards>' --out grid.png`` draws one row per sample, image | overlay | low-res mask,
so a person can judge a run at a glance. Colours depend only on the label id, so sheets of different runs (and
of relabelled datasets with global ids) can be compared side by side.
"""

from __future__ import annotations

import argparse
import colorsys
import itertools
import os
import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from emerdiff_pl.shardio import ShardIndex, iter_samples, resize_labels_nearest

_GOLDEN = 0.618033988749895
_GREEDY_COLORS = 512
IGNORE_COLOR = (0, 0, 0)
BOUNDARY_COLOR = (255, 255, 255)


@lru_cache(maxsize=1)
def _greedy_colors() -> np.ndarray:
    """Farthest-point sequence on a 12-level RGB lattice (weighted 2:4:3 like perceived differences).

    Each colour is the lattice point farthest from all earlier ones and from black (ignore) and white
    (boundaries), so any prefix of the sequence is as spread out as a greedy choice allows.
    """
    levels = np.round(np.linspace(0, 255, 12)).astype(np.int64)
    candidates = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    weight = np.array([2, 4, 3], dtype=np.int64)

    def dist2(points: np.ndarray, color: np.ndarray) -> np.ndarray:
        return (((points - color) ** 2) * weight).sum(-1)

    nearest = np.minimum(
        dist2(candidates, np.array(IGNORE_COLOR)), dist2(candidates, np.array(BOUNDARY_COLOR))
    )
    chosen = []
    for _ in range(_GREEDY_COLORS):
        j = int(np.argmax(nearest))  # first maximum: deterministic
        chosen.append(candidates[j])
        nearest = np.minimum(nearest, dist2(candidates, candidates[j]))
    return np.asarray(chosen, dtype=np.uint8)


@lru_cache(maxsize=8)
def _palette_cached(n: int) -> bytes:
    base = _greedy_colors()
    colors = [tuple(int(v) for v in c) for c in base[:n]]
    for j in range(len(colors), n):  # beyond the greedy table: golden-ratio hues (may repeat colours)
        hue = (0.11 + j * _GOLDEN) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, (0.95, 0.6, 0.8)[j % 3], (0.95, 0.75, 0.55, 0.85)[(j // 3) % 4])
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return np.asarray(colors, dtype=np.uint8).reshape(n, 3).tobytes()


def palette(n: int) -> np.ndarray:
    """n×3 uint8 colours; colour i is the same for every n > i and every run (no randomness)."""
    if n < 0:
        raise ValueError(f"palette size must be ≥ 0, got {n}")
    return np.frombuffer(_palette_cached(int(n)), dtype=np.uint8).reshape(n, 3).copy()


def colorize(labels: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """H×W label ids → H×W×3 uint8 via :func:`palette`; ``ignore_index`` pixels (if given) are black."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D (H×W), got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be ≥ 0, got min {labels.min()}")
    ids = labels.astype(np.int64)
    top = int(ids.max()) + 1 if ids.size else 1
    out = palette(top)[ids]
    if ignore_index is not None:
        out[ids == ignore_index] = IGNORE_COLOR
    return out


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Boolean H×W map, True where a pixel's label differs from its right or lower neighbour."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    alpha: float = 0.5,
    ignore_index: int | None = None,
    draw_boundaries: bool = True,
) -> np.ndarray:
    """Blend coloured labels onto an H×W×3 uint8 image and draw class boundaries in white.

    ``labels`` of another size are resized to the image with nearest neighbour. Pixels equal to
    ``ignore_index`` (if given) keep the image colour.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H×W×3, got shape {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    labels = resize_labels_nearest(np.asarray(labels), image.shape[:2])
    colors = colorize(labels).astype(np.float32)
    out = image.astype(np.float32) * (1.0 - alpha) + colors * alpha
    if ignore_index is not None:
        keep = labels == ignore_index
        out[keep] = image[keep]
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if draw_boundaries:
        out[boundaries(labels)] = BOUNDARY_COLOR
    return out


# --------------------------------------------------------------------------------------------------------------
# contact sheet
# --------------------------------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _fit(array: np.ndarray, height: int, max_width: int, nearest: bool) -> Image.Image:
    h, w = array.shape[:2]
    scale = min(height / h, max_width / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return Image.fromarray(array).resize(size, resample)


def contact_sheet(
    rows: Sequence[Sequence[tuple[np.ndarray, bool] | None]],
    titles: Sequence[str],
    row_labels: Sequence[str],
    legend: Sequence[tuple[str, Sequence[tuple[int, str]]]] = (),
    cell_height: int = 192,
) -> Image.Image:
    """Grid image: one row per sample, one column per title; cells are (H×W×3 uint8, nearest-resize) or None.

    ``legend`` sections hold (palette index, text) entries: a swatch of :func:`palette` colour and its text."""
    ncols = len(titles)
    cell_w = cell_height * 4 // 3
    pad, head, label_w = 6, 24, 0
    font = _font(14)
    if row_labels:
        label_w = max(8 * max(len(s) for s in row_labels), 60) + pad
        label_w = min(label_w, 220)
    width = label_w + ncols * (cell_w + pad) + pad
    legend_cols = max(1, (width - pad) // 180)
    legend_h = sum(30 + 20 * -(-len(entries) // legend_cols) for _, entries in legend)
    height = head + len(rows) * (cell_height + pad) + pad + legend_h
    sheet = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        fitted = title if len(title) * 8 <= cell_w else title[: max(1, cell_w // 8 - 1)] + "…"
        draw.text((label_w + pad + c * (cell_w + pad), 4), fitted, fill=(230, 230, 230), font=font)
    for r, row in enumerate(rows):
        y = head + r * (cell_height + pad)
        if row_labels:
            draw.text((pad, y + cell_height // 2 - 7), row_labels[r][:26], fill=(230, 230, 230), font=font)
        for c, cell in enumerate(row):
            x = label_w + pad + c * (cell_w + pad)
            if cell is None:
                draw.text((x + 8, y + cell_height // 2 - 7), "(none)", fill=(140, 140, 140), font=font)
                continue
            array, nearest = cell
            tile = _fit(array, cell_height, cell_w, nearest)
            sheet.paste(tile, (x + (cell_w - tile.width) // 2, y + (cell_height - tile.height) // 2))
    y0 = head + len(rows) * (cell_height + pad) + pad
    for section, entries in legend:
        draw.text((pad, y0), section, fill=(230, 230, 230), font=font)
        colors = palette(max((i for i, _ in entries), default=0) + 1)
        for n, (color_id, text) in enumerate(entries):
            x = pad + (n % legend_cols) * 180
            y = y0 + 20 + (n // legend_cols) * 20
            draw.rectangle([x, y + 2, x + 14, y + 16], fill=tuple(int(v) for v in colors[color_id]))
            draw.text((x + 20, y + 1), text[:22], fill=(230, 230, 230), font=font)
        y0 += 30 + 20 * -(-len(entries) // legend_cols)
    return sheet


def load_class_names(spec: str | None, num: int | None = None) -> list[str] | None:
    """Class names from a known dataset name (``cocostuff27``, ``cityscapes27``, ``toyworld``) or a text file
    (one a line)."""
    if spec is None:
        return None
    from emerdiff_pl.datasets import CLASS_NAMES

    if spec in CLASS_NAMES:
        return list(CLASS_NAMES[spec])
    if not os.path.isfile(spec):
        raise FileNotFoundError(
            f"--class-names {spec!r} is neither a known dataset ({', '.join(CLASS_NAMES)}) nor a file "
            "with one class name per line"
        )
    with open(spec, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if num is not None and len(names) < num:
        raise ValueError(f"{spec} names {len(names)} classes, fewer than the {num} needed")
    return names


# --------------------------------------------------------------------------------------------------------------
# colours matched to the ground truth
# --------------------------------------------------------------------------------------------------------------


def match_to_gt(pairs: Sequence[tuple[np.ndarray, np.ndarray]], ignore_index: int = 255) -> dict[int, int]:
    """Hungarian match of predicted ids to ground-truth classes, maximising the pixels they share over all
    ``pairs`` of (prediction, ground truth); predictions of another size are resized (nearest) to the GT's.
    Only pairs that overlap are returned; unmatched ids (more clusters than classes) are left out."""
    from scipy.optimize import linear_sum_assignment

    pred_ids: list[np.ndarray] = []
    gt_ids: list[np.ndarray] = []
    for pred, gt in pairs:
        pred = resize_labels_nearest(np.asarray(pred), np.asarray(gt).shape[:2]).astype(np.int64)
        gt = np.asarray(gt).astype(np.int64)
        valid = gt != ignore_index
        pred_ids.append(pred[valid])
        gt_ids.append(gt[valid])
    if not pred_ids or not sum(p.size for p in pred_ids):
        return {}
    pred_all, gt_all = np.concatenate(pred_ids), np.concatenate(gt_ids)
    n_pred, n_gt = int(pred_all.max()) + 1, int(gt_all.max()) + 1
    confusion = np.bincount(pred_all * n_gt + gt_all, minlength=n_pred * n_gt).reshape(n_pred, n_gt)
    rows, cols = linear_sum_assignment(-confusion)
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True) if confusion[r, c] > 0}


def display_ids(labels: np.ndarray, mapping: dict[int, int], num_gt: int) -> np.ndarray:
    """Palette indices for predicted ``labels``: a matched id takes its GT class's colour, an unmatched one a
    colour after the GT classes (``num_gt + id``), so it is never mistaken for a class."""
    labels = np.asarray(labels).astype(np.int64)
    top = int(labels.max()) + 1 if labels.size else 1
    lut = np.arange(top, dtype=np.int64) + num_gt
    for pred, gt in mapping.items():
        if pred < top:
            lut[pred] = gt
    return lut[labels]


# --------------------------------------------------------------------------------------------------------------
# images next to the predictions: source shards or the folder predict read
# --------------------------------------------------------------------------------------------------------------

_IMAGE_FIELDS = ("jpg", "jpeg", "webp", "png", "image.jpg", "image.png")


def _find_image(sample: dict) -> np.ndarray | None:
    for field in _IMAGE_FIELDS:
        value = sample.get(field)
        if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[2] == 3:
            return value
    return None


class _FolderImages:
    """The images of a folder under the keys ``predict --data.folder`` gave them."""

    def __init__(self, folder: str):
        from emerdiff_pl.shardio import list_folder

        self.paths = dict(list_folder(folder))

    def __contains__(self, key: str) -> bool:
        return key in self.paths

    def image(self, key: str) -> np.ndarray | None:
        from emerdiff_pl.shardio import decode_image

        try:
            with open(self.paths[key], "rb") as handle:
                return decode_image(handle.read())
        except (OSError, ValueError):
            return None


class _ShardImages:
    """The images of source shards, by key."""

    def __init__(self, urls: str):
        self.index = ShardIndex(urls, fields=_IMAGE_FIELDS)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def image(self, key: str) -> np.ndarray | None:
        return _find_image(self.index.get(key))


def _holds_tars(path: str) -> bool:
    return any(p.suffix == ".tar" for p in Path(path).iterdir())


def open_images(spec: str) -> _FolderImages | _ShardImages:
    """``--images``: source shards (patterns, a folder of ``*.tar``) or the image folder predict read."""
    if os.path.isdir(spec) and not _holds_tars(spec):
        images = _FolderImages(spec)
        if not images.paths:
            raise FileNotFoundError(f"--images {spec!r} holds neither *.tar shards nor images")
        return images
    return _ShardImages(spec)


# --------------------------------------------------------------------------------------------------------------
# the show command
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl show",
        description="Contact sheet of a pseudo-label run: one row per sample with image | overlay | low-res mask "
        "(and ground truth with --gt), plus a legend of the ids shown. Without --gt colours are fixed per id; "
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
        "--gt", default=None, help="optional ground-truth shards with <key>.gt.png: adds a column"
    )
    parser.add_argument(
        "--match",
        choices=("auto", "image", "dataset", "none"),
        default="auto",
        help="with --gt, how predicted ids get GT colours: per image (per-image cluster ids), over all rows "
        "(dataset-wide ids, e.g. relabel output), or none (fixed colour per id). auto: dataset for relabelled "
        "shards, else image",
    )
    parser.add_argument(
        "--field", default="seg.png", help="label field drawn on the overlay (default seg.png)"
    )
    parser.add_argument(
        "--lowres-field", default="lowres.png", help="low-res label field (default lowres.png)"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1] (default 0.5)")
    parser.add_argument("--cell", type=int, default=192, help="cell height in pixels (default 192)")
    parser.add_argument(
        "--class-names",
        default=None,
        help="ground-truth class names for the legend (with --gt): cocostuff27, cityscapes27, toyworld, or a "
        "text file with one name per line",
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


def main(argv: list[str] | None = None) -> int:
    """``emerdiff-pl show``: write the contact sheet; 0 on success, 2 for a bad argument."""
    args = build_parser().parse_args(argv)
    if args.n < 1:
        print(f"emerdiff-pl show: error: --n must be ≥ 1, got {args.n}", file=sys.stderr)
        return 2
    names = load_class_names(args.class_names)
    images = open_images(args.images) if args.images else None
    gts = ShardIndex(args.gt, fields=("gt.png",)) if args.gt else None
    ignore = 255 if args.field == "gt.png" else None  # showing ground-truth shards themselves

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
    gt_of = {
        s["__key__"]: gts.get(s["__key__"])["gt.png"]
        for s in samples
        if gts is not None and s["__key__"] in gts
    }
    match = args.match
    if match == "auto":
        relabelled = all(isinstance(s.get("json"), dict) and "relabel" in s["json"] for s in samples)
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
        if image is None and images is not None and key in images:
            image = images.image(key)
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
                name = names[pred] if names and gts is None and pred < len(names) else ""
                legend_ids.setdefault(pred, f"{pred} {name}".strip())
            elif pred in mapping:
                gt_class = mapping[pred]
                name = names[gt_class] if names and gt_class < len(names) else str(gt_class)
                legend_ids.setdefault(gt_class, f"= {name}")
            else:
                legend_ids.setdefault(num_gt + pred, f"{pred} unmatched")
        if image is not None:
            over = _overlay_with(image, labels, ids, args.alpha, ignore)
        elif "overlay.jpg" in sample and ids is None:
            over = sample["overlay.jpg"]
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
        f"low-res ({args.lowres_field})",
    ]
    if gts is not None:
        titles.append("ground truth (gt.png)")
    section = f"ids in {args.field}" + (
        f" (matched to GT per {'image' if match == 'image' else 'sheet'})" if matched else ""
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
