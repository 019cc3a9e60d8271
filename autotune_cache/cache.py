"""The cache: which launch config a kernel uses on a GPU for a dtype and a shape.

Lookup order for one (GPU, kernel, dtype, shape bucket), first answer wins:
1. learned entries (this user's cache dir, same Triton version; skipped if ATOMCONV_AUTOTUNE=0);
2. shipped tables (`autotune_cache/tables/*.json`), exact bucket;
3. on a miss, when a benchmark callable is given, autotuning is on and no CUDA graph is being
   captured: benchmark the pruned candidates once, store the winner as a learned entry;
4. the nearest bucket of the same GPU, kernel and dtype among learned and shipped entries;
5. the kernel's default.
Stored configs that are not among the kernel's current candidates are passed over. Under
TRITON_INTERPRET=1, or off CUDA, the answer is always the default. Answers are memoised per
exact shape, so after the first call a lookup is one dict access.
"""

from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from filelock import Timeout

from . import keys
from .configs import Config, config_dict
from .keys import Bucket, bucket_distance, dtype_name, format_bucket, shape_bucket
from .prune import Footprint, device_limits, prune_candidates
from .store import (LOCK_TIMEOUT_S, CacheFile, Entry, EntryKey, OnceWarner, cache_files, merge_into_file,
                    read_cache_file)

TABLES_DIR = Path(__file__).parent / "tables"
MAX_TIMED = 3
"""Configs benchmarked per kernel, dtype and shape bucket: the default and the two the kernel's
cost model ranks best among those that fit (each is compiled once first: seconds)."""
TUNE_BUDGET_S = 4.0
"""No config is started once one kernel's tuning of one shape has taken this long (the default
and one more are always timed): the first call of a new shape spends at most about this long
per kernel, plus the config that was running."""
MIN_GAIN = 0.03
"""A config replaces the default only if it is at least this much faster: closer timings are
within the noise of a busy GPU, and a noisy winner would be stored for good."""


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "false", "off", "no")


def interpreting() -> bool:
    """TRITON_INTERPRET is on: kernels run in Triton's interpreter, timings mean nothing."""
    return _env_flag("TRITON_INTERPRET", False)


def autotune_enabled() -> bool:
    """ATOMCONV_AUTOTUNE=0 turns off benchmarking and learned entries (reproducible runs)."""
    return _env_flag("ATOMCONV_AUTOTUNE", True)


def cache_root() -> Path:
    """ATOMCONV_CACHE_DIR, else $XDG_CACHE_HOME/atomconv, else ~/.cache/atomconv."""
    if os.environ.get("ATOMCONV_CACHE_DIR"):
        return Path(os.environ["ATOMCONV_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "atomconv"


@functools.lru_cache(maxsize=None)
def triton_version() -> str:
    import triton

    return triton.__version__


class AutotuneCache:
    """Shipped tables from `tables_dir`, learned entries under `cache_dir / "autotune"` (one
    file per GPU and Triton version), both read once per process, plus memoised answers."""

    def __init__(self, cache_dir: Path | None = None, tables_dir: Path | None = None):
        self.learned_dir = (cache_root() if cache_dir is None else Path(cache_dir)) / "autotune"
        self.tables_dir = TABLES_DIR if tables_dir is None else Path(tables_dir)
        self.benchmarks_run = 0
        self._warn = OnceWarner()
        self._memo: dict[tuple, object] = {}
        self._tables: dict[str, dict[EntryKey, Entry]] | None = None
        self._learned: dict[str, dict[EntryKey, Entry]] = {}
        self._unpersisted: set[Path] = set()  # learned files this process gave up writing

    def learned_path(self, gpu: str) -> Path:
        return self.learned_dir / f"{gpu}.triton-{triton_version()}.json"

    def get_config(self, kernel: str, *, device: torch.device, dtype: torch.dtype, shape: Mapping[str, int],
                   candidates: Sequence[Config], default: Config,
                   benchmark: Callable[[Config], float] | None = None,
                   footprint: Callable[[Config], Footprint] | None = None) -> Config:
        """The config to launch `kernel` with on `device` for `dtype` and a problem of `shape`
        ({dimension: positive int}, e.g. `keys.layer_shape(geo)`). `candidates` are the
        kernel's configs for this shape, `default` its fallback (dataclasses or mappings of ints).
        `benchmark(config)` runs the kernel on the real problem and returns milliseconds (it may
        raise for a config that does not compile or launch: that config is skipped);
        `footprint(config)` estimates its cost for pruning (without it every candidate is timed).
        Never raises for anything found on disk."""
        if interpreting():
            return default
        memo_key = (kernel, device, dtype, tuple(shape.items()))
        if memo_key in self._memo:
            return self._memo[memo_key]
        gpu = keys.gpu_name(device)
        if gpu is None:
            return default
        # Inside a CUDA-graph capture or a torch.compile trace a benchmark would be captured or
        # traced: answer from what is stored, and tune at the first plain call.
        capturing = (device.type == "cuda" and torch.cuda.is_current_stream_capturing()) or torch.compiler.is_compiling()
        can_benchmark = benchmark is not None and autotune_enabled() and not capturing
        key = (kernel, dtype_name(dtype), shape_bucket(shape))
        config = self._stored(gpu, key, candidates, exact=True)
        if config is None and can_benchmark:
            config = self._benchmark(gpu, key, shape, default, candidates, benchmark, footprint, device)
        if config is None:
            config = self._stored(gpu, key, candidates, exact=False)
        if config is None:
            config = default
        if not capturing:  # inside a capture the answer is a fallback: tune at the next call
            self._memo[memo_key] = config
        return config

    def _stored(self, gpu: str, key: EntryKey, candidates: Sequence[Config], exact: bool) -> Config | None:
        """The candidate a stored entry names for `key` (exact) or for the nearest bucket."""
        sources = [self.table_entries(gpu)]
        if autotune_enabled():
            sources.insert(0, self.learned_entries(gpu))
        by_dict = {_frozen(config_dict(c)): c for c in candidates}
        if exact:
            for entries in sources:
                if key in entries and _frozen(entries[key].config) in by_dict:
                    return by_dict[_frozen(entries[key].config)]
            return None
        kernel, dtype, bucket = key
        ranked = sorted(
            (_nearness(entry.bucket, bucket, rank), _frozen(entry.config))
            for rank, entries in enumerate(sources) for entry in entries.values()
            if entry.kernel == kernel and entry.dtype == dtype and _frozen(entry.config) in by_dict
        )
        if not ranked or math.isinf(ranked[0][0][0]):
            return None
        return by_dict[ranked[0][1]]

    def _benchmark(self, gpu: str, key: EntryKey, shape: Mapping[str, int], default: Config,
                   candidates: Sequence[Config], benchmark: Callable[[Config], float],
                   footprint: Callable[[Config], Footprint] | None, device: torch.device) -> Config | None:
        """Time the default and the best-ranked candidates that survive pruning (at most
        MAX_TIMED configs, started within TUNE_BUDGET_S), learn and return the fastest; None when
        none ran. A config must beat the default by MIN_GAIN to replace it. The winner is kept
        for this process only when a candidate failed for a transient reason (out of memory):
        a rerun may find another."""
        timed = [default, *candidates]
        if footprint is not None:
            timed = prune_candidates(timed, footprint, device_limits(device), keep=MAX_TIMED)
        unique: dict[tuple, Config] = {}
        for config in timed:
            unique.setdefault(_frozen(config_dict(config)), config)
        times, errors, transient = {}, [], False
        start = time.monotonic()
        for frozen, config in list(unique.items())[:MAX_TIMED]:
            if len(times) >= 2 and time.monotonic() - start > TUNE_BUDGET_S:
                break
            try:
                times[frozen] = float(benchmark(config))
            except torch.OutOfMemoryError as error:  # transient: another process may hold the memory now
                errors.append(error)
                transient = True
            except Exception as error:  # noqa: BLE001 - like triton.autotune: a config that fails scores infinity
                errors.append(error)
        self.benchmarks_run += 1
        finite = {c: ms for c, ms in times.items() if math.isfinite(ms)}
        if not finite:
            kernel, dtype, bucket = key
            self._warn(f"{kernel} {dtype} {format_bucket(bucket)} on {gpu}",
                       f"no candidate config ran ({errors[0]!r} first), using the fallback"
                       if errors else "no candidate fits the device, using the fallback")
            return None
        winner = min(finite, key=finite.get)
        default_ms = finite.get(_frozen(config_dict(default)))
        if default_ms is not None and finite[winner] > (1 - MIN_GAIN) * default_ms:
            winner = _frozen(config_dict(default))  # within the timing noise of the default
        entry = Entry(*key, config=config_dict(unique[winner]), shape=dict(shape), ms=finite[winner],
                      default_ms=default_ms)
        self.learned_entries(gpu)[key] = entry
        if not transient:
            self._persist(gpu, entry)
        return unique[winner]

    def _persist(self, gpu: str, entry: Entry) -> None:
        """Merge the entry into this GPU's learned file; when that fails once (the file cannot be
        written, or another process sits on its lock), say so and stop trying:
        later entries stay in memory, and no further lookup waits for the lock."""
        path = self.learned_path(gpu)
        if path in self._unpersisted:
            return
        try:
            merge_into_file(path, gpu, triton_version(), [entry], self._warn)
        except Timeout:
            reason = f"another process has held its lock for {LOCK_TIMEOUT_S:g} s without writing"
        except OSError as error:
            reason = f"cannot write ({error})"
        else:
            return
        self._unpersisted.add(path)
        self._warn(path, f"{reason}; learned configs are kept in memory for this process only")

    def learned_entries(self, gpu: str) -> dict[EntryKey, Entry]:
        """This GPU's learned entries for the running Triton version (read once)."""
        if gpu not in self._learned:
            path = self.learned_path(gpu)
            stored = read_cache_file(path, self._warn)
            if stored is not None and (stored.gpu, stored.triton) != (gpu, triton_version()):
                self._warn(path, f"skipped, holds entries for GPU {stored.gpu!r} and Triton {stored.triton}, "
                                 f"expected {gpu!r} and Triton {triton_version()}")
                stored = None
            self._learned[gpu] = {} if stored is None else stored.entries
        return self._learned[gpu]

    def table_entries(self, gpu: str) -> dict[EntryKey, Entry]:
        """This GPU's shipped entries. Tables are used whatever Triton version they were tuned
        with (a config stays valid, only its speed may change); where two tables of one GPU
        hold the same key, the one tuned with the running Triton wins, then the first by name."""
        if self._tables is None:
            self._tables = {}
            tables = [t for t in self.files(self.tables_dir) if t[1] is not None]
            tables.sort(key=lambda t: t[1].triton != triton_version())  # stable: name order otherwise
            for _, table in tables:
                entries = self._tables.setdefault(table.gpu, {})
                for entry_key, entry in table.entries.items():
                    entries.setdefault(entry_key, entry)
        return self._tables.get(gpu, {})

    def files(self, directory: Path) -> list[tuple[Path, CacheFile | None]]:
        """Every *.json file of a directory with its content (None when unusable, warned once)."""
        return [(path, read_cache_file(path, self._warn)) for path in cache_files(directory, self._warn)]


def _frozen(config: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(config.items()))


def _nearness(found: Bucket, wanted: Bucket, source_rank: int) -> tuple[float, int, Bucket]:
    """Sort key of a stored bucket: distance first, then learned before shipped, then the bucket."""
    return bucket_distance(found, wanted), source_rank, found


_default_cache: AutotuneCache | None = None


def default_cache() -> AutotuneCache:
    """The process-wide cache every launcher uses (ATOMCONV_CACHE_DIR is read when it is first made)."""
    global _default_cache
    if _default_cache is None:
        _default_cache = AutotuneCache()
    return _default_cache


def get_config(kernel: str, *, device: torch.device, dtype: torch.dtype, shape: Mapping[str, int],
               candidates: Sequence[Config], default: Config, benchmark: Callable[[Config], float] | None = None,
               footprint: Callable[[Config], Footprint] | None = None) -> Config:
    """`AutotuneCache.get_config` on the process-wide cache: the one call a launcher makes."""
    return default_cache().get_config(kernel, device=device, dtype=dtype, shape=shape, candidates=candidates,
                                      default=default, benchmark=benchmark, footprint=footprint)
