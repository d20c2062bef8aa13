"""Input side of ``emerdiff-pl predict``: images from WebDataset shards or a folder, as batches for the segmenter.

Every input unit (a shard, or one file of a folder) is read by exactly one process: the sorted unit list is cut
into contiguous blocks per SLURM array task, then dealt round-robin to DDP ranks and to dataloader workers. Images
are decoded with PIL to RGB whatever their mode; anything that cannot be decoded becomes a ``failures`` entry of
the batch instead of stopping the run. Keys already written by an earlier attempt are skipped before decoding.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

# File extensions read as images: folder files and tar members (the last extension of the field, lower case).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
# Compound fields that hold label maps, not the image (ground truth, this tool's own outputs, common names).
_LABEL_FIELDS = {"gt", "seg", "lowres", "label", "labels", "mask", "masks", "overlay", "depth", "cls"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # pipe:, http:, s3:, ... (WebDataset gopen schemes)
_TAR_META = re.compile(r"(^|/)__[^/]*__($|/)")  # WebDataset metadata members such as __index__


class ImageDecodeError(ValueError):
    """An input that cannot become an RGB image; its message is the ``reason`` recorded in the failures."""


# --------------------------------------------------------------------------------------------------------------
# splitting
# --------------------------------------------------------------------------------------------------------------


def array_task(index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """Resolve (array_index, array_count): explicit values win, else ``SLURM_ARRAY_TASK_ID`` /
    ``SLURM_ARRAY_TASK_COUNT``, else (0, 1).

    Arrays must be numbered from 0 (``--array=0-99%16``). When resubmitting some tasks (``--array=3,17``) SLURM
    reports a smaller count, so pass the original ``array_count`` explicitly (slurm/array.sbatch does).
    """
    env = os.environ
    if count is None:
        count = int(env.get("SLURM_ARRAY_TASK_COUNT", "1"))
    if index is None:
        index = int(env.get("SLURM_ARRAY_TASK_ID", "0"))
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"array task index {index} is not in [0, {count}) (array_count={count}): number SLURM arrays from 0 "
            "(--array=0-N), and when resubmitting a subset of tasks (--array=3,17) pass the original "
            "--data.array_count"
        )
    return index, count


def partition(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """The ``index``-th of ``count`` contiguous, near-equal blocks of ``items`` (blocks partition the items)."""
    n = len(items)
    return list(items[index * n // count : (index + 1) * n // count])


def deal(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """Round-robin share ``index`` of ``count`` (used for ranks and dataloader workers)."""
    return list(items[index::count])


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------


def expand_shard_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard list from a brace pattern, ``::``-separated patterns, a list, globs or directories (local paths are
    checked to exist); remote URLs (``pipe:``, ``http://``, ...) are brace-expanded and read with WebDataset's
    ``gopen``."""
    import braceexpand

    from emerdiff_pl.shardio import expand_urls as expand_local

    patterns = [p for p in urls.split("::") if p] if isinstance(urls, str) else [str(u) for u in urls]
    if not patterns:
        raise ValueError("data.urls is empty: give shard paths such as 'shards/train-{000000..000009}.tar'")
    out: list[str] = []
    for pattern in patterns:
        if _REMOTE.match(pattern) and not os.path.exists(pattern):
            out.extend(braceexpand.braceexpand(pattern))
        else:
            out.extend(expand_local(pattern))
    duplicates = sorted(u for u, n in Counter(out).items() if n > 1)
    if duplicates:
        raise ValueError(f"data.urls names these shards more than once: {duplicates[:5]}")
    return out


def tar_safe_key(relative_path: str) -> str:
    """Sample key for a file: its relative path without extension, with every '.' (WebDataset cuts the key at the
    first dot of the basename), whitespace, backslash and other awkward characters replaced by '_'."""
    stem = relative_path.rsplit(".", 1)[0] if "." in Path(relative_path).name else relative_path
    parts = [re.sub(r"[^\w\-+=,@~]", "_", part) or "_" for part in stem.replace("\\", "/").split("/") if part]
    return "/".join(parts)


def list_folder(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """Sorted (key, path) pairs for the images under ``folder`` (recursive, hidden files and folders ignored).

    Keys are :func:`tar_safe_key` of the relative path, made unique by suffixing ``-2``, ``-3``, ... in sorted
    path order (``a.jpg`` and ``a.png`` become ``a`` and ``a-2``), so every process derives the same keys.
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
            if name.startswith(".") or name.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
                continue
            relpaths.append(Path(dirpath, name).relative_to(root).as_posix())
    relpaths.sort()
    taken: set[str] = set()
    out: list[tuple[str, str]] = []
    for rel in relpaths:
        base = key = tar_safe_key(rel)
        suffix = 2
        while key in taken:
            key = f"{base}-{suffix}"
            suffix += 1
        taken.add(key)
        out.append((key, str(root / rel)))
    return out


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/abc.seg.png`` → (``dir/abc``, ``seg.png``): WebDataset's key / field split; None without a field."""
    dirname, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, field = base.split(".", 1)
    return (f"{dirname}/{stem}" if dirname else stem), field


def _open_stream(url: str):
    if os.path.exists(url):
        return open(url, "rb")  # noqa: SIM115 - closed by the caller
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def iter_tar(url: str) -> Iterator[tuple[str, dict[str, bytes] | None, str | None]]:
    """(key, fields, None) per sample of a tar shard, or (key or None, None, reason) when the tar breaks.

    A corrupt or truncated tar ends its shard with one failure naming the sample being read (None when the
    break falls between samples); the samples before the break are yielded normally.
    """
    key: str | None = None
    fields: dict[str, bytes] = {}
    count = 0
    try:
        with _open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile() or _TAR_META.search(member.name):
                    continue
                parts = split_member_name(member.name)
                if parts is None:
                    continue
                if parts[0] != key:
                    if key is not None:
                        yield key, fields, None
                        count += 1
                    key, fields = parts[0], {}
                handle = tar.extractfile(member)
                fields[parts[1]] = handle.read() if handle is not None else b""
                tar.members = []  # streaming mode keeps every header otherwise
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as err:
        reason = f"corrupt or unreadable tar after {count} samples ({type(err).__name__}: {err})"
        yield key, None, reason + ("; the rest of the shard is lost" if key else "")
        return
    if key is not None:
        yield key, fields, None


def image_field(fields: dict[str, bytes]) -> bytes:
    """The bytes of the sample's image member: a field named just ``jpg``, ``png``, ... first; else a compound
    one (``input.png``) unless it is a label map (``gt.png``, ``seg.png``, ``mask.png``, ...)."""
    for field, data in fields.items():
        if field.lower() in IMAGE_EXTENSIONS:
            return data
    for field, data in fields.items():
        head, _, ext = field.lower().rpartition(".")
        if ext in IMAGE_EXTENSIONS and head.split(".")[0] not in _LABEL_FIELDS:
            return data
    raise ImageDecodeError(
        f"sample has no image member (fields: {sorted(fields)}; expected one of {IMAGE_EXTENSIONS})"
    )


# --------------------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------------------


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


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded bytes → H×W×3 uint8 RGB, EXIF orientation applied. Raises :class:`ImageDecodeError` with the
    reason for empty, unidentifiable, truncated, corrupt, zero-size and oversized (decompression bomb) inputs."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large: {width}×{height} = {width * height} pixels > data.max_pixels={max_pixels} "
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


def resize_for_model(rgb: np.ndarray, resolution: int) -> torch.Tensor:
    """H×W×3 uint8 → 3×R×R float32 in [0, 1] (bilinear with antialias, aspect ratio not kept)."""
    image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
    image = F.interpolate(
        image[None], size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
    )
    return image[0].clamp_(0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------------------------


class _Batcher:
    """Collects decoded samples, failures and skip counts into the batch dict of docs/interfaces.md."""

    def __init__(self, batch_size: int, resolution: int):
        self.batch_size = batch_size
        self.resolution = resolution
        self._reset()

    def _reset(self) -> None:
        self.images: list[torch.Tensor] = []
        self.originals: list[torch.Tensor] = []
        self.keys: list[str] = []
        self.urls: list[str] = []
        self.failures: list[dict[str, Any]] = []
        self.skipped = 0

    def add(self, key: str, url: str, rgb: np.ndarray) -> dict[str, Any] | None:
        self.images.append(resize_for_model(rgb, self.resolution))
        self.originals.append(torch.from_numpy(rgb))
        self.keys.append(key)
        self.urls.append(url)
        return self.flush() if len(self.keys) >= self.batch_size else None

    def fail(self, key: str | None, url: str, reason: str) -> None:
        self.failures.append({"key": key, "url": url, "reason": reason})

    def flush(self) -> dict[str, Any]:
        r = self.resolution
        sizes = [tuple(o.shape[:2]) for o in self.originals]
        batch = {
            "image": torch.stack(self.images) if self.images else torch.zeros(0, 3, r, r),
            "original": self.originals,
            "original_size": torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2),
            "key": self.keys,
            "url": self.urls,
            "failures": self.failures,
            "skipped": self.skipped,
        }
        self._reset()
        return batch

    @property
    def pending(self) -> bool:
        return bool(self.keys or self.failures or self.skipped)


_Reader = Callable[[], bytes]


class ImageStream(IterableDataset):
    """Batches of decoded images from this process's share of the input units.

    ``units`` are shard URLs (``kind="shards"``) or (key, path) pairs (``kind="folder"``), already cut to this
    array task. They are dealt to ranks, then to dataloader workers, so each unit is read exactly once. Yields
    ready batches (use ``DataLoader(batch_size=None)``); the batch also carries ``"skipped"``: how many samples
    were left out since the previous batch because their key is in ``done_keys``.
    """

    def __init__(
        self,
        units: Sequence[Any],
        kind: str,
        resolution: int,
        batch_size: int,
        max_pixels: int,
        done_keys: frozenset[str] = frozenset(),
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if kind not in ("shards", "folder"):
            raise ValueError(f"kind must be 'shards' or 'folder', got {kind!r}")
        self.units = list(units)
        self.kind = kind
        self.resolution = resolution
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.done_keys = done_keys
        self.rank = rank
        self.world_size = world_size

    def my_units(self, worker: int = 0, num_workers: int = 1) -> list[Any]:
        return deal(deal(self.units, self.rank, self.world_size), worker, num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        units = self.my_units(info.id, info.num_workers) if info is not None else self.my_units()
        batcher = _Batcher(self.batch_size, self.resolution)
        for unit in units:
            samples = self._folder_samples(unit) if self.kind == "folder" else self._shard_samples(unit)
            for key, url, read, reason in samples:
                if reason is not None:
                    batcher.fail(key, url, reason)
                    continue
                if key in self.done_keys:
                    batcher.skipped += 1
                    continue
                try:
                    rgb = decode_image(read(), self.max_pixels)
                except ImageDecodeError as err:
                    batcher.fail(key, url, str(err))
                    continue
                batch = batcher.add(key, url, rgb)
                if batch is not None:
                    yield batch
        if batcher.pending:
            yield batcher.flush()

    # Both yield (key, url, read, reason): `read()` returns the image bytes lazily (after the done-key check),
    # `reason` is set (and `read` None) for a failure found while reading the container.

    def _folder_samples(self, unit: tuple[str, str]) -> Iterator[tuple[str, str, _Reader, None]]:
        key, path = unit

        def read() -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as err:
                raise ImageDecodeError(f"cannot read file ({type(err).__name__}: {err})") from None

        yield key, path, read, None

    def _shard_samples(self, url: str) -> Iterator[tuple[str | None, str, _Reader | None, str | None]]:
        for key, fields, reason in iter_tar(url):
            if reason is not None:
                yield key, url, None, reason
                continue
            assert key is not None and fields is not None

            def read(fields: dict[str, bytes] = fields) -> bytes:
                return image_field(fields)

            yield key, url, read, None


# --------------------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------------------


class EmerDiffDataModule(pl.LightningDataModule):
    """Images to label, from WebDataset shards (``urls``) or a folder (``folder``), split across SLURM array
    tasks, DDP ranks and dataloader workers so that each image is processed exactly once.

    Args:
        urls: WebDataset shards: a brace pattern (``data/train-{000000..000099}.tar``), several patterns joined
            by ``::``, a list, a glob, a directory of ``*.tar``, or remote URLs (``pipe:``, ``https://``).
        folder: A directory of images (recursive; jpg, jpeg, png, webp, bmp, tif, tiff). Keys are the relative
            paths without extension, with dots and awkward characters replaced by ``_``. Give urls or folder.
        resolution: Side of the square model input; linked to ``model.resolution`` by the CLI.
        batch_size: Images per ``predict_step`` call.
        num_workers: Dataloader worker processes per rank (decoding and resizing happen there).
        array_index: This task's index in a job array (default: from ``SLURM_ARRAY_TASK_ID``, else 0).
        array_count: Number of array tasks sharing the input (default: ``SLURM_ARRAY_TASK_COUNT``, else 1).
            The sorted shard (or file) list is cut into ``array_count`` contiguous blocks.
        max_pixels: Images with more pixels are skipped and recorded as failures (decompression-bomb guard).
    """

    def __init__(
        self,
        urls: str | list[str] | None = None,
        folder: str | None = None,
        resolution: int = 512,
        batch_size: int = 1,
        num_workers: int = 2,
        array_index: int | None = None,
        array_count: int | None = None,
        max_pixels: int = Image.MAX_IMAGE_PIXELS,
    ):
        super().__init__()
        if (urls is None) == (folder is None):
            raise ValueError(
                "give exactly one input: --data.urls 'shards/train-{000000..000009}.tar' (WebDataset shards) or "
                f"--data.folder path/to/images (got urls={urls!r}, folder={folder!r})"
            )
        for name, value, low in (
            ("resolution", resolution, 8),
            ("batch_size", batch_size, 1),
            ("max_pixels", max_pixels, 1),
        ):
            if value < low:
                raise ValueError(f"data.{name} must be ≥ {low}, got {value}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be ≥ 0, got {num_workers}")
        self.urls = urls
        self.folder = folder
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.array_index, self.array_count = array_task(array_index, array_count)
        self.max_pixels = max_pixels
        self.done_keys: frozenset[str] = frozenset()
        self._all_units: list[Any] | None = None

    @property
    def kind(self) -> str:
        return "folder" if self.folder is not None else "shards"

    def all_units(self) -> list[Any]:
        """Every input unit (shard URL, or (key, path) for a folder) before any splitting, in a fixed order."""
        if self._all_units is None:
            if self.folder is not None:
                self._all_units = list_folder(self.folder)
                if not self._all_units:
                    raise FileNotFoundError(
                        f"data.folder {self.folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
                    )
            else:
                assert self.urls is not None
                self._all_units = expand_shard_urls(self.urls)
        return self._all_units

    def task_units(self) -> list[Any]:
        """This array task's block of :meth:`all_units`."""
        return partition(self.all_units(), self.array_index, self.array_count)

    def set_done_keys(self, keys: set[str] | frozenset[str]) -> None:
        """Keys already in finished output shards: they are skipped (called by the writer before predicting)."""
        self.done_keys = frozenset(keys)

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def predict_dataloader(self) -> DataLoader:
        rank, world_size = self._rank()
        units = self.task_units()
        dataset = ImageStream(
            units,
            self.kind,
            self.resolution,
            self.batch_size,
            self.max_pixels,
            self.done_keys,
            rank=rank,
            world_size=world_size,
        )
        mine = len(deal(units, rank, world_size))
        workers = min(self.num_workers, mine)
        if 0 < mine < self.num_workers:
            warnings.warn(
                f"rank {rank} has {mine} input {self.kind} but data.num_workers={self.num_workers}: using {workers} "
                "workers (split the input into more shards for more parallelism)",
                stacklevel=2,
            )
        return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Only the model input goes to the accelerator; originals (full size, for outputs) stay on the CPU."""
        if isinstance(batch, dict) and "image" in batch:
            return {**batch, "image": batch["image"].to(device, non_blocking=True)}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


__all__ = [
    "EmerDiffDataModule",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageStream",
    "array_task",
    "decode_image",
    "deal",
    "expand_shard_urls",
    "iter_tar",
    "list_folder",
    "partition",
    "tar_safe_key",
    "to_rgb",
]
