"""What a cache entry is keyed by: the GPU's name, the kernel, the dtype and a shape bucket.

Shape bucket: every dimension of the layer's shape (`layer_shape`) rounded up to a power of
two, so the shapes of one bucket launch the same tile sizes (the kernels pad channels and atoms
to powers of two anyway). Distance between buckets: the sum over dimensions of |log2 a - log2 b|,
i.e. how many doublings apart they are; "nearest bucket" means the smallest such distance.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Mapping

import torch

from atomconv.validation import AtomConvGeometry

Bucket = tuple[tuple[str, int], ...]
"""A shape bucket: (dimension, power of two) pairs sorted by dimension name (hashable)."""


def normalise_gpu_name(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': lowercase, each run of other
    characters than letters and digits a single dash (a file-name-safe key)."""
    normalised = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not normalised:
        raise ValueError(f"GPU name must contain a letter or digit, got {name!r}")
    return normalised


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    return normalise_gpu_name(torch.cuda.get_device_name(index))


def gpu_name(device: torch.device) -> str | None:
    """The normalised name of the GPU `device` is on, or None when it is not a CUDA device.
    (Tests replace this function to pretend to have a GPU.)"""
    if device.type != "cuda":
        return None
    return _cuda_device_name(torch.cuda.current_device() if device.index is None else device.index)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> 'float16', the spelling stored in the files."""
    return str(dtype).removeprefix("torch.")


def layer_shape(geo: AtomConvGeometry) -> dict[str, int]:
    """The dimensions that decide which launch config of an ACDA kernel wins: input and output
    channels per group, output pixels (N*H_out*W_out), atoms M and taps KH*KW."""
    return {
        "c_in_g": geo.in_channels // geo.groups,
        "c_out_g": geo.out_channels // geo.groups,
        "pixels": geo.batch * geo.out_size[0] * geo.out_size[1],
        "atoms": geo.num_atoms,
        "taps": geo.kernel_size[0] * geo.kernel_size[1],
    }


def shape_bucket(shape: Mapping[str, int]) -> Bucket:
    """Each dimension rounded up to a power of two; every value must be a positive int."""
    for name, value in shape.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"shape must map dimension names to positive ints, got {name!r}: {value!r}")
    return tuple(sorted((name, 1 << (value - 1).bit_length()) for name, value in shape.items()))


def bucket_distance(a: Bucket, b: Bucket) -> float:
    """Doublings between two buckets of the same dimensions (inf when the dimensions differ)."""
    if [name for name, _ in a] != [name for name, _ in b]:
        return math.inf
    return sum(abs(math.log2(x) - math.log2(y)) for (_, x), (_, y) in zip(a, b))


def format_bucket(bucket: Bucket) -> str:
    """'atoms=8,c_in_g=64,...' for tables and messages."""
    return ",".join(f"{name}={value}" for name, value in bucket)
