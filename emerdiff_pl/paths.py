"""Names and places of samples: sample keys, the images of a folder, and shard URL expansion.

Keys follow WebDataset's convention (``tariterators.base_plus_ext``): the member ``dir/abc.seg.png`` belongs to
sample ``__key__ = "dir/abc"`` under the field ``"seg.png"``. Folder files get keys from their own relative path
(:func:`file_key`), so adding files never renames another one. Shard lists come from brace patterns, globs,
folders or remote URLs (read with WebDataset's ``gopen``), each shard named once.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from emerdiff_pl.fields import is_companion_file, is_image_file

_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")  # pipe:, http:, s3:, ... (WebDataset gopen schemes)
_META = re.compile(r"(^|/)__[^/]*__($|/)")  # WebDataset metadata members such as __index__
_SAFE_PART = re.compile(r"[^\w\-+=,@~]")


# --------------------------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/abc.seg.png`` → (``dir/abc``, ``seg.png``): WebDataset's key / field split at the first dot of the
    basename; None for members that are no sample field (no extension, hidden, ``__meta__``)."""
    dirname, _, base = name.rpartition("/")
    if "." not in base or base.startswith(".") or _META.search(name):
        return None
    stem, field = base.split(".", 1)
    return (f"{dirname}/{stem}" if dirname else stem), field


def safe_key(key: str) -> str:
    """A key that is a harmless relative path inside a tar: no absolute path, no ``..``, no dots, spaces,
    backslashes or control characters (each replaced by ``_``). Safe keys are returned unchanged."""
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(_SAFE_PART.sub("_", p) for p in parts) or "_"


def is_metadata_member(name: str) -> bool:
    """Whether a tar member is WebDataset metadata (``__index__``, ``dir/__meta__/...``), part of no sample."""
    return bool(_META.search(name))


def file_key(relative_path: str) -> str:
    """Sample key of a folder file, from its own relative path alone: ``sub/a.jpg`` → ``sub/a_jpg``.

    The extension stays in the key, so ``a.jpg`` and ``a.png`` never share one, whatever else the folder holds.
    Where sanitising lost information (dots, spaces or other characters replaced by ``_``), a hash of the
    original path is appended, so two different paths never map to one key.
    """
    rel = relative_path.replace("\\", "/").strip("/")
    head, _, name = rel.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    parts = [*(p for p in head.split("/") if p), stem]
    key = safe_key("/".join(parts))
    lossy = key != "/".join(parts)
    key = f"{key}_{_SAFE_PART.sub('_', ext)}" if ext else key
    if lossy:
        key += "-" + hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return key


def companion_path(image_path: str | os.PathLike, field: str) -> Path:
    """The file that belongs to a folder image, beside it: ``<stem>.<field>`` (``a.jpg`` → ``a.gt.png``,
    ``a.coarse.npy``); :func:`list_folder` never lists such files as images."""
    path = Path(image_path)
    return path.with_name(f"{path.stem}.{field}")


def list_folder(folder: str | os.PathLike, all_files: bool = False) -> list[tuple[str, str]]:
    """Sorted (key, path) pairs for the images under ``folder`` (recursive, hidden files and folders ignored, and
    the label and coarse maps beside images: ``a.gt.png``, ``a.coarse.png``, ``a.coarse.npy``).

    Keys are :func:`file_key` of the relative path: they depend on the file's own path
    alone (``a.jpg`` → ``a_jpg``, ``a.png`` → ``a_png``), so adding files never renames another one.
    ``all_files`` also lists the files without an image extension (predict records them as failures).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"data.folder {str(folder)!r} is not a directory")
    relpaths: list[str] = []
    visited: set[tuple[int, int]] = set()  # (device, inode) of folders seen: symlink loops end here
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        info = os.stat(dirpath)
        if (info.st_dev, info.st_ino) in visited:
            dirnames[:] = []
            continue
        visited.add((info.st_dev, info.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # same walk order in every process
        for name in filenames:
            if name.startswith(".") or not (all_files or is_image_file(name)) or is_companion_file(name):
                continue
            relpaths.append(Path(dirpath, name).relative_to(root).as_posix())
    relpaths.sort()
    out: list[tuple[str, str]] = []
    owner: dict[str, str] = {}
    for rel in relpaths:
        key = file_key(rel)
        if key in owner:  # needs a file literally named like another's hashed key: refuse rather than guess
            raise ValueError(
                f"files {owner[key]!r} and {rel!r} under {str(folder)!r} map to the same key {key!r}"
            )
        owner[key] = rel
        out.append((key, str(root / rel)))
    return out


# --------------------------------------------------------------------------------------------------------------
# URL expansion
# --------------------------------------------------------------------------------------------------------------


def is_remote(url: str) -> bool:
    """True for URLs that WebDataset's ``gopen`` opens (``pipe:``, ``http(s)://``, ``s3://``, ...)."""
    return bool(_REMOTE.match(url)) and not os.path.exists(url)


def expand_urls(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard list from brace patterns (``data-{000..009}.tar``), globs, directories (their ``*.tar``), remote
    URLs (brace-expanded, read with ``gopen``), ``::``-separated patterns or a list of those.

    Raises ``FileNotFoundError`` naming a local pattern that matches nothing and ``ValueError`` naming shards
    given more than once (they would be read twice).
    """
    from braceexpand import braceexpand

    if isinstance(urls, str | os.PathLike):
        patterns = [p for p in str(urls).split("::") if p]
    else:
        patterns = [str(u) for u in urls]
    if not patterns:
        raise FileNotFoundError("no shard paths given (empty pattern)")
    out: list[str] = []
    for pattern in patterns:
        for path in braceexpand(pattern):
            if is_remote(path):
                out.append(path)
            elif os.path.isdir(path):
                found = sorted(str(p) for p in Path(path).glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"directory {path!r} holds no *.tar shards")
                out.extend(found)
            elif os.path.exists(path):
                out.append(path)
            elif any(ch in path for ch in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise FileNotFoundError(f"shard pattern {path!r} matches no files")
                out.extend(found)
            else:
                raise FileNotFoundError(
                    f"shard {path!r} does not exist (from pattern {pattern!r}); pass existing tar files, "
                    "a brace pattern such as 'out/shard-{000000..000009}.tar', a glob, a directory or a "
                    "remote URL ('pipe:curl -s ...', 'https://...')"
                )
    duplicates = sorted(u for u, n in Counter(os.path.normpath(u) for u in out).items() if n > 1)
    if duplicates:
        raise ValueError(
            f"these shards are named more than once (they would be read twice): {duplicates[:5]}"
        )
    return out


def open_url(url: str, mode: str = "rb") -> Any:
    """A binary stream for a local path or a remote URL (WebDataset's ``gopen``: pipe:, http:, ...)."""
    if not is_remote(url):
        return open(url, mode)  # noqa: SIM115 - closed by the caller
    from webdataset.gopen import gopen

    return gopen(url, mode)


__all__ = [
    "expand_urls",
    "file_key",
    "is_metadata_member",
    "is_remote",
    "list_folder",
    "open_url",
    "safe_key",
    "split_member_name",
]
