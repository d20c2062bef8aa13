"""Integer label maps on their pixel grid: nearest-neighbour resizing and the boundaries between regions.

One definition each for everything that draws or scores label maps (overlays, the boundary F-score, evaluation
at the ground truth's size): a boundary is where two 4-neighbours hold different labels; an id is a class id
below C or 255 (ignore).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emerdiff_pl.fields import IGNORE_CLASS


def ids_beyond_classes(labels: Any, num_classes: int) -> list[int]:
    """The ids of a label map (numpy array or torch tensor) that are neither a class id (< ``num_classes``) nor
    ignore (255), up to five, smallest first; [] when every id fits (the check before naming or scoring class ids)."""
    bad = (labels >= num_classes) & (labels != IGNORE_CLASS)
    if not bad.any():
        return []
    return sorted({int(v) for v in labels[bad].tolist()})[:5]


def resize_labels_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an H×W label map to ``size`` = (H', W') with nearest neighbour (pixel-centre sampling)."""
    labels = np.asarray(labels)
    h, w = labels.shape[:2]
    out_h, out_w = int(size[0]), int(size[1])
    if (h, w) == (out_h, out_w):
        return labels
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def boundaries(labels: np.ndarray, both_sides: bool = False) -> np.ndarray:
    """H×W bool map of the label changes between 4-neighbours (the image border is no boundary).

    By default only the pixel on the left of, or above, each change is marked: a line one pixel wide, as
    overlays draw it. ``both_sides`` marks the pixels on both sides, i.e. every pixel with a 4-neighbour of
    another label: each region's own boundary, as the boundary F-score scores it.
    """
    labels = np.asarray(labels)
    across = labels[:, :-1] != labels[:, 1:]  # H×(W-1): a change between columns x and x+1
    down = labels[:-1, :] != labels[1:, :]  # (H-1)×W: a change between rows y and y+1
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= across
    edge[:-1, :] |= down
    if both_sides:
        edge[:, 1:] |= across
        edge[1:, :] |= down
    return edge


__all__ = ["boundaries", "resize_labels_nearest"]
