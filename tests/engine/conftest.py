"""Fixtures for the engine tests: tiny random model directories, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .model_factory import build_model_dir


class TinyModels:
    """variant -> (model directory, transformers reference model), built on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, tuple[Path, object]] = {}

    def get(self, variant: str) -> tuple[Path, object]:
        if variant not in self._built:
            path = self.root / variant
            self._built[variant] = (path, build_model_dir(path, variant))
        return self._built[variant]

    def path(self, variant: str) -> Path:
        return self.get(variant)[0]

    def reference(self, variant: str):
        return self.get(variant)[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def kernels():
    """The CPU C kernels (engines/torch/kernels/); the test skips where they cannot run."""
    from tokenrelay_engines.torch.kernels import native

    reason = native.unsupported_reason()
    if reason is not None:
        pytest.skip(f"the CPU kernels cannot run here: {reason}")
    loaded = native.load_kernels()
    assert loaded is not None, "the kernels should build on a machine with AVX2, FMA and a C compiler"
    return loaded
