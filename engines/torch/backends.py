"""Device and attention-backend selection for the reference engine.

`--device auto` is CUDA when a GPU is present, else the CPU. On CUDA the attention backend is
the Triton paged-attention one when Triton imports (it ships with CUDA builds of torch), else the
portable TorchAttention; on the CPU it is always TorchAttention.
"""

from __future__ import annotations

import importlib.util

import torch

from tokenrelay_engines.torch.attention import AttentionBackend, TorchAttention


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return resolved


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def default_attention(device: torch.device) -> AttentionBackend:
    if device.type == "cuda" and triton_available():
        from tokenrelay_engines.torch.triton_attention import TritonAttention

        return TritonAttention()
    return TorchAttention()
