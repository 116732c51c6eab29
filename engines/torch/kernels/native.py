"""Build the C kernels (matmul.c, ops.c) with the system C compiler on first use, cache the
library, load it with ctypes.

The library goes to `$XDG_CACHE_HOME/tokenrelay/kernels` (default `~/.cache/...`; the system
temporary directory when that is not writable), named by a hash of the sources and flags, so a
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenrelay_engines.torch.cpu import cpu_flags

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("matmul.c", "ops.c"))
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")  # fma only where written
REQUIRED_CPU_FLAGS = ("avx2", "fma")

_P, _I = ctypes.c_void_p, ctypes.c_int64
_F = ctypes.c_float
_SIGNATURES = {
    "tr_quantize_q16": [_P, _I, _I, _P, _P, _P],
    "tr_q4_1_linear": [_P, _I, _I, _P, _P, _P, _I, _P],
    "tr_q8_0_linear": [_P, _I, _I, _P, _P, _I, _P],
    "tr_rms_norm": [_P, _I, _I, _P, _F, _P],
    "tr_silu_mul": [_P, _I, _I, _P],
    "tr_rope_store_kv": [_P, _I, _I, _I, _I, _P, _P, _P, _P, _I, _P],
    "tr_add_rms_norm": [_P, _P, _I, _I, _P, _F, _P],
    "tr_paged_attention": [_P, _I, _I, _I, _I, _P, _I, _I, _P, _I, _P, _F, _P],
    "tr_float_min_rows": [],
}
_RESTYPES = {"tr_q4_1_linear": ctypes.c_int, "tr_q8_0_linear": ctypes.c_int, "tr_paged_attention": ctypes.c_int,
             "tr_float_min_rows": ctypes.c_int}


@dataclass(frozen=True, slots=True)
class CpuKernels:
    """The loaded library's entry points (see matmul.c and ops.c for their contracts)."""

    library: ctypes.CDLL
    path: Path

    def quantize_q16(self, x: torch.Tensor, xq: torch.Tensor, dx: torch.Tensor, sx: torch.Tensor) -> None:
        self.library.tr_quantize_q16(x.data_ptr(), x.shape[0], x.shape[1], xq.data_ptr(), dx.data_ptr(),
                                    sx.data_ptr())

    def linear_fn(self, kind: str) -> Callable[..., int]:
        """The C entry for a weight format: fn(x, M, K, qs, d, [m,] N, y) -> 0 (or -1: out of memory),
        pointers as ints; y = x @ W^T with x float32 [M, K] and y float32 [M, N], both contiguous.
        Below `float_min_rows` rows x is rounded to 16 bits (integer path), from there on not."""
        return self.library.tr_q4_1_linear if kind == "Q4_1" else self.library.tr_q8_0_linear

    @property
    def float_min_rows(self) -> int:
        return self.library.tr_float_min_rows()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """rms_norm(x) * weight over the last dim (x float32 [T, H] contiguous, H % 8 == 0); with
        `residual`, first x += residual in place (the decoder's residual stream)."""
        out = torch.empty_like(x)
        if residual is None:
            self.library.tr_rms_norm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr())
        else:
            self.library.tr_add_rms_norm(x.data_ptr(), residual.data_ptr(), x.shape[0], x.shape[1],
                                         weight.data_ptr(), eps, out.data_ptr())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up from gate_up float32 [T, 2I] contiguous (I % 8 == 0) -> [T, I]."""
        rows, width = gate_up.shape
        out = torch.empty((rows, width // 2), dtype=torch.float32)
        self.library.tr_silu_mul(gate_up.data_ptr(), rows, width // 2, out.data_ptr())
        return out

    def rope_store_kv(self, qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor,
                      sin_folded: torch.Tensor, slots: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """From qkv float32 [T, (heads + 2 kv_heads) * dim]: rotary q [T, heads, dim] returned,
        rotary k and v written to kv_cache [2, blocks, block_size, kv_heads, dim] at `slots` (int64
        [T]); cos, sin_folded float32 [T, dim] (see models/llama.py apply_rope). All contiguous."""
        rows = qkv.shape[0]
        dim = kv_cache.shape[-1]
        q = torch.empty((rows, heads, dim), dtype=torch.float32)
        self.library.tr_rope_store_kv(qkv.data_ptr(), rows, heads, kv_heads, dim, cos.data_ptr(),
                                      sin_folded.data_ptr(), slots.data_ptr(), kv_cache.data_ptr(),
                                      kv_cache[0].numel(), q.data_ptr())
        return q

    def paged_attention(self, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """q float32 [D, heads, dim] (D query rows, each attending positions [0, context_lens[row]) of
        its block table) against kv_cache float32 [2, blocks, block_size, kv_heads, dim];
        block_tables int64 [D, n], context_lens int64 [D]; all contiguous."""
        rows, heads, dim = q.shape
        _, num_blocks, block_size, kv_heads, _ = kv_cache.shape
        out = torch.empty_like(q)
        status = self.library.tr_paged_attention(
            q.data_ptr(), rows, heads, kv_heads, dim, kv_cache.data_ptr(), num_blocks, block_size,
            block_tables.data_ptr(), block_tables.stride(0), context_lens.data_ptr(), scale, out.data_ptr())
        if status != 0:
            raise MemoryError("no memory for the attention scores")
        return out


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
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = directory / f"tokenrelay_kernels_{digest}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=target.stem, suffix=".so.partial", dir=directory)
    os.close(fd)
    try:
        subprocess.run([_compiler(), *FLAGS, *map(str, SOURCES), "-o", partial], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load_kernels() -> CpuKernels | None:
    reason = unsupported_reason()
    if reason is not None:
        log.info("CPU kernels off: %s", reason)
        return None
    errors = []
    for directory in _cache_dirs():
        try:
            path = _build(directory)
        except subprocess.CalledProcessError as exc:
            log.warning("CPU kernels off: %s failed: %s", _compiler(), exc.stderr.strip()[-2000:])
            return None
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{directory}: {exc}")
            continue
        library = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            getattr(library, name).argtypes = argtypes
            getattr(library, name).restype = _RESTYPES.get(name)
        return CpuKernels(library, path)
    log.warning("CPU kernels off: cannot build (%s)", "; ".join(errors))
    return None
