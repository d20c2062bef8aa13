"""Training on the output: (image, label) pairs from pseudo-label shards, for a segmentation model's DataLoader.

One WebDataset pipeline, built once per dataset: the shard list, shuffled per epoch (the same order on every
rank and worker), split by node and by worker, read by :func:`emerdiff_pl.shardio.tar_samples` (the project's
one tar reader: a truncated or corrupt shard raises naming it), then a seeded shuffle buffer. Labels are decoded
by :func:`emerdiff_pl.codec.read_label_png` (WebDataset's own image decoders convert label PNG modes), images as
the prediction input was decoded. Images come from the label shards themselves (``writer.include_image: true``)
or, for labels written without them, from the folder or shards predict read, joined by key
(:func:`emerdiff_pl.sources.open_images`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from emerdiff_pl.codec import ImageDecodeError, decode_image, image_field, read_label_png
from emerdiff_pl.fields import SEG_FIELD
from emerdiff_pl.paths import expand_urls
from emerdiff_pl.shardio import ShardIndex, tar_samples
from emerdiff_pl.sources import ImageSource, open_images

_NO_PIXEL_LIMIT = 2**40  # predict already applied its decompression-bomb guard to these images

Transform = Callable[[torch.Tensor, torch.Tensor], tuple[Any, Any]]


def _keys_of(urls: list[str]) -> list[str]:
    return ShardIndex(urls, fields=()).keys()


def check_join(label_keys: Iterable[str], image_keys: Iterable[str]) -> None:
    """Raise ``KeyError`` naming the keys found on one side of a label/image join only (and their count)."""
    labels, images = set(label_keys), set(image_keys)
    problems = []
    for side, other, missing in (("label", "image", labels - images), ("image", "label", images - labels)):
        if missing:
            shown = ", ".join(repr(k) for k in sorted(missing)[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            problems.append(
                f"{len(missing)} key(s) are in the {side} shards but not in the {other} shards: {shown}{more}"
            )
    if problems:
        raise KeyError("; ".join(problems) + " (labels and images must describe the same samples)")


class PseudoLabelDataset(IterableDataset):
    """(image, label, key) samples from pseudo-label shards: image uint8 H×W×3, label int64 H×W.

    Args:
        urls: The label shards (brace pattern, glob, folder, list, ``::``-joined): ``emerdiff-pl predict`` or
            ``emerdiff-pl relabel`` output. Relabelled shards hold global ids in ``seg.png``; raw prediction
            shards hold per-image cluster ids (consistent within an image only).
        images: Where the images are when the labels were written without them: the folder or the shards predict
            read (``--data.folder`` / ``--data.urls``; shards local and uncompressed, read by offset), keyed as
            predict keyed them. Every key must be on both sides: a one-sided key raises ``KeyError`` naming it.
            ``None``: images from the label shards.
        transform: Called as ``transform(image, label)`` with ``torchvision.tv_tensors.Image`` (uint8 3×H×W) and
            ``tv_tensors.Mask`` (int64 H×W), so a ``torchvision.transforms.v2`` pipeline transforms both
            jointly; returns (image, label). Without it images of different sizes cannot be batched.
        shuffle: Shuffle buffer size in samples for training (shard order is shuffled too); 0 keeps shard order.
        label_field: The label member (``seg.png``; ``gt.png`` reads ground-truth shards the same way).
        seed: Seed of the shard and sample shuffles. A pass's order depends on (seed, epoch) alone, in any
            process: the same in every pass unless :meth:`set_epoch` changes the epoch, which
            :func:`pseudolabel_loader` does once per pass (so each epoch of ``Trainer.fit`` sees another order).

    Shards are dealt to DDP ranks, then to DataLoader workers: give at least ranks × workers shards, or some of
    them get nothing (and DDP training steps go out of step).
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str],
        images: str | os.PathLike | Sequence[str] | None = None,
        transform: Transform | None = None,
        shuffle: int = 0,
        label_field: str = SEG_FIELD,
        seed: int = 0,
    ):
        super().__init__()
        if shuffle < 0:
            raise ValueError(f"shuffle must be ≥ 0 (a buffer size in samples), got {shuffle}")
        self.urls = expand_urls(urls)
        self.transform = transform
        self.shuffle = shuffle
        self.label_field = label_field
        self.seed = seed
        self.epoch = 0
        self.image_index: ImageSource | None = None
        if images is not None:
            self.image_index = open_images(images if isinstance(images, str | os.PathLike) else list(images))
            check_join(_keys_of(self.urls), self.image_index.keys())
        shard_order = sample_order = None
        if shuffle:
            base = seed * 1_000_003
            # the stages and seeds of the earlier per-pass WebDataset: one process's orders are unchanged
            shard_order = wds.detshuffle(len(self.urls), initial=min(len(self.urls), 100), seed=base)
            sample_order = wds.detshuffle(shuffle, initial=min(shuffle, 100), seed=base)
        self._shuffles = [stage for stage in (shard_order, sample_order) if stage is not None]
        # the shard order comes before the split: every rank and worker permutes the same list, then takes its
        # own share of it (DataPipeline skips the None stages of an unshuffled set)
        self.pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            shard_order,
            wds.split_by_node,
            wds.split_by_worker,
            tar_samples,
            sample_order,
        )

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass: its shard and sample order is the one of (seed, epoch)."""
        self.epoch = int(epoch)

    def samples(self) -> Iterator[dict[str, Any]]:
        """This process's raw samples of one pass (its shards by node, then by worker), in the order of
        (seed, epoch), read from the pipeline built once in the constructor."""
        for stage in self._shuffles:
            stage.epoch = self.epoch - 1  # a detshuffle adds 1 per pass, then seeds with seed + epoch
        return iter(self.pipeline)

    def decode(self, raw: dict[str, Any]) -> tuple[Any, Any, str]:
        """One raw WebDataset sample → (image, label, key), the image joined from ``images`` when given."""
        key = raw["__key__"]
        where = f"sample {key!r} of {raw.get('__url__', '?')}"
        if self.label_field not in raw:
            fields = sorted(k for k in raw if not k.startswith("__"))
            raise KeyError(f"{where} has no {self.label_field!r} member (fields: {fields})")
        source = raw if self.image_index is None else self.image_index.get_raw(key)
        fields = {k: v for k, v in source.items() if not k.startswith("__")}
        try:
            image = decode_image(image_field(fields), _NO_PIXEL_LIMIT)
        except ImageDecodeError as err:
            hint = "" if self.image_index is not None else "; give the image shards (images= / --images)"
            raise ValueError(f"{where}: {err}{hint}") from None
        label = read_label_png(raw[self.label_field])
        if label.ndim != 2:
            raise ValueError(f"{where}: {self.label_field} must be a 2-D id map, got shape {label.shape}")
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"{where}: label {label.shape} and image {image.shape[:2]} differ in size (wrong image shards?)"
            )
        label_t = torch.from_numpy(label.astype(np.int64))
        if self.transform is None:
            return torch.from_numpy(image), label_t, key
        from torchvision import tv_tensors

        image_t = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        out_image, out_label = self.transform(image_t, tv_tensors.Mask(label_t))
        return out_image, out_label, key

    def __iter__(self) -> Iterator[tuple[Any, Any, str]]:
        return self._decoded(self.samples())  # the order is fixed now, not at the first sample

    def _decoded(self, samples: Iterator[dict[str, Any]]) -> Iterator[tuple[Any, Any, str]]:
        if self.image_index is not None:
            self.image_index.close()  # a forked worker must not share the parent's file offsets
        try:
            for raw in samples:
                yield self.decode(raw)
        finally:
            if self.image_index is not None:
                self.image_index.close()


class _EpochLoader(DataLoader):
    """A DataLoader that starts each pass over its :class:`PseudoLabelDataset` at the next epoch.

    Workers iterate copies of the dataset made when a pass starts (and dropped after it), so they cannot count
    passes themselves: the count is kept here, in the main process, after the copies are made.
    """

    def __iter__(self) -> Any:
        iterator = super().__iter__()  # this pass's workers (or the dataset's own iterator) start here
        self.dataset.set_epoch(self.dataset.epoch + 1)
        return iterator


def pseudolabel_loader(
    dataset: PseudoLabelDataset, batch_size: int, num_workers: int = 0, **kwargs: Any
) -> DataLoader:
    """A DataLoader over :class:`PseudoLabelDataset` (workers split the shards; fewer shards idle workers); each
    pass over it is the dataset's next epoch, so a shuffled dataset comes in another order every epoch."""
    return _EpochLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=False,
        **kwargs,
    )


class PseudoLabelDataModule(pl.LightningDataModule):
    """Train (and optional validation) loaders over pseudo-label shards, for a Lightning ``Trainer.fit``.

    ``train`` / ``val`` are label shard patterns; ``images`` / ``val_images`` the image shards to join when the
    labels hold no images. The training set is shuffled through a ``shuffle``-sample buffer, reseeded per epoch:
    :meth:`train_dataloader` starts at the trainer's current epoch (a resumed fit goes on from there), and each
    pass of its loader is the next epoch, so ``Trainer.fit`` sees another order every epoch, the same for a seed.
    """

    def __init__(
        self,
        train: str | Sequence[str],
        val: str | Sequence[str] | None = None,
        images: str | Sequence[str] | None = None,
        val_images: str | Sequence[str] | None = None,
        transform: Transform | None = None,
        val_transform: Transform | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle: int = 1000,
        label_field: str = SEG_FIELD,
        val_label_field: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.train_set = PseudoLabelDataset(train, images, transform, shuffle, label_field, seed)
        self.val_set = None
        if val is not None:
            self.val_set = PseudoLabelDataset(
                val, val_images, val_transform, 0, val_label_field or label_field
            )
        self.batch_size = batch_size
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        """The shuffled training loader, from the trainer's current epoch on."""
        if self.trainer is not None:
            self.train_set.set_epoch(self.trainer.current_epoch)
        return pseudolabel_loader(self.train_set, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader in shard order (reading ``val_label_field``), or none."""
        if self.val_set is None:
            return []  # Lightning skips validation
        return pseudolabel_loader(self.val_set, self.batch_size, self.num_workers)


__all__ = [
    "PseudoLabelDataModule",
    "PseudoLabelDataset",
    "check_join",
    "pseudolabel_loader",
]
