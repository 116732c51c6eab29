"""GGUF block-quantized weights on the CPU: Q4_1 / Q8_0 blocks kept as stored, run by small AVX2
kernels (kernels.c, built on first use by native.py) with 16-bit integer activations."""
