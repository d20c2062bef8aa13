"""Input side of ``emerdiff-pl predict``: images from WebDataset shards or a folder, as batches for the segmenter.

Every input unit (a shard, or one file of a folder) is read by exactly one process: the sorted unit list is cut
into contiguous blocks per SLURM array task, then dealt round-robin to DDP ranks and to dataloader workers. Shards
are read by :mod:`emerdiff_pl.shardio` and images decoded by :mod:`emerdiff_pl.codec` (RGB whatever their mode); anything that cannot be read
or decoded, a truncated tar included, becomes a ``failures`` entry of the batch instead of stopping the run. Keys
already written by an earlier attempt, or recorded as failures by one, are skipped before decoding.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from emerdiff_pl.classifiers.field import (
    CoarseMapError,
    check_coarse_size,
    coarse_file,
    coarse_member,
    coarse_scores,
)
from emerdiff_pl.codec import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, image_field
from emerdiff_pl.fields import IMAGE_EXTENSIONS, is_image_file
from emerdiff_pl.inputs import READ_ALL, InputPolicy, ReadPlan
from emerdiff_pl.manifest import array_task
from emerdiff_pl.paths import expand_urls, list_folder, safe_key
from emerdiff_pl.shardio import iter_tar
from emerdiff_pl.writer import PseudoLabelWriter

# --------------------------------------------------------------------------------------------------------------
# splitting
# --------------------------------------------------------------------------------------------------------------


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


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM sent to the whole process group (SLURM preemption, ``scancel``)
    and SIGINT (Ctrl-C in a terminal reaches every process of the foreground group) must not end the workers,
    or the main process dies on "DataLoader worker exited unexpectedly" instead of closing its shard; the main
    process winds down and the workers end with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def kill_workers_left_at_exit() -> None:
    """At interpreter exit, SIGKILL the dataloader workers still alive (they only read inputs). After an interrupt
    (Ctrl-C, SIGTERM) the loader is not always shut down before exit; multiprocessing's exit handler then
    `terminate()`s its daemonic children, a SIGTERM that :func:`ignore_stop_signals` workers ignore, and joins
    them: the process would wait forever with its summary already written. Registered when a loader with workers
    is built, so it runs before multiprocessing's handler (atexit is last in, first out)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# --------------------------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------------------------


class _Bucket:
    """The samples of one model input shape waiting for a batch."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []
        self.originals: list[torch.Tensor | None] = []  # the decoded image (keep_originals), for the writer
        self.sizes: list[tuple[int, int]] = []
        self.encoded: list[bytes | None] = []  # the input file's bytes (keep_bytes), for writer.include_image
        self.keys: list[str] = []
        self.source_keys: list[str] = []
        self.urls: list[str] = []
        self.coarse: list[torch.Tensor] = []  # (C, h_i, w_i) class scores, with `classifier: field`


class _Batcher:
    """Collects decoded samples, failures and skip counts into the batch dict of docs/interfaces.md.

    Images of one batch share a shape, so samples wait in one bucket per model input shape (``keep_aspect``
    and ``short_side`` give several); a bucket is flushed when it holds ``batch_size`` samples, and every
    bucket at the end of the input (:meth:`flush_all`). Failures and skip counts ride on the next batch flushed."""

    def __init__(
        self, batch_size: int, policy: InputPolicy, keep_originals: bool = False, with_coarse: bool = False
    ):
        self.batch_size = batch_size
        self.policy = policy
        self.keep_originals = keep_originals
        self.with_coarse = with_coarse
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self._reset_counts()

    def _reset_counts(self) -> None:
        self.failures: list[dict[str, Any]] = []
        self.skipped = 0
        self.skipped_failed = 0

    def add(
        self,
        key: str,
        url: str,
        rgb: np.ndarray,
        source_key: str,
        encoded: bytes | None = None,
        coarse: torch.Tensor | None = None,
    ) -> dict[str, Any] | None:
        image = self.policy.resize_image(rgb)
        shape = (int(image.shape[1]), int(image.shape[2]))
        bucket = self.buckets.setdefault(shape, _Bucket())
        bucket.images.append(image)
        bucket.originals.append(torch.from_numpy(rgb) if self.keep_originals else None)
        bucket.sizes.append((int(rgb.shape[0]), int(rgb.shape[1])))
        bucket.encoded.append(encoded)
        bucket.keys.append(key)
        bucket.source_keys.append(source_key)
        bucket.urls.append(url)
        if coarse is not None:
            bucket.coarse.append(coarse)
        return self.flush(shape) if len(bucket.keys) >= self.batch_size else None

    def fail(
        self, key: str | None, url: str, reason: str, source_key: str | None = None, kind: str = "sample"
    ) -> None:
        record = {"key": key, "url": url, "reason": reason, "kind": kind}
        if source_key is not None and source_key != key:
            record["source_key"] = source_key
        self.failures.append(record)

    def flush(self, shape: tuple[int, int] | None = None) -> dict[str, Any]:
        """The batch of bucket ``shape`` (None: the oldest bucket, or no images) with the pending failures."""
        if shape is None:
            shape = next(iter(self.buckets), None)
        bucket = self.buckets.pop(shape, None) if shape is not None else None
        bucket = bucket or _Bucket()
        r = self.policy.resolution
        batch = {
            "image": torch.stack(bucket.images) if bucket.images else torch.zeros(0, 3, r, r),
            "original": bucket.originals,
            "original_bytes": bucket.encoded,
            "original_size": torch.tensor(bucket.sizes, dtype=torch.int64).reshape(-1, 2),
            "key": bucket.keys,
            "source_key": bucket.source_keys,
            "url": bucket.urls,
            "failures": self.failures,
            "skipped": self.skipped,
            "skipped_failed": self.skipped_failed,
        }
        if self.with_coarse:
            batch["coarse"] = bucket.coarse
        self._reset_counts()
        return batch

    def flush_all(self) -> Iterator[dict[str, Any]]:
        """Every bucket that holds samples, oldest first, then a last batch for failures or skips left over."""
        while self.buckets:
            yield self.flush()
        if self.pending:
            yield self.flush()

    @property
    def pending(self) -> bool:
        return bool(self.buckets or self.failures or self.skipped or self.skipped_failed)


_CoarseReader = Callable[[], tuple[str, bytes]]


class ImageStream(IterableDataset):
    """Batches of decoded images from this process's share of the input units.

    ``units`` are shard URLs (``kind="shards"``) or (key, path) pairs (``kind="folder"``), already cut to this
    array task. They are dealt to ranks, then to dataloader workers, so each unit is read exactly once. Images
    are resized by the model's ``policy``; ``plan`` (the writer's) says which keys to leave out and what to
    carry. With ``coarse_classes`` (C, the model's ``classifier: field``) each sample's coarse map is read too
    (``<key>.coarse.png`` / ``.npy`` in shards, ``<stem>.coarse.png`` / ``.npy`` beside a folder image), decoded to
    C class scores and batched as ``coarse``; a sample without one, or with one that does not decode, fit C or
    the image, is a failure naming its key. Yields ready batches (use ``DataLoader(batch_size=None)``); the batch
    also carries ``"skipped"``
    (samples left out since the previous batch because their key is in ``plan.done_keys``) and
    ``"skipped_failed"`` (left out because an earlier run recorded them as failures: ``plan.failed_keys``). Tar
    keys are sanitised with :func:`~emerdiff_pl.paths.safe_key`; the original is passed on as ``"source_key"``.
    """

    def __init__(
        self,
        units: Sequence[Any],
        kind: str,
        policy: InputPolicy,
        batch_size: int,
        max_pixels: int,
        plan: ReadPlan = READ_ALL,
        rank: int = 0,
        world_size: int = 1,
        coarse_classes: int | None = None,
    ):
        super().__init__()
        if kind not in ("shards", "folder"):
            raise ValueError(f"kind must be 'shards' or 'folder', got {kind!r}")
        self.units = list(units)
        self.kind = kind
        self.policy = policy
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        self.coarse_classes = coarse_classes

    def my_units(self, worker: int = 0, num_workers: int = 1) -> list[Any]:
        return deal(deal(self.units, self.rank, self.world_size), worker, num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        units = self.my_units(info.id, info.num_workers) if info is not None else self.my_units()
        plan = self.plan
        batcher = _Batcher(self.batch_size, self.policy, plan.keep_originals, self.coarse_classes is not None)
        for unit in units:
            samples = self._folder_samples(unit) if self.kind == "folder" else self._shard_samples(unit)
            for key, source_key, url, read, reason, kind, read_coarse in samples:
                if reason is not None:
                    batcher.fail(key, url, reason, source_key, kind)
                    continue
                if key in plan.done_keys:
                    batcher.skipped += 1
                    continue
                if key in plan.failed_keys:
                    batcher.skipped_failed += 1
                    continue
                try:
                    encoded = read()
                    rgb = decode_image(encoded, self.max_pixels)
                    coarse = self._coarse(read_coarse, key, rgb.shape[:2])
                except (ImageDecodeError, CoarseMapError) as err:
                    batcher.fail(key, url, str(err), source_key)
                    continue
                batch = batcher.add(key, url, rgb, source_key, encoded if plan.keep_bytes else None, coarse)
                if batch is not None:
                    yield batch
        yield from batcher.flush_all()

    def _coarse(
        self, read_coarse: _CoarseReader, key: str, image_size: tuple[int, int]
    ) -> torch.Tensor | None:
        """The sample's coarse class scores (C, h, w) when the model asks for them, else None."""
        if self.coarse_classes is None:
            return None
        field, data = read_coarse()
        return check_coarse_size(coarse_scores(data, field, self.coarse_classes, key), image_size, key)

    # Both yield (key, source key, url, read, reason, kind, read_coarse): `read()` returns the image bytes lazily
    # (after the done-key check), `read_coarse()` the (field, bytes) of its coarse map; `reason` is set (and
    # `read` None) for a failure found while reading the container.

    def _folder_samples(self, unit: tuple[str, str]) -> Iterator[tuple]:
        key, path = unit
        if not is_image_file(path):
            reason = f"not an image file (supported extensions: {', '.join(IMAGE_EXTENSIONS)}): skipped"
            yield key, key, path, None, reason, "sample", None
            return

        def read() -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as err:
                raise ImageDecodeError(f"cannot read file ({type(err).__name__}: {err})") from None

        def read_coarse() -> tuple[str, bytes]:
            field, coarse_path = coarse_file(path)
            try:
                return field, coarse_path.read_bytes()
            except OSError as err:
                raise CoarseMapError(f"image {path!r}: cannot read {coarse_path.name} ({err})") from None

        yield key, key, path, read, None, "sample", read_coarse

    def _shard_samples(self, url: str) -> Iterator[tuple]:
        for item in iter_tar(url):
            key = safe_key(item.key) if item.key is not None else None
            if item.fields is None:
                yield key, item.key, url, None, item.reason, "shard" if item.fatal else "sample", None
                continue

            def read(fields: dict[str, bytes] = item.fields) -> bytes:
                return image_field(fields)

            def read_coarse(fields: dict[str, bytes] = item.fields, key: str = str(key)) -> tuple[str, bytes]:
                return coarse_member(fields, key)

            yield key, item.key, url, read, None, "sample", read_coarse


# --------------------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------------------


class EmerDiffDataModule(pl.LightningDataModule):
    """Images to label, from WebDataset shards (``urls``) or a folder (``folder``), split across SLURM array
    tasks, DDP ranks and dataloader workers so that each image is processed exactly once.

    The size images are resized to is the model's (``input_policy`` of the LightningModule, e.g.
    ``EmerDiffSegmenter``'s ``model.resolution`` / ``resize`` / ``resize_multiple``), as is whether each input's
    coarse map is read (the model's ``coarse_classes``: C with ``model.classifier: field``); which inputs to leave
    out and what to carry is the writer's (``PseudoLabelWriter.read_plan``): :meth:`predict_dataloader` asks
    both from the Trainer it runs under. Without a Trainer, :meth:`dataloader` takes them as arguments.

    Args:
        urls: WebDataset shards: a brace pattern (``data/train-{000000..000099}.tar``), several patterns joined
            by ``::``, a list, a glob, a directory of ``*.tar``, or remote URLs (``pipe:``, ``https://``).
        folder: A directory of images (recursive; jpg, jpeg, png, webp, bmp, tif, tiff; other files are recorded
            as failures; label and coarse maps beside an image, ``a.gt.png``, ``a.coarse.png``, ``a.coarse.npy``,
            are not inputs). Keys come from each file's relative path alone, extension included (``sub/a.jpg`` →
            ``sub/a_jpg``; see ``paths.file_key``). Give urls or folder.
        batch_size: Images per ``predict_step`` call (images of one model input shape; ``keep_aspect`` and
            ``short_side`` inputs wait in one bucket per shape).
        num_workers: Dataloader worker processes per rank (decoding and resizing happen there).
        array_index: This task's index in a job array (default: from ``SLURM_ARRAY_TASK_ID``, else 0).
        array_count: Number of array tasks sharing the input (default: ``SLURM_ARRAY_TASK_COUNT``, else 1).
            The sorted shard (or file) list is cut into ``array_count`` contiguous blocks.
        max_pixels: Images with more pixels are skipped and recorded as failures (decompression-bomb guard). The
            default, 40 Mpx, bounds one image's host memory (0.75 GiB measured for decoding, resizing and full-size
            labels at the limit, more with overlays and batches in flight; BENCHMARKS.md); raise it for genuine
            larger images where the memory is there.
    """

    def __init__(
        self,
        urls: str | list[str] | None = None,
        folder: str | None = None,
        batch_size: int = 1,
        num_workers: int = 2,
        array_index: int | None = None,
        array_count: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        super().__init__()
        if (urls is None) == (folder is None):
            raise ValueError(
                "give exactly one input: --data.urls 'shards/train-{000000..000009}.tar' (WebDataset shards) or "
                f"--data.folder path/to/images (got urls={urls!r}, folder={folder!r})"
            )
        for name, value, low in (("batch_size", batch_size, 1), ("max_pixels", max_pixels, 1)):
            if value < low:
                raise ValueError(f"data.{name} must be ≥ {low}, got {value}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be ≥ 0, got {num_workers}")
        self.urls = urls
        self.folder = folder
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.array_index, self.array_count = array_task(array_index, array_count)
        self.max_pixels = max_pixels
        self._all_units: list[Any] | None = None

    @property
    def kind(self) -> str:
        return "folder" if self.folder is not None else "shards"

    def all_units(self) -> list[Any]:
        """Every input unit (shard URL, or (key, path) for a folder) before any splitting, in a fixed order."""
        if self._all_units is None:
            if self.folder is not None:
                self._all_units = list_folder(self.folder, all_files=True)
                if not any(is_image_file(path) for _, path in self._all_units):
                    raise FileNotFoundError(
                        f"data.folder {self.folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
                    )
            else:
                assert self.urls is not None
                self._all_units = expand_urls(self.urls)
        return self._all_units

    def task_units(self) -> list[Any]:
        """This array task's block of :meth:`all_units`."""
        return partition(self.all_units(), self.array_index, self.array_count)

    def predict_dataloader(self) -> DataLoader:
        """The loader of this rank: images resized by the model's input policy, inputs left out and carried as
        the writer's read plan says (nothing left out without a ``PseudoLabelWriter``). Lightning asks for it
        after every ``setup``, so the writer has taken its task lock and read its output folder by then."""
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError(
                "predict_dataloader runs under a Trainer; without one, call dataloader(policy, plan)"
            )
        model = trainer.lightning_module
        policy = getattr(model, "input_policy", None)
        if not isinstance(policy, InputPolicy):
            raise TypeError(
                f"{type(model).__name__} has no input_policy (an emerdiff_pl.inputs.InputPolicy): the DataModule "
                "resizes images to the size the model takes them at, and the model says which"
            )
        writer = PseudoLabelWriter.of(trainer)
        plan = writer.read_plan() if writer is not None else READ_ALL
        coarse_classes = getattr(model, "coarse_classes", None)
        return self.dataloader(policy, plan, trainer.global_rank, trainer.world_size, coarse_classes)

    def dataloader(
        self,
        policy: InputPolicy,
        plan: ReadPlan = READ_ALL,
        rank: int = 0,
        world_size: int = 1,
        coarse_classes: int | None = None,
    ) -> DataLoader:
        """The loader of rank ``rank`` of ``world_size``: images resized by ``policy``, inputs left out and
        carried as ``plan`` says; with ``coarse_classes`` (C) each input's coarse map is batched as ``coarse``."""
        units = self.task_units()
        dataset = ImageStream(
            units,
            self.kind,
            policy,
            self.batch_size,
            self.max_pixels,
            plan,
            rank=rank,
            world_size=world_size,
            coarse_classes=coarse_classes,
        )
        mine = len(deal(units, rank, world_size))
        workers = min(self.num_workers, mine)
        if 0 < mine < self.num_workers:
            warnings.warn(
                f"rank {rank} has {mine} input {self.kind} but data.num_workers={self.num_workers}: using {workers} "
                "workers (split the input into more shards for more parallelism)",
                stacklevel=2,
            )
        if workers:  # registered once, after multiprocessing's exit handler, so it runs before that one
            atexit.unregister(kill_workers_left_at_exit)
            atexit.register(kill_workers_left_at_exit)
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=False,
            worker_init_fn=ignore_stop_signals if workers else None,
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Only the model input goes to the accelerator; originals (full size, for outputs) stay on the CPU."""
        if isinstance(batch, dict) and "image" in batch:
            return {**batch, "image": batch["image"].to(device, non_blocking=True)}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


__all__ = [
    "EmerDiffDataModule",
    "ImageStream",
    "deal",
    "ignore_stop_signals",
    "partition",
]
