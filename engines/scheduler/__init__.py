"""Iteration-level continuous batching: plain Python state, no tensors."""
