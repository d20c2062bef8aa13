"""Datasets with ground truth: converters to WebDataset shards (``<key>.jpg`` or ``.png`` + ``<key>.gt.png``) for
evaluation, their class names, and the one reader of ``--class-names``.

Converters: :mod:`~emerdiff_pl.datasets.cocostuff27`, :mod:`~emerdiff_pl.datasets.cityscapes27` and
:mod:`~emerdiff_pl.datasets.toyworld` (procedural scenes); their command is ``emerdiff-pl convert``
(:mod:`emerdiff_pl.commands.convert`).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    spec: str | Sequence[str],
    count: int | None = None,
    flag: str = "--class-names",
    counted: str = "the data has",
) -> list[str]:
    """Class names from a known dataset (``toyworld``, ``cocostuff27``, ``cityscapes27``), a text file (one name
    a line; blank lines and lines starting with ``#`` skipped), a comma list (``a,b,c``) or a list: the one reader
    of every ``--class-names`` and of ``model.class_names``.

    A name may list synonyms after commas (``water, sea``, in a file or a list; the ``clip`` classifier scores the
    best, outputs name the first). Names must be distinct (by their first synonym), at most 255 (id 255 is
    ignore). With ``count``, exactly that many names are required; errors name ``flag``, and ``counted`` says
    where the count comes from (``"the shards have"`` → "... but the shards have 3 classes").
    """
    shown = spec if isinstance(spec, str) else list(spec)
    if not isinstance(spec, str):
        names = [str(name).strip() for name in spec]
    elif spec in CLASS_NAMES:
        names = list(CLASS_NAMES[spec])
    elif Path(spec).is_file():
        lines = Path(spec).read_text(encoding="utf-8").splitlines()
        names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    elif "," in spec:
        names = [name.strip() for name in spec.split(",")]
    else:
        raise FileNotFoundError(
            f"{flag} {spec!r} is neither a known dataset ({', '.join(CLASS_NAMES)}), nor a file with one class "
            "name per line, nor a comma list (a,b,c)"
        )
    if not names or not all(name.strip(", ") for name in names):
        raise ValueError(f"{flag} {shown!r} holds an empty class name")
    from emerdiff_pl.classifiers.names import display_name

    first = [display_name(name) for name in names]
    repeated = sorted({name for name in first if first.count(name) > 1})
    if repeated:
        raise ValueError(f"{flag} {shown!r} names {repeated[0]!r} twice")
    if len(names) > 255:
        raise ValueError(f"{flag} gives {len(names)} class names: at most 255 (id 255 is ignore)")
    if count is not None and len(names) != count:
        raise ValueError(f"{flag} gives {len(names)} names but {counted} {count} classes")
    return names


__all__ = ["CLASS_NAMES", "class_names"]
