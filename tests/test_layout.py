"""Channels-last execution (emerdiff_pl.layout): the NHWC GroupNorm is GroupNorm, and it keeps NHWC."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from emerdiff_pl.backbone import tiny_random_components
from emerdiff_pl.layout import (
    ChannelsLastGroupNorm,
    ChannelsLastTransformer2DModel,
    group_norm_channels_last,
    to_channels_last,
)


@pytest.mark.parametrize("affine", [True, False])
def test_channels_last_group_norm_equals_group_norm(affine):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 64, 9, 7, generator=g) * 3 + 5).to(memory_format=torch.channels_last)
    weight = torch.randn(64, generator=g) if affine else None
    bias = torch.randn(64, generator=g) if affine else None
    got = group_norm_channels_last(x, 16, weight, bias, 1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(
        got, F.group_norm(x.contiguous(), 16, weight, bias, 1e-5), atol=2e-5, rtol=1e-5
    )


def test_channels_last_group_norm_in_bfloat16_is_as_close_as_the_stock_kernel():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 32, 16, 16, generator=g) * 4 - 3).bfloat16().to(memory_format=torch.channels_last)
    weight, bias = torch.randn(32, generator=g).bfloat16(), torch.randn(32, generator=g).bfloat16()
    exact = F.group_norm(x.float(), 8, weight.float(), bias.float(), 1e-5)
    got = group_norm_channels_last(x, 8, weight, bias, 1e-5)
    stock = F.group_norm(x, 8, weight, bias, 1e-5)
    assert got.dtype == torch.bfloat16
    assert (got.float() - exact).abs().max() <= 1.5 * (stock.float() - exact).abs().max()


def _unet_and_inputs(linear_projection: bool = False):
    unet = tiny_random_components()["unet"].eval()
    if linear_projection:  # SD 2.x: proj_in / proj_out are Linear layers on the token grid
        config = {k: v for k, v in unet.config.items() if k != "_use_default_values"}
        config["use_linear_projection"] = True
        unet = UNet2DConditionModel.from_config(config).eval()
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, nn.Linear) == linear_projection
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 32, 32, generator=g)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return unet, x, emb


@pytest.mark.parametrize("linear_projection", [False, True], ids=["sd1_conv_proj", "sd2_linear_proj"])
def test_to_channels_last_keeps_the_unet_output_and_swaps_every_norm_and_transformer(linear_projection):
    unet, x, emb = _unet_and_inputs(linear_projection)
    norms = sum(type(m) is nn.GroupNorm for m in unet.modules())
    with torch.no_grad():
        expected = unet(x, 10, encoder_hidden_states=emb).sample
        fast = to_channels_last(copy.deepcopy(unet))
        got = fast(x.to(memory_format=torch.channels_last), 10, encoder_hidden_states=emb).sample
    assert norms > 10
    assert sum(type(m) is ChannelsLastGroupNorm for m in fast.modules()) == norms
    assert not any(type(m) in (nn.GroupNorm, Transformer2DModel) for m in fast.modules())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


class _CountLayoutWork(TorchDispatchMode):
    """Counts, over 4-D activations, the stock GroupNorm kernel and the copies that change memory layout."""

    def __init__(self):
        super().__init__()
        self.group_norms = self.layout_copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            self.group_norms += func is torch.ops.aten.native_group_norm.default
            self.layout_copies += func is torch.ops.aten.clone.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("linear_projection", [False, True], ids=["sd1_conv_proj", "sd2_linear_proj"])
def test_channels_last_unet_runs_without_layout_copies(linear_projection):
    # on CUDA the stock GroupNorm kernel makes its input NCHW-contiguous (a strided copy) and returns NCHW,
    # which the next channels-last convolution copies back; Transformer2DModel's `.contiguous()` does the
    # same on the CPU too. After to_channels_last neither happens anywhere in the U-Net.
    unet, x, emb = _unet_and_inputs(linear_projection)
    x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        with _CountLayoutWork() as stock:
            unet.to(memory_format=torch.channels_last)(x, 10, encoder_hidden_states=emb)
        with _CountLayoutWork() as swapped:
            out = to_channels_last(unet)(x, 10, encoder_hidden_states=emb).sample
    transformers = sum(isinstance(m, Transformer2DModel) for m in unet.modules())
    assert stock.group_norms == sum(isinstance(m, nn.GroupNorm) for m in unet.modules()) > 10
    assert stock.layout_copies == transformers > 4
    assert swapped.group_norms == swapped.layout_copies == 0
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_an_unknown_diffusers_transformer_keeps_its_own_output_method(monkeypatch):
    # a diffusers release that reshapes this private method must not get the override (wrong arguments)
    def changed(self, hidden_states, residual, batch_size, height, width):  # one argument fewer
        raise AssertionError("the stock method is not what this test runs")

    monkeypatch.setattr(Transformer2DModel, "_get_output_for_continuous_inputs", changed)
    unet, _, _ = _unet_and_inputs()
    to_channels_last(unet)
    assert any(type(m) is Transformer2DModel for m in unet.modules())
    assert not any(type(m) is ChannelsLastTransformer2DModel for m in unet.modules())
    assert any(type(m) is ChannelsLastGroupNorm for m in unet.modules())
