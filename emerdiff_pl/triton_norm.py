"""GroupNorm of a channels-last activation in three Triton kernels (CUDA; the CPU runs them in Triton's interpreter
for the tests).

PyTorch has no NHWC GroupNorm on CUDA, and the same arithmetic written in torch ops
(`emerdiff_pl.layout._group_norm_channels_last_torch`) spent 17 % of a default image's device time on an H200:
its scale-and-shift is a mixed-dtype broadcast that falls to PyTorch's generic elementwise kernel (86 µs where
reading and writing the tensor takes about 9), and its two statistics passes each read the tensor again. Here:

1. `_partial_sums`: each program reads a (rows × channels) tile of the NHWC memory, coalesced along the
   channels, and writes float32 per-channel sums and sums of squares over its rows;
2. `_group_gain_shift`: one program per (image, group) adds the partials of its channels into the group's mean and
   variance and writes each channel's gain `w · rstd` and shift `b − mean · gain` (float32);
3. `_scale_shift`: out = x · gain + shift, written NHWC in x's dtype.

The partials are added in a fixed order: the result does not depend on scheduling (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE = 4096  # elements per program tile: 8 KiB of bf16
GRID_Y_MAX = 65535  # CUDA's limit on grid axes 1 and 2; more row blocks go on axis 0
PROGRAMS = 1024  # statistics programs to aim for (a few per SM); fewer rows per program adds partials


@triton.jit
def _partial_sums(x_ptr, part_ptr, HW, C, ROWS, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    cb = tl.program_id(2)
    splits = tl.num_programs(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = s * ROWS
    for r in range(0, ROWS, BLOCK_P):
        p = start + r + tl.arange(0, BLOCK_P)
        mask = (p[:, None] < HW) & c_ok[None, :]
        v = tl.load(x_ptr + n * HW * C + p[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(v, axis=0)
        acc_sq += tl.sum(v * v, axis=0)
    base = (n * splits + s) * 2 * C
    tl.store(part_ptr + base + c, acc, mask=c_ok)
    tl.store(part_ptr + base + C + c, acc_sq, mask=c_ok)


@triton.jit
def _group_gain_shift(
    part_ptr, w_ptr, b_ptr, gain_ptr, shift_ptr, SPLITS, C, CG, count, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    groups = C // CG
    n = pid // groups
    g = pid % groups
    c = g * CG + tl.arange(0, BLOCK_CG)
    c_ok = tl.arange(0, BLOCK_CG) < CG
    acc = tl.zeros((BLOCK_S, BLOCK_CG), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_S, BLOCK_CG), dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s[:, None] < SPLITS) & c_ok[None, :]
        base = (n * SPLITS + s[:, None]) * 2 * C + c[None, :]
        acc += tl.load(part_ptr + base, mask=mask, other=0.0)
        acc_sq += tl.load(part_ptr + base + C, mask=mask, other=0.0)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
    var = tl.maximum(tl.sum(tl.sum(acc_sq, axis=1), axis=0) / count - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    gain = tl.zeros((BLOCK_CG,), dtype=tl.float32) + rstd
    if HAS_W:
        gain = gain * tl.load(w_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
    shift = -mean * gain
    if HAS_B:
        shift += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(gain_ptr + n * C + c, gain, mask=c_ok)
    tl.store(shift_ptr + n * C + c, shift, mask=c_ok)


@triton.jit
def _scale_shift(
    x_ptr, out_ptr, gain_ptr, shift_ptr, HW, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ROWS_ON_AXIS_0: tl.constexpr,
):  # fmt: skip
    if ROWS_ON_AXIS_0:  # more row blocks than grid axis 1 holds (a decoder norm above ≈ 1450² pixels)
        n = tl.program_id(1).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    else:
        n = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    gain = tl.load(gain_ptr + n * C + c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + n * C + c, mask=c_ok, other=0.0)
    mask = (p[:, None] < HW) & c_ok[None, :]
    offs = n * HW * C + p[:, None] * C + c[None, :]
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = v * gain[None, :] + shift[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def group_norm_nhwc(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """F.group_norm of an (N, C, H, W) tensor, read as channels-last (converted if it is not); the result is
    channels-last, in x's dtype. No autograd: inference only."""
    n, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"GroupNorm: {c} channels do not split into {groups} groups")
    if x.is_cuda and x.device.index != torch.cuda.current_device():  # Triton launches on the current device
        with torch.cuda.device(x.device):
            return group_norm_nhwc(x, groups, weight, bias, eps)
    x = x.contiguous(memory_format=torch.channels_last)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.channels_last)
    hw, cg = h * w, c // groups
    block_c = next((b for b in (128, 64, 32, 16) if c % b == 0), min(128, triton.next_power_of_2(c)))
    block_p = max(1, TILE // block_c)
    c_blocks = triton.cdiv(c, block_c)
    # Rows per statistics program: a multiple of block_p, enough programs to fill the device, few partials.
    splits = max(1, min(triton.cdiv(hw, block_p), PROGRAMS // max(1, n * c_blocks)))
    rows = triton.cdiv(triton.cdiv(hw, splits), block_p) * block_p
    splits = triton.cdiv(hw, rows)
    f32 = dict(device=x.device, dtype=torch.float32)
    part = torch.empty(n, splits, 2, c, **f32)
    _partial_sums[(n, splits, c_blocks)](x, part, hw, c, rows, BLOCK_P=block_p, BLOCK_C=block_c)
    gain, shift = torch.empty(n, c, **f32), torch.empty(n, c, **f32)
    _group_gain_shift[(n * groups,)](
        part, weight if weight is not None else gain, bias if bias is not None else gain, gain, shift,
        splits, c, cg, float(hw * cg), float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_S=min(32, triton.next_power_of_2(splits)), BLOCK_CG=triton.next_power_of_2(cg),
    )  # fmt: skip
    out = torch.empty_like(x, memory_format=torch.channels_last)
    row_blocks = triton.cdiv(hw, block_p)
    rows_first = row_blocks > GRID_Y_MAX
    _scale_shift[(row_blocks, n, c_blocks) if rows_first else (n, row_blocks, c_blocks)](
        x, out, gain, shift, hw, c, BLOCK_P=block_p, BLOCK_C=block_c, ROWS_ON_AXIS_0=rows_first
    )
    return out


__all__ = ["group_norm_nhwc"]
