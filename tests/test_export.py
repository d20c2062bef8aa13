"""emerdiff-pl export: the folder layout (images/ + labels/) and the hf dataset read back, and their refusals."""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from conftest import ColourQuantizer
from PIL import Image

from emerdiff_pl.cli import main as cli_main
from emerdiff_pl.commands.export import main as export_main
from emerdiff_pl.commands.relabel import main as relabel_main
from emerdiff_pl.data import EmerDiffDataModule
from emerdiff_pl.datasets import toyworld
from emerdiff_pl.relabel import centroids_digest
from emerdiff_pl.shardio import TarWriter, iter_samples
from emerdiff_pl.writer import PseudoLabelWriter


def predict(output_dir: Path, urls: list[str], include_image: bool) -> None:
    writer = PseudoLabelWriter(str(output_dir), include_image=include_image)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[writer]
    )
    data = EmerDiffDataModule(urls=urls, batch_size=2, num_workers=0)
    trainer.predict(ColourQuantizer(), datamodule=data, return_predictions=False)


@pytest.fixture
def shards(tmp_path: Path) -> dict:
    """Toy scenes, their raw pseudo-labels (no images), and those relabelled into 3 global classes; with the
    relabelled labels and the scene images by key, what every export must reproduce."""
    scenes = toyworld.write_shards(tmp_path / "scenes", 5, seed=4, size=32, shard_size=5, progress=False)
    predict(tmp_path / "pred", scenes, include_image=False)
    rel = str(tmp_path / "rel")
    relabel_main(["--input", str(tmp_path / "pred"), "--output", rel, "--num-classes", "3",
                  "--device", "cpu"])  # fmt: skip
    labels = {s["__key__"]: s["seg.png"] for s in iter_samples(rel, fields={"seg.png"})}
    images = {s["__key__"]: s["png"] for s in iter_samples(scenes, fields={"png"})}
    return {"scenes": scenes, "pred": str(tmp_path / "pred"), "rel": rel, "tmp": tmp_path, "labels": labels,
            "images": images}  # fmt: skip


def test_folder_export_reads_back_as_the_relabelled_labels_and_the_images(shards: dict):
    out = shards["tmp"] / "export"
    code = cli_main(["export", "--input", shards["rel"], "--images", shards["scenes"][0], "--format", "folder",
                     "--out", str(out), "--class-names", "a,b,c"])  # fmt: skip
    assert code == 0
    relabelled, scenes = shards["labels"], shards["images"]
    images = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.png"))
    labels = sorted(p.relative_to(out / "labels").as_posix() for p in (out / "labels").rglob("*.png"))
    assert images == labels == sorted(f"{k}.png" for k in relabelled)
    for key, expected in relabelled.items():
        label = np.asarray(Image.open(out / "labels" / f"{key}.png"))
        np.testing.assert_array_equal(label, expected)
        np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / f"{key}.png")), scenes[key])
    assert (out / "classes.txt").read_text().splitlines() == ["a", "b", "c"]
    record = json.loads((out / "export.json").read_text())
    assert record["samples"] == len(relabelled) and record["num_classes"] == 3
    assert sum(record["pixels_per_class"]) == sum(v.size for v in relabelled.values())


def test_export_of_shards_that_were_not_relabelled_is_a_clear_error(shards: dict, capsys):
    out = shards["tmp"] / "export"
    code = export_main(["--input", shards["pred"], "--images", shards["scenes"][0], "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "is not relabelled" in err and "emerdiff-pl relabel" in err
    assert not (out / "export.json").exists() and not (out / "labels").exists()


def test_export_without_images_names_the_missing_option(shards: dict, capsys):
    code = export_main(["--input", shards["rel"], "--out", str(shards["tmp"] / "export")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no image member" in err and "images" in err


def test_export_refuses_a_folder_that_is_not_empty(shards: dict, capsys):
    out = shards["tmp"] / "export"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert export_main(["--input", shards["rel"], "--images", shards["scenes"][0], "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_relabel_keeps_included_images_so_export_needs_no_image_shards(shards: dict):
    tmp = shards["tmp"]
    predict(tmp / "pred-img", shards["scenes"], include_image=True)
    relabel_main(["--input", str(tmp / "pred-img"), "--output", str(tmp / "rel-img"), "--num-classes", "3",
                  "--device", "cpu"])  # fmt: skip
    out = tmp / "export"
    assert export_main(["--input", str(tmp / "rel-img"), "--out", str(out)]) == 0
    for key, image in shards["images"].items():
        np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / f"{key}.png")), image)


def test_folder_export_writes_id2label_and_checks_class_names_before_writing(shards: dict, capsys):
    out = shards["tmp"] / "export"
    assert export_main(["--input", shards["rel"], "--images", shards["scenes"][0], "--out", str(out),
                        "--class-names", "a,b"]) == 2  # fmt: skip
    assert "gives 2 names but the shards have 3 classes" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    assert export_main(["--input", shards["rel"], "--images", shards["scenes"][0], "--out", str(out)]) == 0
    assert json.loads((out / "id2label.json").read_text()) == {"0": "class_0", "1": "class_1", "2": "class_2"}


def test_hf_export_loads_back_as_the_relabelled_labels_and_the_images(shards: dict):
    datasets = pytest.importorskip("datasets")
    out = shards["tmp"] / "hf"
    code = cli_main(["export", "--input", shards["rel"], "--images", shards["scenes"][0], "--format", "hf",
                     "--out", str(out), "--class-names", "a,b,c"])  # fmt: skip
    assert code == 0
    relabelled, scenes = shards["labels"], shards["images"]
    loaded = datasets.load_from_disk(str(out))
    assert sorted(loaded.column_names) == ["image", "key", "label"]
    assert sorted(loaded["key"]) == sorted(relabelled)
    for row in loaded:
        np.testing.assert_array_equal(np.asarray(row["label"]), relabelled[row["key"]])
        np.testing.assert_array_equal(np.asarray(row["image"].convert("RGB")), scenes[row["key"]])
    assert json.loads((out / "id2label.json").read_text()) == {"0": "a", "1": "b", "2": "c"}
    record = json.loads((out / "export.json").read_text())
    assert record["format"] == "hf" and record["samples"] == len(relabelled)
    # the arrow cache datasets writes while generating is removed, not left beside the export
    assert sorted(p.name for p in shards["tmp"].iterdir()) == ["hf", "pred", "rel", "scenes"]


def test_hf_export_of_shards_that_were_not_relabelled_is_the_same_clear_error(shards: dict, capsys):
    pytest.importorskip("datasets")
    out = shards["tmp"] / "hf"
    code = export_main(["--input", shards["pred"], "--images", shards["scenes"][0], "--format", "hf",
                        "--out", str(out)])  # fmt: skip
    assert code == 2
    assert "is not relabelled" in capsys.readouterr().err
    assert sorted(p.name for p in shards["tmp"].iterdir()) == ["pred", "rel", "scenes"]


def test_hf_export_without_the_datasets_package_says_what_to_install(shards: dict, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    out = shards["tmp"] / "hf"
    code = export_main(["--input", shards["rel"], "--images", shards["scenes"][0], "--format", "hf",
                        "--out", str(out)])  # fmt: skip
    assert code == 2
    assert "pip install 'emerdiff-pl[hf]'" in capsys.readouterr().err
    assert not out.exists()


def _relabelled_shard(path: Path, labels: dict[str, np.ndarray], num_classes: int, run: str = "run-a") -> str:
    """A shard as ``emerdiff-pl relabel`` writes it (image, global ids, the relabel record), written by hand."""
    meta = {"relabel": {"num_classes": num_classes, "centroids_sha256": run}}
    with TarWriter(path) as sink:
        for key, label in labels.items():
            image = np.full((*label.shape, 3), 40 * (int(label.max()) % 6), np.uint8)
            sink.write({"__key__": key, "png": image, "seg.png": label.astype(np.uint8), "json": meta})
    return str(path)


def test_export_refuses_label_ids_outside_the_relabelled_classes(tmp_path: Path, capsys):
    labels = {"a": np.zeros((4, 4)), "b": np.array([[0, 1], [2, 3]])}  # id 3 in a 3-class run
    shard = _relabelled_shard(tmp_path / "rel.tar", labels, num_classes=3)
    assert export_main(["--input", shard, "--out", str(tmp_path / "export")]) == 2
    assert "sample 'b': id 3 ≥ the 3 relabelled classes" in capsys.readouterr().err
    assert not (tmp_path / "export" / "export.json").exists()


def test_relabel_records_its_centroids_and_export_refuses_shards_of_two_runs(shards: dict, capsys):
    tmp = shards["tmp"]
    centroids = np.load(tmp / "rel" / "centroids.npy")
    meta = next(iter_samples(shards["rel"], fields={"json"}))["json"]
    assert meta["relabel"]["centroids_sha256"] == centroids_digest(centroids)
    np.save(tmp / "other.npy", centroids + 1.0)  # another run's classes, as many of them
    relabel_main(["--input", shards["pred"], "--output", str(tmp / "rel-other"), "--centroids",
                  str(tmp / "other.npy"), "--device", "cpu"])  # fmt: skip
    mixed = f"{shards['rel']}::{tmp / 'rel-other'}"
    assert export_main(["--input", mixed, "--images", shards["scenes"][0], "--out", str(tmp / "export")]) == 2
    assert "mixes several relabel runs" in capsys.readouterr().err
    relabel_main(["--input", shards["pred"], "--output", str(tmp / "rel-again"), "--centroids",
                  str(tmp / "rel" / "centroids.npy"), "--device", "cpu"])  # fmt: skip
    again = next(iter_samples(str(tmp / "rel-again"), fields={"json"}))["json"]
    assert again["relabel"]["centroids_sha256"] == meta["relabel"]["centroids_sha256"]  # the same classes


def test_export_class_names_take_a_dataset_name_and_a_wrong_count_names_the_flag(tmp_path: Path, capsys):
    shard = _relabelled_shard(tmp_path / "rel.tar", {"a": np.arange(7).reshape(1, 7)}, num_classes=7)
    out = tmp_path / "export"
    assert cli_main(["export", "--input", shard, "--out", str(out), "--class-names", "toyworld"]) == 0
    assert (out / "classes.txt").read_text().splitlines() == list(toyworld.CLASS_NAMES)
    code = cli_main(
        ["export", "--input", shard, "--out", str(tmp_path / "e2"), "--class-names", "cocostuff27"]
    )
    assert code == 2
    assert "--class-names gives 27 names but the shards have 7 classes" in capsys.readouterr().err
