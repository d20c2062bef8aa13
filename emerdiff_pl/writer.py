"""Output side of ``emerdiff-pl predict``: the pseudo-label dataset as WebDataset shards, written batch by batch.

Layout of ``output_dir`` (``<tag>`` = ``<prefix>-<run id>``; ``<prefix>`` = ``a<array index>of<count>-r<rank>of
<world>`` names one task and rank, the run id one attempt, so array tasks, ranks and reruns never collide)::

    <tag>-000000.tar         finished shards: <key>.seg.png .lowres.png .emb.npy .json [.overlay.jpg] [.jpg|.png]
    .<tag>-000001.tar.tmp    the shard being written (hidden; fsynced and renamed when complete)
    .<prefix>.lock           the task lock (POSIX record lock held by the running process)
    manifest-<tag>.jsonl     one line per finished shard: {"shard", "keys", "size", "sha256", ...}
    failures-<tag>.jsonl     one line per input that could not be labelled: {"key", "url", "reason", ...}
    summary-<tag>.json       done / skipped / failed / wall time / images per second, and the run status
    config-<tag>.yaml        the resolved CLI config (written by the CLI)
    settings.json            the settings that shape the labels, recorded by the folder's first run
    settings-<tag>.json      a run's own, where it differs (writer.allow_changed_settings)
    id2label.json            with a model classifier (named output): {"0": name, ...}, the same for every task

Guarantees (see slurm/README.md): one process per task prefix at a time (a second start exits with a message
naming the owner; a dead owner's lock is released by the kernel); a visible ``.tar`` is complete and its manifest
line records its size and checksum, which resume verifies (a shard that no longer matches is renamed
``<name>.corrupt`` and its keys are redone); a sample that cannot be decoded, encoded or written is recorded in
the failures file and the run goes on, and reruns skip recorded failures unless ``retry_failures``; a rerun
whose label-shaping settings (``EmerDiffConfig.label_settings``) differ from the folder's is refused before it
writes anything, naming them, unless ``allow_changed_settings``.
``emerdiff-pl merge-manifests OUTPUT_DIR`` (:mod:`emerdiff_pl.commands.merge`) folds everything into
``manifest.jsonl``, ``failures.jsonl`` and ``summary.json``, and names the array tasks to resubmit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException

from emerdiff_pl.codec import encode_jpeg, encode_label_png, encode_npy
from emerdiff_pl.fields import EMB_FIELD, JSON_FIELD, LOWRES_FIELD, OVERLAY_FIELD, SEG_FIELD
from emerdiff_pl.inputs import ReadPlan
from emerdiff_pl.manifest import (
    OutputState,
    TaskLock,
    array_task,
    check_settings,
    describe_changes,
    failed_keys,
    lock_path,
    new_run_id,
    scan_output,
    task_prefix,
)
from emerdiff_pl.paths import safe_key
from emerdiff_pl.shardio import TarWriter
from emerdiff_pl.viz import overlay_jpeg


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("emerdiff-pl", "torch", "lightning", "diffusers", "transformers", "numpy", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


_MAGIC = {b"\xff\xd8\xff": "jpg", b"\x89PNG\r\n\x1a\n": "png"}


def image_member(encoded: bytes | None, original: np.ndarray) -> tuple[str, bytes]:
    """(field, bytes) of the stored input image for ``include_image``: the input's own bytes when it is a JPEG
    or PNG whose pixel grid is the labels' (no EXIF rotation), else the decoded original re-encoded as JPEG."""
    from PIL import Image

    field = next((f for magic, f in _MAGIC.items() if encoded and encoded.startswith(magic)), None)
    if field is not None:
        with contextlib.suppress(Exception), Image.open(io.BytesIO(encoded)) as im:
            upright = im.getexif().get(0x0112, 1) == 1  # EXIF orientation: 1 = stored as displayed
            if upright and (im.height, im.width) == original.shape[:2]:
                return field, encoded
    return "jpg", encode_jpeg(original.astype(np.uint8))


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


class WriterCounts(NamedTuple):
    """Inputs so far: labelled, skipped as done by an earlier run, skipped as failed by one, failed now."""

    done: int
    skipped: int
    skipped_failed: int
    failed: int


# --------------------------------------------------------------------------------------------------------------
# the callback
# --------------------------------------------------------------------------------------------------------------


class PseudoLabelWriter(BasePredictionWriter):
    """Writes ``predict_step`` outputs as a pseudo-label WebDataset (docs/method.md), one batch at a time.

    Its :meth:`read_plan` tells the DataModule which inputs to leave out (resume) and what the batches must carry
    (``EmerDiffDataModule.predict_dataloader`` asks for it); :meth:`counts` says how far the run is (the progress
    bar reads it). A ``predict_step`` that raises is the model's to isolate (``SampleErrorIsolation``).

    Args:
        output_dir: Folder for shards, manifests, failures and summaries; shared safely by array tasks and
            ranks. Rerunning into the same folder resumes: keys in finished shards are skipped.
        samples_per_shard: Samples per tar shard. A kill loses at most the shard being written, so smaller
            shards lose less work; larger ones make fewer files.
        overlay: Also store ``<key>.overlay.jpg``: the image with its labels drawn over it.
        retry_failures: Retry the inputs that earlier runs recorded in their failures files (by default a
            rerun skips them, so one input that always fails cannot stop a task for good).
        include_image: Also store the input image, so the shards are a training set on their own: the input's
            bytes unchanged as ``<key>.jpg`` / ``<key>.png`` when it is a JPEG / PNG without EXIF rotation,
            else the decoded original (the labels' pixel grid) as ``<key>.jpg``.
        allow_changed_settings: Label into a folder whose earlier labels were made with other label-shaping
            settings (``model.*`` other than runtime-only ones such as ``max_branch_batch``). By default such a
            rerun is refused, naming the settings that differ; allowed, its settings are recorded in
            ``settings-<tag>.json`` (and, as always, in every sample's ``<key>.json``).
    """

    def __init__(
        self,
        output_dir: str,
        samples_per_shard: int = 500,
        overlay: bool = False,
        retry_failures: bool = False,
        include_image: bool = False,
        allow_changed_settings: bool = False,
    ):
        super().__init__(write_interval="batch")
        if samples_per_shard < 1:
            raise ValueError(f"writer.samples_per_shard must be ≥ 1, got {samples_per_shard}")
        self.output_dir = Path(output_dir)
        self.samples_per_shard = samples_per_shard
        self.overlay = overlay
        self.retry_failures = retry_failures
        self.include_image = include_image
        self.allow_changed_settings = allow_changed_settings
        self.settings_changes: dict[str, tuple[Any, Any]] = {}
        self.run_id: str | None = None
        self.prefix: str | None = None
        self.array_index, self.array_count, self.rank, self.world_size = 0, 1, 0, 1
        self._shard: TarWriter | None = None
        self._sequence = 0
        self._written: dict[str, str] = {}  # key → input url, for this run
        self._plan: ReadPlan | None = None
        self._lock: TaskLock | None = None
        self.shards_written: list[str] = []
        self.kept_samples = 0  # samples in the shards this run finished
        self.stopped_by: BaseException | None = None  # what interrupted the run (on_exception)
        self.done = self.skipped = self.skipped_failed = self.failed = 0
        self._segment_seconds = 0.0
        self._start: float | None = None
        self._hparams: dict[str, Any] = {}
        self._run_info: dict[str, Any] = {}
        self._versions: dict[str, str] = {}
        self._classifier: dict[str, Any] | None = None  # the model's classifier record (named output), if any
        self._named_meta: dict[
            str, Any
        ] = {}  # what every <key>.json of named output adds (_publish_class_names)

    @classmethod
    def of(cls, trainer: pl.Trainer) -> PseudoLabelWriter | None:
        """The writer among ``trainer``'s callbacks (None without one; more than one is an error)."""
        writers = [cb for cb in trainer.callbacks if isinstance(cb, cls)]
        if len(writers) > 1:
            raise ValueError(f"{len(writers)} PseudoLabelWriter callbacks: one run writes one output folder")
        return writers[0] if writers else None

    def read_plan(self) -> ReadPlan:
        """Which inputs this run leaves out (keys finished shards hold; earlier failures, unless
        ``retry_failures``) and what batches carry for the outputs (bytes for ``include_image``, decoded
        originals for overlays and ``include_image``). Known once :meth:`setup` has read the output folder."""
        if self._plan is None:
            raise RuntimeError(
                "the writer's read plan is known only after its setup (inside Trainer.predict)"
            )
        return self._plan

    def counts(self) -> WriterCounts:
        """Inputs so far: labelled, skipped (done before), skipped (failed before, not retried), failed."""
        return WriterCounts(self.done, self.skipped, self.skipped_failed, self.failed)

    def kept(self) -> str:
        """What an interrupted run kept and how to go on (the CLI's message after Ctrl-C)."""
        return (
            f"kept {self.kept_samples} image(s) labelled by this run in {len(self.shards_written)} finished "
            f"shard(s) under {self.output_dir}; rerun the same command to resume (finished images are skipped)"
        )

    # ---- naming -------------------------------------------------------------------------------------------

    def resolve_tag(self, trainer: pl.Trainer) -> str:
        """``<prefix>-<run id>`` of this process (stable once computed)."""
        if self.prefix is None:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None and hasattr(datamodule, "array_index"):
                self.array_index, self.array_count = datamodule.array_index, datamodule.array_count
            else:
                self.array_index, self.array_count = array_task()
            self.rank, self.world_size = trainer.global_rank, trainer.world_size
            self.prefix = task_prefix(self.array_index, self.array_count, self.rank, self.world_size)
        if self.run_id is None:
            self.run_id = new_run_id()
        return f"{self.prefix}-{self.run_id}"

    def _file(self, kind: str, suffix: str) -> Path:
        return self.output_dir / f"{kind}-{self.prefix}-{self.run_id}{suffix}"

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.resolve_tag(trainer)
        self.run_id = trainer.strategy.broadcast(self.run_id)  # one run id for all ranks of a DDP job
        self.output_dir.mkdir(parents=True, exist_ok=True)
        assert self.prefix is not None
        self._check_settings(trainer, pl_module)  # before the lock: an idle folder's record may be replaced
        lock = TaskLock(lock_path(self.output_dir, self.prefix))
        lock.acquire(self.run_id)  # raises TaskLockedError while another live process runs this task
        self._lock = lock
        # Temporary shards of earlier, dead attempts of this task and rank (the lock proves no live owner).
        for stale in self.output_dir.glob(f".{self.prefix}-*.tar.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        state = scan_output(self.output_dir, checksum=self.prefix)
        self._quarantine(state)
        done = frozenset(state.keys())
        failed = frozenset() if self.retry_failures else frozenset(failed_keys(self.output_dir) - done)
        self._plan = ReadPlan(
            done_keys=done,
            failed_keys=failed,
            keep_bytes=self.include_image,  # the input's own bytes, stored as they are
            keep_originals=self.overlay or self.include_image,
        )

    def _check_settings(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a run whose label-shaping settings differ from the ones the folder's labels were made with;
        with ``allow_changed_settings``, record this run's in ``settings-<tag>.json`` and go on. A model without
        a ``config.label_settings()`` (an EmerDiffConfig) is not checked."""
        config = getattr(pl_module, "config", None)
        if not callable(getattr(config, "label_settings", None)):
            return
        settings = _jsonable(config.label_settings())
        defaults = _jsonable(config.label_defaults()) if hasattr(config, "label_defaults") else {}
        self.settings_changes = check_settings(
            self.output_dir, settings, defaults, allow_changed=self.allow_changed_settings
        )
        if not self.settings_changes:
            return
        changed = {name: list(pair) for name, pair in self.settings_changes.items()}
        record = {"label_settings": settings, "changed": changed, "run_id": self.run_id}
        self._file("settings", ".json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        if trainer.is_global_zero:
            print(
                f"warning: {self.output_dir} holds labels of other settings "
                f"({describe_changes(self.settings_changes)}); mixing them as --writer.allow_changed_settings "
                f"asks, recorded in {self._file('settings', '.json').name}",
                file=sys.stderr,
            )

    def _quarantine(self, state: OutputState) -> None:
        """Say which finished shards failed their checks; rename this task's own out of the way (``.corrupt``),
        so their keys are redone and never appear twice."""
        for name, problem in state.bad.items():
            if self.prefix is not None and name.startswith(self.prefix + "-"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.output_dir / name, self.output_dir / f"{name}.corrupt")
                action = f"renamed to {name}.corrupt; its samples are redone by this run"
            else:
                action = "another task's shard: its samples are redone when that task reruns"
            print(f"warning: finished shard {name} failed its check: {problem}; {action}", file=sys.stderr)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._lock is not None:
            self._lock.release()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._hparams = _jsonable(dict(getattr(pl_module, "hparams", {}) or {}))
        run_info = getattr(pl_module, "run_info", None)
        self._run_info = _jsonable(run_info()) if callable(run_info) else {}
        self._versions = {**_versions(), **dict(self._run_info.get("versions", {}) or {})}
        self._classifier = self._run_info.pop("classifier", None)
        self._publish_class_names()

    def _publish_class_names(self) -> None:
        """Named output (a model classifier): `id2label.json` at the output root, written once and equal for
        every task, rank and rerun; output without names is never mixed with named output."""
        from emerdiff_pl.classifiers.names import (
            ID2LABEL_FILE,
            display_name,
            id2label,
            publish_id2label,
            read_id2label,
        )

        there = read_id2label(self.output_dir)
        self._named_meta = {}
        if self._classifier is None:
            if there is not None:
                raise ValueError(
                    f"{self.output_dir} holds named output ({ID2LABEL_FILE}) but this run has no "
                    "model.classifier: write per-image mask ids into another folder"
                )
            return
        if there is None and self.read_plan().done_keys:
            raise ValueError(
                f"{self.output_dir} holds labels without class names (no {ID2LABEL_FILE}) but this run names its "
                f"classes (model.classifier: {self._classifier.get('classifier')}): write into another folder"
            )
        publish_id2label(self.output_dir, id2label(self._classifier["class_names"]))
        # <key>.json: the classifier's record and the class names, id i = the i-th as in id2label.json
        self._named_meta = {
            "classifier": {k: v for k, v in self._classifier.items() if k != "class_names"},
            "class_names": [display_name(n) for n in self._classifier["class_names"]],
        }

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, dict) or "key" not in prediction:
            raise TypeError(
                "predict_step must return the dict of docs/interfaces.md (key, url, original, original_size, "
                f"labels, lowres_labels, mask_embeddings, failures, seconds); got {type(prediction).__name__}"
            )
        source_keys: list[str] = []
        encoded: dict[str, bytes | None] = {}
        if isinstance(batch, dict):
            self.skipped += int(batch.get("skipped", 0))
            self.skipped_failed += int(batch.get("skipped_failed", 0))
            source_keys = list(batch.get("source_key", []))
            encoded = dict(zip(batch.get("key", []), batch.get("original_bytes", []), strict=False))
        failures = list(prediction.get("failures", []))
        seconds = float(prediction.get("seconds", 0.0))
        keys = list(prediction["key"])
        self._segment_seconds += seconds
        for i, key in enumerate(keys):
            url = prediction["url"][i]
            source = source_keys[i] if i < len(source_keys) else key
            if key in self.read_plan().done_keys:
                raise RuntimeError(
                    f"{key!r} is already in a finished shard of {self.output_dir}: the data source does not leave "
                    "out what the writer's read_plan() says is done (use EmerDiffDataModule, or a fresh "
                    "writer.output_dir)"
                )
            if key in self._written:
                reason = f"duplicate input key: {key!r} was already labelled from {self._written[key]}"
                failures.append({"key": key, "url": url, "reason": reason, "kind": "duplicate"})
                continue
            if self._shard is None:
                self._open_shard()
            assert self._shard is not None
            try:  # a sample whose outputs cannot be encoded is recorded, and the run goes on
                members = self._members(
                    prediction, i, seconds / len(keys), len(keys), source, encoded.get(key)
                )
                if safe_key(key) != key:
                    raise ValueError(f"unsafe sample key {key!r} (a path outside the shard?)")
            except Exception as err:
                reason = f"cannot encode the outputs ({type(err).__name__}: {err})"
                failures.append({"key": key, "url": url, "reason": reason, "kind": "sample"})
                continue
            self._shard.write({"__key__": key, **members})  # OSError (disk full, ...) ends the run
            self._written[key] = url
            self.done += 1
            if self._shard.count >= self.samples_per_shard:
                self._commit_shard()
        self._record_failures(failures)
        if trainer.received_sigterm:  # preemption: keep what is complete, then stop
            self._commit_shard()
            raise SIGTERMException(143)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._commit_shard()
        summary = self._write_summary("finished")
        counts = [self.done, self.skipped, self.skipped_failed, self.failed]
        totals = torch.tensor(counts, dtype=torch.float64)
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        if trainer.is_global_zero:
            from emerdiff_pl.progress import format_rate  # progress imports this module

            done, skipped, skipped_failed, failed = (int(v) for v in totals.tolist())
            wall = summary["wall_seconds"]
            rate = f" ({format_rate(wall / done)})" if done else ""
            where = f"array task {self.array_index}/{self.array_count}, " if self.array_count > 1 else ""
            earlier = (
                f", {skipped_failed} skipped (failed before; --writer.retry_failures true retries them)"
                if skipped_failed
                else ""
            )
            print(
                f"emerdiff-pl predict [{where}{self.world_size} rank(s)]: {done} labelled, {skipped} skipped "
                f"(already done){earlier}, {failed} failed in {wall:.1f} s{rate} "
                f"-> {self.output_dir} (summary: {self._file('summary', '.json').name})",
                flush=True,
            )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Keep the complete samples of the open shard (a torn one, or one that cannot be closed, is dropped),
        then write the summary: also after a full disk, whose partial shard is removed first."""
        self.stopped_by = exception
        if self._lock is None or not self._lock.held:
            return  # never started (e.g. the task lock is held by another process): nothing of ours to close
        shard, self._shard = self._shard, None
        if shard is not None:
            if shard.torn:
                shard.abort()
            else:
                self._shard = shard
                try:
                    self._commit_shard()
                except Exception as err:  # e.g. ENOSPC at fsync: the shard is dropped, its samples redone
                    print(f"warning: could not close shard {shard.name} ({err}): dropped", file=sys.stderr)
        try:
            self._write_summary(f"interrupted: {type(exception).__name__}: {exception}")
        except Exception as err:
            print(f"error: could not write the summary into {self.output_dir} ({err})", file=sys.stderr)
        self._lock.release()

    # ---- internals ----------------------------------------------------------------------------------------

    def _members(
        self,
        prediction: dict[str, Any],
        i: int,
        seconds_per_image: float,
        batch_size: int,
        source_key: str,
        encoded: bytes | None = None,
    ) -> dict[str, bytes]:
        key, url = prediction["key"][i], prediction["url"][i]
        height, width = (int(v) for v in prediction["original_size"][i])
        labels = _numpy(prediction["labels"][i])
        if labels.shape != (height, width):
            raise ValueError(
                f"labels of {key!r} have shape {labels.shape} but the original image is {(height, width)}: "
                "predict_step must return labels at the original size"
            )
        lowres = _numpy(prediction["lowres_labels"][i])
        embeddings = _numpy(prediction["mask_embeddings"][i]).astype(np.float16)
        meta = {
            "key": key,
            **({"source_key": source_key} if source_key != key else {}),
            "url": url,
            "original_size": [height, width],
            "lowres_size": [int(s) for s in lowres.shape],
            **({"model_size": prediction["model_size"]} if prediction.get("model_size") else {}),
            "model": self._run_info.get("model", self._hparams.get("pretrained")),
            "hparams": self._hparams,
            "seed": self._hparams.get("seed"),
            "run_info": self._run_info,
            "versions": self._versions,
            "timings": {
                "seconds_per_image": seconds_per_image,
                "batch_size": batch_size,
                "batch": _jsonable(prediction.get("timings", {})),
            },
            "output": {"shard": self._shard.name if self._shard else None, "run_id": self.run_id},
            **self._named_meta,
        }
        members = {
            SEG_FIELD: encode_label_png(labels),
            LOWRES_FIELD: encode_label_png(lowres),
            EMB_FIELD: encode_npy(embeddings),
            JSON_FIELD: json.dumps(meta, indent=1).encode("utf-8"),
        }
        if self.overlay or self.include_image:
            if prediction["original"][i] is None:
                raise ValueError(
                    f"no decoded original of {key!r} in the batch: the read plan keeps originals"
                )
            original = _numpy(prediction["original"][i])
        if self.overlay:
            members[OVERLAY_FIELD] = overlay_jpeg(original.astype(np.uint8), labels)
        if self.include_image:
            field, data = image_member(encoded, original)
            members[field] = data
        return members

    def _next_shard_name(self) -> str:
        return f"{self.prefix}-{self.run_id}-{self._sequence:06d}.tar"

    def _open_shard(self) -> None:
        self._shard = TarWriter(self.output_dir / self._next_shard_name())
        self._sequence += 1

    def _commit_shard(self) -> None:
        """Publish the open shard (fsync, rename), then its manifest line with size and checksum."""
        shard, self._shard = self._shard, None
        if shard is None:
            return
        if not shard.keys:
            shard.abort()
            return
        shard.close()  # on failure the temporary file is removed and the error propagates
        self.shards_written.append(shard.name)
        self.kept_samples += len(shard.keys)
        record = {
            "shard": shard.name,
            "count": len(shard.keys),
            "size": shard.size,
            "sha256": shard.sha256,
            "keys": shard.keys,
            "run_id": self.run_id,
            "array_index": self.array_index,
            "array_count": self.array_count,
            "rank": self.rank,
            "world_size": self.world_size,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with open(self._file("manifest", ".jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _record_failures(self, failures: list[dict[str, Any]]) -> None:
        if not failures:
            return
        self.failed += len(failures)
        with open(self._file("failures", ".jsonl"), "a", encoding="utf-8") as handle:
            for failure in failures:
                record = {
                    "key": failure.get("key"),
                    "url": failure.get("url"),
                    "reason": failure.get("reason"),
                    "kind": failure.get("kind", "sample"),
                    **({"source_key": failure["source_key"]} if failure.get("source_key") else {}),
                }
                handle.write(json.dumps({**record, "run_id": self.run_id}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _write_summary(self, status: str) -> dict[str, Any]:
        wall = time.perf_counter() - self._start if self._start is not None else 0.0
        summary = {
            "status": status,
            "done": self.done,
            "skipped": self.skipped,
            "skipped_failed": self.skipped_failed,
            "failed": self.failed,
            "wall_seconds": wall,
            "images_per_second": self.done / wall if wall > 0 else 0.0,
            "segment_seconds": self._segment_seconds,
            "shards": self.shards_written,
            "run_id": self.run_id,
            "array_index": self.array_index,
            "array_count": self.array_count,
            "rank": self.rank,
            "world_size": self.world_size,
            "output_dir": str(self.output_dir),
            **(
                {"settings_changed": describe_changes(self.settings_changes)} if self.settings_changes else {}
            ),
        }
        path = self._file("summary", ".json")
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
        os.replace(tmp, path)
        return summary


__all__ = ["PseudoLabelWriter", "WriterCounts"]
