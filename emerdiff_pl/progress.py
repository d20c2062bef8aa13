"""Progress of ``predict`` counted in images: done / total, seconds per image (or images per second), ETA.

Lightning's bar counts batches of an IterableDataset whose length it cannot know (``Predicting 0/--``). This
bar knows the total where it can: the file count of a folder, or a count of the members of local tar shards
(headers only, a few seconds at most; beyond that the total is estimated from the shards counted). On a
terminal it redraws one line every second, also while a long batch runs; elsewhere (a log file, SLURM) it
prints a plain line every few images or every 30 s. It reads the counts of the writer callback.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import threading
import time
from typing import Any, NamedTuple, TextIO

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


class InputCount(NamedTuple):
    """Inputs this process will see: ``total`` (None when unknown), whether it is exact, and whether inputs
    that an earlier run already labelled (skipped now) are part of it."""

    total: int | None
    exact: bool
    includes_done: bool


def count_tar_samples(path: str) -> int:
    """Samples in a tar shard, from its member headers (the data is skipped, not read)."""
    from emerdiff_pl.shardio import open_tar, walk_tar

    count, last = 0, None
    try:
        with open_tar(path, seekable=True) as tar:
            for member in walk_tar(tar):
                if member.key is None or member.key.split("/")[-1].startswith("__"):
                    continue
                if member.key != last:
                    count, last = count + 1, member.key
    except (tarfile.TarError, OSError, EOFError):
        pass  # a broken shard: the samples before the break count, the break itself becomes one failure
    return count


def count_inputs(
    datamodule: Any, rank: int = 0, world_size: int = 1, budget_seconds: float = 3.0
) -> InputCount:
    """How many inputs ``datamodule`` gives this rank: exact for a folder (keys an earlier run finished left out),
    counted or estimated for local shards, unknown for remote ones."""
    if datamodule is None or not hasattr(datamodule, "task_units"):
        return InputCount(None, False, True)
    from emerdiff_pl.data import deal

    units = deal(datamodule.task_units(), rank, world_size)
    if getattr(datamodule, "kind", None) == "folder":
        # keys done, or failed, in an earlier run are skipped without a count: leave them out of the total
        skip = set(getattr(datamodule, "done_keys", ())) | set(getattr(datamodule, "failed_keys", ()))
        return InputCount(sum(1 for key, _ in units if key not in skip), True, False)
    deadline = time.monotonic() + budget_seconds
    counted = samples = 0
    for url in units:
        if not os.path.isfile(url) or time.monotonic() > deadline:
            break
        samples += count_tar_samples(url)
        counted += 1
    if counted == len(units):
        return InputCount(samples, True, True)
    if counted:
        return InputCount(round(samples / counted * len(units)), False, True)
    return InputCount(None, False, True)


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
        self._writer: Any = None
        self.count = InputCount(None, False, True)
        self._start = self._batch_start = self._last_line = self._last_done_at = 0.0
        self._last_done = 0
        self._batch_images = 0
        self._last_logged_position = 0

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

    def _counts(self) -> tuple[int, int, int]:
        """(labelled, skipped as done or failed by an earlier run, failed) so far, from the writer."""
        writer = self._writer
        if writer is None:
            return 0, 0, 0
        skipped = int(writer.skipped) + int(getattr(writer, "skipped_failed", 0))
        return int(writer.done), skipped, int(writer.failed)

    def position(self) -> int:
        """Inputs handled so far, on the same footing as ``count.total``."""
        done, skipped, failed = self._counts()
        return done + failed + (skipped if self.count.includes_done else 0)

    def line(self, now: float | None = None) -> str:
        """The progress text: ``12/100 images (12%) · 3.2 s/image · ETA 4m41s · 1 failed``."""
        now = time.perf_counter() if now is None else now
        done, skipped, failed = self._counts()
        position, total = self.position(), self.count.total
        if total is not None:
            approx = "" if self.count.exact else "~"
            parts = [f"{position}/{approx}{total} images ({100 * position / max(total, 1):.0f}%)"]
        else:
            parts = [f"{position} images"]
        elapsed = now - self._start
        if done:  # the rate up to the last finished image: it does not drift while a batch runs
            last = self._last_done_at if self._last_done_at > self._start else now
            per_image = (last - self._start) / done
            parts.append(format_rate(per_image))
            if total is not None:
                eta = max(total - position, 0) * per_image - (now - last)
                parts.append(f"ETA {format_duration(max(eta, 0.0))}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if failed:
            parts.append(f"{failed} failed")
        if skipped:
            parts.append(f"{skipped} skipped (earlier runs)")
        if self._batch_images and now - self._batch_start >= 2.0:
            parts.append(f"batch of {self._batch_images} running {format_duration(now - self._batch_start)}")
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
        self._writer = next(
            (cb for cb in trainer.callbacks if all(hasattr(cb, a) for a in ("done", "skipped", "failed"))),
            None,
        )
        datamodule = getattr(trainer, "datamodule", None)
        try:
            self.count = count_inputs(datamodule, trainer.global_rank, trainer.world_size)
        except Exception:  # a count is a nicety: the run itself reports input problems
            self.count = InputCount(None, False, True)
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
        if self._counts()[0] != self._last_done:
            self._last_done, self._last_done_at = self._counts()[0], time.perf_counter()
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

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._enabled:
            return
        self._finish()
        if self._tty():
            self._emit(self.line(), final=True)
        elif self.position() != self._last_logged_position:
            self._emit(self.line())

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self._active:
            self._finish()
            self._emit(self.line(), final=True)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._finish()


__all__ = [
    "ImageProgressBar",
    "InputCount",
    "count_inputs",
    "count_tar_samples",
    "format_duration",
    "format_rate",
]
