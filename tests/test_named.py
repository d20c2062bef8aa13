"""Named classes end to end (issue 27, phase 2): `model.classifier` through segment, predict, the DataModule's coarse
maps, the writer's names, fit-probe, and the commands that read named output (evaluate, export, show, relabel).
Each test names the bug it guards; all run on the CPU on tiny-random weights in seconds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FAST_SEGMENTER,
    encode,
    npy_bytes,
    png_bytes,
    random_rgb,
    read_output,
    smooth_images,
    write_tar,
)
from PIL import Image

from emerdiff_pl import method
from emerdiff_pl.classifiers.names import ID2LABEL_FILE, publish_id2label
from emerdiff_pl.classifiers.probe import FeatureSource, fit_probe
from emerdiff_pl.config import EmerDiffConfig
from emerdiff_pl.fields import IGNORE_CLASS, image_field_name
from emerdiff_pl.paths import list_folder
from emerdiff_pl.segmenter import EmerDiffSegmenter

REPO = Path(__file__).resolve().parents[1]
NAMES = ["sky", "water, sea", "grass"]  # the second line has a synonym: outputs name it "water"


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory) -> Path:
    """A probe fit on tiny-random features (FAST_SEGMENTER's model and feature layer; configs/tiny.yaml's too)."""
    seg = EmerDiffSegmenter(**{**FAST_SEGMENTER, "method": "lowres_bilinear"})
    images = smooth_images(3, seed=4)
    maps = seg.score_maps(images)
    labels = (images[:, 0] * 3).long().clamp_max(2).to(torch.uint8)  # three bands of red: three classes
    grid = tuple(maps.lowres.shape[-2:])
    source = FeatureSource.of(seg.config, maps.features.shape[-1])
    probe, _ = fit_probe([(maps.features, grid, labels)], NAMES, source)
    path = tmp_path_factory.mktemp("probe") / "probe.safetensors"
    probe.save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------------


def test_classifier_settings_are_checked_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"model.class_names is required with model.classifier: clip"):
        EmerDiffConfig(classifier="clip")
    with pytest.raises(ValueError, match=r"model.probe is required with model.classifier: probe"):
        EmerDiffConfig(classifier="probe")
    with pytest.raises(FileNotFoundError, match=r"model.class_names 'nope.txt'"):
        EmerDiffConfig(classifier="field", class_names="nope.txt")
    with pytest.raises(ValueError, match=r"model.class_names .* names 'sky' twice"):
        EmerDiffConfig(classifier="field", class_names=["sky", "sky, heaven"])
    names = tmp_path / "classes.txt"
    names.write_text("# ours\nsky\nwater, sea\n")
    assert EmerDiffConfig(classifier="field", class_names=str(names)).named_classes() == ("sky", "water, sea")
    listed = EmerDiffConfig(classifier="field", class_names=["sky", "grass"])  # a YAML list
    assert listed.class_names == ("sky", "grass") and listed.named_classes() == ("sky", "grass")


# ----------------------------------------------------------------------------------------------------------------
# segment: the product path, and its two halves
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classifier", ["none", "probe", "clip", "field"])
def test_segment_is_label_maps_of_score_maps(classifier, tiny_probe, tiny_clip_folder):
    """The benchmark caches score_maps and runs label_maps: that must be segment() for every classifier."""
    settings = {
        "none": {},
        "probe": {"probe": str(tiny_probe)},
        "clip": {"class_names": NAMES, "clip_model": str(tiny_clip_folder), "clip_resolution": 32},
        "field": {"class_names": NAMES},
    }[classifier]
    seg = EmerDiffSegmenter(**FAST_SEGMENTER, refine="pamr", classifier=classifier, **settings)
    images = smooth_images(2, seed=1, size=48)
    coarse = [torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    coarse = coarse if classifier == "field" else None
    direct = seg.segment(images, seeds=[3, 4], coarse=coarse)
    halves = seg.label_maps(seg.score_maps(images, seeds=[3, 4]), (48, 48), coarse=coarse)
    assert torch.equal(direct.labels, halves.labels)
    if classifier != "none":
        assert direct.labels.max() < 3 and direct.class_names == tuple(NAMES)
        assert direct.mask_classes.shape == (2, FAST_SEGMENTER["num_masks"])


def test_the_probe_names_masks_by_their_embedding_and_reads_no_second_pass(tiny_probe, monkeypatch):
    """Each EmerDiff mask takes the probe's class of its mean query vector (its embedding), not the mean of the
    pixel scores; the probe reads the reference pass's queries (one reference pass per segment), and its coarse
    scores come back for the baseline."""
    seg = EmerDiffSegmenter(**FAST_SEGMENTER, classifier="probe", probe=str(tiny_probe))
    passes = []
    reference_pass = method.reference_pass
    monkeypatch.setattr(method, "reference_pass", lambda *a, **k: passes.append(1) or reference_pass(*a, **k))
    images = smooth_images(2, seed=2)
    maps = seg.score_maps(images, seeds=[0, 1])
    k = FAST_SEGMENTER["num_masks"]
    named = torch.arange(k) % 3  # mask i → class i mod 3, whatever its pixels score
    seen = []
    monkeypatch.setattr(
        seg.classifier,
        "mask_scores",
        lambda emb: seen.append(emb) or F.one_hot(named, 3).float().expand(len(emb), -1, -1),
    )
    result = seg.label_maps(maps, (64, 64))
    assert len(passes) == 1 and torch.equal(seen[0], maps.embeddings)
    assert torch.equal(result.mask_classes, named.expand(2, -1))
    assert torch.equal(result.labels, method.name_masks(maps.scores.argmax(1), result.mask_classes))
    grid = tuple(maps.lowres.shape[-2:])
    assert torch.equal(result.class_scores, seg.classifier.scores(maps.features, grid))


def test_lowres_bilinear_with_a_classifier_is_the_classifier_alone(tiny_probe):
    seg = EmerDiffSegmenter(
        **{**FAST_SEGMENTER, "method": "lowres_bilinear"}, classifier="probe", probe=str(tiny_probe)
    )
    images = smooth_images(1, seed=3)
    result = seg.segment(images)
    up = method.bilinear_class_scores(result.class_scores, (64, 64))
    assert torch.equal(result.labels, up.argmax(1)) and result.mask_classes is None


def test_a_threshold_sends_unsure_pixels_to_ignore(tiny_probe):
    seg = EmerDiffSegmenter(**FAST_SEGMENTER, classifier="probe", probe=str(tiny_probe))
    images = smooth_images(2, seed=5)
    plain = seg.segment(images)
    seg.config = dataclasses.replace(seg.config, classifier_threshold=0.999)
    strict = seg.segment(images)
    unsure = strict.labels == IGNORE_CLASS
    assert unsure.any() and torch.equal(strict.labels[~unsure], plain.labels[~unsure])


def test_a_field_mask_over_ignored_coarse_pixels_gets_ignore():
    """A coarse label map's 255 scores nothing: a mask that covers only such pixels has no evidence (not class 0),
    nor has such a pixel for the classifier alone."""
    from emerdiff_pl.classifiers.field import coarse_scores

    labels = np.full((4, 4), IGNORE_CLASS, np.uint8)
    labels[:, :2] = 2
    scores = coarse_scores(png_bytes(labels), "coarse.png", 3, "k")[None]  # (1, 3, 4, 4)
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[:, :, 5:] = 1  # mask 1: pixels whose bilinear scores come from ignored cells only
    named = method.classify_masks(scores, masks, 2)
    assert (named[0, :, :5] == 2).all() and (named[0, :, 5:] == IGNORE_CLASS).all()
    alone = method.assign_classes(scores, (4, 4))
    assert (alone[0, :, :2] == 2).all() and (alone[0, :, 2:] == IGNORE_CLASS).all()


# ----------------------------------------------------------------------------------------------------------------
# predict: names in the output, coarse maps in the input
# ----------------------------------------------------------------------------------------------------------------


def _predict(tmp_path: Path, *args: str) -> int:
    from emerdiff_pl.cli import main

    return main(
        ["predict", "--config", str(REPO / "configs" / "tiny.yaml"), "--trainer.enable_progress_bar", "false"]
        + ["--data.num_workers", "0", "--writer.overlay", "false", *args]
    )


def test_clip_through_predict_gives_class_ids_and_writes_the_names(tmp_path, tiny_clip_folder):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (h, w) in enumerate([(32, 48), (40, 24)]):
        (folder / f"im{i}.png").write_bytes(encode(Image.fromarray(random_rgb(h, w, i)), "PNG"))
    out = tmp_path / "out"
    args = ["--data.folder", str(folder), "--writer.output_dir", str(out), "--model.classifier", "clip"]
    args += ["--model.class_names", json.dumps(NAMES), "--model.clip_model", str(tiny_clip_folder)]
    assert _predict(tmp_path, *args, "--model.clip_resolution", "32") == 0
    result = read_output(out)
    assert len(result["samples"]) == 2 and result["failures"] == []
    for sample in result["samples"]:
        assert sample["seg.png"].max() < 3
        meta = sample["json"]
        assert meta["classifier"]["classifier"] == "clip" and meta["classifier"]["model"] == str(
            tiny_clip_folder
        )
        assert meta["class_names"] == ["sky", "water", "grass"]
    assert json.loads((out / ID2LABEL_FILE).read_text()) == {"0": "sky", "1": "water", "2": "grass"}


def _coarse_shards(tmp_path: Path) -> str:
    """Input shards for `classifier: field`: one good sample per coarse format, and one per way to get it wrong."""
    image = encode(Image.fromarray(random_rgb(32, 48, 1)), "PNG")
    good = np.array(
        [[0, 1, 1, 2, 2, 255], [0, 0, 1, 2, 2, 2], [0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2]], np.uint8
    )
    samples = [
        (
            "good_png",
            {"input.png": image, "coarse.png": png_bytes(good)},
        ),  # input.png + coarse.png: which is the image?
        (
            "good_npy",
            {"png": image, "coarse.npy": npy_bytes(np.random.default_rng(0).random((3, 2, 3), np.float32))},
        ),
        ("no_coarse", {"png": image}),
        ("transposed", {"png": image, "coarse.png": png_bytes(good.T.copy())}),
        ("bad_ids", {"png": image, "coarse.png": png_bytes(np.full((4, 6), 7, np.uint8))}),
        ("bad_channels", {"png": image, "coarse.npy": npy_bytes(np.zeros((5, 4, 6), np.float32))}),
    ]
    return str(write_tar(tmp_path / "in" / "coarse-000000.tar", samples))


def test_field_coarse_map_problems_are_recorded_failures_naming_the_key(tmp_path):
    out = tmp_path / "out"
    args = ["--data.urls", _coarse_shards(tmp_path), "--writer.output_dir", str(out)]
    assert _predict(tmp_path, *args, "--model.classifier", "field", "--model.class_names", "a,b,c") == 0
    result = read_output(out)
    assert sorted(result["keys"]) == ["good_npy", "good_png"]
    assert all(s["seg.png"].shape == (32, 48) and s["seg.png"].max() < 3 for s in result["samples"])
    reasons = {f["key"]: f["reason"] for f in result["failures"]}
    assert set(reasons) == {"no_coarse", "transposed", "bad_ids", "bad_channels"}
    for key, words in {
        "no_coarse": "no coarse map",
        "transposed": "the coarse map is 6×4 but the image is 32×48",
        "bad_ids": "class ids [7] outside [0, 3)",
        "bad_channels": "5 score channels, but there are 3 class names",
    }.items():
        assert f"'{key}'" in reasons[key] and words in reasons[key]


def test_a_folder_reads_coarse_maps_beside_images_and_never_labels_them(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode(Image.fromarray(random_rgb(32, 32, 2)), "JPEG"))
    (folder / "a.coarse.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8)))
    (folder / "b.png").write_bytes(encode(Image.fromarray(random_rgb(32, 32, 3)), "PNG"))
    (folder / "b.gt.png").write_bytes(png_bytes(np.zeros((32, 32), np.uint8)))  # no coarse map for b
    assert [key for key, _ in list_folder(folder, all_files=True)] == ["a_jpg", "b_png"]
    out = tmp_path / "out"
    args = ["--data.folder", str(folder), "--writer.output_dir", str(out)]
    assert _predict(tmp_path, *args, "--model.classifier", "field", "--model.class_names", "a,b") == 0
    result = read_output(out)
    assert result["keys"] == ["a_jpg"] and (result["samples"][0]["seg.png"] == 0).all()
    assert [f["key"] for f in result["failures"]] == ["b_png"] and "b.coarse.png" in result["failures"][0][
        "reason"
    ]


def test_a_coarse_png_is_never_taken_for_the_image():
    assert image_field_name(["coarse.png", "input.png"]) == "input.png"
    assert image_field_name(["coarse.png"]) is None


def test_named_output_and_mask_ids_never_mix_in_one_folder(tmp_path):
    publish_id2label(tmp_path, {"0": "sky", "1": "water"})
    publish_id2label(tmp_path, {"0": "sky", "1": "water"})  # every task and rank: the same table is fine
    with pytest.raises(ValueError, match=r"names the classes \['sky', 'water'\] but this run's are"):
        publish_id2label(tmp_path, {"0": "sky", "1": "grass"})
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(Image.fromarray(random_rgb(16, 16, 1)), "PNG"))
    assert _predict(tmp_path, "--data.folder", str(folder), "--writer.output_dir", str(tmp_path)) == 2
    assert not list(tmp_path.glob("*.tar"))


def test_a_probe_refit_into_the_same_file_is_a_changed_label_setting(tmp_path, tiny_probe):
    """The output folder's settings record holds the probe file's SHA-256: a rerun with a probe refit into the same
    path is refused naming it, the same probe resumes."""
    import shutil

    from emerdiff_pl.classifiers.probe import Probe
    from emerdiff_pl.config import EmerDiffConfig
    from emerdiff_pl.manifest import SettingsChangedError, check_settings

    path = tmp_path / "probe.safetensors"
    shutil.copy(tiny_probe, path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a0000of0001-r000of001-20260101T000000Z-abcdef-000000.tar").write_bytes(b"")  # labels exist
    settings = lambda: EmerDiffConfig(classifier="probe", probe=str(path)).label_settings()  # noqa: E731
    assert check_settings(out, settings()) == {} and check_settings(out, settings()) == {}
    refit = Probe.load(path)
    for buffer in refit.buffers():
        buffer.mul_(2)
    refit.save(path)
    with pytest.raises(SettingsChangedError, match="model.probe_sha256"):
        check_settings(out, settings())


# ----------------------------------------------------------------------------------------------------------------
# fit-probe
# ----------------------------------------------------------------------------------------------------------------


def test_fit_probe_end_to_end_on_toy_shards(tmp_path, capsys):
    from emerdiff_pl.classifiers.probe import Probe
    from emerdiff_pl.cli import main
    from emerdiff_pl.datasets import toyworld

    shards = toyworld.write_shards(tmp_path / "gt", 4, seed=3, size=64, progress=False)
    probe = tmp_path / "probe.safetensors"
    config = str(REPO / "configs" / "tiny.yaml")
    args = ["--config", config, "--labelled", shards[0], "--class-names", "toyworld", "--out", str(probe)]
    assert main(["fit-probe", *args, "--holdout", "1"]) == 0
    out = capsys.readouterr().out
    assert (
        "linear probe on 3 images" in out
        and "train pixel accuracy" in out
        and "held-out pixel accuracy" in out
    )
    loaded = Probe.load(probe)
    assert loaded.class_names == toyworld.CLASS_NAMES and loaded.source.model == "tiny-random"
    # a probe of other features is refused before anything loads, naming what differs
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(Image.fromarray(random_rgb(16, 16, 1)), "PNG"))
    layer = "up_blocks.2.attentions.0.transformer_blocks.0.attn2"
    predict = ["--data.folder", str(folder), "--writer.output_dir", str(tmp_path / "out")]
    predict += ["--model.classifier", "probe", "--model.probe", str(probe), "--model.feature_layer", layer]
    assert _predict(tmp_path, *predict) == 2
    err = capsys.readouterr().err
    assert (
        "--model.probe" in err and "feature_layer: 'up_blocks.1." in err and not (tmp_path / "out").exists()
    )


def test_fit_probe_reports_no_labels_and_ids_beyond_the_classes(tmp_path, capsys):
    from emerdiff_pl.cli import main

    folder = tmp_path / "labelled"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode(Image.fromarray(random_rgb(32, 32, 1)), "JPEG"))
    config = str(REPO / "configs" / "tiny.yaml")
    args = ["fit-probe", "--config", config, "--labelled", str(folder), "--class-names", "a,b"]
    assert main([*args, "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "no labelled images" in capsys.readouterr().err
    (folder / "a.gt.png").write_bytes(png_bytes(np.full((32, 32), 5, np.uint8)))
    assert main([*args, "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "'a_jpg': label ids [5] are ≥ the 2 classes of --class-names" in capsys.readouterr().err


def test_fit_probe_takes_a_label_folder_matched_as_evaluate_matches_it(tmp_path, capsys):
    """--labels: images/x/a.jpg takes labels/x/a.png (evaluate's folder rule, emerdiff_pl.sources); an image
    without a label file is left out, and a colour label file is refused naming the file and --labels."""
    from emerdiff_pl.cli import main

    images, labels = tmp_path / "images", tmp_path / "labels"
    for folder in (images / "x", labels / "x"):
        folder.mkdir(parents=True)
    (images / "x" / "a.jpg").write_bytes(encode(Image.fromarray(random_rgb(32, 32, 1)), "JPEG"))
    (images / "b.png").write_bytes(encode(Image.fromarray(random_rgb(32, 48, 2)), "PNG"))
    (images / "c.png").write_bytes(
        encode(Image.fromarray(random_rgb(32, 32, 3)), "PNG")
    )  # no label: left out
    halves = np.zeros((32, 32), np.uint8)
    halves[:, 16:] = 1
    (labels / "x" / "a.png").write_bytes(png_bytes(halves))
    (labels / "b.png").write_bytes(png_bytes(np.ones((32, 48), np.uint8)))
    config = str(REPO / "configs" / "tiny.yaml")
    args = ["fit-probe", "--config", config, "--labelled", str(images), "--labels", str(labels)]
    args += ["--class-names", "a,b", "--out", str(tmp_path / "p.safetensors")]
    assert main(args) == 0
    assert "linear probe on 2 images" in capsys.readouterr().out
    (labels / "b.png").write_bytes(png_bytes(np.ones((32, 48, 3), np.uint8)))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "b.png" in err and "--labels needs class ids" in err


# ----------------------------------------------------------------------------------------------------------------
# named output through relabel, evaluate, export, show
# ----------------------------------------------------------------------------------------------------------------

# one 2×4 image, 2 classes: ground truth and a named prediction (255 = ignore on both sides)
GT = np.array([[0, 0, 1, 1], [0, 0, 1, 255]], np.uint8)
PRED = np.array([[0, 1, 1, 1], [0, 0, 255, 1]], np.uint8)


def _named_shards(tmp_path: Path) -> tuple[str, str]:
    meta = {"key": "k", "classifier": {"classifier": "probe"}, "class_names": ["road", "tree"]}
    image = encode(Image.fromarray(random_rgb(2, 4, 0)), "PNG")
    pred = write_tar(tmp_path / "pred" / "p-000000.tar", [("k", {"seg.png": png_bytes(PRED), "json": json.dumps(meta).encode(), "png": image})])  # fmt: skip
    gt = write_tar(tmp_path / "gt" / "g-000000.tar", [("k", {"png": image, "gt.png": png_bytes(GT)})])
    return str(pred), str(gt)


def test_named_output_is_scored_without_matching(tmp_path, capsys):
    from emerdiff_pl.commands.evaluate import main

    pred, gt = _named_shards(tmp_path)
    assert main(["--pred", pred, "--gt", gt, "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    named = report["named"]
    # road: 3 right, 1 called tree → 3/4; tree: 2 right, 1 left unlabelled (255: a miss), 1 road pixel called
    # tree → 2/4; the ground truth's 255 is not scored: 5 of 7 pixels right
    assert named["per_class_iou"] == [75.0, 50.0] and named["miou"] == 62.5
    assert round(named["pixel_accuracy"], 2) == 71.43 and report["class_names"] == ["road", "tree"]
    assert "boundary_f" in named and "global" not in report
    assert "IoU named" in capsys.readouterr().out


def test_named_output_exports_with_its_names_and_keeps_ignore(tmp_path):
    from emerdiff_pl.commands.export import main

    pred, _ = _named_shards(tmp_path)
    assert main(["--input", pred, "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "classes.txt").read_text() == "road\ntree\n"
    record = json.loads((tmp_path / "export" / "export.json").read_text())
    assert record["ignore_index"] == 255 and record["pixels_per_class"] == [3, 4]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "export" / "labels" / "k.png")), PRED)


def test_named_output_refuses_ids_beyond_its_classes_in_export(tmp_path, capsys):
    from emerdiff_pl.commands.export import main

    meta = {"classifier": {"classifier": "field"}, "class_names": ["road"]}
    bad = write_tar(tmp_path / "p.tar", [("k", {"seg.png": png_bytes(PRED), "json": json.dumps(meta).encode(), "png": png_bytes(random_rgb(2, 4))})])  # fmt: skip
    assert main(["--input", str(bad), "--out", str(tmp_path / "export")]) == 2
    assert "id 1 ≥ the 1 named classes" in capsys.readouterr().err


def test_named_output_is_shown_by_class_with_a_legend_of_names(tmp_path, monkeypatch):
    from emerdiff_pl.commands import show

    drawn = {}

    def capture(rows, titles, row_labels, legend, **kwargs):
        drawn["legend"], drawn["titles"] = legend, titles
        return Image.new("RGB", (8, 8))

    monkeypatch.setattr(show, "contact_sheet", capture)
    pred, gt = _named_shards(tmp_path)
    assert show.main(["--input", pred, "--gt", gt, "--out", str(tmp_path / "sheet.png")]) == 0
    section, entries = drawn["legend"][0]
    assert section == "classes in seg.png" and entries == [(0, "0 road"), (1, "1 tree")]
    assert "mask ids, not classes" in drawn["titles"][2]  # the low-res map is not named


def test_relabel_refuses_named_output(tmp_path, capsys):
    from emerdiff_pl.commands.relabel import main

    pred, _ = _named_shards(tmp_path)
    assert main(["--input", pred, "--output", str(tmp_path / "rel"), "--num-classes", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds named output (class ids of 2 classes: road, tree)" in err and "relabel is not needed" in err
    assert not (tmp_path / "rel").exists()
