"""Named classes (issue 27), the standalone pieces: mask classification (the method step), the few-shot `probe`,
the open-vocabulary `clip` classifier on a tiny random CLIP saved to a folder, and the `field` decoder of coarse
maps. Each test names the bug it guards; all run on the CPU in seconds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import npy_bytes, png_bytes

from emerdiff_pl import method
from emerdiff_pl.classifiers import (
    CLIPClassifier,
    CoarseMapError,
    FeatureSource,
    FieldClassifier,
    Probe,
    coarse_file,
    coarse_member,
    coarse_scores,
    fit_probe,
    id2label,
)
from emerdiff_pl.classifiers.clip import clip_input_size
from emerdiff_pl.classifiers.probe import cell_label_fractions
from emerdiff_pl.datasets import class_names

IGNORE = method.IGNORE_CLASS


# ----------------------------------------------------------------------------------------------------------------
# mask classification
# ----------------------------------------------------------------------------------------------------------------


def _loop_reference(class_scores, masks, num_masks, threshold):
    """One mask at a time: bilinear upsampling, the mean over the mask's pixels, argmax, threshold → (labels,
    means (B, K, C) with NaN for empty masks)."""
    up = F.interpolate(class_scores.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    out = torch.full_like(masks, -1)
    means = torch.full((masks.shape[0], num_masks, class_scores.shape[1]), float("nan"))
    for b in range(masks.shape[0]):
        for k in range(num_masks):
            inside = masks[b] == k
            if not inside.any():
                continue
            means[b, k] = mean = up[b][:, inside].mean(1)
            cls = int(mean.argmax())
            if threshold is not None and mean[cls] < threshold:
                cls = IGNORE
            out[b][inside] = cls
    return out, means


def test_a_mask_straddling_two_classes_takes_the_larger_mean_not_the_pixel_majority():
    # mask 1 covers 6 columns where class 0 barely wins (0.55 vs 0.45) and 4 where class 1 wins outright: the
    # pixel majority says 0, the mean says 1 (0.33 vs 0.67)
    scores = torch.zeros(1, 2, 4, 12)
    scores[0, 0, :, :6], scores[0, 1, :, :6] = 0.55, 0.45
    scores[0, 0, :, 6:10], scores[0, 1, :, 6:10] = 0.0, 1.0
    scores[0, 0, :, 10:] = 1.0  # mask 0: class 0 everywhere
    masks = torch.ones(1, 4, 12, dtype=torch.long)
    masks[0, :, 10:] = 0
    labels = method.classify_masks(scores, masks, num_masks=2)
    assert (labels[0, :, :10] == 1).all() and (labels[0, :, 10:] == 0).all()
    mean = method.mask_mean_scores(scores, masks, 2)
    torch.testing.assert_close(mean[0, 1], torch.tensor([0.33, 0.67]))


def test_the_threshold_sends_an_unsure_mask_to_ignore_and_keeps_a_sure_one():
    scores = torch.zeros(1, 2, 4, 12)
    scores[0, 0, :, :6], scores[0, 1, :, :6] = 0.55, 0.45
    scores[0, 0, :, 6:10], scores[0, 1, :, 6:10] = 0.0, 1.0
    scores[0, 0, :, 10:] = 1.0
    masks = torch.ones(1, 4, 12, dtype=torch.long)
    masks[0, :, 10:] = 0
    labels = method.classify_masks(scores, masks, num_masks=2, threshold=0.7)  # mask 1's best mean is 0.67
    assert (labels[0, :, :10] == IGNORE).all() and (labels[0, :, 10:] == 0).all()
    assert (method.classify_masks(scores, masks, num_masks=2, threshold=0.6)[0, :, :10] == 1).all()


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_batched_mask_classification_equals_a_per_mask_loop(threshold):
    """Coarse scores at another resolution and aspect (bilinear upsampling), an empty mask, two images."""
    g = torch.Generator().manual_seed(0)
    scores = (3 * torch.rand(2, 5, 5, 7, generator=g)).softmax(1)
    blobs = torch.rand(2, 6, 3, 4, generator=g)
    masks = F.interpolate(blobs, size=(20, 28), mode="bilinear", align_corners=False).argmax(1)
    masks[1][masks[1] == 3] = 2  # image 1 has no mask 3
    out = method.classify_masks(scores, masks, num_masks=6, threshold=threshold)
    expected, means = _loop_reference(scores, masks, 6, threshold)
    assert torch.equal(out, expected)
    if threshold is not None:  # the threshold splits the masks: some named, some ignored
        assert (out == IGNORE).any() and (out != IGNORE).any()
    mean_scores = method.mask_mean_scores(scores, masks, 6)
    present = ~means.isnan().any(-1)
    assert not present[1, 3] and present.sum() == 11
    torch.testing.assert_close(mean_scores[present], means[present])
    assert torch.equal(out, method.classify_masks(scores, masks, num_masks=6, threshold=threshold))
    # naming commutes with the nearest resize to the original size (so `assign`'s output can be named)
    classes = method.classes_of_masks(mean_scores, threshold)
    big = F.interpolate(masks[:, None].float(), size=(45, 61), mode="nearest-exact")[:, 0].long()
    named_big = F.interpolate(out[:, None].float(), size=(45, 61), mode="nearest-exact")[:, 0].long()
    assert torch.equal(method.name_masks(big, classes), named_big)


def test_the_classifier_alone_is_bilinear_upsampling_then_argmax():
    scores = torch.tensor([[[[0.9, 0.1], [0.2, 0.6]], [[0.1, 0.9], [0.8, 0.4]]]])  # (1, 2, 2, 2)
    up = method.bilinear_class_scores(scores, (6, 10))
    expected = F.interpolate(scores, size=(6, 10), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(method.assign_classes(up, (6, 10)), expected)
    unsure = up.max(1).values < 0.6
    assert unsure.any() and torch.equal(method.assign_classes(up, (6, 10), 0.6) == IGNORE, unsure)


# ----------------------------------------------------------------------------------------------------------------
# probe
# ----------------------------------------------------------------------------------------------------------------

SOURCE = FeatureSource(
    "toy-model", "up_blocks.2.attentions.0.transformer_blocks.0.attn2", 1, 16, 128, "square"
)
NAMES = ("sky", "water", "disc")


def _separable(num_images: int, seed: int, grid=(8, 6), cell=4, dim=16):
    """Features whose class is linearly separable (class means far apart, small noise, a shared offset), and
    label maps at cell× the grid (uniform inside each cell), some cells ignored."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    cell_class = torch.randint(0, 3, (num_images, h, w), generator=g)
    means = 4.0 * torch.eye(3, dim) + 2.0  # rows: class means
    features = means[cell_class.flatten(1)] + 0.5 * torch.randn(num_images, h * w, dim, generator=g)
    labels = cell_class.repeat_interleave(cell, 1).repeat_interleave(cell, 2).to(torch.uint8)
    labels[:, :cell, :cell] = IGNORE  # the top-left cell of each image is unlabelled
    return features, grid, labels


@pytest.mark.parametrize("kind", ["linear", "prototype"])
def test_the_probe_recovers_a_separable_labelling(kind):
    probe, fit = fit_probe([_separable(4, 0)], NAMES, SOURCE, kind=kind, heldout=[_separable(6, 1)])
    assert fit.train_cell_accuracy >= 0.99 and fit.heldout_cell_accuracy >= 0.99
    # at label resolution bilinear upsampling blurs the borders of the 4-pixel cells; nothing else is wrong
    assert fit.train_accuracy >= 0.95 and fit.heldout_accuracy >= 0.95
    features, grid, labels = _separable(3, 2)
    scores = probe.scores(features, grid)
    assert scores.shape == (3, 3, *grid)
    torch.testing.assert_close(scores.sum(1), torch.ones(3, *grid))
    cells = labels[:, ::4, ::4].long()
    keep = cells != IGNORE
    assert (scores.argmax(1)[keep] == cells[keep]).float().mean() >= 0.99


@pytest.mark.parametrize("kind", ["linear", "prototype"])
def test_a_class_without_training_pixels_is_reported_and_never_predicted(kind):
    probe, fit = fit_probe([_separable(2, 0)], (*NAMES, "ring"), SOURCE, kind=kind)
    assert fit.missing_classes == ["ring"] and "no training pixels of ring" in fit.summary()
    features, grid, _ = _separable(2, 1)
    features = features - 10.0  # far from every class: a zero prototype or an untrained row must not win
    assert (probe.scores(features, grid)[:, 3] == 0).all()


def test_cell_labels_skip_ignored_pixels_and_follow_the_grid_orientation():
    labels = torch.full((4, 6), IGNORE, dtype=torch.uint8)
    labels[:2, :3] = 2  # top-left cell of a 2×2 grid over a 4×6 map: class 2
    labels[2:, 3:5] = 1  # bottom-right cell: 2 of 3 columns class 1, the rest ignored
    fractions = cell_label_fractions(labels, (2, 2), 3)  # (C+1, 2, 2)
    assert fractions[2, 0, 0] == 1 and fractions[3, 0, 1] == 1 and fractions[3, 1, 0] == 1
    torch.testing.assert_close(fractions[1, 1, 1], torch.tensor(2 / 3))
    with pytest.raises(ValueError, match="≥ the 3 classes"):
        cell_label_fractions(torch.full((4, 6), 7, dtype=torch.uint8), (2, 2), 3)


@pytest.mark.parametrize("kind", ["linear", "prototype"])
def test_a_saved_probe_loads_with_equal_scores_names_and_source(tmp_path, kind):
    probe, _ = fit_probe([_separable(4, 0)], NAMES, SOURCE, kind=kind)
    path = tmp_path / "probe.safetensors"
    probe.save(path)
    loaded = Probe.load(path, expected=SOURCE)
    features, grid, _ = _separable(2, 3)
    assert torch.equal(loaded.scores(features, grid), probe.scores(features, grid))
    assert loaded.class_names == NAMES and loaded.kind == kind and loaded.source == SOURCE
    assert loaded.fit["train_accuracy"] == probe.fit["train_accuracy"]


def test_a_probe_fit_on_other_features_is_refused_naming_both(tmp_path):
    probe, _ = fit_probe([_separable(2, 0)], NAMES, SOURCE)
    path = tmp_path / "probe.safetensors"
    probe.save(path)
    wider = FeatureSource(**{**SOURCE.__dict__, "feature_dim": 1280})
    with pytest.raises(ValueError, match=r"feature_dim: 16 vs 1280"):
        Probe.load(path, expected=wider)
    other = FeatureSource(**{**SOURCE.__dict__, "model": "CompVis/stable-diffusion-v1-4"})
    with pytest.raises(ValueError, match=r"model: 'toy-model' vs 'CompVis/stable-diffusion-v1-4'"):
        Probe.load(path, expected=other)
    with pytest.warns(UserWarning, match="resolution: 128 vs 512"):
        Probe.load(path, expected=FeatureSource(**{**SOURCE.__dict__, "resolution": 512}))
    with pytest.raises(ValueError, match="16-dim features .* got 32-dim"):
        probe.scores(torch.zeros(1, 48, 32), (8, 6))


def test_a_file_that_is_not_a_probe_is_refused(tmp_path):
    path = tmp_path / "not_a_probe.safetensors"
    path.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a probe file"):
        Probe.load(path)
    with pytest.raises(FileNotFoundError, match="fit-probe"):
        Probe.load(tmp_path / "missing.safetensors")


def test_the_probe_reads_features_of_the_current_segmenter():
    """The extract_features contract on tiny-random weights: reference pass only, features (B, N, D) + grid."""
    from conftest import FAST_SEGMENTER, smooth_images

    from emerdiff_pl import EmerDiffSegmenter

    seg = EmerDiffSegmenter(**{**FAST_SEGMENTER, "method": "lowres_bilinear"})
    seg._ensure_ready()
    images = smooth_images(2)
    x0 = seg.encode(images)
    _, features = method.reference_pass(seg.frozen_model(), x0, [0, 0], seg.config, "none")
    grid = method.token_grid(features.shape[1], tuple(x0.shape[-2:]))
    labels = (images[:, 0] > 0.5).to(torch.uint8)  # (B, 64, 64): two classes
    source = FeatureSource("tiny-random", seg.config.feature_layer, 1, features.shape[-1], 64, "keep_aspect")
    probe, fit = fit_probe([(features, grid, labels)], ("dark", "bright"), source)
    assert probe.scores(features, grid).shape == (2, 2, *grid) and 0 <= fit.train_accuracy <= 1


# ----------------------------------------------------------------------------------------------------------------
# clip
# ----------------------------------------------------------------------------------------------------------------


CLIP_NAMES = ("sky", "water, sea", "grass")


def test_clip_scores_a_non_square_batch_at_the_patch_grid(tiny_clip_folder):
    clip = CLIPClassifier(CLIP_NAMES, model=str(tiny_clip_folder), resolution=32)
    images = torch.rand(2, 3, 40, 72, generator=torch.Generator().manual_seed(0))
    scores = clip.scores(images)
    assert clip_input_size(40, 72, 32, 8) == (32, 56)
    assert scores.shape == (2, 3, 4, 7)
    torch.testing.assert_close(scores.sum(1), torch.ones(2, 4, 7))
    ids = method.assign_classes(method.bilinear_class_scores(scores, (40, 72)), (40, 72))
    assert ids.shape == (2, 40, 72) and ids.min() >= 0 and ids.max() < 3
    assert clip.record()["model"] == str(tiny_clip_folder)


def test_clip_dense_features_are_the_last_blocks_value_path_without_residual_or_mlp(tiny_clip_folder):
    clip = CLIPClassifier(CLIP_NAMES, model=str(tiny_clip_folder), resolution=32, softmax=False)
    pixels = clip.pixel_values(torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(1)))
    vision = clip.clip.vision_model
    with torch.no_grad():  # by hand: embeddings, every block but the last, then v_proj → out_proj of the last
        x = vision.pre_layrnorm(vision.embeddings(pixels, interpolate_pos_encoding=True))
        for layer in vision.encoder.layers[:-1]:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        last = vision.encoder.layers[-1]
        values = F.linear(last.layer_norm1(x), last.self_attn.v_proj.weight, last.self_attn.v_proj.bias)
        values = F.linear(values, last.self_attn.out_proj.weight, last.self_attn.out_proj.bias)
        expected = F.normalize(clip.clip.visual_projection(vision.post_layernorm(values[:, 1:])), dim=-1)
    torch.testing.assert_close(clip.dense_features(pixels), expected)
    # the cosine per class is its best name's ("water, sea": the larger of the two)
    text = clip.text_embeddings()  # (4 names, E)
    cosine = expected @ text.T
    scores = clip.scores(torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(1)))
    best = torch.stack([cosine[..., 0], cosine[..., 1:3].max(-1).values, cosine[..., 3]], 1)
    torch.testing.assert_close(scores.flatten(2), best)


def test_clip_text_embeddings_are_the_normalized_template_mean(tiny_clip_folder):
    templates = ("a photo of a {}.", "itap of the {}.")
    clip = CLIPClassifier(["sky"], model=str(tiny_clip_folder), templates=templates)
    with torch.no_grad():
        tokens = clip.tokenizer([t.format("sky") for t in templates], padding=True, return_tensors="pt")
        pooled = clip.clip.text_model(**tokens).pooler_output
        each = F.normalize(clip.clip.text_projection(pooled), dim=-1)
    torch.testing.assert_close(clip.text_embeddings()[0], F.normalize(each.mean(0), dim=0))


def test_an_unknown_clip_hub_id_offline_gives_the_one_line_hub_error():
    with pytest.raises(OSError) as err:
        CLIPClassifier(["sky"], model="nobody-here/no-such-clip")
    message = str(err.value)
    assert "\n" not in message and "'nobody-here/no-such-clip'" in message and "hf download" in message
    assert "clip_model=/path/clip" in message


def test_a_clip_folder_without_config_is_named(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"not a CLIP model folder \(it holds \['weights.bin'\]"):
        CLIPClassifier(["sky"], model=str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# field
# ----------------------------------------------------------------------------------------------------------------


def test_a_coarse_label_map_gives_one_hot_scores_with_ignore_scoring_nothing():
    labels = np.array([[0, 2, 255], [1, 1, 0]], dtype=np.uint8)
    expected = F.one_hot(torch.tensor([[0, 2, 0], [1, 1, 0]]), 3).permute(2, 0, 1).float()
    expected[:, 0, 2] = 0
    assert torch.equal(coarse_scores(png_bytes(labels), "coarse.png", 3, "k"), expected)
    assert torch.equal(coarse_scores(npy_bytes(labels.astype(np.int32)), "coarse.npy", 3, "k"), expected)
    scores = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    assert torch.equal(coarse_scores(npy_bytes(scores), "coarse.npy", 3, "k"), torch.from_numpy(scores))


@pytest.mark.parametrize(
    "field, data, match",
    [
        (
            "coarse.npy",
            npy_bytes(np.zeros((4, 3, 3), np.float32)),
            r"4 score channels, but there are 3 class names",
        ),
        ("coarse.npy", npy_bytes(np.zeros((1, 3, 3, 3), np.float32)), r"got shape \(1, 3, 3, 3\)"),
        ("coarse.npy", npy_bytes(np.zeros((3, 3), np.float32)), r"integer class ids, got float32"),
        ("coarse.npy", npy_bytes(np.full((3, 2, 2), np.nan, np.float32)), r"NaN"),
        ("coarse.npy", b"not an npy", r"cannot read \.npy"),
        ("coarse.png", png_bytes(np.full((3, 3), 5, np.uint8)), r"class ids \[5\] outside \[0, 3\)"),
        ("coarse.png", png_bytes(np.zeros((3, 3, 3), np.uint8)), r"single-channel PNG .* got mode RGB"),
        ("coarse.png", b"garbage", r"cannot decode PNG"),
        ("coarse.jpg", b"", r"not a coarse map field"),
    ],
)
def test_a_bad_coarse_map_is_refused_naming_the_sample_key(field, data, match):
    with pytest.raises(CoarseMapError, match=match) as err:
        coarse_scores(data, field, 3, "shard-000/img_0042")
    assert "'shard-000/img_0042'" in str(err.value) and field in str(err.value)


def test_a_sample_without_its_coarse_map_is_named(tmp_path):
    with pytest.raises(CoarseMapError, match=r"sample 'a': no coarse map .*a\.coarse\.png"):
        coarse_member({"jpg": b"", "gt.png": b""}, "a")
    assert coarse_member({"jpg": b"", "coarse.npy": b"x"}, "a") == ("coarse.npy", b"x")
    image = tmp_path / "img.jpg"
    image.write_bytes(b"")
    with pytest.raises(CoarseMapError, match=r"no coarse map beside it \(expected img\.coarse\.png or"):
        coarse_file(image)
    (tmp_path / "img.coarse.png").write_bytes(b"")
    assert coarse_file(image) == ("coarse.png", tmp_path / "img.coarse.png")


def test_field_scores_stack_coarse_maps_of_any_size_at_one_size():
    field = FieldClassifier(("a", "b"))
    small, large = torch.rand(2, 3, 5), torch.rand(2, 30, 50)
    scores = field.scores([small, large], (12, 20))
    assert scores.shape == (2, 2, 12, 20)
    torch.testing.assert_close(
        scores[1], F.interpolate(large[None], (12, 20), mode="bilinear", antialias=True)[0]
    )


# ----------------------------------------------------------------------------------------------------------------
# class names
# ----------------------------------------------------------------------------------------------------------------


def test_class_names_come_from_a_list_or_a_file_and_map_ids_to_first_names(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# toy world\nsky\n\nwater, sea\ngrass\n")
    names = class_names(str(path))
    assert names == ["sky", "water, sea", "grass"] == class_names(names)
    assert id2label(names) == {"0": "sky", "1": "water", "2": "grass"}
    with pytest.raises(ValueError, match="names 'sky' twice"):
        class_names(["sky", "sky, heaven"])
