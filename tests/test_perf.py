"""`python -m perf`: the sweep on a tiny grid, the cost formulas of docs/design.md §5, the roofline, and
the calls it times (checked against the reference path). No timing assertions."""

import json
import math
import os
import subprocess
from dataclasses import replace

import pandas as pd
import pytest
import torch

from atomconv.validation import AtomConvGeometry
from perf import __main__ as perf_main
from perf import report
from perf.cases import build_case
from perf.costs import atom_conv_macs_per_pixel, fused_forward_min_bytes, static_conv_macs_per_pixel
from perf.grids import GRIDS, Grid, Problem
from perf.measure import cpu_peak_bytes
from perf.roofline import fused_forward_bound_s, known_gpu
from perf.sweep import describe_machine, run_grid, timed_call

REQUIRED_COLUMNS = [
    "impl", "direction", "dtype", "device", "batch", "channels_in", "channels_out", "height", "width", "kernel_size",
    "num_atoms", "groups", "median_ms", "p20_ms", "p80_ms", "throughput_px_s", "tflops", "peak_mem_bytes",
]
TINY = Grid(
    name="tiny",
    base=Problem(batch=1, channels=4, size=8, kernel_size=3, num_atoms=2, dtype=torch.float32),
    axes={"resolution": (6, 8), "channels": (4, 8), "kernel_size": (3,), "num_atoms": (2,)},
    headline=(("kernel_size", 3),),
    cpu_min_run_time_s=0.01,
)


@pytest.fixture
def one_thread():
    """The CI machine is shared: with one thread a busy core cannot stall every op's barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


STATIC_RECORDS = [  # two records as `python -m perf.static_report --json` writes them (docs/design.md §4)
    {"kernel": "atom_conv2d_fwd", "arch": arch, "dtype": "float16", "config": {"block_p": 64, "num_warps": 8},
     "default": True, "shared_bytes": 65536, "registers": 190, "spill_bytes": 0, "mma": 16}
    for arch in ("sm_90", "sm_80")
]


def test_sweep_cli_writes_csv_plots_and_report(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setitem(GRIDS, "tiny", TINY)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, on any machine
    # The static report's own run (compiling for two archs) is test_static_report's job and too slow here.
    monkeypatch.setattr(report, "run_static_report", lambda: STATIC_RECORDS)
    monkeypatch.chdir(tmp_path)
    assert perf_main.main(["--grid", "tiny"]) == 0
    assert not (tmp_path / "perf" / "results").exists()  # committed results are only written with --out
    tmp_path = tmp_path / "perf_out" / "cpu"

    frame = pd.read_csv(tmp_path / "tiny.csv")
    assert set(REQUIRED_COLUMNS) <= set(frame.columns)
    # Without a GPU the fused path is not timed; everything else is, once per point and direction.
    assert set(frame["impl"]) == {"reference", "paper", "conv2d", "layer_atomconv", "layer_conv2d"}
    assert len(frame) == len(TINY.points()) * 5 * 2 == 30
    assert frame[REQUIRED_COLUMNS].notna().all().all()
    assert (frame["device"] == "cpu").all() and (frame["peak_mem_bytes"] > 0).all()
    pixels = frame["batch"] * frame["height"] * frame["width"]  # stride 1, "same" padding
    assert frame["throughput_px_s"].to_numpy() == pytest.approx((pixels / (frame["median_ms"] * 1e-3)).to_numpy())
    conv = frame[(frame["impl"] == "conv2d") & (frame["direction"] == "forward")]
    macs = conv["channels_out"] * conv["channels_in"] * conv["kernel_size"] ** 2 * pixels[conv.index]
    assert conv["tflops"].to_numpy() == pytest.approx((2 * macs / (conv["median_ms"] * 1e-3) / 1e12).to_numpy())

    for metric in ("throughput", "memory"):
        png = (tmp_path / f"tiny_{metric}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    text = (tmp_path / "tiny_report.txt").read_text()
    assert "fused: not timed" in text and "N=1 C=4 8x8 K=3 M=2 float32" in text
    summary = text[text.index("static kernel report, "):].splitlines()
    assert summary[1].split()[:7] == ["kernel", "arch", "dtype", "registers", "spill_bytes", "shared_KiB", "mma"]
    assert summary[2].split()[:7] == ["atom_conv2d_fwd", "sm_80", "float16", "190", "0", "64.0", "16"]
    assert text in capsys.readouterr().out


def test_static_report_runs_without_the_interpreter(monkeypatch):
    """The subprocess gets the static report's CLI, an environment without TRITON_INTERPRET
    (set by conftest here), and its JSON comes back; a failure becomes one line."""
    seen = {}

    def fake_run(command, env, **kwargs):
        seen.update(command=command, env=env)
        json_path = command[command.index("--json") + 1]
        with open(json_path, "w") as f:
            json.dump(STATIC_RECORDS, f)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(report.subprocess, "run", fake_run)
    assert report.run_static_report() == STATIC_RECORDS
    assert seen["command"][1:4] == ["-m", "perf.static_report", "--defaults-only"]
    assert "TRITON_INTERPRET" not in seen["env"] and seen["env"]["PATH"] == os.environ["PATH"]

    monkeypatch.setattr(report.subprocess, "run",
                        lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", "Traceback\nImportError: boom\n"))
    assert report.static_report_summary() == "static kernel report failed (exit 1: ImportError: boom)"


def test_ratio_table_divides_by_the_right_baselines():
    problem = TINY.base
    columns = {"dtype": "float32", "batch": 1, "channels_in": 4, "channels_out": 4, "height": 8, "width": 8,
               "kernel_size": 3, "num_atoms": 2, "num_bases": 6, "groups": 1}
    measured = {"paper": (10.0, 4000), "reference": (5.0, 1000), "conv2d": (2.0, 500),
                "layer_atomconv": (8.0, 3000), "layer_conv2d": (4.0, 600)}
    frame = pd.DataFrame([{**columns, "impl": impl, "direction": "forward", "median_ms": ms, "peak_mem_bytes": mem,
                           "throughput_px_s": 1.0, "roofline_px_s": math.nan}
                          for impl, (ms, mem) in measured.items()])
    grid = Grid("t", problem, TINY.axes, TINY.headline, directions=("forward",))
    table = report.ratio_table(frame, grid).set_index("impl")
    assert table.loc["reference", "x_paper"] == 2.0 and table.loc["reference", "x_static_conv"] == 0.4
    assert table.loc["reference", "mem_vs_paper"] == 0.25 and table.loc["conv2d", "x_paper"] == 5.0
    assert table.loc["layer_atomconv", "x_static_conv"] == 0.5 and math.isnan(table.loc["layer_atomconv", "x_paper"])
    assert "of_roofline" not in table.columns  # no GPU peaks: the column is dropped


def test_costs_match_spec_section_5_by_hand():
    # N=2, C_in=8, C_out=12, G=2, M=3, L=6, a 3x5 kernel, 10x12 input, stride 2, no padding -> 4x4 output.
    geo = AtomConvGeometry(batch=2, in_channels=8, out_channels=12, groups=2, num_atoms=3, num_bases=6,
                           in_size=(10, 12), out_size=(4, 4), kernel_size=(3, 5), stride=(2, 2), padding=(0, 0),
                           dilation=(1, 1))
    macs = atom_conv_macs_per_pixel(geo)
    assert macs.basis_to_atom == 3 * 6 * 15 == 270  # M·L·K²
    assert macs.atom_times_features == 8 * 3 * 15 == 360  # C_in·M·K²
    assert macs.coefficient_sum == 12 * 4 * 3 == 144  # C_out·(C_in/G)·M
    assert macs.total == 774
    assert static_conv_macs_per_pixel(8, 12, 2, (3, 5)) == 12 * 4 * 15 == 720
    # x 2·8·120 + β 2·18·16 + α 12·4·3 + Ψ 6·15 + y 2·12·16 = 1920 + 576 + 144 + 90 + 384 elements.
    assert fused_forward_min_bytes(geo, element_size=4) == 3114 * 4


def test_roofline_bound_by_hand():
    h100 = known_gpu("NVIDIA H100 80GB HBM3")
    assert h100.name == "H100 SXM"
    assert known_gpu("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert known_gpu("NVIDIA A100-SXM4-80GB").name == "A100 80GB SXM"
    assert known_gpu("NVIDIA A100-PCIE-40GB").name == "A100 40GB"
    assert known_gpu("NVIDIA H200").name == "H200 SXM"
    assert known_gpu("NVIDIA GeForce RTX 4090") is None

    # The target shape, float16: N=32, C=64, 56x56, K=3, M=6, L=6 -> 100352 output pixels;
    # stages 1+2 on the CUDA cores (324 + 3456 MACs/px at 67 TFLOP/s) are the bound.
    base = GRIDS["gpu"].base
    assert fused_forward_bound_s(base.geometry(), torch.float16, h100) == pytest.approx(2 * 3780 * 100352 / 67e12)
    # A thin problem is memory-bound: C=4, M=1, 8x8, N=1 moves x 256 + β 384 + α 16 + Ψ 54 + y 256 halves.
    thin = Problem(batch=1, channels=4, size=8, kernel_size=3, num_atoms=1, dtype=torch.float16)
    assert fused_forward_bound_s(thin.geometry(), torch.float16, h100) == pytest.approx(966 * 2 / 3.35e12)


def test_gpu_grid_holds_the_target_points():
    gpu = GRIDS["gpu"]
    points = gpu.points()
    base = Problem(batch=32, channels=64, size=56, kernel_size=3, num_atoms=6, dtype=torch.float16)
    assert base in points and gpu.point("kernel_size", 7) in points and gpu.point("channels", 256) in points
    assert {"fused", "paper", "conv2d", "layer_atomconv", "layer_conv2d"} <= set(gpu.impls)


def test_timed_calls_compute_the_same_operator():
    """The fused (interpreted here), reference and paper calls the sweep times agree, forward
    and gradients, on the same seeded inputs."""
    problem = Problem(batch=1, channels=4, size=5, kernel_size=3, num_atoms=2, dtype=torch.float32)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    outputs = {impl: build_case(impl, problem, device, requires_grad=False).run()
               for impl in ("fused", "reference", "paper")}
    torch.testing.assert_close(outputs["fused"], outputs["reference"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["paper"], outputs["reference"], rtol=1e-4, atol=1e-4)
    grads = {impl: timed_call(build_case(impl, problem, device, requires_grad=True), "forward+backward")()
             for impl in ("fused", "paper")}
    for fused, paper in zip(*grads.values()):
        torch.testing.assert_close(fused, paper, rtol=1e-4, atol=1e-4)
    layer_shapes = {impl: build_case(impl, problem, device, requires_grad=False).run().shape
                    for impl in ("layer_atomconv", "layer_conv2d")}
    assert layer_shapes["layer_atomconv"] == layer_shapes["layer_conv2d"] == (1, 4, 5, 5)


def test_cpu_peak_bytes_replays_every_allocation():
    def allocate():
        with torch.profiler.record_function("outer"):  # an op calling ops, as a custom op does
            a = torch.ones(1024)  # 4 KiB
            b = torch.ones(2048)  # + 8 KiB held together: the peak
            del a, b
        return torch.ones(512)

    assert cpu_peak_bytes(allocate) == (1024 + 2048) * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path of the sweep needs CUDA")
def test_sweep_on_gpu_times_the_fused_path():
    machine = describe_machine(torch.device("cuda"))
    frame = run_grid(Grid("tiny_fp16", replace(TINY.base, dtype=torch.float16), TINY.axes, TINY.headline), machine)
    fused = frame[frame["impl"] == "fused"]
    assert set(fused["direction"]) == {"forward", "forward+backward"} and fused["median_ms"].gt(0).all()
    bounds = fused.loc[fused["direction"] == "forward", "roofline_px_s"]
    assert bounds.notna().all() if known_gpu(machine.label) else bounds.isna().all()


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
def test_onnx_export_cli_on_a_small_layer(capsys, one_thread):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from perf import onnx_export

    assert onnx_export.main(["--batch", "1", "--channels", "4", "--size", "6"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "max |onnxruntime - eager|" in line]
    assert [line.split(":")[0] for line in lines] == ["layer (generator + operator)", "operator alone"]
    errors = [float(line.split("= ")[1].split(" ")[0]) for line in lines]
    assert max(errors) < 1e-4
