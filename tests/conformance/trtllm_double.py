"""The TensorRT-LLM test double (tests/doubles/tensorrt_llm) and a compiled-engine directory for it.

`installed()` puts the double into `sys.modules` as `tensorrt_llm` for the duration of a `with`
block only; `real_library()` says whether TensorRT-LLM itself imports (then the suite runs against
it too, GPU-marked, on the engine directory named by TOKENRELAY_TEST_TRTLLM_ENGINE_DIR).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from types import ModuleType

DOUBLE_ROOT = Path(__file__).resolve().parents[1] / "doubles" / "tensorrt_llm"
REAL_ENGINE_DIR_ENV = "TOKENRELAY_TEST_TRTLLM_ENGINE_DIR"
_NAMES = ("tensorrt_llm", "tensorrt_llm.bindings", "tensorrt_llm.bindings.executor",
          "tensorrt_llm.bindings._runtime")


@contextlib.contextmanager
def installed() -> Iterator[ModuleType]:
    """The double as `tensorrt_llm`; yields `tensorrt_llm.bindings.executor`. Restores sys.modules."""
    saved = {name: sys.modules.get(name) for name in _NAMES}
    spec = importlib.util.spec_from_file_location("tensorrt_llm", DOUBLE_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(DOUBLE_ROOT)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["tensorrt_llm"] = package
    try:
        spec.loader.exec_module(package)
        yield importlib.import_module("tensorrt_llm.bindings.executor")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def real_library() -> bool:
    if "tensorrt_llm" in sys.modules and getattr(sys.modules["tensorrt_llm"], "__file__", "").startswith(
            str(DOUBLE_ROOT)):
        return False
    return importlib.util.find_spec("tensorrt_llm") is not None and bool(os.environ.get(REAL_ENGINE_DIR_ENV))


def write_engine_dir(path: Path, *, max_seq_len: int = 512, max_input_len: int = 256, max_batch_size: int = 8,
                     tokens_per_block: int = 16) -> Path:
    """A directory shaped like trtllm-build's output (config.json; no engine file: the double needs
    none) with the demo model's Hugging Face tokenizer beside it."""
    path.mkdir(parents=True, exist_ok=True)
    demo = Path(str(resources.files("tokenrelay_engines.torch").joinpath("demo_model")))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (demo / name).is_file():
            shutil.copy(demo / name, path / name)
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"]
    config = {
        "version": "1.2.0",
        "pretrained_config": {"architecture": "LlamaForCausalLM", "dtype": "float32", "vocab_size": vocab,
                              "max_position_embeddings": max_seq_len},
        "build_config": {"max_input_len": max_input_len, "max_seq_len": max_seq_len,
                         "max_batch_size": max_batch_size, "max_beam_width": 1, "max_num_tokens": 1024,
                         "plugin_config": {"tokens_per_block": tokens_per_block}},
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
