import json
import os

import numpy as np
import pytest
from PIL import Image

from emerdiff_pl.commands.convert import main as convert
from emerdiff_pl.datasets import CLASS_NAMES
from emerdiff_pl.datasets.cityscapes27 import LABEL_ID_TO_CLASS, label_ids_to_classes
from emerdiff_pl.datasets.cocostuff27 import COARSE_CLASSES, FINE_CLASSES, FINE_TO_COARSE, fine_to_coarse
from emerdiff_pl.shardio import iter_samples

# PiCIE / STEGO fine_to_coarse for fine ids 0..181, the table every COCO-Stuff-27 number in the literature uses.
REFERENCE_FINE_TO_COARSE = (
    [9] + [11] * 8 + [8] * 6 + [7] * 10 + [6] * 8 + [10] * 10 + [5] * 8 + [2] * 10 + [3] * 10 + [0] * 6 + [1] * 6
    + [4] * 8
    + [17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13,
       22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21,
       25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18,
       18, 18, 18, 18, 18, 26, 26, 19, 19, 24]
)  # fmt: skip


def test_cocostuff_table_matches_the_picie_stego_mapping():
    assert len(FINE_CLASSES) == 182 and len(COARSE_CLASSES) == 27
    assert FINE_TO_COARSE[:182].tolist() == REFERENCE_FINE_TO_COARSE
    assert (FINE_TO_COARSE[182:] == 255).all()
    assert FINE_CLASSES[0] == "person" and FINE_CLASSES[91] == "banner" and FINE_CLASSES[181] == "wood"
    assert COARSE_CLASSES[9] == "person-things" and COARSE_CLASSES[23] == "sky-stuff"
    assert fine_to_coarse(np.array([[0, 156, 255, 200]], np.int64)).tolist() == [[9, 23, 255, 255]]


def test_cityscapes_table_maps_label_ids_7_to_33_onto_0_to_26():
    assert LABEL_ID_TO_CLASS[7] == 0 and LABEL_ID_TO_CLASS[33] == 26
    assert (LABEL_ID_TO_CLASS[:7] == 255).all() and (LABEL_ID_TO_CLASS[34:] == 255).all()
    assert CLASS_NAMES["cityscapes27"][0] == "road" and CLASS_NAMES["cityscapes27"][26] == "bicycle"
    assert label_ids_to_classes(np.array([[-1, 6, 7, 26]])).tolist() == [[255, 255, 0, 19]]


def _jpeg(path, h, w, seed, orientation=None):
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    image.save(path, format="JPEG", **kwargs)


def _coco_fixture(root):
    images = root / "images" / "val2017"
    labels = root / "annotations" / "stuffthingmaps_trainval2017" / "val2017"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    fine = {}
    for i, (image_id, (h, w)) in enumerate(
        {"000000000139": (12, 16), "000000000285": (10, 8), "000000000632": (9, 14)}.items()
    ):
        _jpeg(images / f"{image_id}.jpg", h, w, i, orientation=6 if image_id.endswith("632") else None)
        fine[image_id] = (
            np.random.default_rng(i).choice([0, 1, 91, 105, 156, 181, 255], size=(h, w)).astype(np.uint8)
        )
        Image.fromarray(fine[image_id]).save(labels / f"{image_id}.png")
    _jpeg(images / "000000000724.jpg", 8, 8, 9)  # no label map
    return images, labels, fine


def test_cocostuff27_converter_writes_coarse_ground_truth(tmp_path, capsys):
    images, labels, fine = _coco_fixture(tmp_path)
    out = tmp_path / "out"
    args = ["cocostuff27", "--images", str(images), "--annotations", str(labels), "--out", str(out)]
    assert convert([*args, "--shard-size", "2"]) == 0
    assert "1 image(s) without a label map" in capsys.readouterr().err
    samples = list(iter_samples(str(out / "cocostuff27-{000000..000001}.tar")))
    assert [s["__key__"] for s in samples] == sorted(fine)
    for s in samples:
        expected = FINE_TO_COARSE[fine[s["__key__"]]]
        assert s["gt.png"].dtype == np.uint8 and np.array_equal(s["gt.png"], expected)
        assert s["jpg"].shape[:2] == expected.shape  # EXIF-rotated source re-encoded upright with its labels
    assert (expected == 255).any() and (expected == 24).any()
    raw = (images / "000000000139.jpg").read_bytes()
    stored = next(iter_samples(str(out / "cocostuff27-000000.tar"), decode=False))
    assert stored["jpg"] == raw  # copied byte for byte
    info = json.loads((out / "info.json").read_text())
    assert info["num_classes"] == 27 and info["samples"] == 3 and info["exif_reencoded"] == 1
    assert info["shards"] == ["cocostuff27-000000.tar", "cocostuff27-000001.tar"]


def test_cocostuff27_curated_list_selects_images(tmp_path):
    images, labels, _ = _coco_fixture(tmp_path)
    curated = tmp_path / "Coco164kFull_Stuff_Coarse_7.txt"
    curated.write_text("000000000632\n000000000139\n")
    out = tmp_path / "out"
    convert(["cocostuff27", "--images", str(images), "--annotations", str(labels), "--out", str(out),
             "--curated", str(curated)])  # fmt: skip
    assert [s["__key__"] for s in iter_samples(str(out))] == ["000000000632", "000000000139"]
    assert sorted(os.listdir(out)) == ["cocostuff27-curated-000000.tar", "info.json"]
    curated.write_text("000000999999\n")
    with pytest.raises(FileNotFoundError, match="000000999999"):
        convert(["cocostuff27", "--images", str(images), "--annotations", str(labels), "--out", str(out),
                 "--curated", str(curated)])  # fmt: skip


def _cityscapes_fixture(root):
    label_maps = {}
    for city, frames in (("frankfurt", ["000000_000294", "000001_007973"]), ("lindau", ["000000_000019"])):
        for frame in frames:
            name = f"{city}_{frame}"
            (root / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(len(label_maps))
            Image.fromarray(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)).save(
                root / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png"
            )
            ids = rng.integers(0, 34, (8, 16)).astype(np.uint8)
            Image.fromarray(ids).save(root / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png")
            label_maps[name] = ids
    return label_maps


def test_cityscapes27_converter_writes_ground_truth(tmp_path):
    label_maps = _cityscapes_fixture(tmp_path / "cityscapes")
    out = tmp_path / "out"
    assert convert(["cityscapes27", "--root", str(tmp_path / "cityscapes"), "--out", str(out)]) == 0
    samples = list(iter_samples(str(out / "cityscapes27-val-000000.tar")))
    assert [s["__key__"] for s in samples] == sorted(label_maps)
    for s in samples:
        ids = label_maps[s["__key__"]]
        expected = np.where((ids >= 7) & (ids <= 33), ids.astype(np.int64) - 7, 255)
        assert np.array_equal(s["gt.png"], expected)
        assert s["jpg"].shape == (8, 16, 3)
    assert json.loads((out / "info.json").read_text())["class_names"][0] == "road"


def test_cityscapes27_converter_names_the_missing_folder(tmp_path):
    (tmp_path / "cs" / "leftImg8bit" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="gtFine"):
        convert(["cityscapes27", "--root", str(tmp_path / "cs"), "--out", str(tmp_path / "o")])


def test_convert_dispatch_lists_datasets(capsys):
    assert convert(["--help"]) == 0
    assert "cocostuff27" in capsys.readouterr().out
    assert convert(["imagenet"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
