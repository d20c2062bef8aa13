"""Dataset converters: ground truth as WebDataset shards (``<key>.jpg`` + ``<key>.gt.png``) for evaluation.

``emerdiff-pl convert <dataset> ...`` with dataset ``cocostuff27``, ``cityscapes27`` or ``toyworld``.
"""

from __future__ import annotations

import importlib
import sys

from emerdiff_pl.datasets.cityscapes27 import CLASS_NAMES as CITYSCAPES27_CLASSES
from emerdiff_pl.datasets.cocostuff27 import COARSE_CLASSES as COCOSTUFF27_CLASSES
from emerdiff_pl.datasets.toyworld import CLASS_NAMES as TOYWORLD_CLASSES

CONVERTERS: dict[str, tuple[str, str]] = {
    "cocostuff27": ("emerdiff_pl.datasets.cocostuff27", "COCO-Stuff 164k → 27 coarse classes (STEGO/PiCIE)"),
    "cityscapes27": ("emerdiff_pl.datasets.cityscapes27", "Cityscapes fine labelIds 7–33 → 0–26"),
    "toyworld": ("emerdiff_pl.datasets.toyworld", "procedural scenes with ground truth (no download)"),
}

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "cocostuff27": COCOSTUFF27_CLASSES,
    "cityscapes27": CITYSCAPES27_CLASSES,
    "toyworld": TOYWORLD_CLASSES,
}


def _usage() -> str:
    lines = ["usage: emerdiff-pl convert {" + ",".join(CONVERTERS) + "} [--help] ...", "", "datasets:"]
    lines += [f"  {name:<14}{doc}" for name, (_, doc) in CONVERTERS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``convert <dataset> ...`` to the dataset's converter."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in CONVERTERS:
        print(f"error: unknown dataset {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(CONVERTERS[name][0])
    return int(module.main(rest) or 0)


__all__ = ["CLASS_NAMES", "CONVERTERS", "main"]
