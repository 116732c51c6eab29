"""Test double of `tensorrt_llm.bindings` (a compiled extension in the real package)."""

from . import executor  # noqa: F401
