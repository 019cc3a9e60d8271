"""`python -m perf.gpu_session`, the one command for a lent GPU: without a GPU it says so; its
summary reads the files its steps write (made up here: the steps themselves need a GPU)."""

import json
import math

import pandas as pd
import pytest
import torch

from perf import gpu_session, gpu_summary
from perf.grids import GRIDS
from perf.sweep import COLUMNS, problem_columns


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_refuses_without_a_gpu(capsys):
    assert gpu_session.main([]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def _sweep_rows(frame_times):
    """Rows of a gpu-grid CSV at K=3 and K=7: {(impl, direction): (ms, peak bytes)}."""
    rows = []
    for k in (3, 7):
        problem = GRIDS["gpu"].point("kernel_size", k)
        for (impl, direction), (ms, peak) in frame_times.items():
            rows.append({column: math.nan for column in COLUMNS} | problem_columns(problem) | {
                "impl": impl, "direction": direction, "median_ms": ms * k, "peak_mem_bytes": peak,
                "throughput_px_s": 1.0 / ms, "roofline_px_s": math.nan})
    return pd.DataFrame(rows, columns=COLUMNS)


def test_summary_reads_the_targets_tuning_kernel_times_and_tests(tmp_path):
    _sweep_rows({("fused", "forward"): (1.0, 10), ("conv2d", "forward"): (0.9, 5), ("paper", "forward"): (9.0, 80),
                 ("fused", "forward+backward"): (3.0, 40), ("conv2d", "forward+backward"): (2.0, 20),
                 ("paper", "forward+backward"): (30.0, 400)}).to_csv(tmp_path / "gpu.csv", index=False)
    (tmp_path / "kernel_times.json").write_text(json.dumps([
        {"kernel_size": 3, "direction": "forward", "what": "atom_conv2d_fwd_kernel", "us": 12.5}]))
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_cuda" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_b"/></testsuite></testsuites>')
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"schema": 1, "gpu": "g", "triton": "3.6.0", "entries": [
        {"kernel": "atom_conv2d_fwd", "dtype": "float16", "bucket": {"pixels": 1}, "config": {"block_p": 64},
         "shape": {"pixels": 1}, "ms": 0.5, "default_ms": 0.6}]}))
    text = gpu_summary.summarise(tmp_path, "Some GPU (g)", {"tests": (False, 12.0), "sweep": (True, 3.0)}, table)
    assert "| fused forward vs cuDNN conv2d, K=3 | 0.9 | >= 0.8 |" in text
    assert "| fused forward+backward vs paper, K=7 | 10 | >= 5 |" in text
    assert "| fused forward+backward peak memory / paper's, K=3 | 0.1 | <= 0.25 |" in text
    assert "| fused backward / forward, K=3 | 2 | <= 2.5 |" in text
    assert "3 tests, 1 failures, 0 errors, 1 skipped" in text and "tests.test_cuda::test_a" in text
    assert "atom_conv2d_fwd_kernel" in text and "12.5" in text
    assert "| atom_conv2d_fwd | pixels=1 | block_p=64 | 0.5000 | 0.6000 | 1.20x |" in text
    assert "| tests | FAILED | 12 |" in text
