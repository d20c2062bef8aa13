"""docs/method.md properties of EmerDiffSegmenter on tiny-random weights (CPU, seconds)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST_SEGMENTER, changed_settings, smooth_images
from diffusers import DDPMScheduler

from emerdiff_pl import EmerDiffSegmenter, SegmentationResult, method
from emerdiff_pl.inversion import NoiseSchedule

FAST = FAST_SEGMENTER


@pytest.fixture(scope="module")
def model() -> EmerDiffSegmenter:
    m = EmerDiffSegmenter(**FAST)
    m.configure_model()
    return m


def _trajectory(m: EmerDiffSegmenter, images: torch.Tensor, record: str = "qk"):
    m._ensure_ready()
    m.controller.tokens = {}
    x0 = m.encode(images)
    return method.reference_pass(m.frozen_model(), x0, [m.config.seed] * len(images), m.config, record)


def _lowres(
    m: EmerDiffSegmenter, trajectory, features, seeds: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    return method.lowres_masks(features, seeds, tuple(trajectory.latents.shape[-2:]), m.config)


def _maps(m: EmerDiffSegmenter, trajectory, lowres: torch.Tensor) -> torch.Tensor:
    return method.difference_maps(m.frozen_model(), trajectory, lowres, m.config)


def _replay(m: EmerDiffSegmenter, trajectory, inject: bool) -> list[torch.Tensor]:
    """Run every image's branch from x_{t_m} with no modulation; return x_t at every step, then x_0."""
    path: list[torch.Tensor] = []
    rows = torch.arange(trajectory.latents.shape[1])
    path.append(method.denoise_branches(m.frozen_model(), trajectory, rows, None, inject, path=path))
    return path


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("inject", [False, True], ids=["plain", "injected"])
def test_unmodulated_run_reproduces_trajectory(model, prediction_type, inject):
    schedule = model.schedule
    config = dict(model.backbone.scheduler.config)
    model.schedule = NoiseSchedule(DDPMScheduler.from_config(config, prediction_type=prediction_type))
    try:
        trajectory, _ = _trajectory(model, smooth_images(2))
        path = _replay(model, trajectory, inject)
    finally:
        model.schedule = schedule
    assert len(path) == len(trajectory.timesteps) + 1
    scale = trajectory.latents.abs().max().item()
    for s in range(len(trajectory.timesteps)):
        err = (path[s] - trajectory.latents[s]).abs().max().item()
        assert err < 1e-4 * scale, f"step {s} (t={trajectory.timesteps[s]}): max error {err}"
    assert (path[-1] - trajectory.final).abs().max().item() < 1e-4 * scale
    # the noise actually matters: without z the run leaves the trajectory
    assert trajectory.noise[:-1].abs().mean() > 0.1


def test_zero_strength_makes_every_difference_map_zero(model):
    trajectory, features = _trajectory(model, smooth_images(1))
    lowres, _ = _lowres(model, trajectory, features, [0])
    with changed_settings(model, modulation_strength=0.0):
        maps = _maps(model, trajectory, lowres)
    assert maps.shape == (1, 4, 64, 64)
    assert maps.abs().max().item() < 1e-5
    # and with λ = 10 they are not
    trajectory, _ = _trajectory(model, smooth_images(1))
    assert _maps(model, trajectory, lowres).abs().mean().item() > 1e-3


def test_vectorized_path_equals_per_mask_per_sign_loop():
    # the fast path runs both images in one batch of branch rows; the naive loop runs the second image alone,
    # so a wrong row → image mapping in the fast path shows up as a mismatch
    model = EmerDiffSegmenter(**{**FAST, "num_masks": 3})
    images = smooth_images(2, seed=1)
    fast = model.segment(images)
    naive = model.segment(images[1:], naive=True)
    assert torch.equal(fast.lowres_labels[1], naive.lowres_labels[0])
    assert torch.equal(fast.labels[1], naive.labels[0])


def test_injection_from_cached_qk_equals_explicit_probabilities(model):
    images = smooth_images(1, seed=2)
    trajectory, features = _trajectory(model, images, record="qk")
    lowres, _ = _lowres(model, trajectory, features, [0])
    from_qk = _maps(model, trajectory, lowres)
    trajectory, _ = _trajectory(model, images, record="probs")
    from_probs = _maps(model, trajectory, lowres)
    torch.testing.assert_close(from_qk, from_probs, atol=1e-4, rtol=1e-3)
    # injection is not a no-op: without it the maps differ
    with changed_settings(model, attention_injection=False):
        trajectory, _ = _trajectory(model, images, record="none")
        plain = _maps(model, trajectory, lowres)
    assert (plain - from_qk).abs().max().item() > 1e-3


def test_batch_and_chunk_size_do_not_change_labels(model):
    images = smooth_images(3, seed=3)
    together = model.segment(images)
    for i in range(3):
        alone = model.segment(images[i : i + 1])
        assert torch.equal(alone.labels[0], together.labels[i])
        assert torch.equal(alone.lowres_labels[0], together.lowres_labels[i])
    with changed_settings(model, max_branch_batch=2):
        chunked = model.segment(images)
    assert torch.equal(chunked.labels, together.labels)


def test_outputs_have_input_size_and_valid_ids(model):
    images = smooth_images(2, seed=4, size=64)
    images = F.interpolate(images, size=(37, 90), mode="bilinear")
    result = model.segment(images)
    assert result.labels.shape == (2, 37, 90) and result.labels.dtype == torch.int64
    assert result.lowres_labels.shape == (2, 8, 16)  # keep_aspect: 37×90 → 64×128 model input
    assert result.labels.min() >= 0 and result.labels.max() < 4
    # every low-res mask is non-empty, and each embedding is the mean feature of its mask
    for b in range(2):
        assert set(result.lowres_labels[b].unique().tolist()) == {0, 1, 2, 3}
    assert result.mask_embeddings.shape[:2] == (2, 4) and torch.isfinite(result.mask_embeddings).all()


def test_mask_embeddings_are_mask_means(model):
    trajectory, features = _trajectory(model, smooth_images(1, seed=5))
    lowres, embeddings = _lowres(model, trajectory, features, [0])
    flat = lowres.flatten(1)
    for k in range(4):
        torch.testing.assert_close(embeddings[0, k], features[0][flat[0] == k].mean(0))


def test_lowres_bilinear_shares_the_lowres_masks():
    images = smooth_images(2, seed=6)
    emerdiff = EmerDiffSegmenter(**FAST).segment(images)
    baseline = EmerDiffSegmenter(**FAST, method="lowres_bilinear").segment(images)
    assert torch.equal(emerdiff.lowres_labels, baseline.lowres_labels)
    # the baseline is the bilinear upsampling of the one-hot low-res masks
    one_hot = F.one_hot(baseline.lowres_labels, 4).permute(0, 3, 1, 2).float()
    expected = F.interpolate(one_hot, size=64, mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(baseline.labels, expected)
    assert not torch.equal(emerdiff.labels, baseline.labels)


def test_labels_are_spatially_aligned_with_lowres_masks():
    """Modulating mask i changes the image mostly where mask i is (convolutions are local and the upsampling
    path keeps positions), so even with random weights the argmax follows the low-res map. Measured on these
    inputs: agreement ≈ 0.58, transposed map ≈ 0.30, chance (Σ p_k q_k) ≈ 0.18. A flattened/transposed mask or a
    label map in the wrong order falls to the transposed or chance level."""
    model = EmerDiffSegmenter(**{**FAST, "num_masks": 6, "gaussian_sigma": 2.0})
    result = model.segment(smooth_images(3, seed=0))
    lowres = result.lowres_labels[:, None].float()
    up = F.interpolate(lowres, size=64, mode="nearest-exact")[:, 0].long()
    up_t = F.interpolate(lowres.transpose(2, 3), size=64, mode="nearest-exact")[:, 0].long()
    agree = (up == result.labels).float().mean().item()
    agree_t = (up_t == result.labels).float().mean().item()
    p = F.one_hot(result.labels, 6).float().mean((1, 2))
    q = F.one_hot(up, 6).float().mean((1, 2))
    chance = (p * q).sum(1).mean().item()
    assert agree > 2 * chance, (agree, chance)
    assert agree > agree_t + 0.15, (agree, agree_t)


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="valid names"):
        EmerDiffSegmenter(**{**FAST, "modulated_layer": "up_blocks.9.attn2"}).configure_model()
    with pytest.raises(ValueError, match="exceeds the 64 feature vectors"):
        EmerDiffSegmenter(**{**FAST, "num_masks": 65}).segment(smooth_images(1))
    with pytest.raises(ValueError, match="not on the 10-step schedule"):
        EmerDiffSegmenter(**{**FAST, "modulation_timestep": 281}).configure_model()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        EmerDiffSegmenter(**FAST).segment(torch.rand(1, 64, 64))
    with pytest.raises(ValueError, match="method"):
        EmerDiffSegmenter(method="nope")


def test_empty_batch_gives_empty_results(model):
    result = model.segment(torch.empty(0, 3, 64, 64))
    assert result.labels.shape == (0, 64, 64)


def test_one_sided_difference_uses_the_reference_decode(model):
    images = smooth_images(1, seed=7)
    one_sided = EmerDiffSegmenter(**{**FAST, "num_masks": 3}, difference="one_sided")
    fast = one_sided.segment(images)
    naive = one_sided.segment(images, naive=True)
    assert torch.equal(fast.labels, naive.labels)
    two_sided = EmerDiffSegmenter(**{**FAST, "num_masks": 3}).segment(images)
    assert torch.equal(fast.lowres_labels, two_sided.lowres_labels)
    assert (fast.labels == two_sided.labels).float().mean() > 0.5


def test_auto_dtype_is_float32_on_cpu(model):
    assert model.compute_dtype() == torch.float32 and model.unet.dtype == torch.float32


def test_out_of_memory_halves_the_chunk_and_keeps_the_labels(model, monkeypatch):
    images = smooth_images(1, seed=9)
    expected = model.segment(images)
    real_denoise, sizes = method.denoise_branches, []

    def denoise_with_a_small_gpu(frozen, trajectory, image, modulation, inject, path=None):
        sizes.append(len(image))
        if len(image) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_denoise(frozen, trajectory, image, modulation, inject, path)

    monkeypatch.setattr(method, "denoise_branches", denoise_with_a_small_gpu)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    result = model.segment(images)
    assert sizes[0] == 8 and sizes[1] == 4 and set(sizes[2:]) == {2}
    assert torch.equal(result.labels, expected.labels)


def test_prefix_modules_are_the_outermost_calls_finished_before_the_layer():
    from emerdiff_pl.prefix import prefix_modules

    calls = "+ +a +a.x -a.x -a +b +b.y -b.y +b.z +b.z.q -b.z.q -b.z +c -c +a -a -b -"
    order = [("enter" if e[0] == "+" else "exit", e[1:]) for e in calls.split()]
    # `a` runs again after `c` starts, so only its child a.x is shared; b is still running at c, its first
    # two children are done (b.z.q is inside b.z)
    assert prefix_modules(order, "c") == ["a.x", "b.y", "b.z"]


def test_tm_call_runs_the_prefix_once_per_image_with_the_same_maps(model):
    images = smooth_images(2, seed=5)
    trajectory, features = _trajectory(model, images)
    lowres, _ = _lowres(model, trajectory, features, [0, 0])
    names = list(model.prefix.modules)
    assert {"conv_in", "down_blocks.0", "mid_block", "up_blocks.0"} <= set(names)
    assert names[-1] == model.config.modulated_layer.removesuffix("attn2") + "norm2"
    seen: list[int] = []
    hook = model.unet.conv_in.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        shared = _maps(model, trajectory, lowres)
        rows = 2 * 2 * model.config.num_masks
        assert seen == [2] + [rows] * (len(trajectory.timesteps) - 1)  # t_m: one row per image
        model.prefix.remove()
        trajectory, _ = _trajectory(model, images)  # _difference_maps consumed the records
        seen.clear()
        plain = _maps(model, trajectory, lowres)
        assert seen == [rows] * len(trajectory.timesteps)
    finally:
        hook.remove()
        model.prefix.hook(names)
    assert plain.abs().mean() > 1e-3
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-4)


def test_reference_steps_in_one_batch_equal_one_call_per_step(model, monkeypatch):
    images = smooth_images(2, seed=10)
    runs = {}
    for rows in (2, "auto"):  # 2 rows per call: one step of the 2 images per call; auto: every step at once
        calls: list[int] = []
        real_unet = model.call_unet
        monkeypatch.setattr(
            model,
            "call_unet",
            lambda x, t, emb, calls=calls, real=real_unet: calls.append(len(x)) or real(x, t, emb),
        )
        try:
            with changed_settings(model, max_branch_batch=rows):
                trajectory, features = _trajectory(model, images)
        finally:
            monkeypatch.undo()
        runs[rows] = (calls, trajectory, features, {s: dict(r) for s, r in model.controller.saved.items()})
    steps = len(runs[2][1].timesteps)
    assert runs[2][0] == [2] * steps and runs["auto"][0] == [2 * steps]
    (_, one, f_one, saved_one), (_, batched, f_batched, saved_batched) = runs[2], runs["auto"]
    torch.testing.assert_close(batched.noise, one.noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.final, one.final, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f_batched, f_one, atol=1e-5, rtol=1e-5)
    assert saved_batched.keys() == saved_one.keys() == set(range(steps))
    for s in range(steps):  # every step's recorded Q, K and cross-attention outputs, filed under that step
        assert saved_batched[s].keys() == saved_one[s].keys()
        for name, record in saved_one[s].items():
            assert type(saved_batched[s][name]) is type(record)
            for field, tensor in vars(record).items():
                torch.testing.assert_close(
                    getattr(saved_batched[s][name], field), tensor, atol=1e-4, rtol=1e-4
                )


def test_out_of_memory_in_the_reference_pass_halves_the_steps_per_call(model, monkeypatch):
    images = smooth_images(1, seed=11)
    expected = model.segment(images)
    real_unet, sizes = model.call_unet, []

    def unet_on_a_small_gpu(x, t, emb):
        sizes.append(len(x))
        if len(x) > 1 and isinstance(t, torch.Tensor):  # reference calls carry per-row timesteps
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_unet(x, t, emb)

    monkeypatch.setattr(model, "call_unet", unet_on_a_small_gpu)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    result = model.segment(images)
    steps = len(model.timesteps)
    assert sizes[:2] == [steps, steps // 2] and sizes.count(1) >= steps
    assert torch.equal(result.labels, expected.labels)


def test_predict_step_resizes_labels_back_where_nearest_exact_puts_them(model, monkeypatch):
    """At a non-integer scale (64 → 37 rows, 64 → 45 columns) output pixel (y, x) takes the model-size label at
    (⌊(y + ½)·64/37⌋, ⌊(x + ½)·64/45⌋), the label under its centre; `nearest` (⌊y·64/37⌋) is off by one in places."""
    model_labels = torch.arange(64 * 64).view(1, 64, 64)  # every model-size pixel its own label
    monkeypatch.setattr(
        model,
        "segment",
        lambda images, **kwargs: SegmentationResult(model_labels, torch.zeros(1, 8, 8), torch.zeros(1, 4, 3)),
    )
    batch = {
        "image": torch.zeros(1, 3, 64, 64),
        "original": [None],
        "original_size": torch.tensor([[37, 45]]),
        "key": ["k"],
        "url": ["u"],
        "failures": [],
    }
    (labels,) = model.predict_step(batch)["labels"]
    rows = ((torch.arange(37) + 0.5) * 64 / 37).floor().long()
    cols = ((torch.arange(45) + 0.5) * 64 / 45).floor().long()
    assert labels.shape == (37, 45) and torch.equal(labels, model_labels[0][rows][:, cols])
