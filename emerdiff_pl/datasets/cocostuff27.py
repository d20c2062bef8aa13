"""COCO-Stuff-27: COCO-Stuff 164k label maps (fine ids 0–181) reduced to the 27 coarse classes of STEGO / PiCIE.

The table is written from COCO-Stuff's own definitions: each fine class (``stuffthingmaps`` value = COCO category
id − 1) belongs to one supercategory, and the 27 coarse classes are the supercategories in the order of the
COCO-Stuff label hierarchy: 12 thing supercategories (ids 0–11), then 15 stuff supercategories (ids 12–26).
This reproduces the ``fine_to_coarse`` table used by PiCIE and STEGO. Value 255 (unlabelled) and anything
outside 0–181 become 255 (ignore).

``emerdiff-pl convert cocostuff27 --images val2017/ --annotations stuffthingmaps_trainval2017/val2017/ --out DIR``
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from emerdiff_pl.codec import encode_label_png, read_label_png
from emerdiff_pl.datasets._common import write_dataset
from emerdiff_pl.fields import GT_FIELD

IGNORE = 255

# Coarse classes in COCO-Stuff hierarchy order (things: indoor then outdoor; stuff: indoor then outdoor).
THING_SUPERCATEGORIES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen",
    "accessory", "animal", "outdoor", "person", "sports", "vehicle",
)  # fmt: skip
STUFF_SUPERCATEGORIES = (
    "ceiling", "floor", "food", "furniture", "rawmaterial", "textile", "wall", "window",
    "building", "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip
COARSE_CLASSES: tuple[str, ...] = tuple(f"{s}-things" for s in THING_SUPERCATEGORIES) + tuple(
    f"{s}-stuff" for s in STUFF_SUPERCATEGORIES
)
NUM_CLASSES = len(COARSE_CLASSES)  # 27
FIRST_STUFF_CLASS = len(THING_SUPERCATEGORIES)  # 12

# The 91 COCO thing categories (ids 1–91, including the 11 never annotated: street sign, hat, shoe, eye glasses,
# plate, mirror, window, desk, door, blender, hair brush), fine id = COCO id − 1, with their supercategory.
_THINGS = [
    ("person", "person"), ("bicycle", "vehicle"), ("car", "vehicle"), ("motorcycle", "vehicle"),
    ("airplane", "vehicle"), ("bus", "vehicle"), ("train", "vehicle"), ("truck", "vehicle"), ("boat", "vehicle"),
    ("traffic light", "outdoor"), ("fire hydrant", "outdoor"), ("street sign", "outdoor"),
    ("stop sign", "outdoor"), ("parking meter", "outdoor"), ("bench", "outdoor"),
    ("bird", "animal"), ("cat", "animal"), ("dog", "animal"), ("horse", "animal"), ("sheep", "animal"),
    ("cow", "animal"), ("elephant", "animal"), ("bear", "animal"), ("zebra", "animal"), ("giraffe", "animal"),
    ("hat", "accessory"), ("backpack", "accessory"), ("umbrella", "accessory"), ("shoe", "accessory"),
    ("eye glasses", "accessory"), ("handbag", "accessory"), ("tie", "accessory"), ("suitcase", "accessory"),
    ("frisbee", "sports"), ("skis", "sports"), ("snowboard", "sports"), ("sports ball", "sports"),
    ("kite", "sports"), ("baseball bat", "sports"), ("baseball glove", "sports"), ("skateboard", "sports"),
    ("surfboard", "sports"), ("tennis racket", "sports"),
    ("bottle", "kitchen"), ("plate", "kitchen"), ("wine glass", "kitchen"), ("cup", "kitchen"),
    ("fork", "kitchen"), ("knife", "kitchen"), ("spoon", "kitchen"), ("bowl", "kitchen"),
    ("banana", "food"), ("apple", "food"), ("sandwich", "food"), ("orange", "food"), ("broccoli", "food"),
    ("carrot", "food"), ("hot dog", "food"), ("pizza", "food"), ("donut", "food"), ("cake", "food"),
    ("chair", "furniture"), ("couch", "furniture"), ("potted plant", "furniture"), ("bed", "furniture"),
    ("mirror", "furniture"), ("dining table", "furniture"), ("window", "furniture"), ("desk", "furniture"),
    ("toilet", "furniture"), ("door", "furniture"),
    ("tv", "electronic"), ("laptop", "electronic"), ("mouse", "electronic"), ("remote", "electronic"),
    ("keyboard", "electronic"), ("cell phone", "electronic"),
    ("microwave", "appliance"), ("oven", "appliance"), ("toaster", "appliance"), ("sink", "appliance"),
    ("refrigerator", "appliance"), ("blender", "appliance"),
    ("book", "indoor"), ("clock", "indoor"), ("vase", "indoor"), ("scissors", "indoor"),
    ("teddy bear", "indoor"), ("hair drier", "indoor"), ("toothbrush", "indoor"), ("hair brush", "indoor"),
]  # fmt: skip

# The 91 stuff categories (COCO ids 92–182; 183 "other" is not in the label maps), fine id = COCO id − 1.
_STUFF = [
    ("banner", "textile"), ("blanket", "textile"), ("branch", "plant"), ("bridge", "building"),
    ("building-other", "building"), ("bush", "plant"), ("cabinet", "furniture"), ("cage", "structural"),
    ("cardboard", "rawmaterial"), ("carpet", "floor"), ("ceiling-other", "ceiling"), ("ceiling-tile", "ceiling"),
    ("cloth", "textile"), ("clothes", "textile"), ("clouds", "sky"), ("counter", "furniture"),
    ("cupboard", "furniture"), ("curtain", "textile"), ("desk-stuff", "furniture"), ("dirt", "ground"),
    ("door-stuff", "furniture"), ("fence", "structural"), ("floor-marble", "floor"), ("floor-other", "floor"),
    ("floor-stone", "floor"), ("floor-tile", "floor"), ("floor-wood", "floor"), ("flower", "plant"),
    ("fog", "water"), ("food-other", "food"), ("fruit", "food"), ("furniture-other", "furniture"),
    ("grass", "plant"), ("gravel", "ground"), ("ground-other", "ground"), ("hill", "solid"),
    ("house", "building"), ("leaves", "plant"), ("light", "furniture"), ("mat", "textile"),
    ("metal", "rawmaterial"), ("mirror-stuff", "furniture"), ("moss", "plant"), ("mountain", "solid"),
    ("mud", "ground"), ("napkin", "textile"), ("net", "structural"), ("paper", "rawmaterial"),
    ("pavement", "ground"), ("pillow", "textile"), ("plant-other", "plant"), ("plastic", "rawmaterial"),
    ("platform", "ground"), ("playingfield", "ground"), ("railing", "structural"), ("railroad", "ground"),
    ("river", "water"), ("road", "ground"), ("rock", "solid"), ("roof", "building"), ("rug", "textile"),
    ("salad", "food"), ("sand", "ground"), ("sea", "water"), ("shelf", "furniture"), ("sky-other", "sky"),
    ("skyscraper", "building"), ("snow", "ground"), ("solid-other", "solid"), ("stairs", "furniture"),
    ("stone", "solid"), ("straw", "plant"), ("structural-other", "structural"), ("table", "furniture"),
    ("tent", "building"), ("textile-other", "textile"), ("towel", "textile"), ("tree", "plant"),
    ("vegetable", "food"), ("wall-brick", "wall"), ("wall-concrete", "wall"), ("wall-other", "wall"),
    ("wall-panel", "wall"), ("wall-stone", "wall"), ("wall-tile", "wall"), ("wall-wood", "wall"),
    ("water-other", "water"), ("waterdrops", "water"), ("window-blind", "window"), ("window-other", "window"),
    ("wood", "solid"),
]  # fmt: skip

FINE_CLASSES: tuple[str, ...] = tuple(name for name, _ in _THINGS + _STUFF)  # 182 names, index = fine id


def _build_fine_to_coarse() -> np.ndarray:
    table = np.full(256, IGNORE, dtype=np.uint8)
    for fine, (_, supercategory) in enumerate(_THINGS):
        table[fine] = THING_SUPERCATEGORIES.index(supercategory)
    for offset, (_, supercategory) in enumerate(_STUFF):
        table[len(_THINGS) + offset] = FIRST_STUFF_CLASS + STUFF_SUPERCATEGORIES.index(supercategory)
    return table


FINE_TO_COARSE: np.ndarray = _build_fine_to_coarse()  # (256,) uint8 lookup table, 255 = ignore


def fine_to_coarse(fine: np.ndarray) -> np.ndarray:
    """Map a COCO-Stuff fine label map (0–181, 255 unlabelled) to the 27 coarse classes (255 = ignore)."""
    fine = np.asarray(fine)
    if fine.dtype != np.uint8:
        fine = np.where((fine >= 0) & (fine <= 255), fine, IGNORE).astype(np.uint8)
    return FINE_TO_COARSE[fine]


def _read_id_list(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [Path(line.strip()).stem for line in f if line.strip()]


def _exif_orientation(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as im:
        return int(im.getexif().get(0x0112, 1))


def _plain_jpeg(data: bytes) -> bytes:
    """Re-encode the stored pixels without EXIF, so no reader rotates the image away from its label map."""
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue()


def find_pairs(
    images: str, annotations: str, curated: str | None = None
) -> tuple[list[tuple[str, str, str]], list]:
    """(key, image path, label path) for every image with a label map; also the image keys without one."""
    image_dir, label_dir = Path(images), Path(annotations)
    for what, folder in (("--images", image_dir), ("--annotations", label_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} {str(folder)!r} is not a directory")
    image_files = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")}
    label_files = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() == ".png"}
    if not image_files:
        hint = " (point --images at the split folder, e.g. val2017/)" if any(image_dir.glob("*/")) else ""
        raise FileNotFoundError(f"no .jpg images in {images!r}{hint}")
    if not label_files:
        hint = " (point --annotations at the split folder, e.g. stuffthingmaps_trainval2017/val2017/)"
        raise FileNotFoundError(f"no .png label maps in {annotations!r}{hint}")
    keys = sorted(image_files)
    if curated is not None:
        wanted = _read_id_list(curated)
        missing = [k for k in wanted if k not in image_files]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of the curated list {curated!r} are not in {images!r}, e.g. {missing[:5]}"
            )
        keys = list(dict.fromkeys(wanted))
    pairs = [(k, str(image_files[k]), str(label_files[k])) for k in keys if k in label_files]
    unlabelled = [k for k in keys if k not in label_files]
    if not pairs:
        raise FileNotFoundError(
            f"no image of {images!r} has a label map <stem>.png in {annotations!r} "
            f"(e.g. image {keys[0]!r}, label {next(iter(label_files))!r})"
        )
    return pairs, unlabelled


def make_sample(key: str, image_path: str, label_path: str, stats: dict) -> dict:
    with open(image_path, "rb") as f:
        jpeg = f.read()
    with Image.open(io.BytesIO(jpeg)) as im:
        width, height = im.size
    if _exif_orientation(jpeg) != 1:
        jpeg = _plain_jpeg(jpeg)
        stats["exif_reencoded"] = stats.get("exif_reencoded", 0) + 1
    with open(label_path, "rb") as f:
        fine = read_label_png(f.read())
    if fine.ndim != 2:
        raise ValueError(f"label map {label_path!r} is not single-channel (shape {fine.shape})")
    if fine.shape != (height, width):
        raise ValueError(
            f"label map {label_path!r} is {fine.shape[1]}×{fine.shape[0]} but image {image_path!r} is "
            f"{width}×{height}"
        )
    return {"__key__": key, "jpg": jpeg, GT_FIELD: encode_label_png(fine_to_coarse(fine))}


def convert(
    images: str,
    annotations: str,
    out: str,
    curated: str | None = None,
    shard_size: int = 1000,
    prefix: str | None = None,
) -> tuple[list[str], int, dict, list[str]]:
    """Write COCO-Stuff-27 ground truth as shards ``out/<prefix>-NNNNNN.tar`` plus ``info.json``; returns (shard
    paths, samples, counts of what was re-encoded, the image ids skipped for want of a label map)."""
    pairs, unlabelled = find_pairs(images, annotations, curated)
    prefix = prefix or ("cocostuff27-curated" if curated else "cocostuff27")
    info = {
        "dataset": "cocostuff27",
        "num_classes": NUM_CLASSES,
        "ignore_index": IGNORE,
        "class_names": list(COARSE_CLASSES),
        "fine_to_coarse": {str(i): int(FINE_TO_COARSE[i]) for i in range(len(FINE_CLASSES))},
        "images": os.path.abspath(images),
        "annotations": os.path.abspath(annotations),
        "curated": os.path.abspath(curated) if curated else None,
        "skipped_without_label": len(unlabelled),
    }
    shards, stats = write_dataset(pairs, make_sample, out, prefix, shard_size, info, desc="cocostuff27")
    return shards, len(pairs), stats, unlabelled
