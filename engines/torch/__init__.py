"""Reference PyTorch engine: Llama-family runner over a paged KV cache."""
