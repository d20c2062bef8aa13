"""Class names of named output: from a list or a text file (one class a line), and the id → name table.

A line may hold synonyms separated by commas ("person, man, woman"); the first is the class's name in the
output, the `clip` classifier scores the best of all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def read_class_names(value: str | Path | Sequence[str]) -> tuple[str, ...]:
    """Class names from a list, or from a text file (one per line; blank lines and lines starting with # are
    skipped). Raises ValueError for no names, an empty name or a repeated name."""
    if isinstance(value, str | Path):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(
                f"class names file {str(path)!r} does not exist (give a list, or a text file with one class a line)"
            )
        lines = path.read_text(encoding="utf-8").splitlines()
        names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        where = f" in {str(path)!r}"
    else:
        names = [str(n).strip() for n in value]
        where = ""
    if not names:
        raise ValueError(f"no class names{where}")
    if any(not n.strip(", ") for n in names):
        raise ValueError(f"an empty class name{where}: {names}")
    seen: set[str] = set()
    for name in (display_name(n) for n in names):
        if name in seen:
            raise ValueError(f"class {name!r} appears twice{where}")
        seen.add(name)
    if len(names) > 255:
        raise ValueError(f"{len(names)} classes{where}: at most 255 (id 255 is ignore)")
    return tuple(names)


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


__all__ = ["display_name", "id2label", "read_class_names", "synonyms"]
