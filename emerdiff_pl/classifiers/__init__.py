"""Classifiers that name EmerDiff's masks (issue 27): each gives class scores (B, C, h, w) at its own coarse grid,
plus `class_names` and a `record()` for the output, and the method's mask-classification step
(emerdiff_pl.method, docs/method.md §14) names every image-resolution mask from them. `probe` reads the U-Net
feature layer's query vectors, `clip` the images, `field` coarse maps that arrive with each input.

The names are imported lazily (the `clip` module imports transformers), and :func:`build_classifier` builds the
one a config names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from emerdiff_pl.config import EmerDiffConfig

_PUBLIC = {
    "CLIPClassifier": "clip",
    "load_clip": "clip",
    "CoarseMapError": "field",
    "FieldClassifier": "field",
    "coarse_file": "field",
    "coarse_member": "field",
    "coarse_scores": "field",
    "id2label": "names",
    "FeatureSource": "probe",
    "Probe": "probe",
    "ProbeFit": "probe",
    "fit_probe": "probe",
    "probe_accuracy": "probe",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"emerdiff_pl.classifiers.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'emerdiff_pl.classifiers' has no attribute {name!r}")


def build_classifier(config: EmerDiffConfig, feature_dim: int, dtype: torch.dtype) -> nn.Module | None:
    """The classifier `config.classifier` names (None for `none`), on the CPU: a `Probe` loaded from
    `config.probe` and checked against the segmenter's features (`feature_dim`: the feature layer's query
    width), a `CLIPClassifier` in `dtype`, or a `FieldClassifier`. Its `class_names` must equal
    `config.class_names` where both are given."""
    names = config.named_classes()
    if config.classifier == "none":
        return None
    if config.classifier == "probe":
        from emerdiff_pl.classifiers.probe import FeatureSource, Probe

        probe = Probe.load(config.probe, expected=FeatureSource.of(config, feature_dim))
        if names is not None and tuple(names) != probe.class_names:
            raise ValueError(
                f"model.class_names {list(names)} differ from the names of probe {config.probe!r} "
                f"{list(probe.class_names)}: leave class_names out (the probe holds them) or refit the probe"
            )
        return probe
    if config.classifier == "clip":
        from emerdiff_pl.classifiers.clip import CLIPClassifier

        return CLIPClassifier(names, model=config.clip_model, resolution=config.clip_resolution, dtype=dtype)
    from emerdiff_pl.classifiers.field import FieldClassifier

    return FieldClassifier(names)


__all__ = [*_PUBLIC, "build_classifier"]
