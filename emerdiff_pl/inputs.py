"""What the DataModule is told before it reads: the model's input policy and the writer's read plan.

The model owns the :class:`InputPolicy` (the size each image is resized to for it; ``EmerDiffConfig.input_policy``)
and the writer owns the :class:`ReadPlan` (which inputs earlier runs finished or recorded as failures, and what the
batches must carry for the outputs it writes). ``EmerDiffDataModule.predict_dataloader`` asks both once, from the
Trainer it runs under; neither is a setting of the DataModule, so batching and the model can never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from emerdiff_pl.config import ResizeMode

RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
MAX_ASPECT = 4.0  # keep_aspect / short_side: model inputs are at most 4:1 (longer images are squashed to it)


def resize_bilinear(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Images (B, 3, H, W) float → (B, 3, h, w): bilinear with antialias, the one resize of model inputs."""
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


@dataclass(frozen=True)
class InputPolicy:
    """How an H×W image becomes the model input: its size (:meth:`model_input_size`) and the resize itself.

    Attributes:
        resolution: side of the square model input (``square``), the side of a square of the same area
            (``keep_aspect``), or the short side (``short_side``).
        resize: ``keep_aspect``, ``short_side`` or ``square`` (see :meth:`model_input_size`).
        multiple: the side step of ``keep_aspect`` and ``short_side`` (:attr:`size_unit`).
    """

    resolution: int
    resize: ResizeMode
    multiple: int

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")

    @property
    def size_unit(self) -> int:
        """The step of the model input's sides under ``keep_aspect`` and ``short_side``: ``multiple``, or for a
        resolution below it gcd(resolution, multiple), so that a square image keeps resolution²."""
        if self.resolution >= self.multiple:
            return self.multiple
        return math.gcd(self.resolution, self.multiple)

    def model_input_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the model sees for an H×W image at the image's aspect ratio (clamped to 1:4 … 4:1):

        - ``square`` → resolution², squashed;
        - ``keep_aspect`` → area ≈ resolution² (the cost of a square image whatever the aspect);
        - ``short_side`` → short side ≈ resolution (the scale of a square image; up to 4× its area at 4:1).

        Each side is rounded to a multiple of :attr:`size_unit` (at least one): the latent divides by the VAE
        factor and the coarsest U-Net grid stays whole."""
        if self.resize == "square":
            return self.resolution, self.resolution
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}×{width}")
        unit, resolution = self.size_unit, self.resolution
        aspect = min(MAX_ASPECT, max(1.0 / MAX_ASPECT, width / height))
        if self.resize == "keep_aspect":
            exact_h, exact_w = resolution / math.sqrt(aspect), resolution * math.sqrt(aspect)
        else:
            exact_h, exact_w = resolution / min(aspect, 1.0), resolution * max(aspect, 1.0)
        return max(unit, round(exact_h / unit) * unit), max(unit, round(exact_w / unit) * unit)

    def resize_image(self, rgb: np.ndarray) -> Tensor:
        """H×W×3 uint8 → 3×h×w float32 in [0, 1] at :meth:`model_input_size` (what a DataModule batch holds)."""
        size = self.model_input_size(rgb.shape[0], rgb.shape[1])
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
        return resize_bilinear(image[None], size)[0].clamp_(0.0, 1.0)


@dataclass(frozen=True)
class ReadPlan:
    """What the consumer of the batches asks of the input (the writer's, from its output folder and options).

    Attributes:
        done_keys: keys in finished output shards: left out (counted as ``skipped``).
        failed_keys: keys earlier runs recorded as failures: left out (counted as ``skipped_failed``).
        keep_bytes: batches carry each input's encoded bytes (``original_bytes``; ``writer.include_image``).
        keep_originals: batches carry the decoded full-size image (``original``; overlays, ``include_image``);
            otherwise it never leaves the dataloader worker and ``original_size`` alone travels.
    """

    done_keys: frozenset[str] = frozenset()
    failed_keys: frozenset[str] = frozenset()
    keep_bytes: bool = False
    keep_originals: bool = False

    @property
    def skip_keys(self) -> frozenset[str]:
        """Every key this run leaves out."""
        return self.done_keys | self.failed_keys


READ_ALL = ReadPlan()  # no writer: nothing left out, nothing carried beyond the model input and its size

__all__ = [
    "MAX_ASPECT",
    "READ_ALL",
    "RESIZE_MODES",
    "InputPolicy",
    "ReadPlan",
    "ResizeMode",
    "resize_bilinear",
]
