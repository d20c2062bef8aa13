"""Throughput options of EmerDiffSegmenter (channels_last, compile, decoder: taesd) on tiny-random weights."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re

import pytest
import torch
import torch._dynamo
from conftest import FAST_SEGMENTER, smooth_images
from torch._dynamo.utils import counters

from emerdiff_pl import EmerDiffSegmenter
from emerdiff_pl.backbone import load_taesd, tiny_random_components, tiny_random_taesd

FAST = {**FAST_SEGMENTER, "num_masks": 3}
TAESD = dict(decoder="taesd", taesd_model="tiny-random")


@pytest.fixture(scope="module")
def vae_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """(lowres labels, labels) of smooth_images(1, seed=1) with every option at its default."""
    result = EmerDiffSegmenter(**FAST).segment(smooth_images(1, seed=1))
    return result.lowres_labels, result.labels


def test_taesd_decodes_the_unet_latents_unscaled():
    model = EmerDiffSegmenter(**FAST, **TAESD)
    model.configure_model()
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    # diffusers' convention decode(latents / scaling_factor), and TAESD's scaling factor is 1.0
    assert model.taesd.config.scaling_factor == 1.0
    rgb = model.decode(z, chunk=1)
    assert rgb.shape == (2, 3, 64, 64)  # the tiny-random VAE's ×2
    torch.testing.assert_close(rgb, model.taesd.decode(z).sample)
    vae_rgb = model.vae.decode(z / model.vae.config.scaling_factor).sample
    assert (rgb - vae_rgb).abs().mean() > 1e-2  # the VAE decoder is not used


@pytest.mark.parametrize("difference", ["two_sided", "one_sided"])
def test_taesd_labels_agree_between_naive_and_fast_paths(vae_labels, difference):
    model = EmerDiffSegmenter(**FAST, **TAESD, difference=difference)
    images = smooth_images(1, seed=1)
    fast = model.segment(images)
    naive = model.segment(images, naive=True)
    assert torch.equal(fast.lowres_labels, naive.lowres_labels)
    # Equal up to float rounding (batched vs one-at-a-time convolutions differ by ~4e-7): here one pixel
    # of 4096 has its two best masks 5e-8 apart and flips. A wrong row → mask mapping disagrees widely.
    assert (fast.labels == naive.labels).float().mean().item() >= 0.999
    # the reference pass does not decode: same low-res masks as with the VAE, different labels (random TAESD)
    lowres, labels = vae_labels
    assert torch.equal(fast.lowres_labels, lowres)
    assert (fast.labels != labels).float().mean().item() > 0.01
    assert set(fast.labels.unique().tolist()) == {0, 1, 2}


def test_channels_last_on_cpu_changes_nothing(vae_labels):
    model = EmerDiffSegmenter(**FAST, channels_last=True)
    result = model.segment(smooth_images(1, seed=1))
    assert torch.equal(result.lowres_labels, vae_labels[0]) and torch.equal(result.labels, vae_labels[1])
    weight = model.unet.conv_in.weight  # CPU: the memory format is left alone
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)


def test_taesd_folder_loads_like_the_in_process_model(tmp_path):
    vae = tiny_random_components()["vae"]
    tiny_random_taesd(vae).save_pretrained(tmp_path / "taesd")
    from_folder = load_taesd(str(tmp_path / "taesd"), vae)
    in_process = load_taesd("tiny-random", vae)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_folder.decode(z).sample, in_process.decode(z).sample)


def test_bad_decoder_settings_are_clear_errors(tmp_path):
    missing = tmp_path / "no-such-taesd"
    with pytest.raises(
        FileNotFoundError, match=rf"taesd_model={re.escape(repr(str(missing)))} is not a folder"
    ):
        EmerDiffSegmenter(**FAST, decoder="taesd", taesd_model=str(missing)).configure_model()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks config\.json"):
        EmerDiffSegmenter(**FAST, decoder="taesd", taesd_model=str(empty)).configure_model()
    with pytest.raises(OSError, match=r"download it once .* pass taesd_model=/path/taesd"):
        EmerDiffSegmenter(**FAST, decoder="taesd", taesd_model="example-org/not-a-taesd").configure_model()
    # the full-size TAESD upsamples ×8; the tiny-random VAE's latents are ×2
    with pytest.raises(
        ValueError, match=r"upsampling ×8, but the backbone's VAE has 4-channel latents at ×2"
    ):
        EmerDiffSegmenter(**FAST, decoder="taesd", taesd_model="sd14-arch").configure_model()
    with pytest.raises(ValueError, match="decoder must be vae or taesd"):
        EmerDiffSegmenter(**FAST, decoder="tiny")


@pytest.mark.slow
def test_compiled_unet_traces_one_graph_for_every_step(vae_labels, monkeypatch):
    """Dynamo only (backend `eager`): Inductor's code generation takes minutes on a CPU. Three denoising
    steps, two segment() calls: one U-Net graph for the reference pass, one for the branches, one for the
    branch decoder; naive stays eager."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="eager", **kw)
    )
    torch._dynamo.reset()
    counters.clear()
    try:
        model = EmerDiffSegmenter(**FAST, compile=True)
        images = smooth_images(1, seed=1)
        first, second = model.segment(images), model.segment(images)
        graphs = counters["stats"]["unique_graphs"]
        naive = model.segment(images, naive=True)
        assert counters["stats"]["unique_graphs"] == graphs  # naive=True ran eagerly
    finally:
        torch._dynamo.reset()
    assert graphs == 3, f"{graphs} graphs for 3 steps × (reference, branches) + decoder"
    for result in (first, second, naive):
        assert torch.equal(result.lowres_labels, vae_labels[0]) and torch.equal(result.labels, vae_labels[1])


def test_auto_branch_rows_caps_at_saturation_and_fits_free_memory():
    from emerdiff_pl.segmenter import auto_branch_rows

    assert auto_branch_rows(140e9, 512) == 16  # plenty of memory: the measured saturation point
    assert auto_branch_rows(140e9, 256) == 64  # the cap scales with the area
    assert auto_branch_rows(12.5e9, 512) == 7  # 70 % of 12.5 GB at 1.2 GB per bf16 row
    assert auto_branch_rows(12.5e9, 512, itemsize=4) == 3  # float32 rows cost twice as much
    assert auto_branch_rows(1e9, 512) == 2  # never below one mask's two signs
