"""Packaging: the sdist carries its tests, licence and type marker; the version and licence
metadata; a foreign top-level `kernels` package (Hugging Face's) is recognised and named."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from unittest import mock

import pytest

import atomconv
from atomconv import triton_backend

ROOT = Path(__file__).parents[1]


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0,)


@pytest.mark.skipif(_setuptools_version() < (77,), reason="building needs setuptools >= 77 (PEP 639 licence metadata)")
def test_sdist_carries_tests_licence_and_type_marker(tmp_path):
    """Build the sdist (setuptools' PEP 517 hook, no network) from a copy of the source tree."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "dist", "demo_out", "perf_out", ".pytest_cache"))
    out = tmp_path / "dist"
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    name = result.stdout.strip().splitlines()[-1]
    assert name == f"atomconv-{atomconv.__version__}.tar.gz"
    prefix = f"atomconv-{atomconv.__version__}/"
    with tarfile.open(out / name) as sdist:
        members = {m.removeprefix(prefix) for m in sdist.getnames()}
        metadata = sdist.extractfile(prefix + "PKG-INFO").read().decode()
    for needed in ("tests/conftest.py", "tests/helpers.py", "tests/distributed_worker.py", "tests/test_layer.py",
                   "LICENSE", "CHANGELOG.md", "atomconv/py.typed", "docs/design.md", "kernels/__init__.py"):
        assert needed in members, needed
    lines = metadata.splitlines()
    assert "License-Expression: MIT" in lines and "License-File: LICENSE" in lines
    assert not any(line.startswith("License: ") for line in lines)  # the deprecated field
    assert "Classifier: License" not in metadata


def test_version_is_a_release_number():
    parts = atomconv.__version__.split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts)
    assert "__version__" in atomconv.__all__


def test_our_kernels_package_is_recognised():
    import kernels

    assert triton_backend.triton_kernels() is kernels and kernels.ATOMCONV_KERNELS is True


def test_a_foreign_kernels_package_is_named_with_the_way_out(tmp_path):
    """A `kernels` package that shadows ours (as Hugging Face's does once installed): the Triton
    path refuses it with a message naming the clash; the reference path still works."""
    foreign = tmp_path / "kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text('"""Not atomconv\'s."""\n\ndef get_kernel(name):\n    return name\n')
    code = (
        "import torch; from atomconv import atom_conv2d\n"
        "args = (torch.randn(1, 2, 5, 5), torch.randn(1, 4, 3, 3), torch.randn(2, 3, 3), torch.randn(3, 2, 2))\n"
        "print(tuple(atom_conv2d(*args, backend='reference').shape))\n"
        "atom_conv2d(*args, backend='triton')\n"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "(1, 3, 3, 3)" in result.stdout
    assert "KernelsPackageClash" in result.stderr and f"another package, from {foreign / '__init__.py'}" in result.stderr
    assert "Hugging Face's PyPI package `kernels`" in result.stderr and "pip uninstall kernels" in result.stderr


def test_a_missing_kernels_package_is_named():
    triton_backend.triton_kernels.cache_clear()
    try:
        missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
        with mock.patch.object(triton_backend.importlib, "import_module", side_effect=missing):
            with pytest.raises(triton_backend.KernelsPackageClash, match="imports nothing"):
                triton_backend.triton_kernels()
    finally:
        triton_backend.triton_kernels.cache_clear()
