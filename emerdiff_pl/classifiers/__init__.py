"""Classifiers that name EmerDiff's masks (issue 27): each gives class scores (B, C, h, w) at its own coarse grid,
plus `class_names`, and the method's mask-classification step (emerdiff_pl.method.classify_masks) names every
image-resolution mask from them. `probe` reads the U-Net feature layer's query vectors, `clip` the images,
`field` coarse maps that arrive with each input.
"""

from emerdiff_pl.classifiers.clip import CLIPClassifier, load_clip
from emerdiff_pl.classifiers.field import (
    CoarseMapError,
    FieldClassifier,
    coarse_file,
    coarse_member,
    coarse_scores,
)
from emerdiff_pl.classifiers.names import id2label, read_class_names
from emerdiff_pl.classifiers.probe import FeatureSource, Probe, ProbeFit, fit_probe, probe_accuracy

__all__ = [
    "CLIPClassifier",
    "CoarseMapError",
    "FeatureSource",
    "FieldClassifier",
    "Probe",
    "ProbeFit",
    "coarse_file",
    "coarse_member",
    "coarse_scores",
    "fit_probe",
    "id2label",
    "load_clip",
    "probe_accuracy",
    "read_class_names",
]
