"""Reading and writing WebDataset tar shards: the one walk over tar headers, samples as raw bytes or decoded, random
access by key, and atomic shard writers.

Every subcommand (predict's data and writer, relabel, show, evaluate, export, the converters) reads and writes
shards through this module, so broken tars are handled the same everywhere: Python's ``tarfile`` takes a file cut
at or inside a member header for a normal end of archive, so :func:`walk_tar` checks the end itself. Keys and URL
lists come from :mod:`emerdiff_pl.paths`, field decoding from :mod:`emerdiff_pl.codec`. Built on WebDataset's
pieces (``gopen`` for remote URLs and pipes, ``TarWriter`` with raw bytes, its pipeline stages).

Sample layout (WebDataset convention): the member ``dir/abc.seg.png`` belongs to sample ``__key__ = "dir/abc"``
under the field name ``"seg.png"``; members of one sample are consecutive in the tar.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import time
import zlib
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Self

from emerdiff_pl.codec import decode_sample, encode_field
from emerdiff_pl.paths import (
    expand_urls,
    is_metadata_member,
    is_remote,
    open_url,
    safe_key,
    split_member_name,
)


class ShardReadError(OSError):
    """A shard that is unreadable, corrupt or truncated; the message names the file and how far it got."""


class TruncatedTarError(ShardReadError):
    """A tar that ends early (cut at or inside a member header, or inside a member's data); ``samples`` counts
    the complete samples before the cut (the one being read at the cut is not trusted)."""

    def __init__(self, problem: str, samples: int):
        super().__init__(f"truncated tar after {samples} samples ({problem})")
        self.problem, self.samples = problem, samples


# --------------------------------------------------------------------------------------------------------------
# walking tar headers
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


@contextlib.contextmanager
def open_tar(url: str, seekable: bool = False) -> Iterator[tarfile.TarFile]:
    """A tar shard opened for :func:`walk_tar`: streamed (any compression, local or remote: ``r|*``), or with
    ``seekable`` an uncompressed local file whose member data is skipped, not read (``r:``)."""
    if seekable:
        with tarfile.open(url, mode="r:", tarinfo=_RecordingTarInfo) as tar:
            yield tar
        return
    with open_url(url) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_RecordingTarInfo) as tar:
        yield tar


class TarMember(NamedTuple):
    """A file member of a tar shard: its header, and its sample key and field (both None when the member is
    no sample field: no extension, or a hidden file)."""

    info: tarfile.TarInfo
    key: str | None
    field: str | None


def walk_tar(tar: tarfile.TarFile, size: int | None = None) -> Iterator[TarMember]:
    """The file members of a tar opened by :func:`open_tar`, in order, metadata members (``__index__``) left out:
    the one walk over tar headers.

    Raises :class:`TruncatedTarError` when the archive ends without its end-of-archive block, and, given the
    file's ``size`` (seekable tars, whose data is never read), when a member's data runs past the end.
    """
    samples, key = 0, None
    for info in tar:
        tar.members = []  # streaming mode keeps every header otherwise
        if not info.isfile() or is_metadata_member(info.name):
            continue
        parts = split_member_name(info.name)
        if parts is not None and parts[0] != key:
            samples, key = samples + (key is not None), parts[0]
        if size is not None and info.offset_data + info.size > size:
            raise TruncatedTarError("the file ends inside a member's data", samples)
        yield TarMember(info, *(parts or (None, None)))
    problem = _end_problem(tar)
    if problem is not None:
        raise TruncatedTarError(problem, samples)


# --------------------------------------------------------------------------------------------------------------
# reading samples
# --------------------------------------------------------------------------------------------------------------


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
        with open_tar(url) as tar:
            for member in walk_tar(tar):
                name = member.info.name
                if member.key is None:
                    yield TarItem(name, None, f"member {name!r} has no extension: skipped")
                    continue
                if member.key != key:
                    if key is not None:
                        yield TarItem(key, current)
                        count += 1
                    key, current = member.key, {}
                if fields is None or member.field in fields:
                    handle = tar.extractfile(member.info)
                    current[member.field] = handle.read() if handle is not None else b""
    except TruncatedTarError as err:
        # the last sample may have lost members of its own: it is not trusted either
        yield TarItem(key, None, f"{err}; the rest of the shard is lost", fatal=True)
        return
    except _TAR_ERRORS as err:
        reason = f"corrupt or unreadable tar after {count} samples ({type(err).__name__}: {err})"
        yield TarItem(key, None, reason + ("; the rest of the shard is lost" if key else ""), fatal=True)
        return
    if key is not None:
        yield TarItem(key, current)


def iter_shard(url: str, fields: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard with undecoded bytes per field (plus ``__key__`` and ``__url__``), in order.

    Raises :class:`ShardReadError` naming the shard when it is corrupt or truncated (predict records that as a
    failure instead; every other reader stops, as its output would silently lack samples).
    """
    for item in iter_tar(url, fields):
        if item.fatal:
            raise ShardReadError(f"cannot read shard {url!r}: {item.reason}")
        if item.fields is not None:
            yield {"__key__": item.key, "__url__": url, **item.fields}


def tar_samples(shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """WebDataset pipeline stage: the ``{"url": ...}`` items of a shard list → each shard's raw samples
    (:func:`iter_shard`: a truncated or corrupt shard raises naming it)."""
    for shard in shards:
        yield from iter_shard(shard["url"])


def iter_raw_samples(urls: str | list[str], fields: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (:func:`iter_shard`) of every shard of ``urls`` (:func:`~emerdiff_pl.paths.expand_urls`)."""
    wanted = set(fields) if fields is not None else None
    for url in expand_urls(urls):
        yield from iter_shard(url, wanted)


def iter_samples(
    urls: str | list[str],
    fields: Iterable[str] | None = None,
    decode: bool = True,
    labels: Collection[str] = (),
) -> Iterator[dict[str, Any]]:
    """Samples of WebDataset tar shards as dicts: ``__key__``, ``__url__`` and one entry per field.

    Fields are decoded by :func:`~emerdiff_pl.codec.decode_field` (label maps raw, images as RGB, npy, json); ``labels`` names
    further fields to read as raw label maps. ``fields`` keeps only the named fields (others are not read).
    """
    for raw in iter_raw_samples(urls, fields):
        yield decode_sample(raw, labels) if decode else raw


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
        opened = False
        try:
            with open_tar(url, seekable=True) as tar:
                opened = True
                for member in walk_tar(tar, size=os.path.getsize(url)):
                    if member.key is None:
                        continue
                    entry = self._members.setdefault(member.key, {})
                    if wanted is not None and member.field not in wanted:
                        continue
                    if member.field in entry:
                        self.duplicates.append(member.key)
                    entry[member.field] = (url, member.info.offset_data, member.info.size)
        except TruncatedTarError as err:
            raise ShardReadError(f"shard {url!r}: {err}") from None
        except tarfile.ReadError as err:
            if opened:
                raise ShardReadError(f"shard {url!r}: corrupt tar ({err})") from err
            raise ShardReadError(
                f"cannot index shard {url!r} ({err}): random access by key needs uncompressed .tar shards"
            ) from err

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
                "awkward characters (see emerdiff_pl.paths.safe_key)"
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


__all__ = [
    "ShardIndex",
    "ShardReadError",
    "ShardSequenceWriter",
    "TarItem",
    "TarMember",
    "TarWriter",
    "TruncatedTarError",
    "file_digest",
    "fsync_dir",
    "iter_raw_samples",
    "iter_samples",
    "iter_shard",
    "iter_tar",
    "open_tar",
    "tar_keys",
    "tar_samples",
    "walk_tar",
]
