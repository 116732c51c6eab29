"""Build kernels.c with the system C compiler on first use, cache the library, load it with ctypes.

The library goes to `$XDG_CACHE_HOME/tokenrelay/kernels` (default `~/.cache/...`; the system
temporary directory when that is not writable), named by a hash of the source and flags, so a
changed source is rebuilt and concurrent processes never load a half-written file (write to a
temporary name, then rename). It links OpenMP: loaded after torch, it shares torch's OpenMP runtime
(same soname) and so its threads. Calls through ctypes release the GIL.

`load_kernels()` returns None, with the reason logged, where the kernels cannot run: not x86-64,
no AVX2 + FMA, no C compiler, or a failed build. Callers then keep dense float weights.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenrelay_engines.torch.cpu import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = ("avx2", "fma")

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "tr_quantize_q8": [_P, _I, _I, _P, _P, _P],
    "tr_q4_1_matmul": [_P, _P, _P, _I, _I, _P, _P, _P, _I, _P],
    "tr_q8_0_matmul": [_P, _P, _I, _I, _P, _P, _I, _P],
}


@dataclass(frozen=True, slots=True)
class QuantKernels:
    """The loaded library's entry points (see kernels.c for their contracts)."""

    library: ctypes.CDLL
    path: Path

    def quantize_q8(self, x: torch.Tensor, xq: torch.Tensor, dx: torch.Tensor, sx: torch.Tensor) -> None:
        self.library.tr_quantize_q8(x.data_ptr(), x.shape[0], x.shape[1], xq.data_ptr(), dx.data_ptr(),
                                    sx.data_ptr())

    def q4_1_matmul(self, xq: torch.Tensor, dx: torch.Tensor, sx: torch.Tensor, qs: torch.Tensor,
                    d: torch.Tensor, m: torch.Tensor, y: torch.Tensor) -> None:
        self.library.tr_q4_1_matmul(xq.data_ptr(), dx.data_ptr(), sx.data_ptr(), xq.shape[0], xq.shape[1],
                                    qs.data_ptr(), d.data_ptr(), m.data_ptr(), qs.shape[0], y.data_ptr())

    def q8_0_matmul(self, xq: torch.Tensor, dx: torch.Tensor, qs: torch.Tensor, d: torch.Tensor,
                    y: torch.Tensor) -> None:
        self.library.tr_q8_0_matmul(xq.data_ptr(), dx.data_ptr(), xq.shape[0], xq.shape[1], qs.data_ptr(),
                                    d.data_ptr(), qs.shape[0], y.data_ptr())


def unsupported_reason(flags: set[str] | None = None) -> str | None:
    """Why the kernels cannot run on this machine, or None when they can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    flags = cpu_flags() if flags is None else flags
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if shutil.which(_compiler()) is None:
        return f"no C compiler ({_compiler()!r}; set CC)"
    return None


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def _cache_dirs() -> list[Path]:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [base / "tokenrelay" / "kernels", Path(tempfile.gettempdir()) / "tokenrelay-kernels"]


def _build(directory: Path) -> Path:
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = directory / f"tokenrelay_quant_{digest}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=target.stem, suffix=".so.partial", dir=directory)
    os.close(fd)
    try:
        subprocess.run([_compiler(), *FLAGS, str(SOURCE), "-o", partial], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load_kernels() -> QuantKernels | None:
    reason = unsupported_reason()
    if reason is not None:
        log.info("block-quantized CPU kernels off: %s", reason)
        return None
    errors = []
    for directory in _cache_dirs():
        try:
            path = _build(directory)
        except subprocess.CalledProcessError as exc:
            log.warning("block-quantized CPU kernels off: %s failed: %s", _compiler(), exc.stderr.strip()[-2000:])
            return None
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{directory}: {exc}")
            continue
        library = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            getattr(library, name).argtypes = argtypes
            getattr(library, name).restype = None
        return QuantKernels(library, path)
    log.warning("block-quantized CPU kernels off: cannot build (%s)", "; ".join(errors))
    return None
