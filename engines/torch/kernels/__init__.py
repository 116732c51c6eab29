"""C kernels for float32 steps on x86-64 CPUs with AVX2 + FMA, built on first use (native.py):
GGUF Q4_1 / Q8_0 weights kept in their blocks (matmul.c, blocks.py) and a decoder step's small
operations, one call per layer each (ops.c)."""
