"""Images at their own aspect ratio (`resize: keep_aspect` / `short_side`): model input sizes, shape buckets,
non-square grids."""

import inspect
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST_SEGMENTER, encode, random_rgb
from PIL import Image

from emerdiff_pl import EmerDiffSegmenter, method
from emerdiff_pl.commands.predict import cli_main
from emerdiff_pl.config import EmerDiffConfig
from emerdiff_pl.data import EmerDiffDataModule, ImageStream
from emerdiff_pl.inputs import InputPolicy, ReadPlan
from emerdiff_pl.paths import list_folder

READ_ORIGINALS = ReadPlan(keep_originals=True)  # the decoded originals in the batch, as for overlays


def model_input_size(
    height: int, width: int, resolution: int, resize: str, multiple: int = 64
) -> tuple[int, int]:
    return InputPolicy(resolution, resize, multiple).model_input_size(height, width)


# tiny-random needs sides divisible by 16 (VAE ×2, U-Net ×8): at resolution 64 a 2:1 image becomes 48×96
ASPECT = {**FAST_SEGMENTER, "resize": "keep_aspect", "resize_multiple": 16}


def blobs(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Blobby images of any shape (bilinear upsampling of 4×8 noise), so low-res clusters form regions."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, 3, 4, 8, generator=g)
    return F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def model() -> EmerDiffSegmenter:
    m = EmerDiffSegmenter(**ASPECT)
    m.configure_model()
    return m


def test_model_input_size_keeps_area_aspect_and_multiples():
    assert model_input_size(1024, 2048, 704, "keep_aspect", 64) == (512, 1024)
    assert model_input_size(1024, 2048, 512, "square", 64) == (512, 512)
    for res in (16, 32, 48, 64, 128, 512):  # a square image keeps today's resolution²
        assert model_input_size(100, 100, res, "keep_aspect", 64) == (res, res)
    h, w = model_input_size(480, 640, 512, "keep_aspect", 64)  # 4:3
    assert (h, w) == (448, 576) and h % 64 == w % 64 == 0
    # extreme shapes: at most 4:1, never a side below one step
    assert model_input_size(1, 4000, 512, "keep_aspect", 64) == (256, 1024)
    assert model_input_size(4000, 1, 512, "keep_aspect", 64) == (1024, 256)
    assert model_input_size(1, 4000, 32, "keep_aspect", 64) == (32, 64)
    with pytest.raises(ValueError, match="resize must be one of"):
        model_input_size(10, 10, 64, "stretch")


def test_short_side_keeps_the_short_side_at_resolution():
    assert model_input_size(1024, 2048, 512, "short_side", 64) == (512, 1024)  # configs/sd14-cityscapes.yaml
    assert model_input_size(128, 256, 128, "short_side", 32) == (128, 256)  # toy 2:1 scenes at their own size
    assert model_input_size(128, 256, 184, "keep_aspect", 32) == (128, 256)  # the same input, by area
    for res in (16, 32, 48, 64, 128, 512):  # a square image: the same as keep_aspect and square
        assert model_input_size(100, 100, res, "short_side", 64) == (res, res)
    assert model_input_size(480, 640, 512, "short_side", 64) == (512, 704)  # 4:3 → 512 × 682.7 → ×64
    assert model_input_size(640, 480, 512, "short_side", 64) == (704, 512)
    assert model_input_size(1, 4000, 512, "short_side", 64) == (512, 2048)  # clamped to 4:1, 4× the pixels
    assert model_input_size(4000, 1, 512, "short_side", 64) == (2048, 512)
    assert model_input_size(1, 4000, 32, "short_side", 64) == (32, 128)


def test_square_reproduces_the_squashing_resize_bit_identically():
    rgb = random_rgb(37, 90, seed=1)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)[None]
    old = F.interpolate(image, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    old = old[0].clamp(0, 1)
    assert torch.equal(InputPolicy(16, "square", 64).resize_image(rgb), old)
    assert InputPolicy(64, "keep_aspect", 16).resize_image(rgb).shape == (3, 48, 96)


def test_square_segmenter_is_todays_segmenter(model):
    images = blobs(2, 37, 90, seed=2)
    square = EmerDiffSegmenter(**{**FAST_SEGMENTER, "resize": "square"})
    result = square.segment(images)
    # today's path written out: squash to 64², segment, labels back to the input size
    squashed = F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    today = square.segment(squashed, output_size=(37, 90))
    assert torch.equal(result.labels, today.labels) and torch.equal(result.lowres_labels, today.lowres_labels)
    assert result.lowres_labels.shape == (2, 8, 8)


def test_two_to_one_image_gives_two_to_one_latent_and_grid(model):
    images = blobs(1, 100, 200)
    latents = model.encode(images)
    assert latents.shape[-2:] == (24, 48)  # 48×96 model input, VAE ×2
    result = model.segment(images)
    assert result.lowres_labels.shape == (1, 6, 12)  # the feature layer at ¼ of the latent
    assert result.labels.shape == (1, 100, 200)
    tall = model.segment(images.transpose(2, 3))
    assert tall.lowres_labels.shape == (1, 12, 6) and tall.labels.shape == (1, 200, 100)


@pytest.mark.parametrize("method_name", ["emerdiff", "lowres_bilinear"])
def test_labels_align_with_the_non_square_lowres_map(method_name):
    """As the square alignment test (tests/test_segmenter.py): the argmax follows the low-res map at 2:1, far
    more than the same map flipped left-right (a w×h / h×w mix-up or a squashed grid lands near that level)."""
    m = EmerDiffSegmenter(**{**ASPECT, "num_masks": 6, "gaussian_sigma": 2.0, "method": method_name})
    result = m.segment(blobs(3, 48, 96, seed=0))
    assert result.lowres_labels.shape == (3, 6, 12)
    lowres = result.lowres_labels[:, None].float()
    up = F.interpolate(lowres, size=(48, 96), mode="nearest-exact")[:, 0].long()
    agree = (up == result.labels).float().mean().item()
    agree_flip = (up.flip(-1) == result.labels).float().mean().item()
    p = F.one_hot(result.labels, 6).float().mean((1, 2))
    q = F.one_hot(up, 6).float().mean((1, 2))
    chance = (p * q).sum(1).mean().item()
    assert agree > 2 * chance, (agree, chance)
    assert agree > agree_flip + 0.15, (agree, agree_flip)


def _mixed_folder(root: Path) -> dict[str, tuple[int, int]]:
    sizes = {
        "w1.png": (40, 80),
        "t1.png": (80, 40),
        "s1.png": (50, 50),
        "w2.png": (30, 64),
        "t2.png": (90, 44),
    }
    sizes |= {"s2.png": (60, 60), "w3.png": (20, 41), "tiny_wide.png": (1, 4000), "tiny_tall.png": (4000, 1)}
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, (h, w)) in enumerate(sorted(sizes.items())):
        (root / name).write_bytes(encode(Image.fromarray(random_rgb(h, w, seed=i)), "PNG"))
    return sizes


def test_buckets_cover_every_image_once_and_flush_at_the_end(tmp_path):
    sizes = _mixed_folder(tmp_path / "in")
    units = list_folder(tmp_path / "in")
    stream = ImageStream(units, "folder", InputPolicy(64, "keep_aspect", 16), 2, 10**7, READ_ORIGINALS)
    batches = list(stream)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(k for k, _ in units) and len(keys) == len(set(keys)) == len(sizes)
    shapes = []
    for b in batches:
        assert 1 <= len(b["key"]) <= 2
        shapes.append(tuple(b["image"].shape[-2:]))
        for key, original, size in zip(b["key"], b["original"], b["original_size"], strict=True):
            h, w = sizes[key.replace("_png", ".png")]
            assert tuple(original.shape[:2]) == (h, w) == tuple(size.tolist())
            assert tuple(b["image"].shape[-2:]) == model_input_size(h, w, 64, "keep_aspect", 16)
    assert len(set(shapes)) >= 3  # wide, tall and square buckets
    assert sum(len(b["key"]) == 1 for b in batches) >= 1  # some buckets were flushed part-full at the end
    # square mode: one bucket, input order, as before
    square = list(ImageStream(units, "folder", InputPolicy(64, "square", 64), 2, 10**7))
    assert [k for b in square for k in b["key"]] == [k for k, _ in units]
    assert all(b["image"].shape[-2:] == (64, 64) for b in square)


# Batched and single-image GEMMs may round differently (seen: 5e-6 on scores of order 1 on an AVX2 CPU), so an
# argmax may flip where two masks' scores tie to within that; anything larger is a real dependence on the batch.
SCORE_ATOL = 1e-4


def test_results_do_not_depend_on_the_mixed_aspect_batch(model, tmp_path, monkeypatch):
    _mixed_folder(tmp_path / "in")
    units = list_folder(tmp_path / "in")
    scores_seen: list[torch.Tensor] = []  # the score maps of each predict_step call, as labels are assigned
    assign = method.assign
    monkeypatch.setattr(
        method, "assign", lambda scores, size: scores_seen.append(scores) or assign(scores, size)
    )
    together = {}
    for batch in ImageStream(units, "folder", model.input_policy, 3, 10**7, READ_ORIGINALS):
        out = model.predict_step(batch)
        for i, key in enumerate(out["key"]):
            together[key] = (out["labels"][i], out["lowres_labels"][i], out["model_size"], scores_seen[-1][i])
    assert len(together) == len(units)
    for batch in ImageStream(units, "folder", model.input_policy, 1, 10**7, READ_ORIGINALS):
        out = model.predict_step(batch)
        key = out["key"][0]
        labels, lowres, size, scores = together[key]
        alone = scores_seen[-1][0]
        assert torch.equal(out["lowres_labels"][0], lowres), key  # the masks: exactly the same
        assert (alone - scores).abs().max().item() <= SCORE_ATOL, key  # the score maps: to float rounding
        top2 = scores.topk(2, dim=0).values
        flipped = alone.argmax(0) != scores.argmax(0)
        assert bool((top2[0] - top2[1])[flipped].le(2 * SCORE_ATOL).all()), key  # flips only at near-ties
        assert (out["labels"][0] != labels).float().mean().item() <= 1e-3, key
        assert out["model_size"] == size == list(batch["image"].shape[-2:])
        original = batch["original"][0]
        assert labels.shape == original.shape[:2]  # back at the original size, 1×4000 and 4000×1 included
        if key.startswith("tiny_"):
            h, w = lowres.shape
            assert max(h, w) == 4 * min(h, w), (key, lowres.shape)  # clamped to 4:1, not 4000:1


def test_extreme_images_segment_at_original_size(model):
    for shape in ((1, 4000), (4000, 1)):
        rgb = np.ascontiguousarray(random_rgb(*shape, seed=3))
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)[None]
        result = model.segment(image)
        assert result.labels.shape == (1, *shape)
        assert result.labels.min() >= 0 and result.labels.max() < 4


@pytest.mark.parametrize("resize", ["keep_aspect", "short_side", "square"])
def test_the_datamodule_batches_by_the_models_input_policy(tmp_path, resize):
    """Plain Python, no CLI links: the batches of Trainer.predict are at the size the model's policy gives."""
    import lightning.pytorch as pl
    from conftest import ColourQuantizer

    sizes = _mixed_folder(tmp_path / "in")
    model = ColourQuantizer(resolution=48)
    model.input_policy = InputPolicy(48, resize, 16)
    seen: dict[str, tuple[int, int]] = {}

    class Shapes(pl.Callback):
        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.update({key: tuple(batch["image"].shape[-2:]) for key in batch["key"]})

    data = EmerDiffDataModule(folder=str(tmp_path / "in"), batch_size=2, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[Shapes()])
    trainer.predict(model, datamodule=data, return_predictions=False)
    assert seen == {
        name.replace(".png", "_png"): model.input_policy.model_input_size(*hw) for name, hw in sizes.items()
    }
    if resize == "square":
        assert set(seen.values()) == {(48, 48)}
    assert not {"resolution", "resize", "resize_multiple"} & set(
        inspect.signature(EmerDiffDataModule.__init__).parameters
    )  # one home: the model's


def test_segment_checks_the_size_of_an_already_resized_batch(model):
    images = blobs(1, 48, 96)  # 48×96 is what the policy (resolution 64, keep_aspect, ×16) makes of 100×200
    result = model.segment(images, original_sizes=[(100, 200)])
    assert result.labels.shape == (1, 48, 96)
    with pytest.raises(ValueError, match=r"\(100×200 originally\) is 64×64, but .* makes it 48×96"):
        model.segment(blobs(1, 64, 64), original_sizes=[(100, 200)])  # squashed: another policy
    with pytest.raises(ValueError, match="1 original sizes for a batch of 2 images"):
        model.segment(blobs(2, 48, 96), original_sizes=[(100, 200)])


@pytest.mark.parametrize("resize", ["keep_aspect", "short_side"])
def test_a_resize_multiple_the_model_cannot_divide_is_a_clear_error(resize):
    with pytest.raises(ValueError, match=f"{resize} sides step by 8 .* multiples of 16"):
        EmerDiffSegmenter(**{**ASPECT, "resize": resize, "resize_multiple": 8}).configure_model()
    EmerDiffSegmenter(**{**ASPECT, "resize": "square", "resize_multiple": 8}).configure_model()  # not used


def test_toy_scenes_take_a_width_and_keep_their_square_scenes():
    from emerdiff_pl.datasets import toyworld

    wide = toyworld.generate_scene(5, 128, 256)
    assert wide.image.shape == (128, 256, 3) and wide.labels.shape == (128, 256)
    assert all(o.mask.shape == (128, 256) for o in wide.objects)
    assert (wide.labels[0] == 0).mean() > 0.5  # sky along the top
    assert wide.labels[:, 128:].size and np.isin(wide.labels, range(7)).all()
    square, same = toyworld.generate_scene(5, 128), toyworld.generate_scene(5, 128, 128)
    assert np.array_equal(square.image, same.image) and np.array_equal(square.labels, same.labels)
    tall = next(toyworld.generate_scenes(1, 0, 256, width=128))
    assert tall.image.shape == (256, 128, 3)


def test_non_square_token_grids_keep_raster_order():
    """Features whose top half differs from the bottom half (raster order over 6×12) give a low-res map split
    the same way, and a branch's modulation is that mask on the modulated layer's grid (h×w, not w×h)."""
    from emerdiff_pl import method

    h, w = 6, 12
    assert method.token_grid(h * w, (24, 48)) == (h, w) and method.token_grid(h * w, (48, 24)) == (w, h)
    top = (torch.arange(h * w) // w < h // 2).float()
    features = torch.stack([top, 1 - top], -1)[None] + 0.01 * torch.randn(1, h * w, 2)
    config = EmerDiffConfig(num_masks=2, kmeans_n_init=2, kmeans_max_iter=20)
    lowres, _ = method.lowres_masks(features, [0], (24, 48), config)
    band = top.view(h, w).long()
    assert lowres.shape == (1, h, w)
    assert torch.equal(lowres[0], band) or torch.equal(lowres[0], 1 - band)
    one_sided = EmerDiffConfig(num_masks=2, modulation_strength=1.0, difference="one_sided")
    plan = method.branch_plan(lowres, (2 * h, 2 * w), one_sided)
    mask0 = (lowres[0] == 0).float()[None, None]
    expected = F.interpolate(mask0, size=(2 * h, 2 * w), mode="nearest").flatten()
    assert torch.equal(plan.modulation[0], expected)


# model input sizes at resolution 32, sides ×16, of 20×41, 40×20 and 30×30 images
PREDICT_SIZES = {
    "keep_aspect": {"wide_png": [16, 48], "tall_png": [48, 16], "square_png": [32, 32]},
    "short_side": {"wide_png": [32, 64], "tall_png": [64, 32], "square_png": [32, 32]},
}


@pytest.mark.parametrize("resize", sorted(PREDICT_SIZES))
def test_predict_records_the_model_input_size(tmp_path, resize):
    from conftest import read_output

    from emerdiff_pl.runtime import auto_branch_rows

    assert auto_branch_rows(140e9, (512, 1024)) == 8  # auto rows scale with the model input's area
    sizes = {"wide.png": (20, 41), "tall.png": (40, 20), "square.png": (30, 30)}
    (tmp_path / "in").mkdir()
    for i, (name, (h, w)) in enumerate(sizes.items()):
        (tmp_path / "in" / name).write_bytes(encode(Image.fromarray(random_rgb(h, w, seed=i)), "PNG"))
    out = tmp_path / "out"
    cli_main(
        [
            "predict", "--config", "configs/tiny.yaml", "--data.folder", str(tmp_path / "in"),
            "--data.num_workers", "0", "--writer.output_dir", str(out), "--model.resolution", "32",
            "--model.resize_multiple", "16", "--model.resize", resize, "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    samples = {s["__key__"]: s for s in read_output(out)["samples"]}
    expected = PREDICT_SIZES[resize]
    assert set(samples) == set(expected)
    for key, size in expected.items():
        meta = samples[key]["json"]
        assert meta["model_size"] == size and meta["hparams"]["resize"] == resize
        assert samples[key]["seg.png"].shape == tuple(meta["original_size"])
        assert [8 * s for s in samples[key]["lowres.png"].shape] == size  # tiny.yaml: lowres = input / 8
