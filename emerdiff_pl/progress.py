"""Progress of ``predict`` counted in images: done / total, seconds per image (or images per second), ETA.

Lightning's bar counts batches of an IterableDataset whose length it cannot know (``Predicting 0/--``). This
bar knows the total where it can: the inputs this run will label, i.e. the files of a folder, or the samples of
local tar shards (a few seconds of reading at most; beyond that the total is estimated from the shards counted),
less those the writer's read plan leaves out (done, or failed, in earlier runs). On a terminal it redraws one
line every second, also while a long batch runs; elsewhere (a log file, SLURM) it prints a plain line every few
images or every 30 s. Its counts are the :class:`~emerdiff_pl.writer.PseudoLabelWriter`'s (``counts()``); before
the first batch ends, the rate and ETA are estimated from the share of the running batch that the model says is
done (``batch_progress()``, e.g. ``EmerDiffSegmenter``'s branch rows).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from typing import Any, NamedTuple, TextIO

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from emerdiff_pl.data import EmerDiffDataModule, deal
from emerdiff_pl.inputs import READ_ALL, ReadPlan
from emerdiff_pl.shardio import iter_tar, safe_key
from emerdiff_pl.writer import PseudoLabelWriter, WriterCounts


class InputCount(NamedTuple):
    """Inputs this process will label or fail on: ``total`` (None when unknown), and whether it is exact."""

    total: int | None
    exact: bool


def count_inputs(
    datamodule: Any, plan: ReadPlan, rank: int = 0, world_size: int = 1, budget_seconds: float = 3.0
) -> InputCount:
    """How many inputs ``datamodule`` gives this rank that ``plan`` does not leave out: exact for a folder,
    counted (or estimated, past ``budget_seconds`` of reading) for local shards, unknown for remote ones."""
    if not isinstance(datamodule, EmerDiffDataModule):
        return InputCount(None, False)
    units = deal(datamodule.task_units(), rank, world_size)
    skip = plan.skip_keys
    if datamodule.kind == "folder":
        return InputCount(sum(1 for key, _ in units if key not in skip), True)
    deadline = time.monotonic() + budget_seconds
    counted = samples = 0
    for url in units:
        count = _count_shard(url, skip, deadline) if os.path.isfile(url) else None
        if count is None:
            break
        samples += count
        counted += 1
    if counted == len(units):
        return InputCount(samples, True)
    if counted:
        return InputCount(round(samples / counted * len(units)), False)
    return InputCount(None, False)


def _count_shard(url: str, skip: frozenset[str], deadline: float) -> int | None:
    """Samples of a local shard whose key is not in ``skip`` (None once ``deadline`` passes), as the
    DataModule reads them (:func:`~emerdiff_pl.shardio.iter_tar`, keys made safe)."""
    count = 0
    for item in iter_tar(url, fields=()):
        if time.monotonic() > deadline:
            return None
        if item.fields is not None and safe_key(item.key) not in skip:
            count += 1
    return count


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_rate(seconds_per_image: float) -> str:
    """Seconds per image when an image takes a second or more, else images per second."""
    if seconds_per_image <= 0:
        return "— images/s"
    if seconds_per_image >= 1.0:
        return f"{seconds_per_image:.1f} s/image"
    return f"{1.0 / seconds_per_image:.1f} images/s"


class ImageProgressBar(ProgressBar):
    """Progress of ``predict`` in images (see the module docstring); only global rank 0 shows it.

    Args:
        log_every_images: Without a terminal, a line every this many images (default: every 5 % of the total,
            or every 10 images when the total is unknown).
        log_every_seconds: Without a terminal, a line at least this often while work goes on.
        stream: Where to write (default ``sys.stderr``).
        is_tty: Force terminal (True) or log-line (False) mode; default: whether ``stream`` is a terminal.
        refresh_seconds: How often the terminal line is redrawn (elapsed time of a running batch).
    """

    def __init__(
        self,
        log_every_images: int | None = None,
        log_every_seconds: float = 30.0,
        stream: TextIO | None = None,
        is_tty: bool | None = None,
        refresh_seconds: float = 1.0,
    ):
        super().__init__()
        self.log_every_images = log_every_images
        self.log_every_seconds = log_every_seconds
        self.stream = stream
        self.is_tty = is_tty
        self.refresh_seconds = refresh_seconds
        self._enabled = True
        self._active = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writer: PseudoLabelWriter | None = None
        self._model: Any = None
        self.count = InputCount(None, False)
        self._start = self._batch_start = self._last_line = self._last_done_at = 0.0
        self._last_done = 0
        self._batch_images = 0
        self._last_logged_position = 0
        self._closed = False

    # ---- Lightning's ProgressBar interface ------------------------------------------------------------------

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    # ---- counts -------------------------------------------------------------------------------------------

    def _counts(self) -> WriterCounts:
        """The writer's counts so far (zeros without a writer)."""
        return self._writer.counts() if self._writer is not None else WriterCounts(0, 0, 0, 0)

    def batch_share(self) -> float:
        """Images of the running batch done so far, as a fraction of images (the model's ``batch_progress()``
        × the batch size); 0 when no batch runs or the model does not say."""
        report = getattr(self._model, "batch_progress", None)
        share = report() if self._batch_images and callable(report) else None
        return float(share) * self._batch_images if share else 0.0

    def position(self) -> int:
        """Inputs handled so far, on the same footing as ``count.total``: labelled or failed in this run."""
        counts = self._counts()
        return counts.done + counts.failed

    def line(self, now: float | None = None) -> str:
        """The progress text: ``12/100 images (12%) · 3.2 s/image · ETA 4m41s · 1 failed``."""
        now = time.perf_counter() if now is None else now
        counts = self._counts()
        done, failed, skipped = counts.done, counts.failed, counts.skipped + counts.skipped_failed
        position, total = self.position(), self.count.total
        if total is not None:
            approx = "" if self.count.exact else "~"
            parts = [f"{position}/{approx}{total} images ({100 * position / max(total, 1):.0f}%)"]
        else:
            parts = [f"{position} images"]
        elapsed = now - self._start
        share = self.batch_share()
        if done:  # the rate up to the last finished image: it does not drift while a batch runs
            last = self._last_done_at if self._last_done_at > self._start else now
            per_image = (last - self._start) / done
            parts.append(format_rate(per_image))
            if total is not None:
                eta = max(total - position, 0) * per_image - (now - last)
                parts.append(f"ETA {format_duration(max(eta, 0.0))}")
        elif share > 0:  # no image finished yet: the running batch's share done says how fast it goes
            per_image = (now - self._batch_start) / share
            parts.append(f"~{format_rate(per_image)}")
            if total is not None:
                eta = max(total - position - share, 0.0) * per_image
                parts.append(f"ETA ~{format_duration(eta)}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if failed:
            parts.append(f"{failed} failed")
        if skipped:
            parts.append(f"{skipped} skipped (earlier runs)")
        if self._batch_images and now - self._batch_start >= 2.0:
            running = f"batch of {self._batch_images} running {format_duration(now - self._batch_start)}"
            parts.append(running + (f" ({100 * share / self._batch_images:.0f}% done)" if share else ""))
        return " · ".join(parts)

    # ---- output -------------------------------------------------------------------------------------------

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def _tty(self) -> bool:
        if self.is_tty is not None:
            return self.is_tty
        isatty = getattr(self._out(), "isatty", None)
        return bool(isatty and isatty())

    def _emit(self, text: str, final: bool = False) -> None:
        with self._lock:
            out = self._out()
            if self._tty():
                width = shutil.get_terminal_size((120, 20)).columns - 1
                out.write("\r\x1b[K" + f"predict: {text}"[:width] + ("\n" if final else ""))
            else:
                out.write(f"predict: {text}\n")
            out.flush()
            self._last_line = time.perf_counter()

    def _tick(self) -> None:
        """Heartbeat thread: redraw the terminal line, or log a line when none came for a while."""
        while not self._stop.wait(self.refresh_seconds):
            if not self._active:
                continue
            if self._tty() or time.perf_counter() - self._last_line >= self.log_every_seconds:
                self._emit(self.line())

    def _log_step(self) -> int:
        if self.log_every_images:
            return self.log_every_images
        total = self.count.total
        return max(1, total // 20) if total else 10

    # ---- hooks --------------------------------------------------------------------------------------------

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._enabled or not trainer.is_global_zero:
            self._enabled = False
            return
        self._writer = PseudoLabelWriter.of(trainer)
        self._model = pl_module
        datamodule = getattr(trainer, "datamodule", None)
        plan = self._writer.read_plan() if self._writer is not None else READ_ALL
        try:
            self.count = count_inputs(datamodule, plan, trainer.global_rank, trainer.world_size)
        except Exception:  # a count is a nicety: the run itself reports input problems
            self.count = InputCount(None, False)
        self._start = self._last_line = time.perf_counter()
        total = self.count.total
        what = "? images" if total is None else f"{'' if self.count.exact else '~'}{total} images"
        batch = getattr(datamodule, "batch_size", 1) or 1
        ranks = (
            f" (rank 0 of {trainer.world_size}; each rank labels its share)" if trainer.world_size > 1 else ""
        )
        moves = f"; batches of {batch}: the count moves once per batch" if batch > 1 else ""
        self._emit(f"{what} to label{ranks}{moves}", final=self._tty())
        self._active = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._tick, name="emerdiff-progress", daemon=True)
        self._thread.start()

    def on_predict_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if not self._enabled:
            return
        self._batch_start = time.perf_counter()
        keys = batch.get("key") if isinstance(batch, dict) else None
        self._batch_images = len(keys) if keys is not None else 0

    def on_predict_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if not self._enabled:
            return
        self._batch_images = 0
        if self._counts().done != self._last_done:
            self._last_done, self._last_done_at = self._counts().done, time.perf_counter()
        position = self.position()
        if self._tty():
            self._emit(self.line())
        elif position - self._last_logged_position >= self._log_step():
            self._last_logged_position = position
            self._emit(self.line())

    def _finish(self) -> None:
        if not self._active:
            return
        self._active = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _close(self) -> None:
        """Stop the heartbeat and write the last progress line once, ending it on a terminal, so that what
        follows (the writer's summary, an error) starts on a line of its own."""
        if not self._enabled or self._closed or not self._active:
            return
        self._closed = True
        self._finish()
        if self._tty():
            self._emit(self.line(), final=True)
        elif self.position() != self._last_logged_position:
            self._emit(self.line())

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()  # before any callback's on_predict_end: the writer prints its summary there

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._finish()


__all__ = [
    "ImageProgressBar",
    "InputCount",
    "count_inputs",
    "format_duration",
    "format_rate",
]
