"""Everything a lent GPU should measure, in one command:

    python -m perf.gpu_session [--out DIR] [--archive FILE.tar.gz] [--skip STEP ...]

Steps, in this order (the most wanted numbers first), each logged to DIR/<step>.log, timed and
bounded in time (STEP_TIMEOUT_S per command); one failing does not stop the others:
  kernels each Triton launch of one forward and one backward of the perf problem (N=32,
          C=64, 56x56, M=6, float16; K=3, then K=7 in a process of its own) timed on its own,
          next to the static report of the K=3 defaults compiled by this machine's Triton
          (DIR/static_report.json);
  tests   the whole test suite on this GPU (the `cuda`-marked tests included), in parallel
          with pytest-xdist when it is installed; JUnit XML in DIR/tests.xml;
  tune    every shape of the `gpu` perf grid tuned (forward and backward kernels, float16) into
          a fresh cache, exported as the shipped table autotune_cache/tables/<gpu>.json;
  sweep   `python -m perf --grid gpu` with those configs: CSV, plots and report in DIR;
then DIR/summary.md: the target ratios (fused forward vs conv2d at K=3 and K=7, forward+backward
vs the paper's algorithm, peak memory vs the paper's, backward/forward), tuned vs default config
per shape, per-kernel times, test results, and the machine.

DIR defaults to perf/results/<gpu>/ (the GPU's normalised name). Nothing outside the repository
is needed beyond torch, triton, pytest, pandas and matplotlib; run it from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = ("kernels", "tests", "tune", "sweep")
STEP_TIMEOUT_S = {"kernels": 240, "tests": 300, "tune": 240, "sweep": 240}
"""Wall-clock limit of each step: together well inside 10 minutes and 30 of a lent GPU."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.gpu_session", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output folder (default: perf/results/<gpu>/)")
    parser.add_argument("--archive", type=Path, help="also pack the output folder and the table into this .tar.gz")
    parser.add_argument("--skip", action="append", choices=STEPS, default=[], help="leave a step out (repeatable)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU here: python -m perf.gpu_session measures on a GPU", file=sys.stderr)
        return 1
    from autotune_cache.keys import gpu_name

    gpu = gpu_name(torch.device("cuda"))
    out = (args.out or REPO / "perf" / "results" / gpu).resolve()
    out.mkdir(parents=True, exist_ok=True)
    table = REPO / "autotune_cache" / "tables" / f"{gpu}.json"
    session = Session(out, gpu, table)
    for step in STEPS:
        if step not in args.skip:
            session.run(step)
    summary = session.summary()
    (out / "summary.md").write_text(summary)
    print(summary)
    if args.archive:
        with tarfile.open(args.archive, "w:gz") as archive:
            archive.add(out, arcname=out.relative_to(REPO) if out.is_relative_to(REPO) else out.name)
            if table.exists():
                archive.add(table, arcname=table.relative_to(REPO))
        print(f"packed {out} and {table.name} into {args.archive}")
    return 0 if all(ok for ok, _ in session.results.values()) else 1


class Session:
    """The steps of one session and what each left: (ok, seconds) by step."""

    def __init__(self, out: Path, gpu: str, table: Path):
        self.out, self.gpu, self.table = out, gpu, table
        self.cache_dir = out / "autotune-cache"
        self.results: dict[str, tuple[bool, float]] = {}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.env.pop("TRITON_INTERPRET", None)

    def run(self, step: str) -> None:
        start = time.monotonic()
        print(f"== {step}", flush=True)
        (self.out / f"{step}.log").write_text("")
        try:
            ok = getattr(self, f"step_{step}")()
        except Exception as error:  # noqa: BLE001 - a failed step is reported, the session goes on
            (self.out / f"{step}.log").open("a").write(f"\n{type(error).__name__}: {error}\n")
            ok = False
        self.results[step] = (ok, time.monotonic() - start)
        print(f"== {step}: {'ok' if ok else 'FAILED'} in {self.results[step][1]:.0f} s", flush=True)

    def _command(self, step: str, command: list[str], env: dict | None = None) -> bool:
        with (self.out / f"{step}.log").open("a") as log:
            try:
                done = subprocess.run(command, cwd=REPO, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=STEP_TIMEOUT_S[step])
            except subprocess.TimeoutExpired:
                log.write(f"\ntimed out after {STEP_TIMEOUT_S[step]} s\n")
                return False
        return done.returncode == 0

    def step_tests(self) -> bool:
        try:
            import xdist  # noqa: F401

            parallel = ["-n", str(min(8, os.cpu_count() or 1))]
        except ImportError:
            parallel = []
        return self._command("tests", [sys.executable, "-m", "pytest", "-q", *parallel, "-rs",
                                       f"--junitxml={self.out / 'tests.xml'}"])

    def step_tune(self) -> bool:
        from .grids import GRIDS

        env = {**self.env, "ATOMCONV_CACHE_DIR": str(self.cache_dir)}
        env.pop("ATOMCONV_AUTOTUNE", None)
        shapes = []
        for p in GRIDS["gpu"].points():
            shapes += ["--shape", f"{p.batch},{p.channels},{p.channels},{p.size},{p.size},{p.kernel_size},{p.num_atoms}"]
        tuned = self._command("tune", [sys.executable, "-m", "autotune_cache", "clear"], env) and \
            self._command("tune", [sys.executable, "-m", "autotune_cache", "tune", *shapes, "--dtype", "float16"], env)
        exported = tuned and subprocess.run([sys.executable, "-m", "autotune_cache", "export", "--out", str(self.table)],
                                            cwd=REPO, env=env, capture_output=True, text=True).returncode == 0
        return tuned and exported

    def step_sweep(self) -> bool:
        env = {**self.env, "ATOMCONV_CACHE_DIR": str(self.cache_dir)}
        return self._command("sweep", [sys.executable, "-m", "perf", "--grid", "gpu", "--out", str(self.out)], env)

    def step_kernels(self) -> bool:
        # K=3 first, each kernel size in a process of its own: 7x7 kernels take minutes to compile,
        # and a K=7 timing that runs out of time must not lose the K=3 one.
        env = {**self.env, "ATOMCONV_CACHE_DIR": str(self.cache_dir)}
        static = self._command("kernels", [sys.executable, "-m", "perf.static_report", "--defaults-only", "--k", "3",
                                           "--jobs", str(min(8, os.cpu_count() or 1)),
                                           "--json", str(self.out / "static_report.json")], env)
        timed = [self._command("kernels", [sys.executable, "-m", "perf.kernel_times", "--k", str(k),
                                           "--json", str(self.out / "kernel_times.json")], env) for k in (3, 7)]
        return static and all(timed)

    def summary(self) -> str:
        from .gpu_summary import summarise

        return summarise(self.out, f"{torch.cuda.get_device_name()} ({self.gpu})", self.results, self.table)


if __name__ == "__main__":
    sys.exit(main())
