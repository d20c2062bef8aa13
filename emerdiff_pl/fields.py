"""The member names of a sample: the pseudo-label format's fields, and which fields hold images or label maps.

Every module that writes or reads a sample names its members from here (docs/method.md fixes the format). A field
is the part of a tar member name after the key (WebDataset's convention): ``dir/abc.seg.png`` is field
``seg.png`` of sample ``dir/abc``.
"""

from __future__ import annotations

from collections.abc import Iterable

# the pseudo-label format: one sample per input image
SEG_FIELD = "seg.png"  # class ids at the original image size (per-image ids, or global ids after relabel)
LOWRES_FIELD = "lowres.png"  # the low-res mask ids at the feature grid
EMB_FIELD = "emb.npy"  # K×D mask embeddings, float16
JSON_FIELD = "json"  # size, model, hyperparameters, seed, versions, timings (and the relabel record)
OVERLAY_FIELD = "overlay.jpg"  # the image with its labels drawn over it (optional)
# ground-truth shards for evaluation (and the labelled images of fit-probe)
GT_FIELD = "gt.png"  # uint8 class ids, 255 = ignore
# the ignore id of class-id label maps: ground truth's unlabelled pixels, named output's unsure pixels
IGNORE_CLASS = 255
# input shards for `classifier: field`: an external segmenter's coarse map of the sample, one of
COARSE_FIELDS = (
    "coarse.png",
    "coarse.npy",
)  # uint8 class ids (255 = ignore) / (C, h, w) scores or (h, w) ids

# The one list of image extensions: folder files and tar fields read as images (last extension, lower case).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
# Heads of compound fields that hold label maps (read raw, never converted): ``gt.png``, ``seg.png``, ...
LABEL_FIELDS = frozenset(
    {"gt", "seg", "lowres", "label", "labels", "mask", "masks", "depth", "cls", "coarse"}
)


def _field_parts(field: str) -> tuple[str, str]:
    """(first part, last extension) of a field name, lower case: ``gt.png`` → (``gt``, ``png``)."""
    lower = field.lower()
    return lower.split(".", 1)[0], lower.rsplit(".", 1)[-1]


def is_image_file(name: str) -> bool:
    """Whether a file name has one of the image extensions read as input."""
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def is_label_field(field: str) -> bool:
    """A label-map field (``gt.png``, ``seg.png``, ``lowres.png``, ``mask.png``, ...): read raw, never converted."""
    head, ext = _field_parts(field)
    return "." in field and head in LABEL_FIELDS and ext in IMAGE_EXTENSIONS


def is_image_field(field: str) -> bool:
    """A field holding a picture (``jpg``, ``png``, ``input.png``, ``overlay.jpg``, ...), decoded to RGB."""
    return _field_parts(field)[1] in IMAGE_EXTENSIONS and not is_label_field(field)


def is_companion_file(name: str) -> bool:
    """A file that belongs to the image beside it, never an input of its own: ``<stem>.<label field>``
    (``a.gt.png``, ``a.coarse.png``) or ``<stem>.coarse.npy``."""
    parts = name.split(".")
    if len(parts) < 3 or not parts[0]:
        return False
    field = ".".join(parts[-2:])
    return is_label_field(field) or field.lower() in COARSE_FIELDS


def image_field_name(fields: Iterable[str]) -> str | None:
    """The field of a sample's input image: one named just ``jpg``, ``png``, ... first; else a compound one
    (``input.png``) that is neither a label map nor an overlay; None when the sample has none."""
    names = [f for f in fields if not f.startswith("__")]
    plain = next((f for f in names if f.lower() in IMAGE_EXTENSIONS), None)
    if plain is not None:
        return plain
    return next((f for f in names if is_image_field(f) and _field_parts(f)[0] != "overlay"), None)


__all__ = [
    "COARSE_FIELDS",
    "EMB_FIELD",
    "GT_FIELD",
    "IGNORE_CLASS",
    "IMAGE_EXTENSIONS",
    "JSON_FIELD",
    "LABEL_FIELDS",
    "LOWRES_FIELD",
    "OVERLAY_FIELD",
    "SEG_FIELD",
    "image_field_name",
    "is_companion_file",
    "is_image_field",
    "is_image_file",
    "is_label_field",
]
