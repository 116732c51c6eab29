"""What the server needs to know about a compiled TensorRT-LLM engine directory, read without the library.

`trtllm-build` writes `config.json` beside the `rank*.engine` files:

    {"version": ..., "pretrained_config": {"architecture": ..., "vocab_size": ..., ...},
     "build_config": {"max_input_len": ..., "max_seq_len": ..., "max_batch_size": ...,
                      "max_num_tokens": ..., "plugin_config": {"tokens_per_block": ...}}}

The tokenizer is a Hugging Face `tokenizer.json` (in the engine directory or the `--tokenizer`
directory); end-of-sequence ids come from that directory's generation_config.json, config.json or
tokenizer_config.json, in that order, else from the same files in the engine directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

_DEFAULT_TOKENS_PER_BLOCK = 32  # trtllm-build's default plugin_config.tokens_per_block


@dataclass(slots=True, frozen=True)
class EngineDirInfo:
    name: str
    architecture: str
    vocab_size: int
    max_input_len: int
    max_seq_len: int
    max_batch_size: int
    max_num_tokens: int
    tokens_per_block: int
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.max_input_len, self.max_seq_len, self.max_batch_size,
               self.max_num_tokens, self.tokens_per_block) < 1:
            raise ValueError(f"engine {self.name}: sizes in config.json must be >= 1")
        if not self.eos_token_ids:
            raise ValueError(f"engine {self.name}: no end-of-sequence token id found")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def eos_token_ids(tokenizer_dir: Path, tokenizer: Tokenizer) -> tuple[int, ...]:
    found: list[int] = []
    gen = _read_json(tokenizer_dir / "generation_config.json") or {}
    found += _ids(gen.get("eos_token_id"))
    hf = _read_json(tokenizer_dir / "config.json") or {}
    if "pretrained_config" not in hf:  # an engine's config.json carries no eos id
        found += _ids(hf.get("eos_token_id"))
    tok_cfg = _read_json(tokenizer_dir / "tokenizer_config.json") or {}
    eos = tok_cfg.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str) and tokenizer.token_to_id(eos) is not None:
        found.append(int(tokenizer.token_to_id(eos)))
    return tuple(dict.fromkeys(found))


def load_tokenizer(tokenizer_dir: Path) -> Tokenizer:
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{tokenizer_dir} has no tokenizer.json; pass --tokenizer with the "
                                "Hugging Face model directory the engine was built from")
    return Tokenizer.from_file(str(path))


def read_engine_dir(engine_dir: Path, tokenizer_dir: Path, tokenizer: Tokenizer) -> EngineDirInfo:
    config = _read_json(engine_dir / "config.json")
    if config is None or "build_config" not in config or "pretrained_config" not in config:
        raise FileNotFoundError(f"{engine_dir} is not a TensorRT-LLM engine directory "
                                "(no config.json with build_config and pretrained_config)")
    build, pretrained = config["build_config"], config["pretrained_config"]
    max_seq_len = int(build.get("max_seq_len") or pretrained.get("max_position_embeddings") or 0)
    plugin = build.get("plugin_config") or {}
    return EngineDirInfo(
        name=engine_dir.resolve().name,
        architecture=str(pretrained.get("architecture", "")),
        vocab_size=int(pretrained["vocab_size"]),
        max_input_len=int(build.get("max_input_len") or max_seq_len),
        max_seq_len=max_seq_len,
        max_batch_size=int(build.get("max_batch_size") or 1),
        max_num_tokens=int(build.get("max_num_tokens") or max_seq_len),
        tokens_per_block=int(plugin.get("tokens_per_block") or _DEFAULT_TOKENS_PER_BLOCK),
        eos_token_ids=eos_token_ids(tokenizer_dir, tokenizer) or eos_token_ids(engine_dir, tokenizer),
    )
