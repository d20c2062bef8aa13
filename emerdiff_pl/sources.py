"""Where a sample's image and ground truth come from, by the key ``predict`` gave it: the folder or shards
predict read (``--images`` of show / export, ``images=`` of PseudoLabelDataset) and ground truth as shards or a
folder of label PNGs (``--gt`` of evaluate / show).

Every command reads images here, so they are keyed as predict keyed them: a folder's files by
:func:`~emerdiff_pl.paths.file_key` of their relative path (``sub/a.jpg`` → ``sub/a_jpg``), a shard's samples by
:func:`~emerdiff_pl.paths.safe_key` of their member names (``./a.jpg`` → ``a``). A folder of label PNGs is
matched by path without extension: ``sub/a.png`` is the ground truth of the image predict keyed from
``sub/a.<any image extension>`` (key ``sub/a_jpg``, ``sub/a_png``, ...) or from the shard sample ``sub/a``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from emerdiff_pl.codec import ImageDecodeError, decode_image, image_field, read_label_png
from emerdiff_pl.fields import IMAGE_EXTENSIONS
from emerdiff_pl.paths import companion_path, file_key, list_folder, safe_key
from emerdiff_pl.shardio import ShardIndex

# --------------------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------------------


class _ByKey:
    """``keys()``, ``in``, iteration and ``len()`` over ``self.by_key`` (sample key → where the sample is), the
    part of :class:`~emerdiff_pl.shardio.ShardIndex`'s interface every image source has."""

    by_key: dict[str, str]

    def keys(self) -> list[str]:
        return list(self.by_key)

    def __contains__(self, key: str) -> bool:
        return key in self.by_key

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_key)

    def __len__(self) -> int:
        return len(self.by_key)


class FolderImages(_ByKey):
    """The images of a folder under the keys ``predict --data.folder`` gave them, read like a
    :class:`~emerdiff_pl.shardio.ShardIndex` (``get_raw(key)`` → ``{"<extension>": bytes, ...}``)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = str(folder)
        self.by_key = dict(list_folder(folder))  # key → file path

    def get_raw(self, key: str, fields: Any = None) -> dict[str, Any]:
        """The file of ``key`` as a sample: its bytes under its extension (``jpg``, ``png``, ...)."""
        path = self.by_key.get(key)
        if path is None:
            raise KeyError(f"key {key!r} names no image of the folder {self.folder!r}")
        return {"__key__": key, "__url__": path, Path(path).suffix[1:].lower(): Path(path).read_bytes()}

    def close(self) -> None:
        """Nothing held open (the ShardIndex interface)."""


class ShardImages(_ByKey):
    """The samples of source shards under the keys ``predict --data.urls`` gave them (their member names made
    safe: ``./a.jpg`` → ``a``), read by offset (local uncompressed ``.tar``)."""

    def __init__(self, urls: str | list[str]):
        self.index = ShardIndex(urls)
        self.by_key = {safe_key(key): key for key in self.index}  # key → the key in the shards

    def get_raw(self, key: str, fields: Any = None) -> dict[str, Any]:
        if key not in self.by_key:
            raise KeyError(f"key {key!r} is in none of the {len(self.index.urls)} image shards")
        return {**self.index.get_raw(self.by_key[key], fields), "__key__": key}

    def close(self) -> None:
        self.index.close()


ImageSource = FolderImages | ShardImages


def _holds_tars(path: str) -> bool:
    return any(p.suffix == ".tar" for p in Path(path).iterdir())


def open_images(spec: str | os.PathLike | list[str]) -> ImageSource:
    """``--images``: the folder predict read (``--data.folder``), or its source shards (``--data.urls``: brace
    patterns, globs, a folder of ``*.tar``), keyed as predict keyed them."""
    if isinstance(spec, str | os.PathLike) and os.path.isdir(spec) and not _holds_tars(str(spec)):
        images = FolderImages(spec)
        if not images.by_key:
            raise FileNotFoundError(f"--images {str(spec)!r} holds neither *.tar shards nor images")
        return images
    return ShardImages(str(spec) if isinstance(spec, os.PathLike) else spec)


def image_of(source: ImageSource, key: str) -> np.ndarray | None:
    """The decoded image (H×W×3 uint8) of ``key``; None when the source lacks it or it cannot be decoded."""
    if key not in source:
        return None
    fields = {k: v for k, v in source.get_raw(key).items() if not k.startswith("__")}
    try:
        return decode_image(image_field(fields))
    except (ImageDecodeError, OSError):
        return None


# --------------------------------------------------------------------------------------------------------------
# ground truth
# --------------------------------------------------------------------------------------------------------------


class ShardLabels:
    """Ground-truth shards: the label member ``field`` (``gt.png``) of each sample, by key."""

    def __init__(self, urls: str, field: str):
        self.spec, self.field = urls, field
        self.index = ShardIndex(urls)  # every member's offset: a sample without the field can say what it has

    def label(self, key: str) -> np.ndarray | None:
        """The label map of ``key`` as stored; None when there is none."""
        if self.field not in self.index.fields(key):
            return None
        return self.index.get(key, fields={self.field}, labels={self.field})[self.field]

    def why_missing(self, key: str) -> str:
        """Why ``key`` has no label: absent from the shards, or present without the label member."""
        if key not in self.index:
            return f"no sample {key!r} in {self.spec!r}"
        fields = sorted(self.index.fields(key))
        return (
            f"sample {key!r} of {self.spec!r} has no {self.field!r} member (its members: {', '.join(fields)})"
        )

    def unmatched(self, seen: set[str]) -> list[str]:
        """The samples with a label that no key of ``seen`` asked for."""
        return [k for k in self.index if k not in seen and self.field in self.index.fields(k)]

    def close(self) -> None:
        self.index.close()


def _extension_variants() -> list[str]:
    return sorted({v for ext in IMAGE_EXTENSIONS for v in (ext, ext.upper(), ext.capitalize())})


class LabelFolder:
    """A folder of label PNGs (class ids, 8- or 16-bit greyscale or palette indices), each the ground truth of
    the prediction keyed from the same path with an image extension (the module docstring's rule)."""

    def __init__(self, folder: str | os.PathLike, flag: str = "--gt"):
        self.spec, self.flag = str(folder), flag
        self.files = [path for _, path in list_folder(folder)]
        if not self.files:
            raise FileNotFoundError(f"{flag} {self.spec!r} holds neither *.tar shards nor label PNGs")
        self._of_key: dict[str, list[str]] = {}
        self._claimed: dict[str, str] = {}  # label file → the prediction it was read for
        variants = _extension_variants()
        for path in self.files:
            stem = Path(path).relative_to(self.spec).with_suffix("").as_posix()
            keys = {safe_key(stem), *(file_key(f"{stem}.{ext}") for ext in variants)}
            for key in keys:
                self._of_key.setdefault(key, []).append(path)

    def _file(self, key: str) -> str | None:
        paths = self._of_key.get(key, [])
        if len(paths) > 1:
            raise ValueError(
                f"prediction {key!r} matches several label files of {self.flag}: {sorted(paths)}"
            )
        return paths[0] if paths else None

    def label(self, key: str) -> np.ndarray | None:
        path = self._file(key)
        if path is None:
            return None
        if self._claimed.setdefault(path, key) != key:
            raise ValueError(
                f"label file {path} matches two predictions, {self._claimed[path]!r} and {key!r} (images that differ "
                "only in their extension): rename one of the images, or give {self.flag} shards keyed by prediction key"
            )
        return _label_file(path, self.flag)

    def why_missing(self, key: str) -> str:
        stem = key.rsplit("_", 1)[0] if key.rsplit("_", 1)[-1].lower() in IMAGE_EXTENSIONS else key
        return f"no label file {stem}.png (or another extension) under {self.spec!r} for prediction {key!r}"

    def unmatched(self, seen: set[str]) -> list[str]:
        matched = {path for key in seen for path in self._of_key.get(key, [])}
        return [os.path.relpath(p, self.spec) for p in self.files if p not in matched]

    def close(self) -> None:
        """Nothing held open."""


class LabelsBeside:
    """The label PNG beside each image of a folder, ``a.<field>`` for ``a.jpg`` (``a.gt.png``): a folder that is
    images and labels at once (``fit-probe --labelled``). ``list_folder`` never lists these files as images."""

    def __init__(self, images: FolderImages, field: str):
        self.images, self.field = images, field

    def _path(self, key: str) -> Path | None:
        image = self.images.by_key.get(key)
        return None if image is None else companion_path(image, self.field)

    def label(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        return _label_file(str(path), "--labelled") if path is not None and path.is_file() else None

    def why_missing(self, key: str) -> str:
        return f"no label file {self._path(key)} beside the image of {key!r}"

    def unmatched(self, seen: set[str]) -> list[str]:
        return []  # a label file without its image is not listed

    def close(self) -> None:
        """Nothing held open."""


def _label_file(path: str, flag: str) -> np.ndarray:
    """A label PNG of class ids as stored (2-D); a colour PNG is refused naming the file."""
    label = read_label_png(Path(path).read_bytes())
    if label.ndim != 2:
        raise ValueError(
            f"label file {path} is {'×'.join(map(str, label.shape))} (colour?): {flag} needs class ids, one "
            "channel (8- or 16-bit greyscale, or palette indices)"
        )
    return label


Labels = ShardLabels | LabelFolder | LabelsBeside


def open_labels(spec: str, field: str, flag: str = "--gt") -> ShardLabels | LabelFolder:
    """``--gt``: ground-truth shards with ``<key>.<field>``, or a folder of label PNGs matched by file stem
    (``flag``: the option the user gave it, for messages)."""
    if os.path.isdir(spec) and not _holds_tars(spec):
        return LabelFolder(spec, flag)
    return ShardLabels(spec, field)


__all__ = [
    "FolderImages",
    "ImageSource",
    "LabelFolder",
    "Labels",
    "LabelsBeside",
    "ShardImages",
    "ShardLabels",
    "image_of",
    "open_images",
    "open_labels",
]
