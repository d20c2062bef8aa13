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
    """Grid image: one row per sample, one column per title; cells are (H×W×3 uint8, nearest-resize) or None."""
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
        for n, (class_id, name) in enumerate(entries):
            x = pad + (n % legend_cols) * 180
            y = y0 + 20 + (n // legend_cols) * 20
            draw.rectangle([x, y + 2, x + 14, y + 16], fill=tuple(int(v) for v in colors[class_id]))
            draw.text((x + 20, y + 1), f"{class_id} {name}"[:22], fill=(230, 230, 230), font=font)
        y0 += 30 + 20 * -(-len(entries) // legend_cols)
    return sheet


def load_class_names(spec: str | None, num: int | None = None) -> list[str] | None:
    """Class names from a known dataset name (``cocostuff27``, ``cityscapes27``) or a text file (one a line)."""
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


_IMAGE_FIELDS = ("jpg", "jpeg", "webp", "png", "image.jpg", "image.png")


def _find_image(sample: dict) -> np.ndarray | None:
    for field in _IMAGE_FIELDS:
        value = sample.get(field)
        if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[2] == 3:
            return value
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl show",
        description="Contact sheet of a pseudo-label run: one row per sample with image | overlay | low-res mask "
        "(and ground truth with --gt), plus a legend of the ids shown. Colours are fixed per id; predicted "
        "cluster ids and ground-truth class ids are different things even where they share a colour.",
    )
    parser.add_argument(
        "--input", required=True, help="prediction shards, e.g. 'out/shard-{000000..000003}.tar'"
    )
    parser.add_argument("--out", required=True, help="output image (PNG or JPEG by extension)")
    parser.add_argument(
        "--n", type=int, default=16, help="number of samples (rows), the first N (default 16)"
    )
    parser.add_argument(
        "--images",
        default=None,
        help="source shards with <key>.jpg, used when the prediction shards carry no image",
    )
    parser.add_argument(
        "--gt", default=None, help="optional ground-truth shards with <key>.gt.png: adds a column"
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        print(f"error: --n must be ≥ 1, got {args.n}", file=sys.stderr)
        return 2
    names = load_class_names(args.class_names)
    images = ShardIndex(args.images, fields=_IMAGE_FIELDS) if args.images else None
    gts = ShardIndex(args.gt, fields=("gt.png",)) if args.gt else None

    ignore = 255 if args.field == "gt.png" else None  # showing ground-truth shards themselves
    rows, row_labels, seen, gt_seen = [], [], set(), set()
    any_image = False
    for sample in itertools.islice(iter_samples(args.input), args.n):
        key = sample["__key__"]
        if args.field not in sample:
            raise KeyError(
                f"sample {key!r} in {sample['__url__']} has no {args.field!r} (fields: {sorted(sample)})"
            )
        labels = sample[args.field]
        image = _find_image(sample)
        if image is None and images is not None and key in images:
            image = _find_image(images.get(key))
        any_image |= image is not None
        seen.update(np.unique(labels).tolist())
        if image is not None:
            over = overlay(image, labels, alpha=args.alpha, ignore_index=ignore)
        elif "overlay.jpg" in sample:
            over = sample["overlay.jpg"]
        else:
            over = overlay(colorize(labels, ignore_index=ignore), labels, alpha=0.0)
        lowres = sample.get(args.lowres_field)
        cells = [
            (image, False) if image is not None else None,
            (over, False),
            (colorize(lowres), True) if lowres is not None else None,
        ]
        if gts is not None:
            gt = gts.get(key)["gt.png"] if key in gts else None
            if gt is not None:
                gt_seen.update(np.unique(gt).tolist())
            cells.append((colorize(gt, ignore_index=255), True) if gt is not None else None)
        rows.append(cells)
        row_labels.append(key)
    if not rows:
        raise ValueError(f"no samples in {args.input!r}")
    if not any_image:
        print(
            "note: no image found (<key>.jpg in the prediction shards or --images); the overlay column shows "
            "the colourised labels instead",
            file=sys.stderr,
        )
    titles = ["image", f"overlay ({args.field})", f"low-res ({args.lowres_field})"]
    if gts is not None:
        titles.append("ground truth (gt.png)")
    # names describe ground-truth classes: they label the --gt legend, or the ids of --field when that field
    # is itself ground truth (showing converter output with --field gt.png)
    field_names = names if gts is None else None
    shown = sorted(seen - {ignore})
    entries = [(i, field_names[i] if field_names and i < len(field_names) else "") for i in shown]
    legend = [(f"ids in {args.field}", entries[:96])]
    if gt_seen:
        named = [(i, names[i] if names and i < len(names) else "") for i in sorted(gt_seen - {255})]
        legend.append(("ground-truth classes", named[:96]))
    sheet = contact_sheet(rows, titles, row_labels, legend, cell_height=args.cell)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(rows)} samples, {sheet.width}×{sheet.height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
