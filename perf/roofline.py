"""Roofline bound of the fused forward on known GPUs: docs/design.md §5's work and traffic against the
card's datasheet peaks.

The fused kernel does stages 1 and 2 (basis-to-atom, atom-times-features) as float32
elementwise multiply-adds on the CUDA cores and stage 3 (coefficient sum) as a `tl.dot` on the
tensor cores (kernels/forward.py). Those units and the memory system can all work at once, so
the bound is the slowest of the three: no fused forward can take less time than
max(2·MACs_1+2 / FP32 peak, 2·MACs_3 / tensor peak, minimum bytes / bandwidth).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from atomconv.validation import AtomConvGeometry
from kernels.launch import tf32_allowed

from .costs import atom_conv_macs_per_pixel, fused_forward_min_bytes


@dataclass(frozen=True)
class GpuPeaks:
    """Datasheet peaks of one card, dense (no structured sparsity)."""

    name: str
    fp16_tensor_tflops: float  # FP16 / BF16 on tensor cores
    tf32_tensor_tflops: float
    fp32_tflops: float  # CUDA cores
    bandwidth_tb_s: float  # memory bandwidth


# Numbers from NVIDIA's datasheets; they quote tensor-core figures "with sparsity", halved here.
# H100 Tensor Core GPU datasheet: SXM FP32 67, TF32 989*, FP16 1,979*, 3.35 TB/s;
#   PCIe FP32 51, TF32 756*, FP16 1,513*, 2 TB/s; NVL FP32 60, TF32 835*, FP16 1,671*, 3.9 TB/s.
# H200 Tensor Core GPU datasheet: SXM as H100 SXM with 4.8 TB/s; NVL as H100 NVL with 4.8 TB/s.
# A100 Tensor Core GPU datasheet: FP32 19.5, TF32 312*, FP16 624*; 80GB SXM 2,039 GB/s,
#   80GB PCIe 1,935 GB/s, 40GB 1,555 GB/s.
# Patterns match torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3" for the SXM card,
# "NVIDIA A100-SXM4-80GB"), first match wins, so the more specific names come first.
KNOWN_GPUS: tuple[tuple[str, GpuPeaks], ...] = (
    (r"h200 nvl", GpuPeaks("H200 NVL", 835.5, 417.5, 60.0, 4.8)),
    (r"h200", GpuPeaks("H200 SXM", 989.5, 494.5, 67.0, 4.8)),
    (r"h100 nvl", GpuPeaks("H100 NVL", 835.5, 417.5, 60.0, 3.9)),
    (r"h100 pcie", GpuPeaks("H100 PCIe", 756.5, 378.0, 51.0, 2.0)),
    (r"h100", GpuPeaks("H100 SXM", 989.5, 494.5, 67.0, 3.35)),
    (r"a100.*80gb.*pcie", GpuPeaks("A100 80GB PCIe", 312.0, 156.0, 19.5, 1.935)),
    (r"a100.*80gb", GpuPeaks("A100 80GB SXM", 312.0, 156.0, 19.5, 2.039)),
    (r"a100", GpuPeaks("A100 40GB", 312.0, 156.0, 19.5, 1.555)),
)


def known_gpu(device_name: str) -> GpuPeaks | None:
    """The peaks of the card torch calls `device_name`, or None for a card not in the table."""
    for pattern, peaks in KNOWN_GPUS:
        if re.search(pattern, device_name.lower()):
            return peaks
    return None


def fused_forward_bound_s(geo: AtomConvGeometry, dtype: torch.dtype, gpu: GpuPeaks) -> float:
    """Least time (s) a fused forward of this problem can take on `gpu`, inputs in `dtype`.
    float32 dots count as TF32 only where PyTorch's own matmul flag allows it (docs/design.md §6)."""
    macs = atom_conv_macs_per_pixel(geo)
    pixels = geo.batch * geo.out_size[0] * geo.out_size[1]
    if dtype in (torch.float16, torch.bfloat16):
        dot_tflops = gpu.fp16_tensor_tflops
    elif dtype == torch.float32 and tf32_allowed():
        dot_tflops = gpu.tf32_tensor_tflops
    else:
        dot_tflops = gpu.fp32_tflops
    elementwise_s = 2 * (macs.basis_to_atom + macs.atom_times_features) * pixels / (gpu.fp32_tflops * 1e12)
    dot_s = 2 * macs.coefficient_sum * pixels / (dot_tflops * 1e12)
    memory_s = fused_forward_min_bytes(geo, dtype.itemsize) / (gpu.bandwidth_tb_s * 1e12)
    return max(elementwise_s, dot_s, memory_s)
