"""Device and attention-backend selection for the reference engine.

`--device auto` is CUDA when a GPU is present, else the CPU. On CUDA the attention backend is
the Triton paged-attention one when Triton imports (it ships with CUDA builds of torch), else the
portable TorchAttention; on the CPU it is always TorchAttention.
"""

from __future__ import annotations

import importlib.util

import torch

from tokenrelay_engines.torch.attention import AttentionBackend, CpuKernelAttention, TorchAttention
from tokenrelay_engines.torch.kernels.native import CpuKernels


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def default_attention(device: torch.device, kernels: CpuKernels | None = None) -> AttentionBackend:
    if device.type == "cuda" and triton_available():
        from tokenrelay_engines.torch.triton_attention import TritonAttention

        return TritonAttention()
    if device.type == "cpu" and kernels is not None:
        return CpuKernelAttention(kernels)
    return TorchAttention()
