"""The image-guided refiners of score maps (emerdiff_pl.refine) and their wiring into EmerDiffSegmenter."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from emerdiff_pl.refine import PAMR, check_refine_options, refine

EDGE = 32  # the image's colour edge: column where the right half starts


def _edge_image(batch: int, height: int, width: int) -> torch.Tensor:
    """Left half dark blue, right half light orange, with mild noise: one vertical colour edge at EDGE."""
    g = torch.Generator().manual_seed(0)
    image = torch.empty(batch, 3, height, width)
    image[..., :EDGE] = torch.tensor([0.1, 0.2, 0.6])[:, None, None]
    image[..., EDGE:] = torch.tensor([0.9, 0.6, 0.2])[:, None, None]
    return (image + 0.02 * torch.randn(image.shape, generator=g)).clamp(0, 1)


def _misaligned_scores(batch: int, height: int, width: int, boundary: int) -> torch.Tensor:
    """Two soft score maps whose argmax boundary sits at `boundary`, as an upsampled coarse mask would."""
    x = torch.arange(width).float()
    right = torch.sigmoid((x - boundary + 0.5) / 2.0).expand(batch, height, width)
    return torch.stack([1 - right, right], dim=1)


def _boundary_columns(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the first column labelled 1 (the argmax boundary)."""
    return (labels == 1).float().argmax(-1)


@pytest.mark.parametrize("method", ["guided", "bilateral", "pamr"])
@pytest.mark.parametrize("offset", [3, -3])
def test_refiner_moves_a_misaligned_boundary_to_the_image_edge(method, offset):
    image = _edge_image(2, 24, 64)
    scores = _misaligned_scores(2, 24, 64, EDGE + offset)
    assert (_boundary_columns(scores.argmax(1)) == EDGE + offset).all()
    refined = refine(scores, image, method, radius=6, eps=1e-2)
    assert refined.shape == scores.shape
    cols = _boundary_columns(refined.argmax(1))
    assert (cols - EDGE).abs().max() < abs(offset), f"{method}: boundary at {cols.unique().tolist()}"
    if method == "pamr":
        assert (cols == EDGE).all()


def test_refiner_guide_at_another_size_is_resized_to_the_scores():
    scores = _misaligned_scores(3, 24, 64, EDGE + 3)
    big = F.interpolate(_edge_image(3, 24, 64), size=(48, 128), mode="nearest")
    out = refine(scores, big, "pamr")
    assert out.shape == (3, 2, 24, 64)
    offset = (_boundary_columns(out.argmax(1)) - EDGE).abs()
    assert offset.max() < 3 and offset.float().mean() <= 1


def test_refine_none_returns_the_scores_themselves():
    scores = torch.rand(2, 5, 8, 8)
    assert refine(scores, torch.rand(2, 3, 16, 16), "none") is scores


def test_refiners_act_on_each_image_of_a_batch_alone():
    image, scores = _edge_image(2, 24, 64), _misaligned_scores(2, 24, 64, EDGE + 3)
    image[1] = image[1].flip(-1)  # the second image's edge is elsewhere
    for method in ("guided", "bilateral", "pamr"):
        both = refine(scores, image, method)
        first = refine(scores[:1], image[:1], method)
        assert torch.allclose(both[:1], first, atol=1e-5), method


def test_pamr_weights_are_a_softmax_over_neighbours_and_ignore_flat_regions():
    pamr = PAMR(iterations=1, dilations=(1, 2))
    weights = pamr.affinity(_edge_image(1, 16, 64))
    assert weights.shape == (1, 16, 16, 64)
    assert torch.allclose(weights.sum(1), torch.ones(1, 16, 64), atol=1e-5)
    flat = PAMR(iterations=3, dilations=(1,))(torch.ones(1, 2, 8, 8), torch.full((1, 3, 8, 8), 0.5))
    assert torch.allclose(flat, torch.ones(1, 2, 8, 8))


def test_pamr_affinity_scale_is_a_tenth_of_the_local_std_averaged_over_channels():
    # one row [0, 1] in channel 0 and a flat channel 1, dilation 1 (edges replicated). Pixel (0, 0)'s 8
    # neighbours: the 3 on its right read 1, the other 5 read 0. Its neighbourhood for σ is those 8 plus itself:
    # six 0s and three 1s, mean 1/3, unbiased variance (3 − 9·(1/3)²) / 8 = 1/4, σ = 1/2, so the scale is
    # 0.1·σ = 0.05: a neighbour that differs by 1 has logit −1 / 0.05 = −20 in channel 0 and 0 in the flat
    # channel (σ = 0 there), −10 averaged; the equal ones 0. Softmax: e^−10 / (5 + 3·e^−10) and 1 / (5 + 3·e^−10).
    # A scale of σ, of 0.1·var, of a biased σ or of the image-wide σ gives other weights.
    image = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.5]]]])  # (B, C, H, W) = (1, 2, 1, 2)
    weights = PAMR(iterations=1, dilations=(1,)).affinity(image)  # (1, 8, 1, 2)
    near, far = 1 / (5 + 3 * math.exp(-10)), math.exp(-10) / (5 + 3 * math.exp(-10))
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]  # PAMR's order
    # pixel (0, 0): its neighbours on the right hold the other value; pixel (0, 1): mirrored
    expected_left = torch.tensor([far if dx == 1 else near for _, dx in offsets])
    expected_right = torch.tensor([far if dx == -1 else near for _, dx in offsets])
    torch.testing.assert_close(weights[0, :, 0, 0].log(), expected_left.log(), atol=1e-4, rtol=0)
    torch.testing.assert_close(weights[0, :, 0, 1].log(), expected_right.log(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["guided", "bilateral", "pamr"])
@pytest.mark.parametrize("size", [(1, 1), (1, 6), (3, 2), (5, 5)])
def test_refiner_on_a_map_smaller_than_its_window_keeps_the_shape_and_stays_finite(method, size):
    # radius 8 (a 17-px window) and PAMR's dilations up to 24 reach far past maps of a few pixels
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 3, *size, generator=g)
    image = torch.rand(2, 3, 4 * size[0], 4 * size[1], generator=g)
    out = refine(scores, image, method, radius=8, eps=1e-2)
    assert out.shape == scores.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "crf"},
        {"method": "pamr", "iterations": 0},
        {"method": "pamr", "dilations": []},
        {"method": "guided", "radius": 0},
        {"method": "bilateral", "eps": 0.0},
    ],
)
def test_bad_refine_options_are_rejected_by_name(kwargs):
    args = {"method": "none", "iterations": 10, "dilations": (1,), "radius": 4, "eps": 1e-3, **kwargs}
    with pytest.raises(ValueError, match="refine"):
        check_refine_options(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["guided", "bilateral", "pamr"])
def test_refiners_agree_on_cpu_and_cuda(method):
    image, scores = _edge_image(2, 24, 64), _misaligned_scores(2, 24, 64, EDGE + 3)
    cpu = refine(scores, image, method)
    gpu = refine(scores.cuda(), image.cuda(), method)
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# wiring into EmerDiffSegmenter
# ----------------------------------------------------------------------------------------------------------------


def test_segmenter_rejects_an_unknown_refiner_before_loading_anything():
    from emerdiff_pl import EmerDiffSegmenter

    with pytest.raises(ValueError, match="refine must be one of"):
        EmerDiffSegmenter(pretrained="tiny-random", refine="crf")


def test_segmenter_refine_none_is_todays_bilinear_argmax_and_pamr_changes_labels_and_is_timed():
    from conftest import FAST_SEGMENTER, smooth_images

    from emerdiff_pl import EmerDiffSegmenter

    images = smooth_images(2)
    args = {**FAST_SEGMENTER, "method": "lowres_bilinear"}
    plain = EmerDiffSegmenter(**args).segment(images)
    # today's baseline, written out: one-hot low-res masks, bilinear to the resolution, argmax, nearest
    k, size = args["num_masks"], args["resolution"]
    one_hot = F.one_hot(plain.lowres_labels, k).permute(0, 3, 1, 2).float()
    scores = F.interpolate(one_hot, size=(size, size), mode="bilinear", align_corners=False)
    expected = F.interpolate(
        scores.argmax(1, keepdim=True).float(), size=images.shape[-2:], mode="nearest-exact"
    )
    assert torch.equal(plain.labels, expected.squeeze(1).long())
    assert "refine_s" not in plain.timings

    refined = EmerDiffSegmenter(**args, refine="pamr", refine_iterations=5, refine_dilations=(1, 2)).segment(
        images
    )
    assert torch.equal(refined.lowres_labels, plain.lowres_labels)
    assert refined.timings["refine_s"] >= 0
    assert not torch.equal(refined.labels, plain.labels)
    expected_pamr = refine(scores, images, "pamr", iterations=5, dilations=(1, 2)).argmax(1)
    assert torch.equal(refined.labels, expected_pamr)
