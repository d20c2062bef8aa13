"""Reading and writing WebDataset tar shards without WebDataset's decoders.

WebDataset's built-in image decoders convert modes, so a uint16 or palette label PNG comes back wrong
(NOTES.md). This module reads tar members itself and decodes label PNGs raw: what was stored is what you get.

Sample layout (WebDataset convention): the member ``dir/abc.seg.png`` belongs to sample ``__key__ = "dir/abc"``
under the field name ``"seg.png"``; members of one sample are consecutive in the tar.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "webp")
LABEL_EXTENSIONS = ("png",)


# --------------------------------------------------------------------------------------------------------------
# URL expansion
# --------------------------------------------------------------------------------------------------------------


def _braceexpand(pattern: str) -> list[str]:
    try:
        from braceexpand import braceexpand
    except ImportError:  # pragma: no cover - braceexpand ships with webdataset
        return [pattern]
    return list(braceexpand(pattern))


def expand_urls(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard paths from a brace pattern (``data-{000..009}.tar``), a glob, a directory, or a list of those.

    ``::`` separates several patterns in one string (WebDataset's convention). Raises ``FileNotFoundError``
    naming the pattern when it matches nothing.
    """
    if isinstance(urls, str | os.PathLike):
        patterns = [p for p in str(urls).split("::") if p]
    else:
        patterns = [str(u) for u in urls]
    if not patterns:
        raise FileNotFoundError("no shard paths given (empty pattern)")
    out: list[str] = []
    for pattern in patterns:
        for path in _braceexpand(pattern):
            if os.path.isdir(path):
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
                    "a brace pattern such as 'out/shard-{000000..000009}.tar', a glob or a directory"
                )
    return out


# --------------------------------------------------------------------------------------------------------------
# decoding / encoding single fields
# --------------------------------------------------------------------------------------------------------------


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


def read_image(data: bytes) -> np.ndarray:
    """Decode an encoded image to H×W×3 uint8 RGB (EXIF orientation applied)."""
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode an H×W×3 uint8 RGB image as JPEG."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=False).encode("utf-8")


def decode_field(field: str, data: bytes) -> Any:
    """Decode one field by its last extension: png → raw labels, npy, json, jpg/jpeg/webp → RGB, else bytes."""
    ext = field.rsplit(".", 1)[-1].lower()
    if ext in LABEL_EXTENSIONS:
        return read_label_png(data)
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == "json":
        return json.loads(data.decode("utf-8"))
    if ext in IMAGE_EXTENSIONS:
        return read_image(data)
    if ext in ("txt", "cls"):
        return data.decode("utf-8")
    return data


def encode_field(field: str, value: Any) -> bytes:
    """Inverse of :func:`decode_field` for numpy arrays / dicts; bytes pass through unchanged."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    ext = field.rsplit(".", 1)[-1].lower()
    if ext in LABEL_EXTENSIONS:
        return encode_label_png(value)
    if ext == "npy":
        return encode_npy(value)
    if ext == "json":
        return encode_json(value)
    if ext in IMAGE_EXTENSIONS:
        return encode_jpeg(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"cannot encode field {field!r} from {type(value).__name__}")


# --------------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/abc.seg.png`` → (``dir/abc``, ``seg.png``); None for members without an extension."""
    dirname, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, field = base.split(".", 1)
    key = f"{dirname}/{stem}" if dirname else stem
    return key, field


def _wanted(field: str, fields: set[str] | None) -> bool:
    return fields is None or field in fields


def iter_raw_samples(urls: str | list[str], fields: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """Samples with undecoded bytes per field (plus ``__key__`` and ``__url__``), in shard order."""
    wanted = set(fields) if fields is not None else None
    for url in expand_urls(urls):
        try:
            tar = tarfile.open(url, mode="r:*")  # noqa: SIM115 - closed by the with block below
        except (tarfile.TarError, OSError) as err:
            raise OSError(f"cannot read shard {url!r}: {err}") from err
        with tar:
            current: dict[str, Any] | None = None
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    continue
                key, field = parts
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if not _wanted(field, wanted):
                    continue
                handle = tar.extractfile(member)
                current[field] = handle.read() if handle is not None else b""
            if current is not None:
                yield current


def iter_samples(
    urls: str | list[str], fields: Iterable[str] | None = None, decode: bool = True
) -> Iterator[dict[str, Any]]:
    """Samples of WebDataset tar shards as dicts: ``__key__``, ``__url__`` and one entry per field.

    Fields are named as in WebDataset (``"seg.png"``, ``"emb.npy"``, ``"json"``, ``"jpg"``) and decoded by
    their last extension: ``.png`` → numpy exactly as stored (uint8 or uint16, no mode conversion),
    ``.npy`` → numpy, ``.json`` → dict, ``.jpg/.jpeg/.webp`` → H×W×3 uint8 RGB, anything else → bytes.
    ``fields`` keeps only the named fields (others are skipped without decoding).
    """
    for raw in iter_raw_samples(urls, fields):
        if not decode:
            yield raw
            continue
        sample = {"__key__": raw["__key__"], "__url__": raw["__url__"]}
        for field, value in raw.items():
            if field.startswith("__"):
                continue
            try:
                sample[field] = decode_field(field, value)
            except Exception as err:
                raise ValueError(
                    f"cannot decode field {field!r} of sample {raw['__key__']!r} in {raw['__url__']!r}: {err}"
                ) from err
        yield sample


class ShardIndex:
    """Random access to samples by key across shards (uncompressed tars are read by offset, never fully).

    Used to match predictions with ground truth or source images that are stored in a different order.
    """

    def __init__(self, urls: str | list[str], fields: Iterable[str] | None = None):
        self.urls = expand_urls(urls)
        wanted = set(fields) if fields is not None else None
        self._members: dict[str, dict[str, tuple[str, int, int]]] = {}
        self.duplicates: list[str] = []
        for url in self.urls:
            try:
                tar = tarfile.open(url, mode="r:")  # noqa: SIM115 - closed by the with block below
            except tarfile.ReadError as err:
                raise ValueError(
                    f"cannot index shard {url!r} ({err}): random access by key needs uncompressed .tar shards"
                ) from err
            with tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    parts = split_member_name(member.name)
                    if parts is None:
                        continue
                    key, field = parts
                    if not _wanted(field, wanted):
                        self._members.setdefault(key, {})
                        continue
                    entry = self._members.setdefault(key, {})
                    if field in entry:
                        self.duplicates.append(key)
                    entry[field] = (url, member.offset_data, member.size)
        self._handles: dict[str, Any] = {}

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

    def get(self, key: str, fields: Iterable[str] | None = None) -> dict[str, Any]:
        raw = self.get_raw(key, fields)
        return {k: (v if k.startswith("__") else decode_field(k, v)) for k, v in raw.items()}

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> ShardIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------------


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


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
    """One tar shard written under ``<path>.tmp`` and renamed to ``path`` on close (atomic output)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.tmp_path = self.path + ".tmp"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._tar = tarfile.open(self.tmp_path, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed in close()
        self.count = 0
        self._closed = False

    def write(self, sample: dict[str, Any]) -> None:
        """Write one sample: ``__key__`` plus fields (bytes, or arrays / dicts encoded by extension)."""
        key = sample.get("__key__")
        if not key or "." in os.path.basename(key):
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' in its basename")
        now = time.time()
        for field, value in sample.items():
            if field.startswith("__"):
                continue
            _add_member(self._tar, f"{key}.{field}", encode_field(field, value), now)
        self.count += 1

    def close(self) -> None:
        if self._closed:
            return
        self._tar.close()
        os.replace(self.tmp_path, self.path)
        self._closed = True

    def abort(self) -> None:
        """Drop the partial shard (nothing appears under the final name)."""
        if self._closed:
            return
        self._tar.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)
        self._closed = True


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
            self.written.append(self._current.path)
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
