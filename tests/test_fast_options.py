"""Throughput options of EmerDiffSegmenter (channels_last, compile, decoder: taesd | latent) on tiny-random weights,
and the shipped toy-model TAESD."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re

import pytest
import torch
import torch._dynamo
from conftest import FAST_SEGMENTER, smooth_images
from torch._dynamo.utils import counters

from emerdiff_pl import EmerDiffSegmenter, method
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
@pytest.mark.parametrize(("decoder", "min_changed"), [("taesd", 0.01), ("latent", 0.001)])
def test_branch_decoders_agree_between_naive_and_fast_paths(vae_labels, difference, decoder, min_changed):
    options = TAESD if decoder == "taesd" else {"decoder": "latent"}
    model = EmerDiffSegmenter(**FAST, **options, difference=difference)
    images = smooth_images(1, seed=1)
    fast = model.segment(images)
    naive = model.segment(images, naive=True)
    assert torch.equal(fast.lowres_labels, naive.lowres_labels)
    # Equal up to float rounding (batched vs one-at-a-time convolutions differ by ~4e-7): here one pixel
    # of 4096 has its two best masks 5e-8 apart and flips. A wrong row → mask mapping disagrees widely.
    assert (fast.labels == naive.labels).float().mean().item() >= 0.999
    # the reference pass does not decode: same low-res masks as with the VAE, different labels (another decoder)
    lowres, labels = vae_labels
    assert torch.equal(fast.lowres_labels, lowres)
    assert (fast.labels != labels).float().mean().item() > min_changed
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
    with pytest.raises(ValueError, match="model.decoder must be one of vae, taesd, latent"):
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
    from emerdiff_pl.runtime import auto_branch_rows

    assert auto_branch_rows(140e9, 512) == 16  # plenty of memory: the measured saturation point
    assert auto_branch_rows(140e9, 256) == 64  # the cap scales with the area
    assert auto_branch_rows(12.5e9, 512) == 7  # 70 % of 12.5 GB at 1.2 GB per bf16 row
    assert auto_branch_rows(12.5e9, 512, itemsize=4) == 3  # float32 rows cost twice as much
    assert auto_branch_rows(1e9, 512) == 2  # never below one mask's two signs


# ---- decoder: latent ------------------------------------------------------------------------------------------
LATENT = dict(decoder="latent")


def test_latent_decoder_is_the_latents_upsampled_bilinearly():
    model = EmerDiffSegmenter(**FAST, **LATENT)
    model.configure_model()
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model.decode(z, chunk=1)
    assert out.shape == (2, 4, 64, 64)  # the tiny-random VAE's ×2, the latent channels kept
    # interior pixel (1, 1) of the ×2 bilinear grid (align_corners False): 9/16, 3/16, 3/16, 1/16 of its latents
    want = (9 * z[..., 0, 0] + 3 * z[..., 0, 1] + 3 * z[..., 1, 0] + z[..., 1, 1]) / 16
    torch.testing.assert_close(out[..., 1, 1], want)
    torch.testing.assert_close(out, torch.nn.functional.interpolate(z, scale_factor=2, mode="bilinear"))


def test_latent_decoder_maps_are_the_latent_difference_norms():
    """With σ 0 the two-sided map of a mask is ‖up(z⁻) − up(z⁺)‖ over the latent channels, computed here from
    the branch latents the fast path ends at."""
    model = EmerDiffSegmenter(**{**FAST, "gaussian_sigma": 0.0}, **LATENT)
    images = smooth_images(1, seed=1)
    model.segment(images)  # load
    seen = []
    decode = model.decode
    model.decode = lambda z, chunk: seen.append(z.clone()) or decode(z, chunk)
    x0, frozen = model.encode(images), model.frozen_model()
    trajectory, features = method.reference_pass(frozen, x0, [0], model.config, "qk")
    lowres, _ = method.lowres_masks(features, [0], tuple(x0.shape[-2:]), model.config)
    maps = method.difference_maps(frozen, trajectory, lowres, model.config)
    z = torch.cat(seen)
    up = torch.nn.functional.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(maps[0], (up[0::2] - up[1::2]).norm(dim=1))


# ---- the shipped TAESD of the toy model -----------------------------------------------------------------------
TOY = os.path.join(os.path.dirname(__file__), "..", "emerdiff_pl", "assets")
needs_toy_taesd = pytest.mark.skipif(
    not os.path.exists(os.path.join(TOY, "toyworld-taesd", "config.json")),
    reason="toyworld-taesd not distilled",
)


@needs_toy_taesd
def test_shipped_toy_taesd_loads_by_name_and_matches_the_toy_vae():
    """`taesd_model: toyworld-taesd` loads the distilled decoder; on held-out scenes it reproduces the toy VAE's
    decode (PSNR ≥ 20 dB, images in [-1, 1]) where a random one of the same shape does not (< 12 dB)."""
    import numpy as np
    from diffusers import AutoencoderKL

    from emerdiff_pl.datasets import toyworld

    vae = AutoencoderKL.from_pretrained(os.path.join(TOY, "toyworld-ldm", "vae")).eval()
    taesd = load_taesd("toyworld-taesd", vae)
    scenes = np.stack([s.image for s in toyworld.generate_scenes(4, 4242, 128)])
    x = torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        teacher = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
        student = taesd.decode(z).sample.clamp(-1, 1)
        random = tiny_random_taesd(vae).decode(z).sample.clamp(-1, 1)

    def psnr(a):
        return 10 * torch.log10(4 / ((a - teacher) ** 2).mean()).item()

    assert psnr(student) >= 20.0, psnr(student)
    assert psnr(random) < 12.0, psnr(random)


@needs_toy_taesd
def test_shipped_toy_taesd_passes_the_config_checks():
    from emerdiff_pl.validation import check_model_settings

    base = {"pretrained": "toyworld-ldm", "resolution": 128, "decoder": "taesd"}
    check_model_settings({**base, "taesd_model": "toyworld-taesd"})  # no error
    from emerdiff_pl.validation import UserError

    with pytest.raises(UserError, match="not an AutoencoderTiny folder"):
        check_model_settings({**base, "taesd_model": "toyworld-no-such-taesd"})
