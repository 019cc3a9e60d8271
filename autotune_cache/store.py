"""The files: one JSON format for shipped tables and learned entries, read leniently, written atomically.

A file holds the configs tuned on one GPU with one Triton version:

    {"schema": 1, "gpu": "nvidia-h100-80gb-hbm3", "triton": "3.6.0",
     "entries": [{"kernel": "atom_conv2d_fwd", "dtype": "float16",
                  "bucket": {"atoms": 8, "c_in_g": 64, "c_out_g": 64, "pixels": 131072, "taps": 9},
                  "config": {"num_warps": 4, "block_c": 16, "block_o": 64, "num_stages": 1},
                  "shape": {"atoms": 6, "c_in_g": 64, "c_out_g": 64, "pixels": 100352, "taps": 9},
                  "ms": 0.41, "default_ms": 0.47}]}

`shape` (the exact shape benchmarked), `ms` (the winner's time) and `default_ms` (the default
config's time on the same shape) are informative and may be absent.

Reading never raises and never hangs: only regular files (or links to one) of at most
`MAX_FILE_BYTES` are read, so a device, a FIFO, a directory or a huge file named `*.json` is
skipped unread; a damaged, unreadable or unexpected file is skipped with one warning naming it;
malformed entries inside a good file are dropped with one warning for the file.

Writing is read-merge-write under a lock file, finished by `os.replace` of a complete temporary
file, so readers only ever see a whole old or a whole new file and concurrent writers lose
nothing. A writer never writes without the lock: after `LOCK_TIMEOUT_S` it gives up instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import reprlib
import stat
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from filelock import FileLock, Timeout

from .keys import Bucket, shape_bucket

SCHEMA = 1
MAX_FILE_BYTES = 16 * 2**20
"""Larger files are skipped unread: a file of every kernel, dtype and shape bucket one GPU
could meet is well under 1 MiB, and parsing hundreds of MiB would stall the first lookup."""
LOCK_TIMEOUT_S = 10.0
"""How long a writer waits for the lock while no other writer replaces the file: then the
holder is taken to be stuck and the writer gives up (`filelock.Timeout`). While others do
replace it the writer keeps waiting: filelock's lock is not fair (a process that just released
it often takes it again first), so a bound on the whole wait would fail writers that are merely
last in line."""
LOCK_POLL_S = 0.002
"""How often a waiting writer tries the lock."""

EntryKey = tuple[str, str, Bucket]
"""(kernel, dtype name, shape bucket)."""


@dataclass(frozen=True)
class Entry:
    """One tuned config: `config` won on `kernel` for `dtype` in shape bucket `bucket`."""

    kernel: str
    dtype: str
    bucket: Bucket
    config: dict[str, int]
    shape: dict[str, int] | None = None
    ms: float | None = None
    default_ms: float | None = None

    @property
    def key(self) -> EntryKey:
        return self.kernel, self.dtype, self.bucket

    def to_json(self) -> dict:
        record = {"kernel": self.kernel, "dtype": self.dtype, "bucket": dict(self.bucket), "config": self.config}
        optional = {"shape": self.shape, "ms": self.ms, "default_ms": self.default_ms}
        return record | {name: value for name, value in optional.items() if value is not None}

    @classmethod
    def from_json(cls, record: object) -> Entry:
        """Parse one stored entry; ValueError says what is wrong with it."""
        if not isinstance(record, dict):
            raise ValueError(f"an entry must be an object, got {type(record).__name__}")
        kernel, dtype = record.get("kernel"), record.get("dtype")
        if not isinstance(kernel, str) or not isinstance(dtype, str):
            raise ValueError("an entry needs string 'kernel' and 'dtype'")
        bucket = _int_mapping(record.get("bucket"), "bucket")
        if shape_bucket(bucket) != tuple(sorted(bucket.items())):
            raise ValueError(f"bucket values must be powers of two, got {bucket}")
        shape = record.get("shape")
        times = [record.get(name) for name in ("ms", "default_ms")]
        if any(t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t))
               for t in times):
            raise ValueError("'ms' and 'default_ms' must be finite numbers")
        return cls(kernel, dtype, tuple(sorted(bucket.items())), _int_mapping(record.get("config"), "config"),
                   None if shape is None else _int_mapping(shape, "shape"), *times)


def _int_mapping(value: object, name: str) -> dict[str, int]:
    if not isinstance(value, dict) or not value or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()):
        raise ValueError(f"'{name}' must be a non-empty object of ints, got {reprlib.repr(value)}")
    return dict(value)


@dataclass
class CacheFile:
    """The parsed content of one file: which GPU and Triton version, and its entries by key."""

    gpu: str
    triton: str
    entries: dict[EntryKey, Entry] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "gpu": self.gpu, "triton": self.triton,
                "entries": [entry.to_json() for entry in self.entries.values()]}


class CacheWarning(RuntimeWarning):
    """Something about the cache's files or benchmarks went wrong; a default was used instead."""


class OnceWarner:
    """Warns about a subject (a file, a kernel's shape) at most once: a damaged file read at
    every miss would flood the log."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def __call__(self, subject: object, message: str) -> None:
        if str(subject) not in self._warned:
            self._warned.add(str(subject))
            warnings.warn(f"atomconv autotune cache: {subject}: {message}", CacheWarning, stacklevel=3)


def read_cache_file(path: Path, warn: OnceWarner) -> CacheFile | None:
    """The file's content; None when it does not exist, or (after one warning) when it cannot
    be used at all."""
    try:
        text = read_regular_file(path, MAX_FILE_BYTES).decode("utf-8")
    except (FileNotFoundError, NotADirectoryError):  # no such file, as Path.exists() would say
        return None
    except (NotARegularFile, FileTooLarge) as error:
        warn(path, f"skipped unread ({error})")
        return None
    except (OSError, UnicodeDecodeError) as error:
        warn(path, f"skipped, unreadable ({error})")
        return None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:  # also: ints of over 4300 digits, deep nesting
        warn(path, f"skipped, not valid JSON ({error})")
        return None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        found = reprlib.repr(document.get("schema")) if isinstance(document, dict) else type(document).__name__
        warn(path, f"skipped, schema {found} instead of {SCHEMA}")
        return None
    gpu, triton, records = document.get("gpu"), document.get("triton"), document.get("entries")
    if not isinstance(gpu, str) or not isinstance(triton, str) or not isinstance(records, list):
        warn(path, "skipped, needs string 'gpu' and 'triton' and an 'entries' list")
        return None
    parsed = CacheFile(gpu, triton)
    malformed = []
    for record in records:
        try:
            entry = Entry.from_json(record)
        except ValueError as error:
            malformed.append(str(error))
            continue
        parsed.entries[entry.key] = entry
    if malformed:
        warn(path, f"{len(malformed)} malformed entries skipped, e.g. {malformed[0]}")
    return parsed


class NotARegularFile(OSError):
    """A path that names a directory, a device, a FIFO or a socket where a file was expected."""


class FileTooLarge(OSError):
    """A file over the size a reader accepts."""


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of `path`, which must be a regular file (or a link to one) of at most
    `max_bytes`. Anything else raises before it is read: FileNotFoundError, NotARegularFile,
    FileTooLarge, or the OSError of the failed call. The type is checked before the open, so a
    device or FIFO is never opened, and again on the open file, which is opened non-blocking
    in case one was swapped in between."""
    _check_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with open(fd, "rb") as handle:
        info = os.fstat(fd)
        _check_regular(info.st_mode)
        data = handle.read(max_bytes + 1) if info.st_size <= max_bytes else b""
    size = max(info.st_size, len(data))  # the file may have grown since the fstat
    if size > max_bytes:
        raise FileTooLarge(f"{size / 2**20:.1f} MiB, over the {max_bytes / 2**20:g} MiB a cache file may have")
    return data


def _check_regular(mode: int) -> None:
    """Raise NotARegularFile, saying what it is instead, unless `mode` is a regular file's."""
    if not stat.S_ISREG(mode):
        kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
                 stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
        kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
        raise NotARegularFile(f"{kind}, not a regular file")


def cache_files(directory: Path, warn: OnceWarner) -> list[Path]:
    """The *.json paths of a directory in name order (whatever they are: reading each decides);
    none when it does not exist, or (after one warning) when it cannot be listed."""
    try:
        return sorted(directory / entry.name for entry in os.scandir(directory) if entry.name.endswith(".json"))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as error:
        warn(directory, f"skipped, cannot list it ({error})")
        return []


def merge_into_file(path: Path, gpu: str, triton: str, entries: Iterable[Entry], warn: OnceWarner) -> None:
    """Add entries to the file (creating it and its directory), replacing entries of the same
    key: read, merge and replace happen under the file's lock, so the merge is with what is on
    disk when the file is replaced and concurrent writers lose nothing. A file that is damaged
    or belongs to another GPU or Triton version is overwritten. Raises `filelock.Timeout` (and
    writes nothing) when a writer held the lock for `LOCK_TIMEOUT_S` without replacing the
    file, OSError when the directory cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_for(path)
    _acquire_while_others_progress(lock, path)
    try:
        current = read_cache_file(path, warn)
        if current is None or (current.gpu, current.triton) != (gpu, triton):
            current = CacheFile(gpu, triton)
        current.entries.update((entry.key, entry) for entry in entries)
        write_atomically(path, current)
    finally:
        lock.release()


def lock_for(path: Path) -> FileLock:
    """The lock every writer of `path` holds while it reads, merges and replaces it."""
    return FileLock(f"{path}.lock", timeout=LOCK_TIMEOUT_S)


def _acquire_while_others_progress(lock: FileLock, path: Path) -> None:
    """Acquire `lock`, waiting as long as other writers keep replacing `path`; raise
    `filelock.Timeout` once LOCK_TIMEOUT_S pass without any replacement."""
    def version() -> tuple[int, int] | None:  # os.replace gives the path a new inode
        with contextlib.suppress(OSError):
            info = os.stat(path)
            return info.st_ino, info.st_mtime_ns
        return None

    seen, give_up_at = version(), time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            lock.acquire(timeout=max(0.0, min(0.5, give_up_at - time.monotonic())), poll_interval=LOCK_POLL_S)
            return
        except Timeout:
            if version() != seen:
                seen, give_up_at = version(), time.monotonic() + LOCK_TIMEOUT_S
            elif time.monotonic() >= give_up_at:
                raise


def write_atomically(path: Path, content: CacheFile) -> None:
    """Write a complete temporary file next to `path`, then rename it over `path`."""
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(json.dumps(content.to_json(), indent=1))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise
