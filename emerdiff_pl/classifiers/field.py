"""`field`: class scores that arrive with each input, from any external coarse segmenter.

A sample's coarse map is a member `<key>.coarse.png` (a label map: uint8 class ids, 255 = ignore) or
`<key>.coarse.npy` ((C, h, w) float scores, or an (h, w) integer label map) of an input shard, or a file of the
same stem beside a folder image (`img.jpg` + `img.coarse.png` / `img.coarse.npy`). Label maps become one-hot
scores with ignored pixels scoring 0 for every class, so a mask's mean score per class is the fraction of its
pixels labelled with that class. Decoding is pure (bytes → tensor); reading members and files is the caller's.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from emerdiff_pl.fields import COARSE_FIELDS, IGNORE_CLASS
from emerdiff_pl.paths import companion_path


class CoarseMapError(ValueError):
    """A coarse map that cannot give C class scores; the message names the sample key and the field."""


def coarse_scores(data: bytes, field: str, num_classes: int, key: str) -> Tensor:
    """Decode a sample's coarse map → class scores (C, h, w) float32. `field` is `coarse.png` or `coarse.npy`;
    label maps give one-hot scores (255 = ignore: all zeros). Raises CoarseMapError naming `key`."""
    where = f"sample {key!r}, {field}"
    if field == "coarse.png":
        labels = _read_png(data, where)
    elif field == "coarse.npy":
        array = _read_npy(data, where)
        if array.ndim == 3:
            return _score_array(array, num_classes, where)
        if array.ndim != 2:
            raise CoarseMapError(
                f"{where}: a coarse .npy holds (C, h, w) scores or an (h, w) label map, got shape {array.shape}"
            )
        if not np.issubdtype(array.dtype, np.integer):
            raise CoarseMapError(
                f"{where}: a 2-D coarse map must hold integer class ids, got {array.dtype} (scores are (C, h, w))"
            )
        labels = array
    else:
        raise CoarseMapError(f"{where}: not a coarse map field (expected one of {', '.join(COARSE_FIELDS)})")
    return _one_hot(labels, num_classes, where)


def _read_png(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
                raise CoarseMapError(
                    f"{where}: a coarse label map must be a single-channel PNG of class ids (mode L or P), "
                    f"got mode {image.mode}"
                )
            return np.asarray(image).copy()
    except CoarseMapError:
        raise
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, …
        raise CoarseMapError(f"{where}: cannot decode PNG ({type(err).__name__}: {err})") from None


def _read_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # ValueError for object arrays, others for truncated or foreign files
        raise CoarseMapError(f"{where}: cannot read .npy ({type(err).__name__}: {err})") from None


def _check_size(height: int, width: int, where: str) -> None:
    if height < 1 or width < 1:
        raise CoarseMapError(f"{where}: empty coarse map ({height}×{width})")


def _score_array(array: np.ndarray, num_classes: int, where: str) -> Tensor:
    if array.shape[0] != num_classes:
        raise CoarseMapError(
            f"{where}: {array.shape[0]} score channels, but there are {num_classes} class names "
            f"(expected shape ({num_classes}, h, w), got {array.shape})"
        )
    _check_size(array.shape[1], array.shape[2], where)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise CoarseMapError(f"{where}: scores must be numbers, got dtype {array.dtype}")
    scores = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not torch.isfinite(scores).all():
        raise CoarseMapError(f"{where}: scores hold NaN or infinite values")
    return scores


def _one_hot(labels: np.ndarray, num_classes: int, where: str) -> Tensor:
    _check_size(labels.shape[0], labels.shape[1], where)
    ids = torch.from_numpy(labels.astype(np.int64))
    bad = ((ids < 0) | (ids >= num_classes)) & (ids != IGNORE_CLASS)
    if bad.any():
        found = sorted({int(v) for v in ids[bad].unique()[:5]})
        raise CoarseMapError(
            f"{where}: class ids {found} outside [0, {num_classes}) for {num_classes} class names "
            f"({IGNORE_CLASS} = ignore)"
        )
    ignored = ids == IGNORE_CLASS
    one_hot = F.one_hot(ids.masked_fill(ignored, 0), num_classes).permute(2, 0, 1).float()  # (C, h, w)
    return one_hot.masked_fill(ignored, 0.0)


def check_coarse_size(scores: Tensor, image_size: tuple[int, int], key: str) -> Tensor:
    """`scores` (C, h, w) when the coarse map covers an image of `image_size` (H, W): its aspect ratio within a
    cell (or 10 %) of the image's, or square (from a segmenter that squashed the image); else CoarseMapError
    naming `key` and both sizes (a transposed or another image's map)."""
    (h, w), (height, width) = scores.shape[-2:], image_size
    expected = h * width / height  # the width a map of h rows has at the image's aspect ratio
    if h != w and abs(w - expected) > max(1.0, 0.1 * expected):
        raise CoarseMapError(
            f"sample {key!r}: the coarse map is {h}×{w} but the image is {height}×{width}: a coarse map must "
            "have the image's aspect ratio (or be square, from a segmenter that squashed it)"
        )
    return scores


def coarse_member(fields: dict[str, bytes], key: str) -> tuple[str, bytes]:
    """The coarse-map member of a shard sample's fields → (field, bytes); CoarseMapError when it has none or
    both."""
    found = [f for f in COARSE_FIELDS if f in fields]
    if len(found) != 1:
        what = "no coarse map" if not found else "two coarse maps"
        raise CoarseMapError(
            f"sample {key!r}: {what} (members: {sorted(fields)}; expected one of "
            f"{', '.join(f'{key}.{f}' for f in COARSE_FIELDS)})"
        )
    return found[0], fields[found[0]]


def coarse_file(image_path: str | Path) -> tuple[str, Path]:
    """The coarse-map file beside a folder image (`img.jpg` → `img.coarse.png` or `img.coarse.npy`) → (field,
    path); CoarseMapError when there is none or both."""
    path = Path(image_path)
    found = [(f, companion_path(path, f)) for f in COARSE_FIELDS]
    found = [(f, p) for f, p in found if p.is_file()]
    if len(found) != 1:
        what = "no coarse map" if not found else "two coarse maps"
        names = " or ".join(f"{path.stem}.{f}" for f in COARSE_FIELDS)
        raise CoarseMapError(f"image {str(path)!r}: {what} beside it (expected {names})")
    return found[0]


class FieldClassifier(nn.Module):
    """Class scores from the coarse maps that came with a batch: each (C, h_i, w_i) resized bilinearly to one
    size and stacked → (B, C, H, W). No weights; an nn.Module only to sit beside the other classifiers."""

    kind = "field"

    def __init__(self, class_names: Sequence[str]):
        super().__init__()
        if not class_names:
            raise ValueError("the field classifier needs class names (one per score channel / label id)")
        self.class_names = tuple(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def scores(self, coarse: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """The batch's coarse scores (each (C, h_i, w_i), from `coarse_scores`) at `size` → (B, C, H, W)."""
        out = []
        for scores in coarse:
            if scores.shape[0] != self.num_classes:
                raise ValueError(
                    f"coarse scores have {scores.shape[0]} channels for {self.num_classes} classes"
                )
            x = scores.float()[None]
            if tuple(x.shape[-2:]) != tuple(size):
                x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
            out.append(x[0])
        if not out:
            return torch.empty(0, self.num_classes, *size)
        return torch.stack(out)

    def record(self) -> dict[str, str]:
        """What `<key>.json` and `id2label.json` say about this classifier."""
        return {"classifier": "field", "fields": " or ".join(COARSE_FIELDS)}


__all__ = [
    "COARSE_FIELDS",
    "CoarseMapError",
    "check_coarse_size",
    "FieldClassifier",
    "coarse_file",
    "coarse_member",
    "coarse_scores",
]
