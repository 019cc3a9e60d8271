"""python -m autotune_cache {show,tune,export,clear}: inspect, warm, ship and clear the tuned configs.

    show                                  what is shipped and learned, as a table
    tune --shape N,C_in,C_out,H,W,K,M[,groups] [--shape ...] [--dtype float16 ...]
    tune --model MODULE:FACTORY --input-size N,C,H,W [--dtype ...]
                                          benchmark every registered kernel (forward, backward)
                                          on each layer shape, on this GPU; learned entries are
                                          written to the cache dir
    export [--gpu NAME] --out FILE        learned entries of a GPU -> a table to ship in
                                          autotune_cache/tables/
    clear [--gpu NAME]                    delete learned entries (all GPUs unless --gpu)

A problem (a bad argument, a damaged or unreadable file, a path that cannot be written) is one
line naming the path and what is wrong, and the exit status is non-zero: 2 for bad arguments,
1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Iterator

import torch
from filelock import FileLock, Timeout
from torch import nn

from . import keys
from .cache import AutotuneCache, autotune_enabled, default_cache, triton_version
from .keys import format_bucket, normalise_gpu_name
from .store import CacheFile, CacheWarning, lock_for, write_atomically

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheWarning)
        try:
            status = args.command(args)
        except ValueError as error:  # bad --shape, --model, --gpu...: a message, not a traceback
            print(f"error: {error}", file=sys.stderr)
            status = 2
    # The cache's warnings (each names its file) become error lines; other warnings pass on.
    for warning in caught:
        if issubclass(warning.category, CacheWarning):
            print(f"error: {warning.message}", file=sys.stderr)
            status = status or 1
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m autotune_cache", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="{show,tune,export,clear}")
    commands.add_parser("show", help="what is shipped and learned").set_defaults(command=show)
    tune_parser = commands.add_parser("tune", help="warm the cache for layer shapes or a model, on this GPU")
    tune_parser.add_argument("--shape", action="append", default=[], help="N,C_in,C_out,H,W,K,M[,groups] (repeatable)")
    tune_parser.add_argument("--model", help="MODULE:FACTORY, a callable returning the model")
    tune_parser.add_argument("--input-size", help="N,C,H,W of the model's input (with --model)")
    tune_parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default float16")
    tune_parser.set_defaults(command=tune)
    export_parser = commands.add_parser("export", help="learned entries -> a table file fit to ship")
    export_parser.add_argument("--gpu", help="GPU name (default: this machine's GPU)")
    export_parser.add_argument("--out", type=Path, required=True, help="table file to write")
    export_parser.set_defaults(command=export)
    clear_parser = commands.add_parser("clear", help="delete learned entries")
    clear_parser.add_argument("--gpu", help="only this GPU's entries")
    clear_parser.set_defaults(command=clear)
    return parser


def _this_gpu() -> str | None:
    return keys.gpu_name(torch.device("cuda")) if torch.cuda.is_available() else None


def show(args: argparse.Namespace) -> int:
    cache = AutotuneCache()
    print(f"this machine: {_this_gpu() or 'no CUDA GPU'}, Triton {triton_version()}, "
          f"autotuning {'on' if autotune_enabled() else 'off (ATOMCONV_AUTOTUNE=0)'}")
    print(f"shipped tables: {cache.tables_dir}")
    print(f"learned entries: {cache.learned_dir}")
    rows = []
    for source, directory in (("table", cache.tables_dir), ("learned", cache.learned_dir)):
        for path, content in cache.files(directory):
            if content is None:
                continue
            for entry in content.entries.values():
                speedup = f"{entry.default_ms / entry.ms:.2f}x" if entry.ms and entry.default_ms else "-"
                rows.append([f"{source}:{path.name}", content.gpu, content.triton, entry.kernel, entry.dtype,
                             format_bucket(entry.bucket), " ".join(f"{k}={v}" for k, v in entry.config.items()),
                             "-" if entry.ms is None else f"{entry.ms:.4f}", speedup])
    if not rows:
        print("(no shipped tables and no learned entries)")
        return 0
    header = ["source", "gpu", "triton", "kernel", "dtype", "bucket", "config", "ms", "vs default"]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def tune(args: argparse.Namespace) -> int:
    from .layers import layer_inputs, model_layer_shapes, parse_input_size, parse_shape
    from .tune import TUNERS

    layers = [parse_shape(text) for text in args.shape]
    if args.model and not args.input_size:
        raise ValueError("--model needs --input-size N,C,H,W")
    input_size = parse_input_size(args.input_size) if args.model else None
    if not layers and not args.model:
        raise ValueError("give layer shapes with --shape, or a model with --model and --input-size")
    # Both checks come before --model's module is imported: none of its code runs for nothing.
    if not torch.cuda.is_available():
        print("error: no CUDA GPU here: tune benchmarks the kernels on a GPU, nothing was tuned", file=sys.stderr)
        return 1
    if not autotune_enabled():
        print("error: ATOMCONV_AUTOTUNE=0 turns benchmarking off: unset it to tune", file=sys.stderr)
        return 1
    if args.model:
        layers += [shape for _, shape in model_layer_shapes(_load_model(args.model), input_size)]
    import kernels  # noqa: F401 - its modules register their tuners

    if not TUNERS:
        print("error: no kernel is registered for tuning (kernels must call autotune_cache.register_tuner)",
              file=sys.stderr)
        return 1
    unique = list(dict.fromkeys(layers))
    jobs = [(layer, dtype, name, run) for layer in unique for dtype in (args.dtype or ["float16"])
            for name, run in TUNERS.items()]
    cache, device = default_cache(), torch.device("cuda")
    before = cache.benchmarks_run
    for done, (layer, dtype, name, run) in enumerate(jobs, start=1):
        print(f"\r[{done}/{len(jobs)}] {name} {dtype} {layer.describe()}".ljust(120), end="", file=sys.stderr, flush=True)
        run(**layer_inputs(layer, DTYPES[dtype], device))
        torch.cuda.synchronize()
    print(file=sys.stderr)
    print(f"{cache.benchmarks_run - before} shapes benchmarked ({len(jobs)} kernel runs); "
          f"learned entries in {cache.learned_path(_this_gpu())}")
    return 0


def _load_model(spec: str) -> nn.Module:
    """The model that MODULE:FACTORY's factory returns (the module is imported, the factory called)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model must be MODULE:FACTORY, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--model {spec!r}: {error}") from error
    if not callable(factory):
        raise ValueError(f"--model {spec!r} is not callable")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def export(args: argparse.Namespace) -> int:
    gpu = normalise_gpu_name(args.gpu) if args.gpu else _this_gpu()
    if gpu is None:
        raise ValueError("no CUDA GPU here: name the GPU with --gpu")
    entries = AutotuneCache().learned_entries(gpu)
    if not entries:
        print(f"error: no learned entries for GPU {gpu!r} with Triton {triton_version()}", file=sys.stderr)
        return 1
    file_above = next((p for p in args.out.parents if p.exists() and not p.is_dir()), None)
    problem = ("is a directory: give a file path" if args.out.is_dir() else
               None if file_above is None else f"{file_above} is a file, not a directory")
    if problem is None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(args.out, CacheFile(gpu, triton_version(), dict(entries)))
        except OSError as error:
            problem = f"cannot write it ({error.strerror or error})"
    if problem is not None:
        print(f"error: --out {args.out}: {problem}", file=sys.stderr)
        return 1
    print(f"wrote {len(entries)} entries for {gpu} (Triton {triton_version()}) to {args.out}")
    return 0


def clear(args: argparse.Namespace) -> int:
    """Delete the learned files (whatever each has become: file, link, FIFO, directory) with
    their lock files and the temporary files of crashed writers, each file under its lock."""
    directory = AutotuneCache().learned_dir
    prefix = f"{normalise_gpu_name(args.gpu)}.triton-" if args.gpu else ""
    try:
        names = [entry.name for entry in os.scandir(directory)]
    except (FileNotFoundError, NotADirectoryError):
        names = []
    except OSError as error:
        print(f"error: {directory}: cannot list it ({error.strerror or error})", file=sys.stderr)
        return 1
    learned = sorted({_learned_file_name(name) for name in names} - {None})
    removed, failed = 0, False
    for name in (n for n in learned if n.startswith(prefix)):
        path, lock_name = directory / name, f"{name}.lock"
        family = [n for n in names if _learned_file_name(n) == name and n != lock_name]
        try:
            with _held_unless_broken(lock_for(path)):
                for member in [*family, lock_name]:  # the lock file last, while held: a waiter then tries afresh
                    _remove(directory / member)
            removed += name in names
        except Timeout:
            print(f"error: {path}: another process is writing it, not removed: try again", file=sys.stderr)
            failed = True
        except OSError as error:
            print(f"error: {error.filename or path}: cannot remove it ({error.strerror or error})", file=sys.stderr)
            failed = True
    print(f"removed {removed} learned file(s) from {directory}")
    return 1 if failed else 0


def _learned_file_name(name: str) -> str | None:
    """'X.json' for a learned file X.json, its lock file 'X.json.lock' and a crashed writer's
    temporary '.X.json.<random>.tmp'; None for other names."""
    if name.endswith(".json"):
        return name
    if name.endswith(".json.lock"):
        return name.removesuffix(".lock")
    if name.startswith(".") and name.endswith(".tmp") and ".json." in name:
        return name[1:name.rindex(".json.") + len(".json")]
    return None


@contextlib.contextmanager
def _held_unless_broken(lock: FileLock) -> Iterator[None]:
    """Holds `lock` (Timeout when another process keeps it); a lock file that cannot be opened
    at all (a directory, a link) is held by nobody, so the block then runs without it."""
    try:
        lock.acquire()
    except Timeout:
        raise
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _remove(path: Path) -> None:
    """Unlink a file, link, FIFO or socket; delete a real directory with its content."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
