"""emerdiff_pl: pseudo-label segmentation datasets from a frozen Stable Diffusion model (EmerDiff, ICLR 2024).

The public names are imported lazily, so `emerdiff-pl relabel / evaluate / show` and data-loader workers start
without importing diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "EmerDiffSegmenter": "emerdiff_pl.segmenter",
    "SegmentationResult": "emerdiff_pl.segmenter",
    "EmerDiffDataModule": "emerdiff_pl.data",
    "PseudoLabelWriter": "emerdiff_pl.writer",
    "PseudoLabelDataset": "emerdiff_pl.pseudolabels",
    "PseudoLabelDataModule": "emerdiff_pl.pseudolabels",
    "load_backbone": "emerdiff_pl.backbone",
    "TINY_RANDOM": "emerdiff_pl.backbone",
    "batched_kmeans": "emerdiff_pl.kmeans",
}

if TYPE_CHECKING:
    from emerdiff_pl.backbone import TINY_RANDOM, load_backbone
    from emerdiff_pl.data import EmerDiffDataModule
    from emerdiff_pl.kmeans import batched_kmeans
    from emerdiff_pl.pseudolabels import PseudoLabelDataModule, PseudoLabelDataset
    from emerdiff_pl.segmenter import EmerDiffSegmenter, SegmentationResult
    from emerdiff_pl.writer import PseudoLabelWriter


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'emerdiff_pl' has no attribute {name!r}")


__all__ = [
    "TINY_RANDOM",
    "EmerDiffDataModule",
    "EmerDiffSegmenter",
    "PseudoLabelDataModule",
    "PseudoLabelDataset",
    "PseudoLabelWriter",
    "SegmentationResult",
    "__version__",
    "batched_kmeans",
    "load_backbone",
]
