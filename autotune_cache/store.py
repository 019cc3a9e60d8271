"""The files: one JSON format for shipped tables and learned entries, read leniently, written atomically.

A file holds the configs tuned on one GPU with one Triton version:

    {"schema": 1, "gpu": "nvidia-h100-80gb-hbm3", "triton": "3.6.0",
     "entries": [{"kernel": "atom_conv2d_fwd", "dtype": "float16",
                  "bucket": {"atoms": 8, "c_in_g": 64, "c_out_g": 64, "pixels": 131072, "taps": 9},
                  "config": {"block_p": 64, "block_o": 64, "block_k": 256, "num_warps": 8, "num_stages": 1},
                  "shape": {"atoms": 6, "c_in_g": 64, "c_out_g": 64, "pixels": 100352, "taps": 9},
                  "ms": 0.41, "default_ms": 0.47}]}

`shape` (the exact shape benchmarked), `ms` (the winner's time) and `default_ms` (the default
config's time on the same shape) are informative and may be absent. Reading never raises: a
damaged, unreadable or unexpected file is skipped with one warning, malformed entries inside a
good file are dropped with one warning for the file. Writing is read-merge-write under a lock
file, finished by `os.replace` of a complete temporary file, so readers only ever see a whole
old or a whole new file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from filelock import FileLock, Timeout

from .keys import Bucket, shape_bucket

SCHEMA = 1
LOCK_TIMEOUT_S = 10.0
"""How long a writer waits for another process's write before writing anyway (then the last
writer wins for the whole file: entries the other process added in between are lost)."""

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
        if any(t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))) for t in times):
            raise ValueError("'ms' and 'default_ms' must be numbers")
        return cls(kernel, dtype, tuple(sorted(bucket.items())), _int_mapping(record.get("config"), "config"),
                   None if shape is None else _int_mapping(shape, "shape"), *times)


def _int_mapping(value: object, name: str) -> dict[str, int]:
    if not isinstance(value, dict) or not value or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()):
        raise ValueError(f"'{name}' must be a non-empty object of ints, got {value!r}")
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


class OnceWarner:
    """Warns about a subject (a file, a kernel's shape) at most once: a damaged file read at
    every miss would flood the log."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def __call__(self, subject: object, message: str) -> None:
        if str(subject) not in self._warned:
            self._warned.add(str(subject))
            warnings.warn(f"atomconv autotune cache: {subject}: {message}", RuntimeWarning, stacklevel=3)


def read_cache_file(path: Path, warn: OnceWarner) -> CacheFile | None:
    """The file's content; None when it does not exist, or (after one warning) when it cannot
    be used at all."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # no such file, as Path.exists() would say
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        warn(path, f"skipped, unreadable ({error})")
        return None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        found = document.get("schema") if isinstance(document, dict) else type(document).__name__
        warn(path, f"skipped, schema {found!r} instead of {SCHEMA}")
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


def cache_files(directory: Path, warn: OnceWarner) -> list[Path]:
    """The *.json paths of a directory in name order; none when it does not exist, or (after one
    warning) when it cannot be read."""
    try:
        return sorted(directory.glob("*.json")) if directory.is_dir() else []
    except OSError as error:
        warn(directory, f"skipped, unreadable ({error})")
        return []


def merge_into_file(path: Path, gpu: str, triton: str, entries: Iterable[Entry], warn: OnceWarner) -> None:
    """Add entries to the file (creating it and its directory), replacing entries of the same
    key: read, merge and write happen under a lock so concurrent writers lose nothing. A file
    that is damaged or belongs to another GPU or Triton version is overwritten. Raises OSError
    when the directory cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        current = read_cache_file(path, warn)
        if current is None or (current.gpu, current.triton) != (gpu, triton):
            current = CacheFile(gpu, triton)
        current.entries.update((entry.key, entry) for entry in entries)
        write_atomically(path, current)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=LOCK_TIMEOUT_S)
        acquired = True
    except Timeout:  # a stuck writer must not stall the training run: write anyway
        acquired = False
    try:
        yield
    finally:
        if acquired:
            lock.release()


def write_atomically(path: Path, content: CacheFile) -> None:
    """Write a complete temporary file next to `path`, then rename it over `path`."""
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            json.dump(content.to_json(), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise
