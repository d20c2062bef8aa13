"""The method's steps (docs/method.md §3–§6) and the attention controller, each against the bug it guards:
smoothing skipped, modulation at every step, features read at the wrong call, a naive path that reuses the fast
path's branch plan, a mask silently ignored. Tiny-random weights on the CPU, seconds each."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch
from conftest import FAST_SEGMENTER, smooth_images

from emerdiff_pl import EmerDiffSegmenter, method
from emerdiff_pl.attention import AttentionController, CrossOutput, QueryKey

FAST = FAST_SEGMENTER


@pytest.fixture(scope="module")
def model() -> EmerDiffSegmenter:
    m = EmerDiffSegmenter(**FAST)
    m.configure_model()
    m._ensure_ready()
    return m


def _gaussian(size: int, center: tuple[int, int], sigma: float) -> torch.Tensor:
    """exp(−r²/2σ²) around `center`, cut at ⌈3σ⌉ per axis and normalized: the filtered unit impulse."""

    def axis(c: int) -> torch.Tensor:
        x = torch.arange(size, dtype=torch.float64) - c
        g = torch.exp(-(x**2) / (2 * sigma**2)) * (x.abs() <= math.ceil(3 * sigma))
        return g / g.sum()

    return (axis(center[0])[:, None] * axis(center[1])[None, :]).float()


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_smoothing_turns_an_impulse_into_a_gaussian_of_width_sigma(sigma):
    maps = torch.zeros(1, 2, 48, 48)
    maps[0, 1, 20, 25] = 1.0
    out = method.smooth(maps, sigma)
    torch.testing.assert_close(out[0, 1], _gaussian(48, (20, 25), sigma), atol=1e-6, rtol=1e-4)
    assert out[0, 0].abs().max() == 0  # maps are filtered one by one
    # its width: the second moment along an axis is σ² (the ±3σ cut keeps 97 % of it)
    x = torch.arange(48.0) - 25
    variance = (out[0, 1].sum(0) * x**2).sum() / out[0, 1].sum()
    assert 0.95 * sigma**2 < variance < 1.0 * sigma**2


def test_sigma_zero_is_the_identity():
    maps = torch.rand(2, 3, 16, 16)
    assert torch.equal(method.smooth(maps, 0.0), maps)


@pytest.mark.parametrize("sigma", [2.0, 0.0])
def test_segment_assigns_from_the_smoothed_difference_maps(monkeypatch, sigma):
    """segment() hands `assign` the smoothed maps (σ = gaussian_sigma), not the raw ones."""
    impulse = torch.zeros(1, 4, 64, 64)
    impulse[0, 2, 30, 33] = 1.0
    monkeypatch.setattr(method, "difference_maps", lambda *args, **kwargs: impulse.clone())
    seen, real_assign = [], method.assign
    monkeypatch.setattr(
        method, "assign", lambda scores, size: seen.append(scores) or real_assign(scores, size)
    )
    EmerDiffSegmenter(**{**FAST, "gaussian_sigma": sigma}).segment(smooth_images(1))
    if sigma == 0:
        assert torch.equal(seen[0], impulse)
    else:
        torch.testing.assert_close(seen[0][0, 2], _gaussian(64, (30, 33), sigma), atol=1e-6, rtol=1e-4)


def test_modulation_is_added_at_the_tm_call_only(model):
    """A hook on the modulated layer sees its output = reference output + c·M_i at the t_m call and exactly the
    reference output at every later call."""
    images = smooth_images(2, seed=3)
    x0, config, frozen = model.encode(images), model.config, model.frozen_model()
    trajectory, features = method.reference_pass(frozen, x0, [0, 0], config, "qk")
    lowres, _ = method.lowres_masks(features, [0, 0], tuple(x0.shape[-2:]), config)
    plan = method.branch_plan(lowres, method.modulated_grid(frozen, trajectory, config), config)
    strength = config.modulation_strength
    assert set(plan.modulation.unique().tolist()) == {-strength, 0.0, strength}
    layer = config.modulated_layer
    outputs: list[torch.Tensor] = []
    hook = model.unet.get_submodule(layer).register_forward_hook(
        lambda m, a, out: outputs.append(out.clone())
    )
    try:
        method.denoise_branches(frozen, trajectory, plan.image, plan.modulation, inject=True)
    finally:
        hook.remove()
    saved, rows = model.controller.saved, plan.image
    model.controller.clear()
    assert len(outputs) == len(trajectory.timesteps) and trajectory.timesteps[0] == config.modulation_timestep
    for s, out in enumerate(outputs):
        reference = saved[s][layer]
        assert isinstance(reference, CrossOutput)
        added = out - reference.output[rows]
        if s == 0:  # every channel of every masked position gets ±λ
            torch.testing.assert_close(added, plan.modulation[:, :, None].expand_as(added), atol=1e-5, rtol=0)
        else:
            assert added.abs().max().item() == 0, f"step {s} (t={trajectory.timesteps[s]}) was modulated"


@pytest.mark.parametrize("feature_timestep", [1, 101, 901], ids=["last-step", "mid-step", "outside-span"])
def test_features_are_the_queries_of_the_tf_call(feature_timestep):
    """The vectors clustered are the feature layer's queries (to_q output) on the rows run at t_f, in image
    order; t_f outside the denoised span (901 > t_m) gets a call of its own."""
    m = EmerDiffSegmenter(**{**FAST, "feature_timestep": feature_timestep})
    m.configure_model()
    m._ensure_ready()
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    timestep: list[torch.Tensor] = []

    def pre(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        timestep.append(t.reshape(-1).expand(args[0].shape[0]).clone())

    to_q = m.unet.get_submodule(m.config.feature_layer).to_q
    handles = [
        m.unet.register_forward_pre_hook(pre, with_kwargs=True),
        to_q.register_forward_hook(lambda mod, a, out: calls.append((timestep[-1], out.float().clone()))),
    ]
    images = smooth_images(2, seed=4)
    try:
        _, features = method.reference_pass(m.frozen_model(), m.encode(images), [0, 0], m.config, "qk")
    finally:
        for h in handles:
            h.remove()
    at_tf = torch.cat([q[t == feature_timestep] for t, q in calls])
    assert at_tf.shape == features.shape == (2, 64, features.shape[-1])
    torch.testing.assert_close(features, at_tf, atol=0, rtol=0)
    at_tm = torch.cat([q[t == m.config.modulation_timestep] for t, q in calls])
    assert (at_tm - features).abs().max() > 1e-3  # the t_m queries are not the same vectors


def test_naive_path_builds_its_masks_without_the_branch_plan(monkeypatch):
    """The naive reference modulates with `lowres == i` itself, so `fast == naive` (test_segmenter) checks
    branch_plan instead of sharing its bugs."""
    model = EmerDiffSegmenter(**{**FAST, "num_masks": 2})
    images = smooth_images(1, seed=1)
    expected = model.segment(images)

    def no_plan(*args, **kwargs):
        raise AssertionError("the naive path called branch_plan")

    monkeypatch.setattr(method, "branch_plan", no_plan)
    naive = model.segment(images, naive=True)
    assert torch.equal(naive.labels, expected.labels)


def test_a_wrong_branch_plan_breaks_fast_equals_naive(monkeypatch):
    """The check the naive path exists for: give each branch row the next mask's modulation and the fast labels
    leave the naive ones."""
    model = EmerDiffSegmenter(**{**FAST, "num_masks": 3})
    images = smooth_images(1, seed=1)
    naive = model.segment(images, naive=True)
    real = method.branch_plan

    def shifted(*args, **kwargs):
        plan = real(*args, **kwargs)
        return method.BranchPlan(plan.image, plan.modulation.roll(2, dims=0), plan.two_sided)

    monkeypatch.setattr(method, "branch_plan", shifted)
    fast = model.segment(images)
    assert (fast.labels != naive.labels).float().mean() > 0.05


def test_an_attention_mask_is_an_error_not_ignored(model):
    ctl = AttentionController(model.config.feature_layer, model.config.modulated_layer)
    layer = model.unet.get_submodule(model.config.modulated_layer)
    hidden = torch.randn(1, 64, layer.to_q.in_features)
    context = torch.randn(1, 77, layer.to_k.in_features)
    mask = torch.ones(1, 1, 77, dtype=torch.bool)
    with ctl.reference(model.unet, "sdpa"), ctl.step(0, 1):
        with pytest.raises(NotImplementedError, match="attention_mask"):
            layer(hidden, encoder_hidden_states=context, attention_mask=mask)
        layer(hidden, encoder_hidden_states=context)  # recorded: a CrossOutput
    rows, modulation = torch.zeros(1, dtype=torch.long), torch.zeros(1, 64)
    with (
        ctl.branches(model.unet, "sdpa", rows, modulation, modulation_timestep=1),
        ctl.step(0, 1),
        pytest.raises(NotImplementedError, match="attention_mask"),
    ):
        layer(hidden, encoder_hidden_states=context, attention_mask=mask)


def test_controller_modes_install_and_restore_processors(model):
    ctl = AttentionController(model.config.feature_layer, model.config.modulated_layer)
    before = {name: type(p) for name, p in model.unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="outside"), ctl.step(0, 1):
        pass
    with ctl.reference(model.unet, "sdpa", record="qk"):
        assert {type(p).__name__ for p in model.unet.attn_processors.values()} == {"PlainProcessor"}
        with (
            pytest.raises(RuntimeError, match="already in reference mode"),
            ctl.reference(model.unet, "sdpa"),
        ):
            pass
        x = torch.randn(2, 4, 32, 32)
        with ctl.steps([0, 1], [201, 101]):
            model.call_unet(x, torch.tensor([201, 101]), model.backbone.empty_prompt_embedding())
    assert {name: type(p) for name, p in model.unet.attn_processors.items()} == before
    # records are typed and filed per step, one image each
    self_attn = model.config.modulated_layer.removesuffix("attn2") + "attn1"
    assert isinstance(ctl.saved[1][self_attn], QueryKey) and ctl.saved[1][self_attn].query.shape[0] == 1
    assert isinstance(ctl.saved[0][model.config.modulated_layer], CrossOutput)
    rows = torch.zeros(3, dtype=torch.long)
    modulation = torch.zeros(2, 64)
    with (
        pytest.raises(ValueError, match="modulation has 2 rows"),
        ctl.branches(model.unet, "sdpa", rows, modulation, 201),
    ):
        pass
