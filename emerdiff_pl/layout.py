"""Channels-last execution on CUDA: weights in NHWC, and no layout copies between the layers.

Converting the weights is not enough. PyTorch's GroupNorm on CUDA makes its input NCHW-contiguous
(`group_norm` calls `input.contiguous()`; only the CPU kernel reads channels-last) and returns NCHW, so every
norm → conv pair pays two strided copies: NHWC → NCHW for the norm, NCHW → NHWC for the next cuDNN
convolution; and diffusers' Transformer2DModel ends with `.permute(0, 3, 1, 2).contiguous()`, two more per
attention block. Those copies were 26.5 % of the device time of a default image on an H200 (BENCHMARKS.md).
`ChannelsLastGroupNorm` normalizes the NHWC view itself: per-channel sums (float32 accumulation), per-group
statistics from them, one scale-and-shift pass written straight into an NHWC output; on CUDA as the Triton
kernels of `emerdiff_pl.triton_norm` (torch ops where those do not run: they took 17 % of the device time).
`ChannelsLastTransformer2DModel` hands `proj_out` the NHWC view it already has.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import Tensor, nn

from emerdiff_pl.config import GroupNormKernel

# GroupNormKernel (emerdiff_pl.config) is set per module: `to_channels_last(..., group_norm=)`,
# `set_group_norm_kernel`, or the segmenter's `group_norm_kernel` setting.
_triton_verdict: dict[torch.device, bool] = {}


def group_norm_channels_last(
    x: Tensor,
    groups: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    kernel: GroupNormKernel = "auto",
) -> Tensor:
    """F.group_norm for a channels-last (N, C, H, W) tensor; the result is channels-last, in x's dtype.

    `kernel` picks the CUDA implementation: Triton (`auto`: where a probe passes) or torch ops."""
    if (
        x.is_cuda
        and kernel != "torch"
        and not torch.compiler.is_compiling()  # inductor fuses the torch ops itself
        and math.prod(x.shape[1:]) < 2**31  # the kernels index one image's NHWC memory in int32
        and not (torch.is_grad_enabled() and _needs_grad(x, weight, bias))  # the kernels have no backward
        and (kernel == "triton" or _triton_works(x.device))
    ):
        from emerdiff_pl.triton_norm import group_norm_nhwc

        return group_norm_nhwc(x, groups, weight, bias, eps)
    return _group_norm_channels_last_torch(x, groups, weight, bias, eps)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _triton_works(device: torch.device) -> bool:
    """Once per device: do the Triton kernels compile here and match torch ops? (No: a warning, torch ops.)"""
    if device not in _triton_verdict:
        try:
            from emerdiff_pl.triton_norm import group_norm_nhwc

            gen = torch.Generator(device=device).manual_seed(0)
            # the production layout: several images, several statistics programs each, several row blocks each
            x = torch.randn(16, 128, 64, 64, device=device, generator=gen).contiguous(
                memory_format=torch.channels_last
            )
            w, b = (
                torch.randn(128, device=device, generator=gen),
                torch.randn(128, device=device, generator=gen),
            )
            err = (group_norm_nhwc(x, 32, w, b, 1e-5) - F.group_norm(x, 32, w, b, 1e-5)).abs().max().item()
            if not err < 1e-3:
                raise RuntimeError(f"differs from F.group_norm by {err:.3g}")
            _triton_verdict[device] = True
        except Exception as err:  # no Triton, no compiler, an unsupported GPU: the torch ops still work
            warnings.warn(
                f"Triton NHWC GroupNorm unavailable on {device} ({type(err).__name__}: {err}); "
                "using the slower torch-op version",
                stacklevel=3,
            )
            _triton_verdict[device] = False
    return _triton_verdict[device]


def _group_norm_channels_last_torch(
    x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    n, c, h, w = x.shape
    y = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view: x is NHWC in memory
    channel_mean = torch.mean(y, dim=1, dtype=torch.float32)  # (n, c)
    channel_square = torch.linalg.vector_norm(y, 2, dim=1, dtype=torch.float32).square() / (h * w)
    mean = channel_mean.view(n, groups, -1).mean(-1, keepdim=True)  # (n, groups, 1)
    var = (channel_square.view(n, groups, -1).mean(-1, keepdim=True) - mean.square()).clamp_min(0)
    gain = torch.rsqrt(var + eps).expand(n, groups, c // groups)
    if weight is not None:
        gain = gain * weight.float().view(1, groups, -1)
    shift = -mean * gain
    if bias is not None:
        shift = shift + bias.float().view(1, groups, -1)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    torch.addcmul(
        shift.reshape(n, 1, c), y, gain.reshape(n, 1, c), out=out.permute(0, 2, 3, 1).view(n, h * w, c)
    )
    return out


class ChannelsLastGroupNorm(nn.GroupNorm):
    """nn.GroupNorm that leaves channels-last 4-D inputs channels-last; any other input takes the stock path.

    `kernel` (class default `auto`; set per instance by `set_group_norm_kernel`) picks the CUDA implementation."""

    kernel: GroupNormKernel = "auto"

    def forward(self, x: Tensor) -> Tensor:
        if _nhwc(x):
            return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps, self.kernel)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _nhwc(x: Tensor) -> bool:
    return x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class ChannelsLastTransformer2DModel(Transformer2DModel):
    """Transformer2DModel whose output stays NHWC: the token grid (B, H·W, C) is already NHWC memory, so the
    permuted view goes to `proj_out` and the residual add as it is, instead of through `.contiguous()`."""

    def _get_output_for_continuous_inputs(
        self, hidden_states, residual, batch_size, height, width, inner_dim
    ):
        if not _nhwc(residual):
            return super()._get_output_for_continuous_inputs(
                hidden_states, residual, batch_size, height, width, inner_dim
            )
        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        return hidden_states + residual


def _overrides_match() -> bool:
    """Does this diffusers' Transformer2DModel end in the method (and signature) the subclass overrides?"""
    method = getattr(Transformer2DModel, "_get_output_for_continuous_inputs", None)
    if method is None:
        return False
    expected = ["self", "hidden_states", "residual", "batch_size", "height", "width", "inner_dim"]
    return list(inspect.signature(method).parameters) == expected


def set_group_norm_kernel(module: nn.Module, kernel: GroupNormKernel) -> nn.Module:
    """Pick the CUDA implementation of every ChannelsLastGroupNorm in `module`: `triton`, `torch` or `auto`."""
    if kernel not in ("auto", "triton", "torch"):
        raise ValueError(f"group_norm_kernel must be auto, triton or torch, got {kernel!r}")
    for child in module.modules():
        if isinstance(child, ChannelsLastGroupNorm):
            child.kernel = kernel
    return module


def to_channels_last(module: nn.Module, group_norm: GroupNormKernel = "auto") -> nn.Module:
    """Weights to channels-last; every nn.GroupNorm and Transformer2DModel to its NHWC-keeping subclass (the
    same module, parameters and hooks: only the class changes), the norms with the CUDA kernel `group_norm`.
    A diffusers whose Transformer2DModel no longer has the overridden method keeps its own (correct, with the
    layout copies)."""
    module.to(memory_format=torch.channels_last)
    swaps: dict[type, type] = {nn.GroupNorm: ChannelsLastGroupNorm}
    if _overrides_match():
        swaps[Transformer2DModel] = ChannelsLastTransformer2DModel
    for child in module.modules():
        if type(child) in swaps:
            child.__class__ = swaps[type(child)]
    return set_group_norm_kernel(module, group_norm)


__all__ = [
    "ChannelsLastGroupNorm",
    "ChannelsLastTransformer2DModel",
    "GroupNormKernel",
    "group_norm_channels_last",
    "set_group_norm_kernel",
    "to_channels_last",
]
