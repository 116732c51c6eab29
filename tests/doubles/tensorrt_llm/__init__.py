"""Test double of the `tensorrt_llm` package: only `tensorrt_llm.bindings.executor` (see ../README.md)."""

__version__ = "1.2.0"
