"""TensorRT-LLM engine: compiled engine directories served by TensorRT-LLM's executor (GPU; optional extra)."""
