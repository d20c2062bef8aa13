"""Datasets with ground truth: converters to WebDataset shards (``<key>.jpg`` or ``.png`` + ``<key>.gt.png``) for
evaluation, their class names, and the one reader of ``--class-names``.

Converters: :mod:`~emerdiff_pl.datasets.cocostuff27`, :mod:`~emerdiff_pl.datasets.cityscapes27` and
:mod:`~emerdiff_pl.datasets.toyworld` (procedural scenes); their command is ``emerdiff-pl convert``
(:mod:`emerdiff_pl.commands.convert`).
"""

from __future__ import annotations

from pathlib import Path

from emerdiff_pl.datasets.cityscapes27 import CLASS_NAMES as CITYSCAPES27_CLASSES
from emerdiff_pl.datasets.cocostuff27 import COARSE_CLASSES as COCOSTUFF27_CLASSES
from emerdiff_pl.datasets.toyworld import CLASS_NAMES as TOYWORLD_CLASSES

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "cocostuff27": COCOSTUFF27_CLASSES,
    "cityscapes27": CITYSCAPES27_CLASSES,
    "toyworld": TOYWORLD_CLASSES,
}


def class_names(
    spec: str, count: int | None = None, flag: str = "--class-names", counted: str = "the data has"
) -> list[str]:
    """Class names from a known dataset (``toyworld``, ``cocostuff27``, ``cityscapes27``), a text file (one name
    a line) or a comma list (``a,b,c``): the one reader of every ``--class-names``.

    With ``count``, exactly that many names are required; errors name ``flag``, and ``counted`` says where the
    count comes from (``"the shards have"`` → "... but the shards have 3 classes").
    """
    if spec in CLASS_NAMES:
        names = list(CLASS_NAMES[spec])
    elif Path(spec).is_file():
        lines = Path(spec).read_text(encoding="utf-8").splitlines()
        names = [line.strip() for line in lines if line.strip()]
    elif "," in spec:
        names = [name.strip() for name in spec.split(",")]
    else:
        raise FileNotFoundError(
            f"{flag} {spec!r} is neither a known dataset ({', '.join(CLASS_NAMES)}), nor a file with one class "
            "name per line, nor a comma list (a,b,c)"
        )
    if not names or not all(names):
        raise ValueError(f"{flag} {spec!r} holds an empty class name")
    if count is not None and len(names) != count:
        raise ValueError(f"{flag} gives {len(names)} names but {counted} {count} classes")
    return names


__all__ = ["CLASS_NAMES", "class_names"]
