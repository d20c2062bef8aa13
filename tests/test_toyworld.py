"""The toy world: deterministic scenes whose class maps agree with what was painted, shards that round-trip,
and the shipped toy latent diffusion model in the layout and scale the segmenter expects."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from emerdiff_pl.commands.convert import main as convert
from emerdiff_pl.datasets import toyworld

ASSET = Path(toyworld.__file__).parents[1] / "assets" / "toyworld-ldm"


def test_same_seed_gives_identical_scene():
    a = toyworld.generate_scene(toyworld.scene_seed(3, 7))
    b = toyworld.generate_scene(toyworld.scene_seed(3, 7))
    c = toyworld.generate_scene(toyworld.scene_seed(3, 8))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)


def test_scene_depends_only_on_seed_and_index_not_on_count():
    five = list(toyworld.generate_scenes(5, seed=11))
    later = list(toyworld.generate_scenes(2, seed=11, start=3))
    assert np.array_equal(five[3].image, later[0].image)
    assert np.array_equal(five[4].labels, later[1].labels)


def test_scene_shapes_dtypes_and_class_ids_in_range():
    for scene in toyworld.generate_scenes(20, seed=0, size=96):
        assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
        assert scene.labels.shape == (96, 96) and scene.labels.dtype == np.uint8
        assert scene.labels.max() < toyworld.NUM_CLASSES
        assert 0 in scene.labels  # sky is always above the horizon
        assert 1 <= len(scene.objects) <= 4


def test_world_has_at_least_six_classes_and_all_appear():
    seen = set()
    for scene in toyworld.generate_scenes(40, seed=1):
        seen |= set(np.unique(scene.labels).tolist())
    assert toyworld.NUM_CLASSES >= 6
    assert seen == set(range(toyworld.NUM_CLASSES))


def test_visible_object_pixels_carry_their_class_and_front_objects_win():
    for scene in toyworld.generate_scenes(30, seed=2):
        covered = np.zeros(scene.labels.shape, dtype=bool)
        for obj in reversed(scene.objects):  # front to back
            visible = obj.mask & ~covered
            assert (scene.labels[visible] == obj.class_id).all()
            covered |= obj.mask
        # pixels no object touches are stuff
        assert np.isin(scene.labels[~covered], toyworld.STUFF_CLASSES).all()


def test_image_colour_of_visible_object_is_its_own():
    scene = next(s for s in toyworld.generate_scenes(50, seed=4) if len(s.objects) >= 2)
    front = scene.objects[-1]
    pixels = scene.image[front.mask].astype(float)
    # flat colour with at most ±15 % vertical shading
    assert np.abs(pixels.mean(0) - np.array(front.color)).max() < 0.2 * 255


def test_ring_hole_shows_what_lies_behind():
    for scene in toyworld.generate_scenes(200, seed=5):
        rings = [o for o in scene.objects if o.class_id == 6]
        if not rings or scene.objects[-1].class_id != 6:
            continue
        ring = scene.objects[-1]
        ys, xs = np.nonzero(ring.mask)
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        assert not ring.mask[cy, cx]
        assert scene.labels[cy, cx] != 6
        return
    pytest.fail("no scene with a ring in front among 200")


def test_colour_alone_does_not_identify_class():
    """Every class appears in widely different colours: per-instance mean colours spread over RGB."""
    colours: dict[int, list[np.ndarray]] = {c: [] for c in range(toyworld.NUM_CLASSES)}
    for scene in toyworld.generate_scenes(60, seed=6):
        for c in np.unique(scene.labels):
            colours[int(c)].append(scene.image[scene.labels == c].mean(0) / 255)
    for c, values in colours.items():
        values = np.stack(values)
        assert values.std(0).min() > 0.12, (toyworld.CLASS_NAMES[c], values.std(0))


def test_write_shards_round_trip(tmp_path):
    paths = toyworld.write_shards(tmp_path, num_images=5, seed=9, size=64, shard_size=2, progress=False)
    assert [os.path.basename(p) for p in paths] == [f"toyworld-{i:06d}.tar" for i in range(3)]
    assert not list(tmp_path.glob("*.tmp"))
    samples: dict[str, dict[str, bytes]] = {}
    for p in paths:
        with tarfile.open(p) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    assert len(samples) == 5
    for i, scene in enumerate(toyworld.generate_scenes(5, seed=9, size=64)):
        sample = samples[toyworld.scene_key(9, i)]
        image = np.array(Image.open(io.BytesIO(sample["png"])))
        gt = Image.open(io.BytesIO(sample["gt.png"]))
        assert gt.mode == "L"
        assert np.array_equal(image, scene.image)
        assert np.array_equal(np.array(gt), scene.labels)
        meta = json.loads(sample["json"])
        assert meta["index"] == i and meta["seed"] == 9 and meta["classes"] == list(toyworld.CLASS_NAMES)


def test_convert_cli_writes_requested_scenes(tmp_path, capsys):
    assert (
        convert(["toyworld", "--out", str(tmp_path), "--num-images", "3", "--seed", "1", "--size", "48"]) == 0
    )
    with tarfile.open(tmp_path / "toyworld-000000.tar") as tar:
        names = tar.getnames()
    assert sorted(n for n in names if n.endswith(".gt.png")) == [
        f"{toyworld.scene_key(1, i)}.gt.png" for i in range(3)
    ]
    assert "wrote 3 scenes" in capsys.readouterr().out


def test_too_small_scene_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="at least 32"):
        toyworld.generate_scene(0, size=16)


# ---- the shipped model --------------------------------------------------------------------------------------

needs_asset = pytest.mark.skipif(
    not (ASSET / "model_index.json").exists(), reason="toyworld-ldm not trained yet"
)


@needs_asset
def test_shipped_model_is_small_enough_to_commit():
    total = sum(f.stat().st_size for f in ASSET.rglob("*") if f.is_file())
    assert total <= 20 * 2**20, total


@needs_asset
def test_shipped_model_keeps_sd1_layout_and_feature_level_is_8x_coarser():
    unet = json.loads((ASSET / "unet" / "config.json").read_text())
    vae = json.loads((ASSET / "vae" / "config.json").read_text())
    sched = json.loads((ASSET / "scheduler" / "scheduler_config.json").read_text())
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet["layers_per_block"] == 2
    # the layers configs/toyworld.yaml reads and modulates run at least 8× coarser than the image
    config = yaml.safe_load((ASSET.parents[2] / "configs" / "toyworld.yaml").read_text())["model"]
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    for layer in (config["feature_layer"], config["modulated_layer"]):
        block = int(layer.split(".")[1])  # up_blocks.i runs at latent / 2^(3 - i)
        assert layer.startswith("up_blocks.") and vae_factor * 2 ** (3 - block) >= 8, layer
    assert 0.05 < vae["scaling_factor"] < 20
    assert sched["beta_schedule"] == "scaled_linear" and sched["steps_offset"] == 1
    assert sched["timestep_spacing"] == "leading" and sched["prediction_type"] == "epsilon"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (ASSET / sub).is_dir()


@needs_asset
def test_shipped_model_loads_offline_with_sd_layer_names():
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(ASSET, subfolder="unet", torch_dtype=torch.float32)
    names = set(unet.attn_processors)
    assert len(names) == 32
    for i in range(3):
        assert f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2.processor" in names
    tok = CLIPTokenizer.from_pretrained(ASSET, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(ASSET, subfolder="text_encoder")
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = text(ids)[0]
    assert emb.shape == (1, 77, unet.config.cross_attention_dim)
