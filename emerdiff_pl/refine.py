"""Training-free refiners of class score maps, guided by the RGB image (the cheap rivals of EmerDiff).

Each refiner takes score maps (B, K, H, W), one map per mask, higher = more likely, and the image (B, 3, h, w)
in [0, 1] (resized to H×W here), and returns refined maps of the same shape; the labels are their argmax.

- ``none``: the maps unchanged (the same tensor object).
- ``guided``: the guided filter (He et al. 2010) of each map with the RGB image as guide,
  ``kornia.filters.guided_blur``; window ``2·radius + 1``, ``eps`` the regulariser (a colour variance).
- ``bilateral``: the joint bilateral filter, ``kornia.filters.joint_bilateral_blur``; window ``2·radius + 1``,
  spatial σ = radius / 2, colour σ = √eps.
- ``pamr``: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020, the refiner DiffCut uses):
  ``iterations`` rounds of averaging each map over its 8 neighbours at each dilation, weighted by a softmax of
  the negative local colour distance (normalised by the local colour spread). See :class:`PAMR`.

All three filters are linear in the scores, so a map's overall scale (EmerDiff's difference maps are small
and differ from mask to mask) changes nothing but ties. Every step is batched torch: CPU and CUDA, any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emerdiff_pl.config import PAMR_DILATIONS, Refiner

REFINERS: tuple[str, ...] = get_args(Refiner)
_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def check_refine_options(
    method: str, iterations: int, dilations: Sequence[int], radius: int, eps: float
) -> None:
    """Raise a ValueError naming the bad option (called by the segmenter's constructor, before any work)."""
    if method not in REFINERS:
        raise ValueError(f"refine must be one of {', '.join(REFINERS)}, got {method!r}")
    if method == "pamr":
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"refine_iterations must be a positive int, got {iterations!r}")
        if len(dilations) == 0 or any(not isinstance(d, int) or d < 1 for d in dilations):
            raise ValueError(f"refine_dilations must be positive ints, got {list(dilations)!r}")
    if method in ("guided", "bilateral"):
        if not isinstance(radius, int) or radius < 1:
            raise ValueError(f"refine_radius must be a positive int (pixels), got {radius!r}")
        if not eps > 0:
            raise ValueError(f"refine_eps must be > 0, got {eps!r}")


def _shift(x: Tensor, dy: int, dx: int, d: int) -> Tensor:
    """x (N, C, H, W) read at (y + dy·d, x + dx·d), edges replicated."""
    h, w = x.shape[-2:]
    padded = F.pad(x, [d, d, d, d], mode="replicate")
    return padded[..., d + dy * d : d + dy * d + h, d + dx * d : d + dx * d + w]


class PAMR(nn.Module):
    """Pixel-adaptive mask refinement (Araslanov & Roth 2020, "Single-stage semantic segmentation from image
    labels"), written from the paper and the authors' ``pamr.py``: same affinities, fewer intermediate tensors.

    Affinity of pixel p to its neighbour q (the 8 neighbours at each dilation): for each colour channel,
    ``−|I_p − I_q| / (0.1·σ_p + 1e-8)`` with σ_p the standard deviation of that channel over p's whole
    neighbourhood (all dilations, p included); averaged over channels, softmax over the neighbours. Each
    iteration replaces every score by the affinity-weighted mean of its neighbours' scores.
    """

    def __init__(self, iterations: int = 10, dilations: Sequence[int] = PAMR_DILATIONS):
        super().__init__()
        check_refine_options("pamr", iterations, dilations, 1, 1.0)
        self.iterations = int(iterations)
        self.dilations = tuple(int(d) for d in dilations)

    def affinity(self, image: Tensor) -> Tensor:
        """image (B, C, H, W) → neighbour weights (B, P, H, W), P = 8·len(dilations), summing to 1 over P."""
        image = image.float()
        shifts = [(dy, dx, d) for d in self.dilations for dy, dx in _OFFSETS]
        # σ over the neighbourhood: the 8 neighbours at every dilation plus the centre (as in pamr.py:
        # the centre once per dilation), unbiased
        count = len(shifts) + len(self.dilations)
        total = image * len(self.dilations)
        total_sq = image.square() * len(self.dilations)
        for dy, dx, d in shifts:
            q = _shift(image, dy, dx, d)
            total, total_sq = total + q, total_sq + q.square()
        var = (total_sq - total.square() / count) / (count - 1)
        scale = 0.1 * var.clamp_min(0).sqrt() + 1e-8
        logits = torch.stack(
            [(-(image - _shift(image, dy, dx, d)).abs() / scale).mean(1) for dy, dx, d in shifts], dim=1
        )
        return logits.softmax(dim=1)

    def forward(self, scores: Tensor, image: Tensor) -> Tensor:
        """scores (B, K, H, W), image (B, C, H, W) → refined scores (B, K, H, W), float32."""
        weights = self.affinity(image)  # (B, P, H, W)
        shifts = [(dy, dx, d) for d in self.dilations for dy, dx in _OFFSETS]
        x = scores.float()
        for _ in range(self.iterations):
            out = torch.zeros_like(x)
            for p, (dy, dx, d) in enumerate(shifts):
                out += weights[:, p : p + 1] * _shift(x, dy, dx, d)
            x = out
        return x


def refine(
    scores: Tensor,
    image: Tensor,
    method: Refiner = "none",
    *,
    iterations: int = 10,
    dilations: Sequence[int] = PAMR_DILATIONS,
    radius: int = 8,
    eps: float = 1e-2,
) -> Tensor:
    """Refine score maps (B, K, H, W) with the image (B, 3, h, w) in [0, 1] as guide → (B, K, H, W).

    ``method`` and the options are described in the module docstring; ``none`` returns ``scores`` itself."""
    check_refine_options(method, iterations, dilations, radius, eps)
    if method == "none":
        return scores
    if scores.ndim != 4 or image.ndim != 4 or scores.shape[0] != image.shape[0]:
        raise ValueError(
            f"need scores (B, K, H, W) and image (B, C, h, w) with the same B, got {tuple(scores.shape)} and "
            f"{tuple(image.shape)}"
        )
    guide = image.to(scores.device, torch.float32)
    if guide.shape[-2:] != scores.shape[-2:]:
        guide = F.interpolate(
            guide, size=scores.shape[-2:], mode="bilinear", antialias=True, align_corners=False
        )
    x = scores.float()
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        return x
    if method == "pamr":
        return PAMR(iterations, dilations)(x, guide)
    # a window wider than the image makes reflect padding fail: clip it
    r = max(1, min(radius, scores.shape[-2] - 1, scores.shape[-1] - 1))
    if min(scores.shape[-2:]) < 2:
        return x
    size = 2 * r + 1
    from kornia.filters import guided_blur, joint_bilateral_blur

    if method == "guided":
        return guided_blur(guide, x, size, eps)
    sigma_space = max(r / 2, 0.5)
    return joint_bilateral_blur(x, guide, size, eps**0.5, (sigma_space, sigma_space))


__all__ = ["PAMR", "PAMR_DILATIONS", "REFINERS", "Refiner", "check_refine_options", "refine"]
