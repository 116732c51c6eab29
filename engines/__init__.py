"""Inference engines behind the engine contract of `engines.base`."""
