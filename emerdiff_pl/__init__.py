"""emerdiff_pl: pseudo-label segmentation datasets from a frozen Stable Diffusion model (EmerDiff, ICLR 2024)."""

__version__ = "0.1.0"

from emerdiff_pl.backbone import TINY_RANDOM, load_backbone
from emerdiff_pl.kmeans import batched_kmeans
from emerdiff_pl.segmenter import EmerDiffSegmenter, SegmentationResult

__all__ = [
    "EmerDiffSegmenter",
    "SegmentationResult",
    "TINY_RANDOM",
    "batched_kmeans",
    "load_backbone",
    "__version__",
]
