"""Class names of named output: synonyms, display names and the id → name table (`id2label.json`).

The names themselves are read by the project's one reader, :func:`emerdiff_pl.datasets.class_names` (a list, a
text file or a known dataset). A name may hold synonyms separated by commas ("person, man, woman"): the first is
the class's name in the output, the `clip` classifier scores the best of all of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ID2LABEL_FILE = "id2label.json"  # at the root of named predict output and of export output


def display_name(class_name: str) -> str:
    """The output name of a class line: its first synonym ("person, man" → "person")."""
    return synonyms(class_name)[0]


def synonyms(class_name: str) -> list[str]:
    """The names a class scores the best of, comma-separated: "person, man, woman" → [person, man, woman]."""
    names = [n.strip() for n in class_name.split(",") if n.strip()]
    if not names:
        raise ValueError(f"empty class name {class_name!r}")
    return names


def id2label(class_names: Sequence[str]) -> dict[str, str]:
    """The `id2label.json` table: {"0": name, …}, names without their synonyms (Hugging Face's convention)."""
    return {str(i): display_name(n) for i, n in enumerate(class_names)}


def publish_id2label(folder: str | os.PathLike, table: dict[str, str]) -> None:
    """Write `<folder>/id2label.json` once, atomically (every task and rank may try; the first one's file
    stands), or check the one there: a different table raises a ValueError naming both."""
    from emerdiff_pl.manifest import create_file_once

    path = Path(folder) / ID2LABEL_FILE
    if not path.exists():
        create_file_once(path, json.dumps(table, indent=1) + "\n")  # never replaces one published first
    there = read_id2label(folder)
    if there != table:
        raise ValueError(
            f"{path} names the classes {list(there.values())} but this run's are {list(table.values())}: named "
            "output of other classes is not mixed; write into a fresh folder"
        )


def read_id2label(folder: str | os.PathLike) -> dict[str, str] | None:
    """The `id2label.json` table in `folder`, or None when there is none."""
    path = Path(folder) / ID2LABEL_FILE
    if not path.is_file():
        return None
    try:
        return {str(k): str(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not an id → name table ({err})") from None


def named_classes(meta: Any) -> list[str] | None:
    """The class names (id i = the i-th) of a prediction sample whose `<key>.json` (`meta`) says a classifier
    named its labels; None for per-image mask ids (or relabelled ones)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("classifier"), dict):
        return None
    names = meta.get("class_names")
    if not isinstance(names, list) or not names:
        raise ValueError(f"sample {meta.get('key')!r} names its classifier but not its class_names")
    return [str(n) for n in names]


def output_class_names(urls: str | list[str]) -> list[str] | None:
    """The class names of named predict output (from its first sample's `<key>.json`), None for mask ids."""
    from emerdiff_pl.fields import JSON_FIELD
    from emerdiff_pl.shardio import iter_samples

    for sample in iter_samples(urls, fields={JSON_FIELD}):
        return named_classes(sample.get(JSON_FIELD))
    return None


__all__ = [
    "ID2LABEL_FILE",
    "display_name",
    "id2label",
    "named_classes",
    "output_class_names",
    "publish_id2label",
    "read_id2label",
    "synonyms",
]
