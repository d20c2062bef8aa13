"""Output side of ``emerdiff-pl predict``: the pseudo-label dataset as WebDataset shards, written batch by batch.

Layout of ``output_dir`` (``<tag>`` = ``a<array index>of<count>-r<rank>of<world>-<run id>``, unique per process
and attempt, so array tasks, ranks and reruns never collide)::

    <tag>-000000.tar         finished shards: <key>.seg.png .lowres.png .emb.npy .json [.overlay.jpg]
    .<tag>-000001.tar.tmp    the shard being written (hidden; renamed when complete)
    manifest-<tag>.jsonl     one line per finished shard: {"shard", "keys", ...}
    failures-<tag>.jsonl     one line per input that could not be labelled: {"key", "url", "reason", ...}
    summary-<tag>.json       done / skipped / failed / wall time / images per second, and the run status
    config-<tag>.yaml        the resolved CLI config (written by the CLI)

Resume: a finished ``.tar`` is the truth. Its keys come from the manifest, or from the tar itself when the
process died between the rename and the manifest line. Those keys are skipped by the next run.
``emerdiff-pl merge-manifests OUTPUT_DIR`` folds everything into ``manifest.jsonl``, ``failures.jsonl`` and
``summary.json``, and names the array tasks to resubmit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import secrets
import sys
import tarfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image

SHARD_PATTERN = re.compile(
    r"^(?P<prefix>a\d+of\d+-r\d+of\d+)-(?P<run>\d{8}T\d{6}Z-[0-9a-f]+)-(?P<seq>\d{6})\.tar$"
)
_TAG_PATTERN = re.compile(
    r"^(?P<kind>manifest|failures|summary)-a(?P<a>\d+)of(?P<ac>\d+)-r(?P<r>\d+)of(?P<w>\d+)-(?P<run>.+)\.jsonl?$"
)


def task_prefix(array_index: int, array_count: int, rank: int, world_size: int) -> str:
    """The file-name prefix owned by one process: its array task and rank (e.g. ``a0003of0007-r000of002``)."""
    return f"a{array_index:04d}of{array_count:04d}-r{rank:03d}of{world_size:03d}"


def new_run_id() -> str:
    """A fresh attempt id: UTC start time (sorts chronologically) plus random hex."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


# --------------------------------------------------------------------------------------------------------------
# reading what earlier runs finished
# --------------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (process killed mid-write) is ignored."""
    out = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
    return out


def tar_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys of a finished shard, in order, read from its member names."""
    keys: list[str] = []
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            dirname, _, base = member.name.rpartition("/")
            if not member.isfile() or "." not in base:
                continue
            key = (f"{dirname}/" if dirname else "") + base.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def finished_shards(output_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Every finished shard of ``output_dir`` (file name → keys), from the manifests where they list it, else
    from the tar itself. Shards whose tar cannot be read are reported and left out (their keys get redone)."""
    root = Path(output_dir)
    if not root.is_dir():
        return {}
    listed: dict[str, list[str]] = {}
    for manifest in sorted(root.glob("manifest-*.jsonl")):
        for record in _read_jsonl(manifest):
            if isinstance(record.get("shard"), str) and isinstance(record.get("keys"), list):
                listed[record["shard"]] = [str(k) for k in record["keys"]]
    shards: dict[str, list[str]] = {}
    for path in sorted(root.glob("*.tar")):
        if not SHARD_PATTERN.match(path.name):
            continue
        if path.name in listed:
            shards[path.name] = listed[path.name]
            continue
        try:
            shards[path.name] = tar_keys(path)
        except (tarfile.TarError, OSError) as err:
            print(
                f"warning: finished shard {path} is unreadable ({err}); its samples will be redone",
                file=sys.stderr,
            )
    return shards


def finished_keys(output_dir: str | os.PathLike) -> set[str]:
    """Keys present in finished shards of ``output_dir`` (what a rerun skips)."""
    return {key for keys in finished_shards(output_dir).values() for key in keys}


# --------------------------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------------------------


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


def _label_png(labels: np.ndarray) -> bytes:
    from emerdiff_pl.shardio import encode_label_png

    return encode_label_png(labels)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _overlay_jpg(image: np.ndarray, labels: np.ndarray) -> bytes:
    from emerdiff_pl.viz import overlay

    buffer = io.BytesIO()
    Image.fromarray(overlay(image, labels)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


class _ShardFile:
    """One output shard: written under a hidden temporary name, renamed to its final name by :meth:`commit`."""

    def __init__(self, directory: Path, name: str):
        self.name = name
        self.path = directory / name
        self.tmp_path = directory / f".{name}.tmp"
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in commit() / discard()
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.keys: list[str] = []
        self.intact = True  # False once a sample write failed half-way

    def add(self, key: str, members: dict[str, bytes]) -> None:
        self.intact = False
        now = int(time.time())
        for field, data in members.items():
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size, info.mtime, info.mode = len(data), now, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.keys.append(key)
        self.intact = True

    def commit(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp_path, self.path)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._tar.close()
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp_path)


# --------------------------------------------------------------------------------------------------------------
# the callback
# --------------------------------------------------------------------------------------------------------------


class PseudoLabelWriter(BasePredictionWriter):
    """Writes ``predict_step`` outputs as a pseudo-label WebDataset (SPEC.md §3), one batch at a time.

    Args:
        output_dir: Folder for shards, manifests, failures and summaries; shared safely by array tasks and
            ranks. Rerunning into the same folder resumes: keys in finished shards are skipped.
        samples_per_shard: Samples per tar shard. A kill loses at most the shard being written, so smaller
            shards lose less work; larger ones make fewer files.
        overlay: Also store ``<key>.overlay.jpg``: the image with its labels drawn over it.
    """

    def __init__(self, output_dir: str, samples_per_shard: int = 500, overlay: bool = False):
        super().__init__(write_interval="batch")
        if samples_per_shard < 1:
            raise ValueError(f"writer.samples_per_shard must be ≥ 1, got {samples_per_shard}")
        self.output_dir = Path(output_dir)
        self.samples_per_shard = samples_per_shard
        self.overlay = overlay
        self.run_id: str | None = None
        self.prefix: str | None = None
        self.array_index, self.array_count, self.rank, self.world_size = 0, 1, 0, 1
        self._shard: _ShardFile | None = None
        self._sequence = 0
        self._written: set[str] = set()
        self.shards_written: list[str] = []
        self.done = self.skipped = self.failed = 0
        self._segment_seconds = 0.0
        self._start: float | None = None
        self._hparams: dict[str, Any] = {}
        self._run_info: dict[str, Any] = {}
        self._versions: dict[str, str] = {}

    # ---- naming -------------------------------------------------------------------------------------------

    def resolve_tag(self, trainer: pl.Trainer) -> str:
        """``<prefix>-<run id>`` of this process (stable once computed)."""
        if self.prefix is None:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None and hasattr(datamodule, "array_index"):
                self.array_index, self.array_count = datamodule.array_index, datamodule.array_count
            else:
                from emerdiff_pl.data import array_task

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
        # Temporary shards that earlier attempts of this task and rank left behind; never another task's.
        for stale in self.output_dir.glob(f".{self.prefix}-*.tar.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        done = finished_keys(self.output_dir)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_done_keys"):
            datamodule.set_done_keys(done)
        elif done:
            raise RuntimeError(
                f"{self.output_dir} already holds {len(done)} labelled samples but the data source cannot skip them "
                "(use EmerDiffDataModule, or a fresh writer.output_dir)"
            )

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._hparams = _jsonable(dict(getattr(pl_module, "hparams", {}) or {}))
        run_info = getattr(pl_module, "run_info", None)
        self._run_info = _jsonable(run_info()) if callable(run_info) else {}
        self._versions = {**_versions(), **dict(self._run_info.get("versions", {}) or {})}

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
                "predict_step must return the dict of docs/interfaces.md (key, url, original, labels, "
                f"lowres_labels, mask_embeddings, failures, seconds); got {type(prediction).__name__}"
            )
        if isinstance(batch, dict):
            self.skipped += int(batch.get("skipped", 0))
        failures = list(prediction.get("failures", []))
        seconds = float(prediction.get("seconds", 0.0))
        keys = list(prediction["key"])
        self._segment_seconds += seconds
        for i, key in enumerate(keys):
            url = prediction["url"][i]
            if key in self._written:
                failures.append(
                    {"key": key, "url": url, "reason": "duplicate key: input keys must be unique"}
                )
                continue
            if self._shard is None:
                self._open_shard()
            assert self._shard is not None
            self._shard.add(key, self._members(prediction, i, seconds / len(keys), len(keys)))
            self._written.add(key)
            self.done += 1
            if len(self._shard.keys) >= self.samples_per_shard:
                self._commit_shard()
        self._record_failures(failures)
        self._show_progress(trainer)
        if trainer.received_sigterm:  # preemption: keep what is complete, then stop
            self._commit_shard()
            raise SIGTERMException(143)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._commit_shard()
        summary = self._write_summary("finished")
        totals = torch.tensor([self.done, self.skipped, self.failed], dtype=torch.float64)
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        if trainer.is_global_zero:
            done, skipped, failed = (int(v) for v in totals.tolist())
            wall = summary["wall_seconds"]
            where = f"array task {self.array_index}/{self.array_count}, " if self.array_count > 1 else ""
            print(
                f"emerdiff-pl predict [{where}{self.world_size} rank(s)]: {done} labelled, {skipped} skipped "
                f"(already done), {failed} failed in {wall:.1f} s ({done / max(wall, 1e-9):.2f} images/s) "
                f"-> {self.output_dir} (summary: {self._file('summary', '.json').name})",
                flush=True,
            )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Keep the complete samples of the open shard (a half-written sample drops the shard instead)."""
        if self.prefix is None:
            return
        if self._shard is not None and not self._shard.intact:
            self._shard.discard()
            self._shard = None
        with contextlib.suppress(Exception):
            self._commit_shard()
        with contextlib.suppress(Exception):
            self._write_summary(f"interrupted: {type(exception).__name__}: {exception}")

    # ---- internals ----------------------------------------------------------------------------------------

    def _members(
        self, prediction: dict[str, Any], i: int, seconds_per_image: float, batch_size: int
    ) -> dict[str, bytes]:
        key, url = prediction["key"][i], prediction["url"][i]
        original = _numpy(prediction["original"][i])
        labels = _numpy(prediction["labels"][i])
        if labels.shape != original.shape[:2]:
            raise ValueError(
                f"labels of {key!r} have shape {labels.shape} but the original image is {original.shape[:2]}: "
                "predict_step must return labels at the original size"
            )
        lowres = _numpy(prediction["lowres_labels"][i])
        embeddings = _numpy(prediction["mask_embeddings"][i]).astype(np.float16)
        meta = {
            "key": key,
            "url": url,
            "original_size": [int(original.shape[0]), int(original.shape[1])],
            "lowres_size": [int(s) for s in lowres.shape],
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
        }
        members = {
            "seg.png": _label_png(labels),
            "lowres.png": _label_png(lowres),
            "emb.npy": _npy(embeddings),
            "json": json.dumps(meta, indent=1).encode("utf-8"),
        }
        if self.overlay:
            members["overlay.jpg"] = _overlay_jpg(original.astype(np.uint8), labels)
        return members

    def _next_shard_name(self) -> str:
        return f"{self.prefix}-{self.run_id}-{self._sequence:06d}.tar"

    def _open_shard(self) -> None:
        self._shard = _ShardFile(self.output_dir, self._next_shard_name())
        self._sequence += 1

    def _commit_shard(self) -> None:
        shard, self._shard = self._shard, None
        if shard is None:
            return
        if not shard.keys:
            shard.discard()
            return
        shard.commit()
        self.shards_written.append(shard.name)
        record = {
            "shard": shard.name,
            "count": len(shard.keys),
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
                }
                handle.write(json.dumps({**record, "run_id": self.run_id}) + "\n")

    def _write_summary(self, status: str) -> dict[str, Any]:
        wall = time.perf_counter() - self._start if self._start is not None else 0.0
        summary = {
            "status": status,
            "done": self.done,
            "skipped": self.skipped,
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
        }
        path = self._file("summary", ".json")
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1), encoding="utf-8")
        os.replace(tmp, path)
        return summary

    def _show_progress(self, trainer: pl.Trainer) -> None:
        """Images per second and counts on Lightning's progress bar (its own rate counts batches)."""
        bar = trainer.progress_bar_callback
        wall = time.perf_counter() - self._start if self._start is not None else 0.0
        rate = f"{self.done / wall:.2f}" if wall > 0 else "-"
        counts = {"img/s": rate, "done": self.done, "skipped": self.skipped, "failed": self.failed}
        with contextlib.suppress(Exception):  # no bar, a bar of another kind, or not started: nothing to show
            if (
                isinstance(bar, RichProgressBar)
                and bar.progress is not None
                and bar.predict_progress_bar_id is not None
            ):
                text = " · ".join(f"{v} {k}" for k, v in counts.items())
                bar.progress.update(
                    bar.predict_progress_bar_id, description=f"{bar.predict_description} · {text}"
                )
            elif isinstance(bar, TQDMProgressBar):
                bar.predict_progress_bar.set_postfix(counts, refresh=False)


# --------------------------------------------------------------------------------------------------------------
# merge-manifests
# --------------------------------------------------------------------------------------------------------------


def merge(output_dir: str | os.PathLike, clean_temp: bool = False) -> dict[str, Any]:
    """Fold the per-process files of ``output_dir`` into ``manifest.jsonl``, ``failures.jsonl`` (inputs that
    are still not labelled, deduplicated) and ``summary.json``; return the summary."""
    root = Path(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"output folder {str(root)!r} does not exist")
    shards = finished_shards(root)
    owner: dict[str, str] = {}
    duplicates: dict[str, list[str]] = {}
    for name, keys in shards.items():
        for key in keys:
            if key in owner:
                duplicates.setdefault(key, [owner[key]]).append(name)
            else:
                owner[key] = name
    failures: dict[tuple[Any, Any], dict[str, Any]] = {}
    for path in sorted(root.glob("failures-*.jsonl")):
        for record in _read_jsonl(path):
            if record.get("key") not in owner:
                failures[(record.get("key"), record.get("url"))] = record
    runs: dict[tuple[int, int], dict[str, Any]] = {}  # (array index, count) → latest run's ranks
    for path in sorted(root.glob("summary-*.json")):
        match = _TAG_PATTERN.match(path.name)
        if not match:
            continue
        with contextlib.suppress(json.JSONDecodeError, OSError):
            summary = json.loads(path.read_text(encoding="utf-8"))
            task = (int(match["a"]), int(match["ac"]))
            latest = runs.get(task)
            if latest is None or match["run"] > latest["run_id"]:
                latest = runs[task] = {"run_id": match["run"], "world_size": int(match["w"]), "statuses": []}
            if match["run"] == latest["run_id"]:
                latest["statuses"].append(summary.get("status", "?"))
    counts = {count for _, count in runs}
    unfinished = sorted(
        index
        for count in counts
        for index in range(count)
        if (run := runs.get((index, count))) is None
        or len(run["statuses"]) < run["world_size"]
        or any(status != "finished" for status in run["statuses"])
    )
    temp_files = sorted(p.name for p in root.glob(".*.tar.tmp"))
    if clean_temp:
        for name in temp_files:
            with contextlib.suppress(FileNotFoundError):
                (root / name).unlink()
    _atomic_lines(
        root / "manifest.jsonl", [{"shard": n, "count": len(k), "keys": k} for n, k in shards.items()]
    )
    _atomic_lines(root / "failures.jsonl", list(failures.values()))
    summary = {
        "shards": len(shards),
        "samples": len(owner),
        "failed": len(failures),
        "duplicate_keys": duplicates,
        "array_counts": sorted(counts),
        "unfinished_array_tasks": unfinished,
        "temp_files": [] if clean_temp else temp_files,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def _atomic_lines(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def merge_main(argv: list[str] | None = None) -> int:
    """``emerdiff-pl merge-manifests OUTPUT_DIR``: one manifest, one failures file, and what to resubmit."""
    parser = argparse.ArgumentParser(
        prog="emerdiff-pl merge-manifests",
        description="Merge the per-task manifests / failures / summaries of a predict output folder into "
        "manifest.jsonl, failures.jsonl (inputs still unlabelled) and summary.json, and list the SLURM array "
        "tasks that did not finish (resubmit them with sbatch --array=<list>).",
    )
    parser.add_argument("output_dir", help="the writer.output_dir of the predict runs")
    parser.add_argument(
        "--clean-temp",
        action="store_true",
        help="delete leftover .*.tar.tmp files (only when no task is running)",
    )
    args = parser.parse_args(argv)
    summary = merge(args.output_dir, clean_temp=args.clean_temp)
    print(f"{summary['shards']} shards, {summary['samples']} samples, {summary['failed']} failed inputs")
    print(f"wrote {Path(args.output_dir) / 'manifest.jsonl'}, failures.jsonl, summary.json")
    if summary["unfinished_array_tasks"]:
        tasks = ",".join(str(i) for i in summary["unfinished_array_tasks"])
        print(f"array tasks not finished: {tasks}  ->  sbatch --array={tasks} slurm/array.sbatch ...")
    if summary["temp_files"]:
        print(f"{len(summary['temp_files'])} temporary shard files remain (running or killed tasks)")
    if summary["duplicate_keys"]:
        print(f"error: {len(summary['duplicate_keys'])} keys appear in more than one shard", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "PseudoLabelWriter",
    "finished_keys",
    "finished_shards",
    "merge",
    "merge_main",
    "tar_keys",
    "task_prefix",
]
