"""Tuning a new shape: a few ranked candidates per kernel, a bounded time, a stable winner, nothing
persisted from a run that a transient failure may have skewed, and no benchmark inside a trace.

No GPU: `keys.gpu_name` pretends one is there, the kernels run in Triton's interpreter, and the
"timings" are made up (the interpreter's wall time means nothing).
"""

from __future__ import annotations

import pytest
import torch

import autotune_cache
from autotune_cache import AutotuneCache, DeviceLimits, Footprint, prune_candidates
from autotune_cache import cache as cache_module
from autotune_cache import keys
from atomconv.validation import validate_atom_conv2d
from kernels import backward, configs, launch
from helpers import make_problem

GPU = "nvidia-test-gpu"
SHAPE = {"c_in_g": 64, "c_out_g": 64, "pixels": 100352, "atoms": 6, "taps": 9}
CANDIDATES = [{"block": b} for b in (1, 2, 3, 4, 5, 6)]


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """A machine with a GPU named GPU, autotuning on, a fresh process-wide cache under tmp_path."""
    monkeypatch.setattr(keys, "gpu_name", lambda device: GPU)
    monkeypatch.setattr(cache_module, "interpreting", lambda: False)
    monkeypatch.setattr(cache_module, "device_limits", lambda device: DeviceLimits(shared_bytes=227 * 1024))
    monkeypatch.delenv("ATOMCONV_AUTOTUNE", raising=False)
    monkeypatch.setattr(cache_module, "_default_cache", AutotuneCache(tmp_path / "cache", tmp_path / "tables"))
    return cache_module.default_cache()


def lookup(cache, benchmark, **kwargs):
    return cache.get_config("k", device=torch.device("cpu"), dtype=torch.float16, shape=SHAPE,
                            candidates=CANDIDATES, default=CANDIDATES[0], benchmark=benchmark, **kwargs)


def test_prune_keeps_the_default_and_the_cheapest_by_the_kernels_cost_model():
    costs = {1: 50.0, 2: 10.0, 3: None, 4: 5.0, 5: 20.0, 6: 7.0}

    def footprint(config):
        return Footprint(config["block"], 128, 0, 1, 1.0, costs[config["block"]])

    kept = prune_candidates(CANDIDATES, footprint, DeviceLimits(shared_bytes=1), keep=3)
    assert kept == [{"block": 1}, {"block": 4}, {"block": 6}]  # the default first, then by cost, in order


def test_a_new_shape_times_at_most_max_timed_configs(fake_gpu):
    timed = []
    lookup(fake_gpu, lambda c: timed.append(c) or 1.0 + c["block"])
    assert timed == CANDIDATES[: cache_module.MAX_TIMED]


def test_no_config_is_started_past_the_time_budget(fake_gpu, monkeypatch):
    clock = iter(range(0, 1000, 10))  # each reading 10 s later: over the budget after the first two
    monkeypatch.setattr(cache_module.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(cache_module, "MAX_TIMED", 6)
    timed = []
    lookup(fake_gpu, lambda c: timed.append(c) or 1.0)
    assert timed == CANDIDATES[:2]


def test_a_winner_within_the_noise_does_not_replace_the_default(fake_gpu):
    almost = {1: 1.0, 2: 1.0 - cache_module.MIN_GAIN / 2, 3: 1.5}
    assert lookup(fake_gpu, lambda c: almost[c["block"]]) == CANDIDATES[0]
    clearly = {1: 1.0, 2: 0.5, 3: 1.5}
    fresh = AutotuneCache(fake_gpu.learned_dir.parent / "other", fake_gpu.tables_dir)
    assert lookup(fresh, lambda c: clearly[c["block"]]) == CANDIDATES[1]


def test_a_run_with_an_out_of_memory_candidate_is_not_persisted(fake_gpu):
    def benchmark(config):
        if config["block"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {1: 1.0, 2: 0.5}[config["block"]]

    assert lookup(fake_gpu, benchmark) == CANDIDATES[1]  # used for this process...
    assert not fake_gpu.learned_path(GPU).exists()  # ...but another process tunes again
    assert lookup(fake_gpu, lambda c: pytest.fail("benchmarked twice")) == CANDIDATES[1]


def test_no_benchmark_while_torch_compile_traces(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert lookup(fake_gpu, lambda c: pytest.fail("benchmarked in a trace")) == CANDIDATES[0]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert lookup(fake_gpu, lambda c: 1.0 if c["block"] == 1 else 0.5) == CANDIDATES[1]  # tuned at the next call


@pytest.mark.skipif(not launch.INTERPRETING, reason="drives the kernels on CPU tensors")
def test_each_backward_kernel_times_a_few_candidates_on_a_new_shape(fake_gpu, monkeypatch):
    """The real backward launchers: each kernel's cost model leaves at most MAX_TIMED configs."""
    timed: dict[str, list] = {}
    current = []

    def fake_time(run):
        run()
        return 1.0

    real_get_config = autotune_cache.get_config

    def recording_get_config(kernel, **kwargs):
        current.append(kernel)
        try:
            return real_get_config(kernel, **kwargs)
        finally:
            current.pop()

    def counting_benchmark(original):
        def benchmark(config):
            timed.setdefault(current[-1], []).append(config)
            return original(config)
        return benchmark

    monkeypatch.setattr(autotune_cache, "time_launch", fake_time)
    monkeypatch.setattr(configs.autotune_cache, "get_config",
                        lambda kernel, *, benchmark, **kw: recording_get_config(kernel, benchmark=counting_benchmark(benchmark), **kw))
    tensors, kwargs = make_problem(1, 4, 6, (5, 6), 3, padding=1, num_atoms=3, num_bases=4)
    inputs = [t.float() for t in tensors[:4]]
    geo = validate_atom_conv2d(*inputs, None, **kwargs)
    backward.launch_backward(torch.ones(1, 6, 5, 6), *inputs, geo, (True, True, True, True))
    assert set(timed) == {"atom_conv2d_bwd_input", "atom_conv2d_bwd_coeff_bases", "atom_conv2d_bwd_weight"}
    for kernel, configs_timed in timed.items():
        assert 1 <= len(configs_timed) <= cache_module.MAX_TIMED, kernel
        assert len(set(configs_timed)) == len(configs_timed), kernel
