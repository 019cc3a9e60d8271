"""autotune_cache: lookup order, learning, pruning, file robustness, concurrency and the CLI.

No GPU is needed: `keys.gpu_name` is replaced to pretend one is there, and benchmarks are
callables returning made-up milliseconds (or raising where none may run).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock, Timeout
from torch import nn

import autotune_cache
from atomconv import AtomConv2d
from atomconv.reference import atom_conv2d_reference
from atomconv.validation import validate_atom_conv2d
from autotune_cache import AutotuneCache, DeviceLimits, Footprint, layer_shape, prune_candidates
from autotune_cache import __main__ as cli
from autotune_cache import cache as cache_module
from autotune_cache import keys, store
from autotune_cache.layers import model_layer_shapes, parse_shape
from autotune_cache.store import SCHEMA, CacheFile, Entry, OnceWarner, merge_into_file, read_cache_file
from kernels import launch
from kernels.configs import TileConfig, default_config, fit_tile_config, tile_candidates
from kernels.forward import forward_footprint
from perf import static_report

GPU = "nvidia-test-gpu"
KERNEL = "atom_conv2d_fwd"
DEFAULT = default_config()
CANDIDATES = tile_candidates()
# Three distinct candidates to store in tables and learned files.
LEARNED, TABLED, NEAR = [c for c in CANDIDATES if c != DEFAULT][:3]
SHAPE = {"c_in_g": 64, "c_out_g": 64, "pixels": 100352, "atoms": 6, "taps": 9}
CPU = torch.device("cpu")


def never(config):
    raise AssertionError(f"benchmark called with {config}")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine with a GPU named GPU, not interpreting, autotuning on, every candidate timed
    (tests/test_tuning.py checks the cap on how many are)."""
    monkeypatch.setattr(keys, "gpu_name", lambda device: GPU)
    monkeypatch.setattr(cache_module, "MAX_TIMED", len(CANDIDATES) + 1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("ATOMCONV_AUTOTUNE", raising=False)


def entry(config, shape=SHAPE, dtype="float16", kernel=KERNEL, ms=None, default_ms=None) -> Entry:
    return Entry(kernel, dtype, keys.shape_bucket(shape), config.as_dict(), dict(shape), ms, default_ms)


def write_file(path: Path, *entries: Entry, gpu=GPU, triton=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    content = CacheFile(gpu, triton or cache_module.triton_version(), {e.key: e for e in entries})
    path.write_text(json.dumps(content.to_json()))
    return path


def lookup(cache, shape=SHAPE, dtype=torch.float16, benchmark=never, candidates=CANDIDATES, **kwargs):
    return cache.get_config(KERNEL, device=CPU, dtype=dtype, shape=shape, candidates=candidates, default=DEFAULT,
                            benchmark=benchmark, **kwargs)


def scaled(shape, **factors):
    return {k: v * factors.get(k, 1) for k, v in shape.items()}


# --- keys ---------------------------------------------------------------------------------

def test_gpu_names_are_normalised():
    assert keys.normalise_gpu_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert keys.normalise_gpu_name("  NVIDIA A100-SXM4-40GB ") == "nvidia-a100-sxm4-40gb"
    with pytest.raises(ValueError, match="GPU name"):
        keys.normalise_gpu_name(" -- ")


def test_buckets_round_up_to_powers_of_two_and_measure_doublings():
    bucket = keys.shape_bucket({"pixels": 100352, "atoms": 6, "taps": 9, "c_in_g": 64, "c_out_g": 1})
    assert bucket == (("atoms", 8), ("c_in_g", 64), ("c_out_g", 1), ("pixels", 131072), ("taps", 16))
    assert keys.bucket_distance(bucket, keys.shape_bucket(scaled(dict(bucket), pixels=4, atoms=2))) == 3
    assert keys.bucket_distance((("a", 2),), (("b", 2),)) == float("inf")
    with pytest.raises(ValueError, match="positive ints"):
        keys.shape_bucket({"pixels": 0})


def test_layer_shape_reads_the_geometry():
    x, beta, bases, weight = torch.empty(2, 8, 9, 7), torch.empty(2, 12, 5, 4), torch.empty(4, 3, 3), torch.empty(6, 4, 3)
    geo = validate_atom_conv2d(x, beta, bases, weight, None, 2, 1, 1, 2)
    assert layer_shape(geo) == {"c_in_g": 4, "c_out_g": 3, "pixels": 2 * 5 * 4, "atoms": 3, "taps": 9}


# --- lookup order ---------------------------------------------------------------------------

def test_lookup_order_learned_then_table_then_nearest_then_default(tmp_path, fake_gpu):
    tables = tmp_path / "tables"
    write_file(tables / "gpu.json", entry(TABLED), entry(NEAR, scaled(SHAPE, pixels=8)))
    cache_dir = tmp_path / "cache"
    with_learned = AutotuneCache(cache_dir, tables)
    write_file(with_learned.learned_path(GPU), entry(LEARNED))

    assert lookup(with_learned) == LEARNED
    assert lookup(AutotuneCache(tmp_path / "empty", tables)) == TABLED
    # Unseen bucket, no benchmark: the nearest stored bucket (pixels x16 is 1 doubling from
    # the NEAR entry's x8, 4 from the exact ones).
    assert lookup(AutotuneCache(cache_dir, tables), scaled(SHAPE, pixels=16), benchmark=None) == NEAR
    # Nothing stored for this dtype, or for another GPU: the default.
    assert lookup(AutotuneCache(cache_dir, tables), dtype=torch.float32, benchmark=None) == DEFAULT
    write_file(tables / "gpu.json", entry(TABLED), gpu="nvidia-other-gpu")
    assert lookup(AutotuneCache(tmp_path / "empty", tables), benchmark=None) == DEFAULT


def test_nearest_prefers_learned_on_ties_and_skips_configs_that_are_no_longer_candidates(tmp_path, fake_gpu):
    tables = tmp_path / "tables"
    write_file(tables / "gpu.json", entry(TABLED, scaled(SHAPE, pixels=4)))
    cache = AutotuneCache(tmp_path / "cache", tables)
    write_file(cache.learned_path(GPU), entry(LEARNED, scaled(SHAPE, pixels=4)), entry(NEAR, scaled(SHAPE, pixels=8)))
    # Both pixels x4 entries are 2 doublings away from the wanted bucket: learned wins the tie.
    assert lookup(cache, benchmark=None) == LEARNED
    # Once LEARNED is no longer a candidate, its entry is passed over.
    without = tuple(c for c in CANDIDATES if c != LEARNED)
    assert lookup(AutotuneCache(tmp_path / "cache", tables), benchmark=None, candidates=without) == TABLED


def test_plain_dict_configs_work_too(tmp_path, fake_gpu):
    candidates = [{"block": 32}, {"block": 64}, {"block": 128}]
    cache = AutotuneCache(tmp_path / "cache", tmp_path / "tables")
    chosen = cache.get_config("k", device=CPU, dtype=torch.float32, shape={"n": 5}, candidates=candidates,
                              default=candidates[0], benchmark=lambda c: 1.0 / c["block"])
    assert chosen == {"block": 128}
    again = AutotuneCache(tmp_path / "cache", tmp_path / "tables")
    assert again.get_config("k", device=CPU, dtype=torch.float32, shape={"n": 7}, candidates=candidates,
                            default=candidates[0], benchmark=never) == {"block": 128}


# --- learning -------------------------------------------------------------------------------

def test_a_miss_benchmarks_once_and_later_processes_reuse_the_winner(tmp_path, fake_gpu):
    timings = {c: 1.0 + i for i, c in enumerate(CANDIDATES)}
    timings[NEAR] = 0.25
    failing = CANDIDATES[-1]
    calls = []

    def benchmark(config):
        calls.append(config)
        if config == failing:
            raise RuntimeError("out of resources")
        return timings[config]

    cache = AutotuneCache(tmp_path / "cache", tmp_path / "tables")
    assert lookup(cache, benchmark=benchmark) == NEAR
    assert sorted(map(str, calls)) == sorted(map(str, CANDIDATES)) and calls[0] == DEFAULT
    assert lookup(cache, benchmark=never) == NEAR  # memoised
    stored = json.loads(cache.learned_path(GPU).read_text())
    assert stored["schema"] == SCHEMA and stored["gpu"] == GPU
    assert stored["triton"] == cache_module.triton_version()
    [record] = stored["entries"]
    assert record["config"] == NEAR.as_dict() and record["ms"] == 0.25 and record["default_ms"] == timings[DEFAULT]
    assert record["shape"] == SHAPE
    # A new process (a new cache on the same dir) reuses it, for any shape of the bucket.
    assert lookup(AutotuneCache(tmp_path / "cache", tmp_path / "tables"), SHAPE | {"pixels": 70000}) == NEAR


def test_when_no_candidate_runs_the_fallback_is_used_with_one_warning(tmp_path, fake_gpu):
    def broken(config):
        raise RuntimeError("no kernel image")

    cache = AutotuneCache(tmp_path / "cache", tmp_path / "tables")
    with pytest.warns(RuntimeWarning, match="no kernel image") as caught:
        assert lookup(cache, benchmark=broken) == DEFAULT
        assert lookup(AutotuneCache(tmp_path / "cache", tmp_path / "tables"), benchmark=None) == DEFAULT
    assert len(caught) == 1 and not cache.learned_path(GPU).exists()


def test_lookups_after_the_first_are_a_dict_access(tmp_path, fake_gpu):
    cache = AutotuneCache(tmp_path / "cache", tmp_path / "tables")
    lookup(cache, benchmark=lambda c: 1.0)
    start = time.perf_counter()
    for _ in range(1000):
        lookup(cache, benchmark=never)
    assert time.perf_counter() - start < 0.5  # ~µs each; the bound allows a loaded CI machine


def test_prune_by_footprint_before_benchmarking(tmp_path, fake_gpu, monkeypatch):
    # 8 KiB of shared memory: room for the 128-pixel tiles' dot operands, not for the 256-pixel ones.
    limit = 8 * 1024
    monkeypatch.setattr(cache_module, "device_limits", lambda device: DeviceLimits(shared_bytes=limit))
    x, beta, bases, weight = (torch.empty(32, 64, 56, 56), torch.empty(32, 36, 56, 56), torch.empty(6, 3, 3),
                              torch.empty(64, 64, 6))
    geo = validate_atom_conv2d(x, beta, bases, weight, None, 1, 1, 1, 1)
    assert layer_shape(geo) == SHAPE
    timed = []
    cache = AutotuneCache(tmp_path / "cache", tmp_path / "tables")
    lookup(cache, benchmark=lambda c: timed.append(c) or 1.0,
           footprint=lambda c: forward_footprint(fit_tile_config(c, geo), geo, torch.float16, "sm_90"))

    def operand_bytes(config):  # the dot's operands α [BLOCK_O, K] and Z [K, BLOCK_P] in float16
        fitted = fit_tile_config(config, geo)
        return (fitted.BLOCK_O + fitted.BLOCK_P) * fitted.ATOMS_PER_DOT * fitted.BLOCK_C * 2

    fitting = [c for c in CANDIDATES if operand_bytes(c) <= limit]
    assert DEFAULT in fitting and len(fitting) < len(CANDIDATES)  # the limit excludes someone
    assert timed and set(timed) <= set(fitting) and len(timed) < len(CANDIDATES)


# --- pruning --------------------------------------------------------------------------------

# From `python -m perf.static_report` (its `record`, Triton 3.9.0) for the report's problem at K=3
# (`problem_at(3)`: N=32, C_in=C_out=64, 56x56, M=6, L=6, "same" padding), num_stages=1 --
# (arch, dtype, num_warps, block_c, block_o, shared_bytes, registers, spill_bytes).
STATIC_REPORT = [
    ("sm_80", torch.float16, 4, 8, 64, 8192, 255, 976),
    ("sm_80", torch.float16, 4, 16, 64, 8192, 32, 6112),
    ("sm_80", torch.float16, 8, 8, 64, 16384, 255, 960),
    ("sm_90", torch.float16, 4, 8, 64, 8192, 230, 0),
    ("sm_90", torch.float16, 4, 8, 32, 2048, 255, 1616),
    ("sm_90", torch.float16, 8, 8, 64, 16384, 255, 224),
    ("sm_80", torch.bfloat16, 4, 8, 32, 8192, 255, 648),
    ("sm_90", torch.bfloat16, 4, 8, 64, 8192, 255, 0),
    ("sm_80", torch.float32, 4, 8, 32, 10240, 208, 0),
    ("sm_80", torch.float32, 4, 16, 64, 53248, 255, 264),
    ("sm_80", torch.float32, 8, 8, 64, 20480, 254, 0),
    ("sm_90", torch.float32, 4, 8, 64, 12288, 255, 8),
]


@pytest.mark.parametrize("record", STATIC_REPORT,
                         ids=lambda r: f"{r[0]}-{str(r[1]).removeprefix('torch.')}-w{r[2]}c{r[3]}o{r[4]}")
def test_forward_footprint_matches_the_static_report(record):
    """The forward's footprint against what the variant compiles to.

    Registers: the footprint is a lower bound of the compiled registers plus spilled words.
    Shared memory: the footprint counts the stage-3 dot's operands, α [BLOCK_O, K] and Z
    [K, BLOCK_P] in the input dtype. That is exact only for float32 with two atoms per dot
    (BLOCK_C=8; float32 dots use no tensor cores). Elsewhere it is no exact figure: a lower bound
    (16-bit dtypes: 4/3 to 1.6 times it; float32 with BLOCK_C=16: 4.3 times), except for 16-bit
    dtypes on sm_90 with BLOCK_O < 64 (too few rows for a wgmma: the dot compiles to mma.sync),
    which take less than the footprint says (2048 bytes for 5120): there it over-estimates.
    """
    arch, dtype, num_warps, block_c, block_o, shared, registers, spill = record
    geo = static_report.problem_tensors(static_report.problem_at(3), dtype)[-1]
    fitted = fit_tile_config(TileConfig(num_warps, block_c, block_o), geo)
    footprint = forward_footprint(fitted, geo, dtype, arch)
    if dtype == torch.float32 and fitted.ATOMS_PER_DOT == 2:
        assert footprint.shared_bytes == shared
    elif arch == "sm_90" and dtype.itemsize == 2 and fitted.BLOCK_O < 64:
        assert shared < footprint.shared_bytes  # the one over-estimate (see above)
    else:
        assert footprint.shared_bytes <= shared
    assert footprint.registers <= registers + spill / 4  # a lower bound of what the live tiles need
    # 64 channels fill the channel tiles; the pixel tiles, over the batch's pixels, pad its end
    pixels = geo.batch * geo.out_size[0] * geo.out_size[1]
    assert footprint.threads == 32 * num_warps
    assert footprint.fill == pytest.approx(pixels / (fitted.BLOCK_P * -(-pixels // fitted.BLOCK_P)))


def test_prune_drops_what_does_not_fit_spills_duplicates_or_is_mostly_padding():
    limits = DeviceLimits(shared_bytes=1000, registers_per_thread=100, registers_per_block=100 * 64)
    costs = {
        "ok": Footprint("a", 64, 1000, 100, 1.0),
        "same_launch": Footprint("a", 64, 10, 10, 1.0),
        "too_much_shared": Footprint("b", 64, 1001, 10, 1.0),
        "too_many_registers": Footprint("c", 32, 10, 101, 1.0),
        "too_many_per_block": Footprint("d", 128, 10, 60, 1.0),
        "spills": Footprint("e", 64, 10, 10, 1.0),
        "half_padding": Footprint("f", 64, 10, 10, 0.5),
        "mostly_padding": Footprint("g", 64, 10, 10, 0.4),
    }
    candidates = [{"name": i} for i in range(len(costs))]
    names = list(costs)
    kept = prune_candidates(candidates, lambda c: costs[names[c["name"]]], limits,
                            known_spilling=[{"name": names.index("spills")}])
    assert [names[c["name"]] for c in kept] == ["ok", "half_padding"]
    # When everything is mostly padding, the best-filled ones stay.
    padded = [{"name": 0}, {"name": 1}]
    fills = [Footprint("a", 32, 1, 1, 0.1), Footprint("b", 32, 1, 1, 0.02)]
    assert prune_candidates(padded, lambda c: fills[c["name"]], limits) == [{"name": 0}]


def test_spilling_configs_come_from_static_report_records():
    records = [{"kernel": KERNEL, "arch": arch, "dtype": str(dtype).removeprefix("torch."),
                "config": TileConfig(w, c, o).as_dict(), "spill_bytes": spill}
               for arch, dtype, w, c, o, _, _, spill in STATIC_REPORT]
    for record in records:
        record.update(triton="3.9.0", kernel_size=3)
    assert autotune_cache.spilling_configs(records, KERNEL, torch.float16, "sm_90", "3.9.0", 3) == [
        TileConfig(4, 8, 32).as_dict(), TileConfig(8, 8, 64).as_dict()]
    assert autotune_cache.spilling_configs(records, KERNEL, torch.float32, "sm_80", "3.9.0", 3) == [
        TileConfig(4, 16, 64).as_dict()]
    assert autotune_cache.spilling_configs(records, KERNEL, torch.bfloat16, "sm_90", "3.9.0", 3) == []
    assert autotune_cache.spilling_configs(records, "other", torch.float32, "sm_90", "3.9.0", 3) == []
    # Another Triton allocates registers differently: its records say nothing about this one.
    assert autotune_cache.spilling_configs(records, KERNEL, torch.float16, "sm_90", "3.6.0", 3) == []
    # The records of the nearest kernel size decide: K=7 spills where K=3 does not.
    at_7 = [dict(r, kernel_size=7, spill_bytes=64) for r in records if r["arch"] == "sm_90"]
    assert autotune_cache.spilling_configs(records + at_7, KERNEL, torch.bfloat16, "sm_90", "3.9.0", 5) == []
    assert autotune_cache.spilling_configs(records + at_7, KERNEL, torch.bfloat16, "sm_90", "3.9.0", 7) == [
        TileConfig(4, 8, 64).as_dict()]


def test_real_forward_candidates_on_a_tiny_problem_prune_to_a_few_launches():
    candidates = tile_candidates()
    assert candidates[0] == default_config()

    def kept_on(out_channels):
        x, beta, bases = torch.empty(1, 4, 5, 5), torch.empty(1, 12, 5, 5), torch.empty(4, 3, 3)
        geo = validate_atom_conv2d(x, beta, bases, torch.empty(out_channels, 4, 3), None, 1, 1, 1, 1)

        def footprint(config):
            return forward_footprint(fit_tile_config(config, geo), geo, torch.float16, "sm_80")

        kept = prune_candidates(candidates, footprint, DeviceLimits(shared_bytes=163 * 1024))
        launches = [footprint(c).launch for c in kept]
        assert kept[0] == candidates[0] and len(set(launches)) == len(kept) < len(set(candidates))
        return kept, geo

    # 4 input and 6 output channels: every chunk fits to 8 channels and every channel tile to 16,
    # so the 4-warp candidates all make the default's launch; only the 8-warp one differs. (Its
    # 256-pixel tiles, 90 % padding on 25 pixels, fill exactly half what 128-pixel tiles do:
    # MIN_RELATIVE_FILL keeps it.)
    kept, _ = kept_on(6)
    assert kept == [candidates[0], TileConfig(num_warps=8, block_c=8, block_o=64)]
    # 65 output channels: the channel tiles differ (block_c=16 still makes the default's launch),
    # and 256-pixel tiles of 64 channels (3/8 of the fill of 128-pixel tiles of 32) are dropped.
    kept, geo = kept_on(65)
    assert kept == [candidates[0], TileConfig(num_warps=4, block_c=8, block_o=32),
                    TileConfig(num_warps=4, block_c=8, block_o=128)]
    assert all(fit_tile_config(c, geo).BLOCK_P <= 128 for c in kept)


# --- robustness -----------------------------------------------------------------------------

def _document(*records, padding: int = 0) -> str:
    """A learned file's text for the running Triton version with these raw entry records,
    followed by `padding` spaces (still valid JSON)."""
    document = {"schema": SCHEMA, "gpu": GPU, "triton": cache_module.triton_version(), "entries": list(records)}
    return json.dumps(document) + " " * padding


def _record(**fields) -> dict:
    return {"kernel": KERNEL, "dtype": "float16", "bucket": {"pixels": 4}, "config": TABLED.as_dict()} | fields


DAMAGED = {
    "truncated": lambda p: p.write_text('{"schema": 1, "gpu": "nvidia-test-gpu", "entr'),
    "wrong_schema": lambda p: p.write_text(json.dumps({"schema": 99, "gpu": GPU, "triton": "3.6.0", "entries": []})),
    "binary": lambda p: p.write_bytes(bytes(range(256)) * 4),
    "not_an_object": lambda p: p.write_text("[1, 2, 3]"),
    "directory": lambda p: p.mkdir(),
    "bad_entries": lambda p: p.write_text(json.dumps({"schema": SCHEMA, "gpu": GPU, "triton": "3.6.0", "entries": [
        {"kernel": KERNEL, "dtype": "float16", "bucket": {"pixels": 3}, "config": TABLED.as_dict()},
        {"kernel": KERNEL, "dtype": "float16", "bucket": {"pixels": 4}, "config": {"num_warps": True}}, 7]})),
    # Python refuses to convert ints of over 4300 digits (a ValueError that is no JSONDecodeError).
    "huge_int": lambda p: p.write_text(_document().replace('"entries": []', '"entries": [' + "9" * 5000 + "]")),
    "huge_int_in_entry": lambda p: p.write_text(_document(_record(ms=0)).replace('"ms": 0', '"ms": ' + "9" * 5000)),
    "deep_nesting": lambda p: p.write_text("[" * 100_000 + "]" * 100_000),
    "nested_entry": lambda p: p.write_text(_document(_record(config={"num_warps": json.loads("[" * 400 + "]" * 400)}))),
    "not_finite_ms": lambda p: p.write_text(_document(_record(ms=float("nan")), _record(default_ms=float("inf")))),
    "over_the_size_cap": lambda p: p.write_text(_document(_record(), padding=store.MAX_FILE_BYTES)),
    "link_to_dev_zero": lambda p: p.symlink_to("/dev/zero"),
    "link_to_dev_urandom": lambda p: p.symlink_to("/dev/urandom"),
    "fifo": lambda p: os.mkfifo(p),
    "link_loop": lambda p: p.symlink_to(p),
}


class Hung(Exception):
    """A read that did not finish in time (no OSError or ValueError: nothing may catch it)."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise Hung in the block after `seconds` (a blocking open or an endless read is
    interrupted by the signal), so that a regression fails instead of hanging the suite."""
    def interrupt(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("damage", DAMAGED, ids=list(DAMAGED))
@pytest.mark.parametrize("place", ["table", "learned"])
def test_damaged_files_give_one_warning_and_no_exception(tmp_path, fake_gpu, damage, place):
    cache = AutotuneCache(tmp_path / "cache", tmp_path / "tables")
    path = cache.learned_path(GPU) if place == "learned" else tmp_path / "tables" / "gpu.json"
    path.parent.mkdir(parents=True)
    DAMAGED[damage](path)
    with pytest.warns(RuntimeWarning, match="atomconv autotune cache") as caught, deadline(10):
        assert lookup(cache, benchmark=None) == DEFAULT
        assert lookup(cache, scaled(SHAPE, atoms=2), benchmark=None) == DEFAULT
        cache.files(path.parent)  # what `show` reads: no second warning either
    assert len(caught) == 1 and str(path) in str(caught[0].message)


@pytest.mark.parametrize("damage", DAMAGED, ids=list(DAMAGED))
def test_a_damaged_learned_file_is_replaced_by_the_next_write(tmp_path, fake_gpu, damage):
    cache = AutotuneCache(tmp_path / "cache", tmp_path / "tables")
    path = cache.learned_path(GPU)
    path.parent.mkdir(parents=True)
    DAMAGED[damage](path)
    with pytest.warns(RuntimeWarning, match="atomconv autotune cache") as caught, deadline(10):
        assert lookup(cache, benchmark=lambda c: 0.5 if c == NEAR else 1.0) == NEAR
    assert len(caught) == 1 and str(path) in str(caught[0].message)
    if damage == "directory":  # no file can replace it: the entry stays in memory
        assert path.is_dir()
    else:
        [stored] = read_cache_file(path, OnceWarner()).entries.values()
        assert stored.config == NEAR.as_dict()


@pytest.mark.parametrize("damage", DAMAGED, ids=list(DAMAGED))
def test_clear_removes_damaged_learned_files_and_lock_files(tmp_path, monkeypatch, damage, capsys):
    monkeypatch.setenv("ATOMCONV_CACHE_DIR", str(tmp_path / "cache"))
    learned_dir = AutotuneCache().learned_dir
    learned_dir.mkdir(parents=True)
    DAMAGED[damage](learned_dir / f"{GPU}.triton-3.6.0.json")
    DAMAGED[damage](Path(store.lock_for(learned_dir / "nvidia-other.triton-3.6.0.json").lock_file))
    with deadline(10):
        assert cli.main(["clear"]) == 0
    assert "removed 1 learned file(s)" in capsys.readouterr().out
    assert not os.listdir(learned_dir)


def test_learned_entries_of_another_triton_version_are_ignored(tmp_path, fake_gpu):
    cache = AutotuneCache(tmp_path / "cache", tmp_path / "tables")
    write_file(cache.learned_path(GPU), entry(LEARNED), triton="0.0.1")
    with pytest.warns(RuntimeWarning, match="Triton 0.0.1"):
        assert lookup(cache, benchmark=None) == DEFAULT
    # Benchmarking replaces the stale file with one for the running version.
    with pytest.warns(RuntimeWarning, match="Triton 0.0.1"):
        assert lookup(AutotuneCache(tmp_path / "cache", tmp_path / "tables"),
                      benchmark=lambda c: 0.5 if c == NEAR else 1.0) == NEAR
    assert json.loads(cache.learned_path(GPU).read_text())["triton"] == cache_module.triton_version()


def test_an_unwritable_cache_dir_falls_back_to_memory(tmp_path, fake_gpu):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cache = AutotuneCache(blocker / "cache", tmp_path / "tables")  # cannot be created under a file
    with pytest.warns(RuntimeWarning, match="kept in memory") as caught:
        assert lookup(cache, benchmark=lambda c: 0.5 if c == NEAR else 1.0) == NEAR
        assert lookup(cache, scaled(SHAPE, pixels=2), benchmark=lambda c: 0.5 if c == TABLED else 1.0) == TABLED
    assert len(caught) == 1
    assert lookup(cache, scaled(SHAPE, pixels=2) | {"taps": 10}, benchmark=never) == TABLED  # same bucket, from memory


def test_the_interpreter_always_gets_the_default_and_never_benchmarks(tmp_path, fake_gpu, monkeypatch):
    cache = AutotuneCache(tmp_path / "cache", tmp_path / "tables")
    write_file(cache.learned_path(GPU), entry(LEARNED))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert lookup(cache) == DEFAULT
    assert lookup(cache, scaled(SHAPE, pixels=64)) == DEFAULT


def test_autotune_off_uses_tables_and_defaults_only(tmp_path, fake_gpu, monkeypatch):
    tables = tmp_path / "tables"
    write_file(tables / "gpu.json", entry(TABLED))
    cache = AutotuneCache(tmp_path / "cache", tables)
    write_file(cache.learned_path(GPU), entry(LEARNED))
    monkeypatch.setenv("ATOMCONV_AUTOTUNE", "0")
    assert lookup(cache) == TABLED
    assert lookup(cache, dtype=torch.bfloat16) == DEFAULT


def test_off_cuda_without_a_gpu_name_the_default_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert keys.gpu_name(CPU) is None
    assert lookup(AutotuneCache(tmp_path / "cache", tmp_path / "tables")) == DEFAULT


# --- concurrent writers ---------------------------------------------------------------------

WRITERS, WRITES = 8, 100


def _writer(path: str, writer: int) -> None:
    """WRITES merges of one entry of this writer's own and one key every writer shares (a merge
    that cannot get the lock raises: the process then exits non-zero)."""
    warn = OnceWarner()
    for i in range(WRITES):
        own = Entry(KERNEL, "float16", (("pixels", 2 ** i), ("writer", 2 ** writer)), {"writer": writer})
        shared = Entry(KERNEL, "float16", (("pixels", 1),), {"writer": writer})
        merge_into_file(Path(path), GPU, "3.6.0", [own, shared], warn)


def _reader(path: str, stop, reads, failures) -> None:
    """Reads the file as fast as it can until `stop`: every read must be a whole valid file."""
    while not stop.is_set():
        try:
            document = json.loads(Path(path).read_text())
        except FileNotFoundError:
            continue
        except ValueError:
            failures.value += 1
            continue
        reads.value += 1
        if read_cache_file(Path(path), OnceWarner()) is None or document["schema"] != SCHEMA:
            failures.value += 1


def test_concurrent_writers_never_leave_a_partial_file_and_lose_nothing(tmp_path):
    path = str(tmp_path / "learned.json")
    context = multiprocessing.get_context("fork")  # the children only write files: no torch threads involved
    stop, reads, failures = context.Event(), context.Value("i", 0), context.Value("i", 0)
    reader = context.Process(target=_reader, args=(path, stop, reads, failures))
    reader.start()
    writers = [context.Process(target=_writer, args=(path, w)) for w in range(WRITERS)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(300)
    stop.set()
    reader.join(60)
    assert [p.exitcode for p in writers] == [0] * WRITERS
    assert reads.value > 0 and failures.value == 0
    content = read_cache_file(Path(path), OnceWarner())
    # Every writer's own entries survive (read-merge-write under the lock); the shared key
    # holds one writer's value (the last writer wins per key).
    assert len(content.entries) - 1 == WRITERS * WRITES
    assert content.entries[KERNEL, "float16", (("pixels", 1),)].config["writer"] in range(WRITERS)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_writer_that_cannot_get_the_lock_writes_nothing_and_says_so_once(tmp_path, fake_gpu, monkeypatch):
    monkeypatch.setattr(store, "LOCK_TIMEOUT_S", 0.2)
    cache = AutotuneCache(tmp_path / "cache", tmp_path / "tables")
    before = write_file(cache.learned_path(GPU), entry(TABLED, scaled(SHAPE, atoms=2))).read_text()
    with held_by_another_process(cache.learned_path(GPU)):
        with pytest.warns(RuntimeWarning, match="held its lock") as caught:
            assert lookup(cache, benchmark=lambda c: 0.5 if c == NEAR else 1.0) == NEAR
            # Persisting is given up for this process: no second wait, no second warning.
            assert lookup(cache, scaled(SHAPE, pixels=2), benchmark=lambda c: 0.5 if c == LEARNED else 1.0) == LEARNED
        assert len(caught) == 1 and str(cache.learned_path(GPU)) in str(caught[0].message)
        with pytest.raises(Timeout):
            merge_into_file(cache.learned_path(GPU), GPU, "3.6.0", [entry(NEAR)], OnceWarner())
        assert cache.learned_path(GPU).read_text() == before


def test_a_link_planted_at_the_lock_path_leaves_its_target_alone(tmp_path, fake_gpu):
    """With an attacker-writable cache dir, a symlink at the lock path must not get its target
    truncated (filelock before 3.20.1 followed it, and opened with O_TRUNC)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cache = AutotuneCache(tmp_path / "cache", tmp_path / "tables")
    cache.learned_dir.mkdir(parents=True)
    Path(store.lock_for(cache.learned_path(GPU)).lock_file).symlink_to(victim)
    with pytest.warns(RuntimeWarning, match="kept in memory"):
        assert lookup(cache, benchmark=lambda c: 0.5 if c == NEAR else 1.0) == NEAR
    assert victim.read_text() == "precious" and not cache.learned_path(GPU).exists()


@contextlib.contextmanager
def held_by_another_process(path: Path):
    """The lock of `path` (the `<path>.lock` file every writer locks), held by a child process
    for the duration of the block."""
    context = multiprocessing.get_context("fork")
    holding, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(path), holding, release))
    holder.start()
    try:
        assert holding.wait(60)
        yield
    finally:
        release.set()
        holder.join(60)


def _hold_lock(path: str, holding, release) -> None:
    with FileLock(f"{path}.lock"):
        holding.set()
        release.wait(60)


# --- end to end with the real forward kernel (interpreted) ----------------------------------

@pytest.mark.skipif(not launch.INTERPRETING, reason="runs the kernel on CPU tensors, in Triton's interpreter")
def test_the_forward_kernel_runs_with_the_config_the_cache_learns(tmp_path, fake_gpu, monkeypatch):
    monkeypatch.setattr(cache_module, "device_limits", lambda device: DeviceLimits(shared_bytes=163 * 1024))
    # The kernel runs in the interpreter, while the cache is told it is not (to let it benchmark).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cache_module, "interpreting", lambda: False)
    g = torch.Generator().manual_seed(0)
    x, beta = torch.randn(1, 4, 5, 5, generator=g), torch.randn(1, 12, 5, 5, generator=g)
    bases, weight, bias = torch.randn(4, 3, 3, generator=g), torch.randn(6, 4, 3, generator=g), torch.randn(6, generator=g)
    geo = validate_atom_conv2d(x, beta, bases, weight, bias, 1, 1, 1, 1)
    from kernels.forward import launch_forward

    expected = atom_conv2d_reference(x, beta, bases, weight, bias, geo)
    outputs = {}

    def fake_ms(config):  # favours 8 warps, then narrow channel chunks
        return config.block_c / config.num_warps

    def benchmark(config):  # runs the real kernel; the "time" is fake_ms
        outputs[config] = launch_forward(x, beta, bases, weight, bias, geo, config=config)
        return fake_ms(config)

    default = default_config()
    chosen = AutotuneCache(tmp_path / "cache", tmp_path / "tables").get_config(
        KERNEL, device=CPU, dtype=torch.float32, shape=layer_shape(geo), candidates=tile_candidates(),
        default=default, benchmark=benchmark,
        footprint=lambda c: forward_footprint(fit_tile_config(c, geo), geo, torch.float32, "sm_80"))
    # Pruning leaves the default and the 8-warp config (the others make the default's launch).
    assert default in outputs and len(outputs) >= 2
    assert chosen == min(outputs, key=fake_ms) and chosen != default
    for config, y in outputs.items():
        torch.testing.assert_close(y, expected, msg=lambda m: f"{config}: {m}")


# --- layer shapes for `tune` ----------------------------------------------------------------

def test_model_layer_shapes_follow_every_atom_conv2d():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          AtomConv2d(8, 16, 3, padding=1, stride=2, num_atoms=4), nn.ReLU(),
                          AtomConv2d(16, 16, 5, padding=2, groups=2))
    (first_name, first), (second_name, second) = model_layer_shapes(model, (2, 3, 17, 17))
    assert (first_name, first.in_size, first.stride, first.num_atoms, first.num_bases) == ("3", (17, 17), (2, 2), 4, 4)
    assert (second_name, second.in_size, second.out_size(), second.groups, second.num_bases) == ("5", (9, 9), (9, 9), 2, 12)


def test_parse_shape():
    layer = parse_shape("8,64,32,28,30,3,6,2")
    assert (layer.batch, layer.in_channels, layer.out_channels, layer.in_size) == (8, 64, 32, (28, 30))
    assert (layer.kernel_size, layer.num_atoms, layer.num_bases, layer.groups, layer.padding) == (3, 6, 6, 2, (1, 1))
    for bad in ("8,64,32,28,30,3", "8,64,x,28,30,3,6", "8,64,32,28,30,3,6,5"):
        with pytest.raises(ValueError, match="--shape"):
            parse_shape(bad)


# --- command line ---------------------------------------------------------------------------

@pytest.fixture
def cli_cache(tmp_path, monkeypatch):
    """ATOMCONV_CACHE_DIR pointing at a learned file of two entries for GPU."""
    monkeypatch.setenv("ATOMCONV_CACHE_DIR", str(tmp_path / "cache"))
    cache = AutotuneCache(tmp_path / "cache")
    write_file(cache.learned_path(GPU), entry(LEARNED, ms=0.5, default_ms=0.75),
               entry(NEAR, scaled(SHAPE, pixels=4), dtype="bfloat16"))
    return cache


def test_cli_show_lists_shipped_and_learned_entries(cli_cache, tmp_path, monkeypatch, capsys):
    write_file(tmp_path / "tables" / "shipped.json", entry(TABLED), triton="3.6.0")
    monkeypatch.setattr(cache_module, "TABLES_DIR", tmp_path / "tables")
    assert cli.main(["show"]) == 0
    out = capsys.readouterr().out
    assert str(cli_cache.learned_dir) in out and str(tmp_path / "tables") in out
    rows = [line for line in out.splitlines() if line.startswith("learned:")]
    assert len(rows) == 2 and all(GPU in row and KERNEL in row for row in rows)
    assert any("1.50x" in row and "num_warps=" in row for row in rows)
    [shipped] = [line for line in out.splitlines() if line.startswith("table:shipped.json")]
    assert "3.6.0" in shipped and f"num_warps={TABLED.num_warps} block_c={TABLED.block_c} block_o={TABLED.block_o}" in shipped


def test_cli_export_writes_a_table_the_cache_ships(cli_cache, tmp_path, fake_gpu, capsys):
    out = tmp_path / "ship" / "test.json"
    assert cli.main(["export", "--gpu", "NVIDIA Test GPU", "--out", str(out)]) == 0
    table_only = AutotuneCache(tmp_path / "no-learned", out.parent)
    assert lookup(table_only, benchmark=None) == LEARNED
    assert lookup(table_only, scaled(SHAPE, pixels=4), dtype=torch.bfloat16, benchmark=None) == NEAR
    assert cli.main(["export", "--gpu", "another", "--out", str(out)]) == 1
    assert "no learned entries" in capsys.readouterr().err


def test_cli_clear_removes_learned_files(cli_cache, capsys):
    other = write_file(cli_cache.learned_dir / "nvidia-other.triton-3.6.0.json", entry(TABLED))
    crashed_writer_left = cli_cache.learned_dir / f".{cli_cache.learned_path(GPU).name}.x1y2.tmp"
    crashed_writer_left.write_text('{"schema": 1, "gp')
    assert cli.main(["clear", "--gpu", "nvidia other"]) == 0
    assert not other.exists() and cli_cache.learned_path(GPU).exists() and crashed_writer_left.exists()
    assert cli.main(["clear"]) == 0
    assert not list(cli_cache.learned_dir.iterdir())
    assert cli.main(["show"]) == 0
    assert "no shipped tables and no learned entries" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cli_tune_without_a_gpu_says_so_before_running_any_model_code(tmp_path, monkeypatch, capsys):
    assert cli.main(["tune", "--shape", "1,8,8,8,8,3,4"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err
    assert cli.main(["tune"]) == 2  # nothing to tune: an argument error comes first
    assert cli.main(["tune", "--model", "m:f"]) == 2 and "--input-size" in capsys.readouterr().err
    # The model's module is not even imported before the GPU check.
    (tmp_path / "model_with_side_effects.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('imported').touch()\ndef f():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["tune", "--model", "model_with_side_effects:f", "--input-size", "1,3,8,8"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "imported").exists()


def test_cli_tune_says_when_the_factory_returns_no_module(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the GPU check; nothing runs on it
    monkeypatch.delenv("ATOMCONV_AUTOTUNE", raising=False)
    (tmp_path / "not_a_model.py").write_text("def f():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["tune", "--model", "not_a_model:f", "--input-size", "1,3,8,8"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "not_a_model:f" in line and "returned int, not a torch.nn.Module" in line


def test_cli_runs_as_a_module(cli_cache):
    result = subprocess.run([sys.executable, "-m", "autotune_cache", "show"], capture_output=True, text=True,
                            env=os.environ | {"ATOMCONV_CACHE_DIR": str(cli_cache.learned_dir.parent)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("learned:") == 2


@pytest.fixture
def deny(monkeypatch):
    """deny(path): from now on listing `path`, opening it, or opening or creating anything
    directly in it fails with EACCES, as it does for a user without the permission. (The tests
    run as root, whom permission bits do not stop, so the os calls are patched, on any user.)"""
    denied: set[Path] = set()
    real_open, real_scandir = os.open, os.scandir

    def check(path):
        path = Path(os.fsdecode(path)).absolute()
        if path in denied or path.parent in denied:
            raise PermissionError(13, "Permission denied", str(path))

    def fake_open(path, *args, **kwargs):
        check(path)
        return real_open(path, *args, **kwargs)

    def fake_scandir(path="."):
        check(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "scandir", fake_scandir)
    return lambda path: denied.add(Path(path).absolute())


def test_unreadable_directories_and_files_fall_back_with_warnings(tmp_path, fake_gpu, deny):
    tables = tmp_path / "tables"
    write_file(tables / "gpu.json", entry(TABLED))
    cache = AutotuneCache(tmp_path / "cache", tables)
    write_file(cache.learned_path(GPU), entry(LEARNED))
    deny(tables)
    deny(cache.learned_path(GPU))
    with pytest.warns(RuntimeWarning, match="Permission denied") as caught:
        assert lookup(cache, benchmark=None) == DEFAULT
    assert sorted(str(w.message).split(": ")[1] for w in caught) == sorted([str(tables), str(cache.learned_path(GPU))])


def _one_error_line(capsys, *expected: str) -> str:
    """The command's only stderr line, which must contain each of `expected`."""
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and all(text in line for text in expected), line
    return line


def test_cli_show_names_an_unreadable_directory(cli_cache, deny, capsys):
    deny(cli_cache.learned_dir)
    assert cli.main(["show"]) == 1
    _one_error_line(capsys, str(cli_cache.learned_dir), "Permission denied")


@pytest.mark.parametrize("damage", ["truncated", "huge_int", "fifo", "link_to_dev_zero"])
def test_cli_show_names_a_damaged_file_and_lists_the_rest(cli_cache, damage, capsys):
    damaged = cli_cache.learned_dir / "nvidia-other.triton-3.6.0.json"
    DAMAGED[damage](damaged)
    with deadline(10):
        assert cli.main(["show"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("learned:") == 2
    [line] = captured.err.splitlines()
    assert line.startswith("error: ") and str(damaged) in line and "skipped" in line


def test_cli_clear_names_an_unreadable_directory(cli_cache, deny, capsys):
    deny(cli_cache.learned_dir)
    assert cli.main(["clear"]) == 1
    _one_error_line(capsys, str(cli_cache.learned_dir), "cannot list", "Permission denied")
    assert cli_cache.learned_path(GPU).exists()


def test_cli_clear_leaves_a_file_another_process_is_writing(cli_cache, monkeypatch, capsys):
    monkeypatch.setattr(store, "LOCK_TIMEOUT_S", 0.2)
    with held_by_another_process(cli_cache.learned_path(GPU)):
        assert cli.main(["clear"]) == 1
    _one_error_line(capsys, str(cli_cache.learned_path(GPU)), "another process")
    assert cli_cache.learned_path(GPU).exists()


@pytest.mark.parametrize("where", ["a_directory", "under_a_file", "unwritable"])
def test_cli_export_names_an_out_path_it_cannot_write(cli_cache, tmp_path, deny, where, capsys):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "read_only").mkdir()
    deny(tmp_path / "read_only")
    out, problem = {"a_directory": (tmp_path, "is a directory"),
                    "under_a_file": (tmp_path / "a_file" / "t.json", f"{tmp_path / 'a_file'} is a file"),
                    "unwritable": (tmp_path / "read_only" / "t.json", "Permission denied")}[where]
    assert cli.main(["export", "--gpu", GPU, "--out", str(out)]) == 1
    _one_error_line(capsys, f"--out {out}", problem)
    assert (tmp_path / "a_file").read_text() == "" and not os.listdir(tmp_path / "read_only")
