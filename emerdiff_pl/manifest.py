"""The state of a predict output folder, without Lightning or torch: which shards are finished (verified
against their manifest lines), which inputs failed, the per-task lock, and ``merge-manifests``.

File layout and guarantees: :mod:`emerdiff_pl.writer` and slurm/README.md. Kept apart from the writer so that
``emerdiff-pl merge-manifests`` and resume checks start without importing Lightning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from emerdiff_pl.fields import JSON_FIELD
from emerdiff_pl.shardio import ShardReadError, file_digest, iter_samples, tar_keys

SHARD_PATTERN = re.compile(
    r"^(?P<prefix>a\d+of\d+-r\d+of\d+)-(?P<run>\d{8}T\d{6}Z-[0-9a-f]+)-(?P<seq>\d{6})\.tar$"
)
_TAG_PATTERN = re.compile(
    r"^(?P<kind>manifest|failures|summary)-a(?P<a>\d+)of(?P<ac>\d+)-r(?P<r>\d+)of(?P<w>\d+)-(?P<run>.+)\.jsonl?$"
)


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


def _task_of(name: str) -> tuple[int, int] | None:
    """(array index, array count) of a shard or per-run file name, None for foreign files."""
    match = re.search(r"a(\d+)of(\d+)-r\d+of\d+", name)
    return (int(match[1]), int(match[2])) if match else None


@dataclass
class OutputState:
    """What earlier runs left in an output folder: verified finished shards, and the ones that failed checks."""

    shards: dict[str, list[str]] = field(default_factory=dict)  # file name → keys (verified)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name → its manifest line
    bad: dict[str, str] = field(default_factory=dict)  # file name → why it is not trusted
    missing: dict[str, dict[str, Any]] = field(default_factory=dict)  # listed in a manifest, no tar on disk

    def keys(self) -> set[str]:
        return {key for keys in self.shards.values() for key in keys}


def _verify(path: Path, record: dict[str, Any] | None, checksum: bool) -> tuple[list[str], str | None]:
    """(keys, None) for a shard that passes its checks, ([], reason) for one that does not."""
    if record is not None and isinstance(record.get("size"), int):
        size = path.stat().st_size
        if size != record["size"]:
            return (
                [],
                f"size {size} B differs from the {record['size']} B its manifest records (truncated or overwritten)",
            )
        if checksum and record.get("sha256") and file_digest(path) != record["sha256"]:
            return [], "checksum differs from the one its manifest records (corrupted)"
        if not checksum or record.get("sha256"):
            return [str(k) for k in record["keys"]], None
    try:  # no manifest line (killed between the rename and the manifest write), or an old one without a size
        keys = tar_keys(path)
    except (ShardReadError, OSError) as err:
        return [], f"unreadable ({err})"
    if record is not None and keys != [str(k) for k in record["keys"]]:
        return [], "its keys differ from the ones its manifest records"
    return keys, None


def scan_output(output_dir: str | os.PathLike, checksum: bool | str = False) -> OutputState:
    """Every finished shard of ``output_dir``, verified against its manifest line: the size always, the SHA-256
    when ``checksum`` is True or is the task prefix the shard belongs to (what a resuming task checks). Shards
    without a manifest line are read whole (their structure, truncation included, is checked)."""
    root = Path(output_dir)
    state = OutputState()
    if not root.is_dir():
        return state
    for manifest in sorted(root.glob("manifest-*.jsonl")):
        for record in _read_jsonl(manifest):
            if isinstance(record.get("shard"), str) and isinstance(record.get("keys"), list):
                state.records[record["shard"]] = record
    present = set()
    for path in sorted(root.glob("*.tar")):
        if not SHARD_PATTERN.match(path.name):
            continue
        present.add(path.name)
        deep = checksum is True or (isinstance(checksum, str) and path.name.startswith(checksum + "-"))
        keys, problem = _verify(path, state.records.get(path.name), deep)
        if problem is None:
            state.shards[path.name] = keys
        else:
            state.bad[path.name] = problem
    state.missing = {n: r for n, r in state.records.items() if n not in present}
    return state


def finished_shards(output_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Every finished shard of ``output_dir`` that passes its size check (file name → keys)."""
    return scan_output(output_dir).shards


def finished_keys(output_dir: str | os.PathLike) -> set[str]:
    """Keys present in verified finished shards of ``output_dir`` (what a rerun skips)."""
    return scan_output(output_dir).keys()


def failed_keys(output_dir: str | os.PathLike) -> set[str]:
    """Keys that earlier runs recorded as per-sample failures (a rerun skips them unless asked to retry)."""
    out = set()
    for path in Path(output_dir).glob("failures-*.jsonl"):
        for record in _read_jsonl(path):
            if record.get("key") is not None and record.get("kind", "sample") == "sample":
                out.add(str(record["key"]))
    return out


# --------------------------------------------------------------------------------------------------------------
# the task lock
# --------------------------------------------------------------------------------------------------------------


class TaskLockedError(OSError):
    """Another live process runs the same task (array index and rank) into the same output folder."""


class TaskLock:
    """Exclusive lock of one task prefix in the output folder: a POSIX record lock (``fcntl.lockf``, which NFS
    and Lustre support where ``flock`` may not) on ``.<prefix>.lock``, holding the owner's host, pid and start.

    The kernel (or the NFS lock manager) drops the lock when its process dies, however it dies, so a stale lock
    file never blocks. Where the file system has no locking at all, the run goes on with a warning.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    @staticmethod
    def _owner(fd: int) -> str:
        with contextlib.suppress(Exception):
            owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            return f"pid {owner['pid']} on host {owner['host']} (started {owner['started']})"
        return "another process"

    def acquire(self, run_id: str | None = None) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                owner = self._owner(fd)
                os.close(fd)
                raise TaskLockedError(
                    f"this task is already running into the same output folder: {owner} holds {self.path}. "
                    "Two processes of one task would label the same inputs; wait for it to end (or cancel it), "
                    "then rerun: finished work is kept"
                ) from None
            os.close(fd)
            print(
                f"warning: no file locking on {self.path.parent} ({err}): running without the task lock, so do "
                "not start the same array task twice at once",
                file=sys.stderr,
            )
            return
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id}
        owner["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode("utf-8"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the POSIX lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    @staticmethod
    def is_held(path: str | os.PathLike) -> bool:
        """Whether a live process holds the lock (call from a process that does not hold it itself: POSIX
        locks of one process do not conflict, and closing the probe would drop its own lock)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            return err.errno in (errno.EACCES, errno.EAGAIN)
        finally:
            os.close(fd)
        return False


def lock_path(output_dir: str | os.PathLike, prefix: str) -> Path:
    return Path(output_dir) / f".{prefix}.lock"


# --------------------------------------------------------------------------------------------------------------
# the settings the labels were made with
# --------------------------------------------------------------------------------------------------------------

SETTINGS_FILE = "settings.json"  # the label-shaping settings of the folder's runs, written once by the first


class SettingsChangedError(ValueError):
    """A rerun into an output folder whose labels were made with other label-shaping settings."""


def _plain(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON gives them back (tuples become lists), so a record and a live config compare equal."""
    return json.loads(json.dumps(settings, default=str))


def _read_record(path: Path) -> dict[str, Any] | None:
    """The settings record at ``path`` (None when absent); a record another process is still writing is waited
    for a moment (the O_EXCL fallback of :func:`_create_record` is not atomic)."""
    for _ in range(20):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(record, dict) and isinstance(record.get("label_settings"), dict):
                return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SettingsChangedError(f"{path} is not a settings record: delete it if no run uses the folder")


def create_file_once(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists, atomically: of several processes starting at once the first
    creates it complete, the others find it. Returns whether this call created it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)  # fails when the name exists: an atomic create-if-absent, contents complete
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _create_record(path: Path, record: dict[str, Any], replace: bool = False) -> bool:
    """Write ``record`` at ``path`` unless one is there (:func:`create_file_once`), or over it (``replace``,
    atomically). Returns whether this call wrote it."""
    text = json.dumps(record, indent=1)
    if not replace:
        return create_file_once(path, text)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return True


def _settings_of_samples(root: Path, shards: list[str], names: set[str]) -> dict[str, Any] | None:
    """The label settings of a folder labelled before it recorded them: the ``hparams`` in the ``<key>.json`` of
    its first finished sample, restricted to ``names``; None when no sample says."""
    for shard in shards[:1]:
        with contextlib.suppress(Exception):
            for sample in iter_samples(str(root / shard), fields={JSON_FIELD}):
                hparams = sample.get(JSON_FIELD, {}).get("hparams")
                if isinstance(hparams, dict):
                    return {k: v for k, v in hparams.items() if k in names}
                break
    return None


def settings_changes(
    old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
) -> dict[str, tuple[Any, Any]]:
    """name → (recorded, new) for every setting that differs. A setting only one side has counts as its default
    there (a setting added to the config after the folder was labelled, at its default, changes nothing)."""
    old, new, defaults = _plain(old), _plain(new), _plain(defaults or {})
    missing = object()
    changes = {}
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name, defaults.get(name, missing)), new.get(name, defaults.get(name, missing))
        if before != after:
            changes[name] = (
                None if before is missing else before,
                None if after is missing else after,
            )
    return changes


def describe_changes(changes: dict[str, tuple[Any, Any]], group: str = "model") -> str:
    """``model.num_masks 12 → 8, model.seed 0 → 1``."""
    return ", ".join(
        f"{group}.{name} {json.dumps(old)} → {json.dumps(new)}" for name, (old, new) in changes.items()
    )


def _labels_pending(root: Path) -> bool:
    """Whether the folder holds labels (a finished shard) or a live run that may be writing them."""
    if any(SHARD_PATTERN.match(p.name) for p in root.glob("*.tar")):
        return True
    return any(TaskLock.is_held(lock) for lock in root.glob(".*.lock"))


def check_settings(
    output_dir: str | os.PathLike,
    settings: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    allow_changed: bool = False,
    record: bool = True,
) -> dict[str, tuple[Any, Any]]:
    """Compare the label-shaping ``settings`` of a run into ``output_dir`` with the ones its labels were made with;
    returns the changes (none for a new folder, a resume, or ``allow_changed``), else raises
    :class:`SettingsChangedError` naming them and the two ways out.

    ``record``: write the folder's :data:`SETTINGS_FILE` when it has none (the first run; a folder labelled before
    the record existed records the settings of its first sample). A record of a run that left no labels (no
    finished shard, no live task) is replaced, so a failed first try does not bind the next one.
    """
    root = Path(output_dir)
    path = root / SETTINGS_FILE
    recorded = _read_record(path) if root.is_dir() else None
    if recorded is not None and not _labels_pending(root):  # settings that labelled nothing
        if record:
            _create_record(path, _new_record(settings), replace=True)
        return {}
    if recorded is None and root.is_dir():
        shards = sorted(p.name for p in root.glob("*.tar") if SHARD_PATTERN.match(p.name))
        legacy = _settings_of_samples(root, shards, set(settings)) if shards else None
        if legacy is not None:
            recorded = _new_record(legacy, adopted_from=shards[0])
            if record:
                _create_record(path, recorded)
                recorded = _read_record(path) or recorded
    if recorded is None:
        if not record or _create_record(path, _new_record(settings)):
            return {}
        recorded = _read_record(path)  # another process created it first: compare with that
        assert recorded is not None
    changes = settings_changes(recorded["label_settings"], settings, defaults)
    if changes and not allow_changed:
        raise SettingsChangedError(
            f"--writer.output_dir {str(output_dir)!r} holds labels made with other settings: "
            f"{describe_changes(changes)} ({path.name} records the folder's). Labels of different settings in one "
            "folder would mean different things. Write to a new folder (--writer.output_dir NEW_DIR), or mix them "
            "on purpose with --writer.allow_changed_settings true (this run's settings are then recorded beside "
            "its shards)"
        )
    return changes


def _new_record(settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "label_settings": _plain(settings),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


# --------------------------------------------------------------------------------------------------------------
# merge-manifests
# --------------------------------------------------------------------------------------------------------------


def _inputs_of(root: Path, shard: str, keys: set[str]) -> dict[str, str]:
    """key → input url recorded in the ``<key>.json`` of one output shard (for duplicate reports)."""
    out: dict[str, str] = {}
    with contextlib.suppress(Exception):
        for sample in iter_samples(str(root / shard), fields={JSON_FIELD}):
            if sample["__key__"] in keys:
                out[sample["__key__"]] = str(sample.get(JSON_FIELD, {}).get("url"))
    return out


def merge(output_dir: str | os.PathLike, clean_temp: bool = False, checksum: bool = True) -> dict[str, Any]:
    """Fold the per-process files of ``output_dir`` into ``manifest.jsonl``, ``failures.jsonl`` (inputs that
    are still not labelled, deduplicated, and every duplicate-key report) and ``summary.json``; return the
    summary. Every shard is verified against its manifest line (size, and SHA-256 unless ``checksum=False``):
    shards that fail, or that a manifest lists but are gone, are left out and their tasks listed to rerun."""
    root = Path(output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"output folder {str(root)!r} does not exist")
    state = scan_output(root, checksum=checksum)
    shards = state.shards
    owner: dict[str, str] = {}
    duplicated: dict[str, list[str]] = {}
    for name, keys in shards.items():
        for key in keys:
            if key in owner:
                duplicated.setdefault(key, [owner[key]]).append(name)
            else:
                owner[key] = name
    duplicates: dict[str, list[dict[str, str]]] = {}
    if duplicated:
        inputs: dict[str, dict[str, str]] = {}
        for name in {n for names in duplicated.values() for n in names}:
            inputs[name] = _inputs_of(root, name, set(duplicated))
        for key, names in duplicated.items():
            duplicates[key] = [{"shard": n, "input": inputs[n].get(key, "?")} for n in names]
    failures: dict[tuple[Any, Any], dict[str, Any]] = {}
    for path in sorted(root.glob("failures-*.jsonl")):
        for record in _read_jsonl(path):
            if record.get("key") not in owner or record.get("kind") == "duplicate":
                failures[(record.get("key"), record.get("url"))] = record
    runs = _runs(root)
    seen_tasks = {t for p in root.iterdir() if (t := _task_of(p.name)) is not None}  # any file of a task
    # a shard listed in a manifest but gone (deleted, or renamed .corrupt) matters until a rerun redid its keys
    missing = sorted(n for n, r in state.missing.items() if not {str(k) for k in r["keys"]} <= owner.keys())
    damaged = {t for n in [*state.bad, *missing] if (t := _task_of(n)) is not None}
    finished = {
        task
        for task, attempts in runs.items()
        if task not in damaged
        and any(
            len(a["statuses"]) == a["world_size"] and set(a["statuses"]) == {"finished"}
            for a in attempts.values()
        )
    }
    counts = {count for _, count in seen_tasks | set(runs)}
    array_count = _original_count(root, counts)
    # a damaged shard's keys may be ones that a task of another count skipped: rerun whatever shares its units
    unfinished = [
        i
        for i in range(array_count)
        if not _covered(i, array_count, finished) or _overlaps(i, array_count, damaged)
    ]
    without_summary = sorted(
        i for i, c in seen_tasks if c == array_count and (i, c) not in runs and i in unfinished
    )
    temp_files = sorted(p.name for p in root.glob(".*.tar.tmp"))
    if clean_temp:  # only the temporary files of tasks that no live process holds
        for name in list(temp_files):
            match = SHARD_PATTERN.match(name[1:].removesuffix(".tmp"))
            if match and TaskLock.is_held(lock_path(root, match["prefix"])):
                continue
            with contextlib.suppress(FileNotFoundError):
                (root / name).unlink()
            temp_files.remove(name)
    _atomic_lines(
        root / "manifest.jsonl",
        [
            {
                "shard": n,
                "count": len(k),
                **{f: state.records.get(n, {}).get(f) for f in ("size", "sha256")},
                "keys": k,
            }
            for n, k in shards.items()
        ],
    )
    _atomic_lines(root / "failures.jsonl", list(failures.values()))
    summary = {
        "shards": len(shards),
        "samples": len(owner),
        "failed": len(failures),
        "duplicate_keys": duplicates,
        "bad_shards": state.bad,
        "missing_shards": missing,
        "array_counts": sorted(counts),
        "array_count": array_count,
        "unfinished_array_tasks": unfinished,
        "tasks_without_summary": without_summary,
        "temp_files": temp_files,
        "work_left": bool(unfinished or state.bad or missing),
    }
    summary["resubmit"] = resubmit_command(root, summary) if summary["work_left"] else None
    (root / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def _runs(root: Path) -> dict[tuple[int, int], dict[str, dict[str, Any]]]:
    """(array index, count) → run id → {"world_size", "statuses": the status of each rank's summary}."""
    runs: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for path in sorted(root.glob("summary-*.json")):
        match = _TAG_PATTERN.match(path.name)
        if not match:
            continue
        with contextlib.suppress(json.JSONDecodeError, OSError):
            summary = json.loads(path.read_text(encoding="utf-8"))
            attempt = runs.setdefault((int(match["a"]), int(match["ac"])), {}).setdefault(
                match["run"], {"world_size": int(match["w"]), "statuses": []}
            )
            attempt["statuses"].append(summary.get("status", "?"))
    return runs


def _original_count(root: Path, counts: set[int]) -> int:
    """The array count of the earliest attempt in ``root`` (run ids start with their UTC start time): the split
    that resubmissions must keep. 0 for a folder without any task file."""
    first: dict[int, str] = {}
    for path in root.iterdir():
        match = re.search(r"a\d+of(\d+)-r\d+of\d+-(\d{8}T\d{6}Z-[0-9a-f]+)", path.name)
        if match and (int(match[1]) not in first or match[2] < first[int(match[1])]):
            first[int(match[1])] = match[2]
    if first:
        return min(first, key=lambda count: first[count])
    return min(counts) if counts else 0


def _covered(index: int, count: int, finished: set[tuple[int, int]]) -> bool:
    """Whether finished tasks, of any array count, cover task ``index`` of ``count``.

    :func:`emerdiff_pl.data.partition` gives task i of c the units u with (u + 1) / n in (i / c, (i + 1) / c],
    for any number of units n. So task ``index`` needs no rerun when the finished tasks' intervals cover its own:
    a resubmission with another count (a forgotten ARRAY_COUNT) counts where it did the work, and leaves
    listed only what no finished task covered.
    """
    low, high = Fraction(index, count), Fraction(index + 1, count)
    for start, end in sorted((Fraction(i, c), Fraction(i + 1, c)) for i, c in finished):
        if start <= low < end:
            low = end
            if low >= high:
                return True
    return low >= high


def _overlaps(index: int, count: int, tasks: set[tuple[int, int]]) -> bool:
    """Whether task ``index`` of ``count`` shares units with any of ``tasks`` (of any count; see :func:`_covered`)."""
    return any(
        max(Fraction(index, count), Fraction(i, c)) < min(Fraction(index + 1, count), Fraction(i + 1, c))
        for i, c in tasks
    )


def _ranges(indexes: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2,5,7-8"`` (SLURM's --array syntax)."""
    runs: list[list[int]] = []
    for index in indexes:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def resubmit_command(root: Path, summary: dict[str, Any]) -> str:
    """A command that reruns what ``summary`` lists as not done, with the settings of the original run: its
    saved config (``config-*.yaml``: every override, the weights), its input, the original array count, and
    the script for its shape (array or DDP) and device (GPU or CPU). Unknown values are ``<placeholders>``."""
    count = summary["array_count"] or 1
    configs = sorted(root.glob(f"config-a*of{count:04d}-*.yaml"), key=lambda p: p.name.rsplit("-", 2)[-2:])
    config: dict[str, Any] = {}
    if configs:
        with contextlib.suppress(OSError, yaml.YAMLError):
            config = yaml.safe_load(configs[-1].read_text(encoding="utf-8")) or {}
    data, trainer = config.get("data") or {}, config.get("trainer") or {}
    env = [f"CONFIG={shlex.quote(str(configs[-1].resolve()))}" if configs else "CONFIG=<your config.yaml>"]
    if isinstance(data.get("folder"), str):
        env.append(f"FOLDER={shlex.quote(data['folder'])}")
    elif isinstance(data.get("urls"), str):
        env.append(f"INPUT={shlex.quote(data['urls'])}")
    else:
        env.append("INPUT=<the input shards>")
    env.append(f"OUTPUT={shlex.quote(str(root.resolve()))}")
    device = "-cpu" if trainer.get("accelerator") == "cpu" else ""
    # world size from any file of the count (a DDP job whose ranks all died before their summaries has manifests)
    ranks = (re.search(rf"a\d+of{count:04d}-r\d+of(\d+)", p.name) for p in root.iterdir())
    world = max((int(m[1]) for m in ranks if m), default=1)
    # slurm/ddp.sbatch's output (ranks, one array task): rerun the whole job, its ranks skip what is done
    if count == 1 and world > 1:
        nodes = trainer.get("num_nodes") or 1
        per_node = trainer.get("devices") if isinstance(trainer.get("devices"), int) else world // nodes
        return f"{' '.join(env)} sbatch --nodes={nodes} --ntasks-per-node={per_node} slurm/ddp{device}.sbatch"
    tasks = _ranges(summary["unfinished_array_tasks"])
    return f"ARRAY_COUNT={count} {' '.join(env)} sbatch --array={tasks} slurm/array{device}.sbatch"


def _atomic_lines(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
