"""What the CPU offers the reference engine: bf16 matmul units, physical cores, thread setup."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

# Instruction sets that make bf16 matmuls faster than fp32 (Intel AMX, AVX-512 BF16 on Intel
# and AMD Zen 4+). Without them torch emulates bf16 on CPU and fp32 is the faster choice.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    return any(flag in cpu_flags(cpuinfo) for flag in BF16_CPU_FLAGS)


def physical_cores(cpuinfo: str | None = None) -> int:
    """Cores this process may run on, counting hyper-threads of one core once."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return usable
    cores, physical = set(), "0"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            cores.add((physical, value.strip()))
    return max(1, min(usable, len(cores) or usable))


def configure_threads(num_threads: int, reserved_cores: int = 0) -> int:
    """Intra-op threads = `num_threads` (0: OpenMP's standard OMP_NUM_THREADS when set, else the
    physical cores less `reserved_cores`, at least one); one inter-op thread (the engine runs one
    step at a time, so a second pool would only compete for the same cores). Returns the
    intra-op thread count in effect.

    Why reserve: OpenMP threads spin at each parallel region's barrier. When another busy process
    of the server (a front end) takes one of the cores, the thread that lost its core stalls every
    region; measured on a 2-core box, the demo model through gRPC fell from ~1,750 to ~60 tokens/s.
    """
    omp = os.environ.get("OMP_NUM_THREADS", "")
    want = num_threads or (int(omp) if omp.isdigit() and int(omp) > 0
                           else max(1, physical_cores() - reserved_cores))
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable before the first inter-op work of the process
            logging.getLogger(__name__).debug("inter-op threads already fixed at %d",
                                              torch.get_num_interop_threads())
    return torch.get_num_threads()
