"""Cityscapes-27: Cityscapes fine annotations with labelIds 7–33 mapped to 0–26 (STEGO / PiCIE), others ignored.

The label table is Cityscapes' own (``cityscapesscripts/helpers/labels.py``): ids 0–6 are void classes
(unlabeled, ego vehicle, rectification border, out of roi, static, dynamic, ground) and become 255; ids 7–33
(road … bicycle, including the rarely used parking, rail track, guard rail, bridge, tunnel, polegroup, caravan
and trailer) become 0–26; -1 (license plate) and anything else become 255.

``emerdiff-pl convert cityscapes27 --root cityscapes/ --out DIR [--split val]`` reads
``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` and ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from emerdiff_pl.codec import decode_image, encode_jpeg, encode_label_png, read_label_png
from emerdiff_pl.datasets._common import write_dataset
from emerdiff_pl.fields import GT_FIELD

IGNORE = 255

# Cityscapes labelIds 0–33 in id order (labels.py).
LABEL_NAMES: tuple[str, ...] = (
    "unlabeled", "ego vehicle", "rectification border", "out of roi", "static", "dynamic", "ground",
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge", "tunnel",
    "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person", "rider",
    "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)  # fmt: skip
FIRST_LABEL_ID = 7  # first non-void labelId
LAST_LABEL_ID = 33
CLASS_NAMES: tuple[str, ...] = LABEL_NAMES[FIRST_LABEL_ID : LAST_LABEL_ID + 1]
NUM_CLASSES = len(CLASS_NAMES)  # 27


def _build_table() -> np.ndarray:
    table = np.full(256, IGNORE, dtype=np.uint8)
    table[FIRST_LABEL_ID : LAST_LABEL_ID + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)
    return table


LABEL_ID_TO_CLASS: np.ndarray = _build_table()  # (256,) uint8 lookup table, 255 = ignore


def label_ids_to_classes(label_ids: np.ndarray) -> np.ndarray:
    """Map a Cityscapes ``*_gtFine_labelIds.png`` array to the 27 classes (255 = ignore)."""
    label_ids = np.asarray(label_ids)
    if label_ids.dtype != np.uint8:
        label_ids = np.where((label_ids >= 0) & (label_ids <= 255), label_ids, IGNORE).astype(np.uint8)
    return LABEL_ID_TO_CLASS[label_ids]


IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def find_pairs(root: str, split: str) -> list[tuple[str, str, str]]:
    """(key, image path, label path) for every image of the split, sorted by city then name."""
    image_root = Path(root) / "leftImg8bit" / split
    label_root = Path(root) / "gtFine" / split
    for folder in (image_root, label_root):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{str(folder)!r} does not exist: --root must hold leftImg8bit/{split}/<city>/ and "
                f"gtFine/{split}/<city>/ (the layout of leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip)"
            )
    pairs, missing = [], []
    for image in sorted(image_root.glob(f"*/*{IMAGE_SUFFIX}")):
        stem = image.name[: -len(IMAGE_SUFFIX)]
        label = label_root / image.parent.name / f"{stem}{LABEL_SUFFIX}"
        if label.is_file():
            pairs.append((stem, str(image), str(label)))
        else:
            missing.append(str(label))
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) have no label map, e.g. {missing[:3]}")
    if not pairs:
        raise FileNotFoundError(f"no *{IMAGE_SUFFIX} images under {str(image_root)!r}/<city>/")
    return pairs


def make_sample(key: str, image_path: str, label_path: str, stats: dict, quality: int = 95) -> dict:
    with open(image_path, "rb") as f:
        rgb = decode_image(f.read())  # the one image decoder of the shard layer
    with open(label_path, "rb") as f:
        label_ids = read_label_png(f.read())
    if label_ids.shape != rgb.shape[:2]:
        raise ValueError(
            f"label map {label_path!r} is {label_ids.shape[1]}×{label_ids.shape[0]} but image {image_path!r} "
            f"is {rgb.shape[1]}×{rgb.shape[0]}"
        )
    return {
        "__key__": key,
        "jpg": encode_jpeg(rgb, quality=quality),
        GT_FIELD: encode_label_png(label_ids_to_classes(label_ids)),
    }


def convert(
    root: str,
    out: str,
    split: str = "val",
    shard_size: int = 500,
    jpeg_quality: int = 95,
    prefix: str | None = None,
) -> tuple[list[str], int]:
    """Write Cityscapes-27 ground truth of ``split`` under ``root`` as shards ``out/<prefix>-NNNNNN.tar`` plus
    ``info.json``; returns (shard paths, samples)."""
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    pairs = find_pairs(root, split)
    info = {
        "dataset": "cityscapes27",
        "split": split,
        "num_classes": NUM_CLASSES,
        "ignore_index": IGNORE,
        "class_names": list(CLASS_NAMES),
        "label_id_to_class": {str(i): int(LABEL_ID_TO_CLASS[i]) for i in range(len(LABEL_NAMES))},
        "root": os.path.abspath(root),
        "jpeg_quality": jpeg_quality,
    }

    def sample(key: str, image: str, label: str, stats: dict) -> dict:
        return make_sample(key, image, label, stats, quality=jpeg_quality)

    prefix = prefix or f"cityscapes27-{split}"
    shards, _ = write_dataset(pairs, sample, out, prefix, shard_size, info, desc="cityscapes27")
    return shards, len(pairs)
