"""The one shard layer: naming, listing, reading, decoding and atomic writing of WebDataset tar shards.

Every subcommand (predict's data and writer, relabel, show, evaluate, the converters) goes through this module,
so keys, image decoding, URL expansion and broken-tar handling are the same everywhere. It builds on
WebDataset's pieces (``gopen`` for remote URLs and pipes, ``TarWriter`` with raw bytes, the key convention of
``tariterators.base_plus_ext``) but decodes fields itself: WebDataset's decoders convert image modes, so a
uint16 or palette label PNG would come back wrong. See docs/method.md for the pseudo-label format.

Sample layout (WebDataset convention): the member ``dir/abc.seg.png`` belongs to sample ``__key__ = "dir/abc"``
under the field name ``"seg.png"``; members of one sample are consecutive in the tar.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import tarfile
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Self

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The one list of image extensions: folder files and tar fields read as images (last extension, lower case).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
# Heads of compound fields that hold label maps (read raw, never converted): ``gt.png``, ``seg.png``, ...
LABEL_FIELDS = frozenset({"gt", "seg", "lowres", "label", "labels", "mask", "masks", "depth", "cls"})
# Decompression-bomb guard of every image decode: 40 Mpx (a 36-megapixel camera frame fits, a 45-megapixel one does
# not). Decoding, resizing and full-size labels of one 40 Mpx image peak at 0.75 GiB of host memory (BENCHMARKS.md);
# overlays and the batches in flight in dataloader workers come on top. PIL's own limit, 89.5 Mpx, is far above.
DEFAULT_MAX_PIXELS = 40_000_000
# JPEG cannot store a side longer than this (Pillow raises "broken data stream" beyond it).
JPEG_MAX_SIDE = 65500

_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")  # pipe:, http:, s3:, ... (WebDataset gopen schemes)
_META = re.compile(r"(^|/)__[^/]*__($|/)")  # WebDataset metadata members such as __index__
_SAFE_PART = re.compile(r"[^\w\-+=,@~]")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ShardReadError(OSError):
    """A shard that is unreadable, corrupt or truncated; the message names the file and how far it got."""


class ImageDecodeError(ValueError):
    """An input that cannot become an RGB image; its message is the ``reason`` recorded in the failures."""


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


def list_folder(folder: str | os.PathLike, all_files: bool = False) -> list[tuple[str, str]]:
    """Sorted (key, path) pairs for the images under ``folder`` (recursive, hidden files and folders ignored).

    Keys are :func:`~emerdiff_pl.shardio.file_key` of the relative path: they depend on the file's own path
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
            if name.startswith(".") or not (all_files or is_image_file(name)):
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


def is_image_file(name: str) -> bool:
    """Whether a file name has one of the image extensions read as input."""
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


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


# --------------------------------------------------------------------------------------------------------------
# reading tars
# --------------------------------------------------------------------------------------------------------------


class _RecordingTarInfo(tarfile.TarInfo):
    """Records on the TarFile why header reading stopped: Python's tarfile treats a file cut at or inside a
    512-byte header as a normal end of archive, so the end-of-archive zero block must be checked here."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as err:
            tarfile_._emerdiff_end = err  # type: ignore[attr-defined]
            raise


def _end_problem(tar: tarfile.TarFile) -> str | None:
    """Why the archive did not end properly (None when it ended with the zero end-of-archive block)."""
    end = getattr(tar, "_emerdiff_end", None)
    if isinstance(end, tarfile.EOFHeaderError):
        return None
    if isinstance(end, tarfile.EmptyHeaderError):
        return "the file ends without the end-of-archive blocks"
    if isinstance(end, tarfile.TruncatedHeaderError):
        return "the file ends inside a member header"
    if end is not None:
        return f"invalid member header ({end})"
    return "the archive ended early"


class TarItem(NamedTuple):
    """One sample of a tar (``fields`` raw bytes), or a failure (``fields`` None, ``reason`` set).

    ``fatal`` failures end the shard (corrupt or truncated tar): the samples after them are lost.
    """

    key: str | None
    fields: dict[str, bytes] | None
    reason: str | None = None
    fatal: bool = False


_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


def iter_tar(url: str, fields: Collection[str] | None = None) -> Iterator[TarItem]:
    """Samples of one tar shard (local, compressed or remote) as raw bytes, in order, with every problem
    reported as a :class:`TarItem` failure: a corrupt or truncated tar ends with one fatal failure
    (``truncated tar after N samples``) naming the sample being read; members that are no sample field
    (no extension) give a non-fatal one. ``fields`` keeps only the named fields (others are not read)."""
    key: str | None = None
    current: dict[str, bytes] = {}
    count = 0
    try:
        with (
            open_url(url) as stream,
            tarfile.open(fileobj=stream, mode="r|*", tarinfo=_RecordingTarInfo) as tar,
        ):
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    if not _META.search(member.name):
                        yield TarItem(member.name, None, f"member {member.name!r} has no extension: skipped")
                    continue
                if parts[0] != key:
                    if key is not None:
                        yield TarItem(key, current)
                        count += 1
                    key, current = parts[0], {}
                if fields is None or parts[1] in fields:
                    handle = tar.extractfile(member)
                    current[parts[1]] = handle.read() if handle is not None else b""
                tar.members = []  # streaming mode keeps every header otherwise
            problem = _end_problem(tar)
    except _TAR_ERRORS as err:
        reason = f"corrupt or unreadable tar after {count} samples ({type(err).__name__}: {err})"
        yield TarItem(key, None, reason + ("; the rest of the shard is lost" if key else ""), fatal=True)
        return
    if problem is not None:
        # the last sample may have lost members of its own: it is not trusted either
        reason = f"truncated tar after {count} samples ({problem}); the rest of the shard is lost"
        yield TarItem(key, None, reason, fatal=True)
        return
    if key is not None:
        yield TarItem(key, current)


def iter_raw_samples(urls: str | list[str], fields: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """Samples with undecoded bytes per field (plus ``__key__`` and ``__url__``), in shard order.

    Raises :class:`ShardReadError` naming the shard when a tar is corrupt or truncated (predict records that
    as a failure instead; every other subcommand stops, as its output would silently lack samples).
    """
    wanted = set(fields) if fields is not None else None
    for url in expand_urls(urls):
        for item in iter_tar(url, wanted):
            if item.fatal:
                raise ShardReadError(f"cannot read shard {url!r}: {item.reason}")
            if item.fields is not None:
                yield {"__key__": item.key, "__url__": url, **item.fields}


def iter_samples(
    urls: str | list[str],
    fields: Iterable[str] | None = None,
    decode: bool = True,
    labels: Collection[str] = (),
) -> Iterator[dict[str, Any]]:
    """Samples of WebDataset tar shards as dicts: ``__key__``, ``__url__`` and one entry per field.

    Fields are decoded by :func:`decode_field` (label maps raw, images as RGB, npy, json); ``labels`` names
    further fields to read as raw label maps. ``fields`` keeps only the named fields (others are not read).
    """
    for raw in iter_raw_samples(urls, fields):
        yield decode_sample(raw, labels) if decode else raw


def decode_sample(raw: dict[str, Any], labels: Collection[str] = ()) -> dict[str, Any]:
    """Decode every field of a raw sample (see :func:`decode_field`); errors name the field, key and shard."""
    sample = {k: v for k, v in raw.items() if k.startswith("__")}
    for field, value in raw.items():
        if field.startswith("__"):
            continue
        try:
            sample[field] = decode_field(field, value, as_label=field in labels)
        except Exception as err:
            raise ValueError(
                f"cannot decode field {field!r} of sample {raw.get('__key__')!r} in {raw.get('__url__')!r}: {err}"
            ) from err
    return sample


def tar_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys of a shard, in order; raises :class:`ShardReadError` when it is corrupt or truncated."""
    keys: list[str] = []
    for item in iter_tar(str(path), fields=()):
        if item.fatal:
            raise ShardReadError(f"shard {str(path)!r}: {item.reason}")
        if item.fields is not None:
            keys.append(str(item.key))
    return keys


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, hex (the checksum manifests record per shard)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class ShardIndex:
    """Random access to samples by key across shards (uncompressed local tars are read by offset, never fully).

    Used to match predictions with ground truth or source images that are stored in a different order. A
    truncated or corrupt shard raises :class:`ShardReadError` naming it.
    """

    def __init__(self, urls: str | list[str], fields: Iterable[str] | None = None):
        self.urls = expand_urls(urls)
        wanted = set(fields) if fields is not None else None
        self._members: dict[str, dict[str, tuple[str, int, int]]] = {}
        self.duplicates: list[str] = []
        for url in self.urls:
            if is_remote(url):
                raise ValueError(f"cannot index {url!r}: random access by key needs local .tar shards")
            self._index(url, wanted)
        self._handles: dict[str, Any] = {}

    def _index(self, url: str, wanted: set[str] | None) -> None:
        size = os.path.getsize(url)
        count = 0
        try:
            tar = tarfile.open(url, mode="r:", tarinfo=_RecordingTarInfo)  # noqa: SIM115 - closed below
        except tarfile.ReadError as err:
            raise ShardReadError(
                f"cannot index shard {url!r} ({err}): random access by key needs uncompressed .tar shards"
            ) from err
        with tar:
            last = None
            for member in tar:
                if not member.isfile() or (parts := split_member_name(member.name)) is None:
                    continue
                key, field = parts
                if key != last:
                    count, last = count + 1, key
                if member.offset_data + member.size > size:
                    raise ShardReadError(f"shard {url!r}: truncated tar after {count - 1} samples")
                entry = self._members.setdefault(key, {})
                if wanted is not None and field not in wanted:
                    continue
                if field in entry:
                    self.duplicates.append(key)
                entry[field] = (url, member.offset_data, member.size)
            problem = _end_problem(tar)
        if problem is not None:
            raise ShardReadError(f"shard {url!r}: truncated tar after {count} samples ({problem})")

    def keys(self) -> list[str]:
        return list(self._members)

    def __contains__(self, key: str) -> bool:
        return key in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def fields(self, key: str) -> list[str]:
        return list(self._members.get(key, {}))

    def _read(self, url: str, offset: int, size: int) -> bytes:
        handle = self._handles.get(url)
        if handle is None:
            if len(self._handles) >= 8:
                old = next(iter(self._handles))
                self._handles.pop(old).close()
            handle = open(url, "rb")  # noqa: SIM115 - kept open for random access, closed in close()
            self._handles[url] = handle
        handle.seek(offset)
        return handle.read(size)

    def get_raw(self, key: str, fields: Iterable[str] | None = None) -> dict[str, Any]:
        entry = self._members.get(key)
        if entry is None:
            raise KeyError(f"key {key!r} is in none of the {len(self.urls)} indexed shards")
        out: dict[str, Any] = {"__key__": key}
        for field, (url, offset, size) in entry.items():
            if fields is not None and field not in fields:
                continue
            out[field] = self._read(url, offset, size)
            out["__url__"] = url
        return out

    def get(
        self, key: str, fields: Iterable[str] | None = None, labels: Collection[str] = ()
    ) -> dict[str, Any]:
        return decode_sample(self.get_raw(key, fields), labels)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> ShardIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# decoding / encoding single fields
# --------------------------------------------------------------------------------------------------------------


def _field_parts(field: str) -> tuple[str, str]:
    """(first part, last extension) of a field name, lower case: ``gt.png`` → (``gt``, ``png``)."""
    lower = field.lower()
    return lower.split(".", 1)[0], lower.rsplit(".", 1)[-1]


def is_label_field(field: str) -> bool:
    """A label-map field (``gt.png``, ``seg.png``, ``lowres.png``, ``mask.png``, ...): read raw, never converted."""
    head, ext = _field_parts(field)
    return "." in field and head in LABEL_FIELDS and ext in IMAGE_EXTENSIONS


def is_image_field(field: str) -> bool:
    """A field holding a picture (``jpg``, ``png``, ``input.png``, ``overlay.jpg``, ...), decoded to RGB."""
    return _field_parts(field)[1] in IMAGE_EXTENSIONS and not is_label_field(field)


def image_field(fields: dict[str, bytes]) -> bytes:
    """The bytes of a sample's input image: a field named just ``jpg``, ``png``, ... first; else a compound one
    (``input.png``) that is neither a label map nor an overlay."""
    for field, data in fields.items():
        if field.lower() in IMAGE_EXTENSIONS:
            return data
    for field, data in fields.items():
        if is_image_field(field) and _field_parts(field)[0] != "overlay":
            return data
    raise ImageDecodeError(
        f"sample has no image member (fields: {sorted(fields)}; expected one of {IMAGE_EXTENSIONS})"
    )


def _sixteen_bit_to_uint8(image: Image.Image) -> np.ndarray:
    array = np.asarray(image).astype(np.float64)
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and array.max(initial=0) > 255):
        array = array / 257.0
    elif image.mode == "F" and array.max(initial=0) <= 1.0:
        array = array * 255.0
    gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def to_rgb(image: Image.Image) -> np.ndarray:
    """H×W×3 uint8 RGB from any PIL mode: 16-bit and float greyscale are rescaled (not clipped), transparency
    is composited over white, CMYK / YCbCr / palette / 1-bit are converted."""
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        return _sixteen_bit_to_uint8(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes → H×W×3 uint8 RGB, EXIF orientation applied, alpha composited over white (the one image
    decoder). Raises :class:`ImageDecodeError` with the reason for empty, unidentifiable, truncated, corrupt,
    zero-size and oversized (decompression bomb, more than ``max_pixels``) inputs."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large: {width}×{height} = {width * height} pixels > max_pixels={max_pixels} "
                    "(possible decompression bomb; raise data.max_pixels if it is genuine)"
                )
            if width == 0 or height == 0:
                raise ImageDecodeError(f"image has zero size ({width}×{height})")
            image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (PIL cannot identify the format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"image too large (decompression bomb check: {err})") from None
    except Exception as err:  # truncated / corrupt data raise OSError, SyntaxError, ValueError, ...
        raise ImageDecodeError(f"cannot decode image ({type(err).__name__}: {err})") from None
    with contextlib.suppress(Exception):  # a broken EXIF block must not cost the image: keep it unrotated
        image = ImageOps.exif_transpose(image)
    try:
        return to_rgb(image)
    except Exception as err:
        raise ImageDecodeError(
            f"cannot convert mode {image.mode!r} to RGB ({type(err).__name__}: {err})"
        ) from None


def read_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Alias of :func:`decode_image` (kept for callers of the earlier name)."""
    return decode_image(data, max_pixels)


def read_label_png(data: bytes) -> np.ndarray:
    """Decode a label PNG exactly as stored: uint8 for 8-bit (L or palette indices), uint16 for 16-bit."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(im, dtype=np.uint16).copy()
        if im.mode == "I":  # some writers store 16-bit greyscale as mode I
            arr = np.asarray(im)
            if arr.min() >= 0 and arr.max() <= 65535:
                return arr.astype(np.uint16)
            return arr.astype(np.int32)
        if im.mode in ("L", "P", "1"):
            return np.asarray(im, dtype=np.uint8).copy()
        return np.asarray(im).copy()  # RGB / RGBA PNG: returned as stored, H×W×C


def encode_label_png(labels: np.ndarray) -> bytes:
    """Encode an H×W integer label map losslessly: 8-bit PNG when max ≤ 255, else 16-bit PNG."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D (H×W), got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"label map holds negative ids (min {labels.min()}); PNG labels must be ≥ 0")
    top = int(labels.max()) if labels.size else 0
    if top > 65535:
        raise ValueError(f"label id {top} does not fit a 16-bit PNG (max 65535)")
    buf = io.BytesIO()
    if top <= 255:
        Image.fromarray(labels.astype(np.uint8)).save(buf, format="PNG")
    else:
        Image.fromarray(labels.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode an H×W×3 uint8 RGB image as JPEG, downscaled to fit JPEG's 65500-pixel side limit."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if max(picture.size) > JPEG_MAX_SIDE:
        scale = JPEG_MAX_SIDE / max(picture.size)
        size = (max(1, int(picture.width * scale)), max(1, int(picture.height * scale)))
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=False).encode("utf-8")


def decode_field(field: str, data: bytes, as_label: bool = False) -> Any:
    """Decode one field: label maps (:func:`is_label_field`, or ``as_label``) raw, other images to RGB with
    :func:`decode_image`, ``npy`` → numpy, ``json`` → dict, ``txt``/``cls`` → str, anything else → bytes."""
    ext = field.rsplit(".", 1)[-1].lower()
    if as_label or is_label_field(field):
        return read_label_png(data)
    if ext in IMAGE_EXTENSIONS:
        return decode_image(data)
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == "json":
        return json.loads(data.decode("utf-8"))
    if ext in ("txt", "cls"):
        return data.decode("utf-8")
    return data


def encode_field(field: str, value: Any) -> bytes:
    """Inverse of :func:`decode_field` for numpy arrays / dicts; bytes pass through unchanged."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    ext = field.rsplit(".", 1)[-1].lower()
    if ext == "npy":
        return encode_npy(value)
    if ext == "json":
        return encode_json(value)
    if ext == "png" and np.asarray(value).ndim == 2:
        return encode_label_png(value)
    if ext == "png":
        buf = io.BytesIO()
        Image.fromarray(np.asarray(value, dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()
    if ext in ("jpg", "jpeg"):
        return encode_jpeg(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"cannot encode field {field!r} from {type(value).__name__}")


# --------------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------------


class _HashingFile:
    """Write-only file wrapper that counts and hashes what goes through (size and checksum of a shard)."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        written = self.handle.write(data)
        self.size += len(data)
        self.sha256.update(data)
        return written

    def flush(self) -> None:
        self.handle.flush()


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (best effort: some file systems refuse directory fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _CloseOrAbort:
    """Context manager of the atomic writers: `close()` (publish) on success, `abort()` (drop) on error."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TarWriter(_CloseOrAbort):
    """The one atomic shard writer: a hidden ``.<name>.tmp`` beside ``path``, fsynced and renamed on close.

    Nothing ever appears under the final name unless the whole shard was written, flushed and fsynced; a
    failed close or :meth:`abort` removes the temporary file. Samples are encoded completely before the first
    byte reaches the tar, so an encoding error leaves the shard as it was; an error while writing marks the
    shard torn and it can no longer be published. Built on ``webdataset.TarWriter`` with raw bytes.
    """

    def __init__(self, path: str | os.PathLike):
        import webdataset as wds

        self.path = Path(path)
        self.name = self.path.name
        self.tmp_path = self.path.with_name(f".{self.name}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in close() / abort()
        self._hashing = _HashingFile(self._file)
        self._tar = wds.TarWriter(
            self._hashing,
            mtime=int(time.time()),  # whole seconds: a float mtime costs a PAX header per member
            encoder=False,
            mode=0o644,
            user="emerdiff-pl",
            group="emerdiff-pl",
            format="PAX_FORMAT",
        )
        self.keys: list[str] = []
        self.torn = False  # a sample write failed half-way: the shard is not publishable
        self.size: int | None = None  # bytes, once published
        self.sha256: str | None = None  # hex checksum, once published
        self._closed = False

    @property
    def count(self) -> int:
        return len(self.keys)

    def write(self, sample: dict[str, Any]) -> None:
        """Write one sample: ``__key__`` plus fields (bytes, or arrays / dicts encoded by extension)."""
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in key.rsplit("/", 1)[-1] or safe_key(key) != key:
            raise ValueError(
                f"sample key {key!r} must be a non-empty relative path without '.', '..', spaces or other "
                "awkward characters (see shardio.safe_key)"
            )
        members = {f: encode_field(f, v) for f, v in sample.items() if not f.startswith("__")}
        if self.torn or self._closed:
            raise RuntimeError(
                f"shard {self.name} is {'torn' if self.torn else 'closed'}: cannot write {key!r}"
            )
        self.torn = True
        self._tar.write({"__key__": key, **members})
        self.torn = False
        self.keys.append(key)

    def close(self) -> None:
        """Publish: end the tar, flush, fsync, rename to the final name, fsync the folder."""
        if self._closed:
            return
        if self.torn:
            self.abort()
            raise RuntimeError(f"shard {self.name} holds a half-written sample: dropped instead of published")
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.size, self.sha256 = self._hashing.size, self._hashing.sha256.hexdigest()
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Drop the partial shard (nothing appears under the final name)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._tar.tarstream.fileobj.closed = True  # its buffer must never be flushed into a dropped shard
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp_path)


class ShardSequenceWriter(_CloseOrAbort):
    """Numbered shards ``<pattern % index>`` of at most ``maxcount`` samples each, each written atomically."""

    def __init__(self, pattern: str, maxcount: int = 1000, start_index: int = 0):
        if "%" not in pattern:
            raise ValueError(f"shard pattern {pattern!r} needs a %-format index, e.g. 'out/shard-%06d.tar'")
        if maxcount < 1:
            raise ValueError(f"maxcount must be ≥ 1, got {maxcount}")
        self.pattern = pattern
        self.maxcount = maxcount
        self.index = start_index
        self.written: list[str] = []
        self.total = 0
        self._current: TarWriter | None = None

    def write(self, sample: dict[str, Any]) -> None:
        if self._current is None or self._current.count >= self.maxcount:
            self._finish()
            self._current = TarWriter(self.pattern % self.index)
            self.index += 1
        self._current.write(sample)
        self.total += 1

    def _finish(self) -> None:
        if self._current is not None:
            self._current.close()
            self.written.append(str(self._current.path))
            self._current = None

    def close(self) -> None:
        self._finish()

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None


def resize_labels_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an H×W label map to ``size`` = (H', W') with nearest neighbour (pixel-centre sampling)."""
    labels = np.asarray(labels)
    h, w = labels.shape[:2]
    out_h, out_w = int(size[0]), int(size[1])
    if (h, w) == (out_h, out_w):
        return labels
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]
