"""Pictures of label maps: a fixed colour palette, overlays with class boundaries, contact sheets, and colours
matched to the ground truth.

Colours depend only on the label id, so pictures of different runs (and of relabelled datasets with global ids)
can be compared side by side. The ``show`` command (:mod:`emerdiff_pl.commands.show`) draws its contact sheet
with these; the writer and relabel store :func:`overlay_jpeg` as ``<key>.overlay.jpg``.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from emerdiff_pl.codec import encode_jpeg
from emerdiff_pl.labelmaps import boundaries, resize_labels_nearest

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


def overlay_jpeg(image: np.ndarray, labels: np.ndarray) -> bytes:
    """The :func:`overlay` of ``labels`` on an H×W×3 uint8 image, as JPEG bytes (``<key>.overlay.jpg``)."""
    return encode_jpeg(overlay(image, labels))


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


# --------------------------------------------------------------------------------------------------------------
# colours matched to the ground truth
# --------------------------------------------------------------------------------------------------------------


def match_to_gt(pairs: Sequence[tuple[np.ndarray, np.ndarray]], ignore_index: int = 255) -> dict[int, int]:
    """Hungarian match of predicted ids to ground-truth classes, maximising the pixels they share over all
    ``pairs`` of (prediction, ground truth); predictions of another size are resized (nearest) to the GT's.
    Only pairs that overlap are returned; unmatched ids (more clusters than classes) are left out."""
    from emerdiff_pl.metrics import hungarian_match  # torch and scipy: only where colours are matched

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
    assignment = hungarian_match(confusion)
    return {p: int(c) for p, c in enumerate(assignment) if c >= 0 and confusion[p, c] > 0}


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


__all__ = [
    "BOUNDARY_COLOR",
    "IGNORE_COLOR",
    "colorize",
    "contact_sheet",
    "display_ids",
    "match_to_gt",
    "overlay",
    "overlay_jpeg",
    "palette",
]
