"""Load a Llama-family model: weights from a Hugging Face directory, or random for a named shape.

Nothing is ever downloaded. A model directory holds config.json, model.safetensors (or shards
listed by model.safetensors.index.json), and tokenizer.json (read with `tokenizers`). With
`load_format="dummy"` the weights are random (seeded), the shape comes from the directory's
config.json or from `dummy_shape`, and a byte-level tokenizer is built in code when the
directory has none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engines.config import TorchEngineConfig
from engines.torch.models import LlamaForCausalLM
from engines.torch.shapes import ModelConfig, named_shape

DEMO_MODEL_DIR = "demo_model"  # inside the engines.torch package
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(slots=True)
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    name: str
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a loaded model needs a name")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("float16 is not supported on CPU; use float32 or bfloat16")
    return _DTYPES[dtype]


def resolve_model_dir(config: TorchEngineConfig) -> Path | None:
    """The directory to read, or None for a named dummy shape."""
    if config.model:
        path = Path(config.model).expanduser()
    elif config.load_format == "dummy" and config.dummy_shape:
        return None
    else:
        path = Path(str(resources.files("engines.torch").joinpath(DEMO_MODEL_DIR)))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json (nothing is downloaded)")
    return path


def byte_level_tokenizer() -> Tokenizer:
    """256 byte tokens (id = byte value), then <s> = 256 and </s> = 257."""
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def _byte_alphabet() -> list[str]:
    """The printable stand-in for each byte 0..255 used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = 0
    chars = {}
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def load_model(config: TorchEngineConfig, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    model_dir = resolve_model_dir(config)
    if model_dir is None:
        shape = named_shape(config.dummy_shape)
        name = f"dummy-{config.dummy_shape}"
    else:
        shape = ModelConfig.from_hf_config(json.loads((model_dir / "config.json").read_text()))
        name = model_dir.name if config.model else "tokenrelay-demo"
    model = LlamaForCausalLM(shape, device=device, dtype=dtype, param_device="meta")
    model.to_empty(device=device)
    if shape.tie_word_embeddings:
        model.tie_weights()
    if config.load_format == "dummy":
        _init_dummy(model, config.seed, device)
    else:
        _load_safetensors(model, model_dir)
    model.eval()
    tokenizer_file = model_dir / "tokenizer.json" if model_dir is not None else None
    if tokenizer_file is not None and tokenizer_file.is_file():
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    elif config.load_format == "dummy":
        tokenizer = byte_level_tokenizer()
    else:
        raise FileNotFoundError(f"model directory {model_dir} has no tokenizer.json")
    eos = list(shape.eos_token_ids)
    gen_file = model_dir / "generation_config.json" if model_dir is not None else None
    if gen_file is not None and gen_file.is_file():
        gen_eos = json.loads(gen_file.read_text()).get("eos_token_id")
        for e in gen_eos if isinstance(gen_eos, list) else ([] if gen_eos is None else [gen_eos]):
            if int(e) not in eos and 0 <= int(e) < shape.vocab_size:
                eos.append(int(e))
    return LoadedModel(model=model, config=shape, tokenizer=tokenizer, name=name, eos_token_ids=tuple(eos))


def _init_dummy(model: LlamaForCausalLM, seed: int, device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model directory {model_dir} has no *.safetensors weights")
    return files


def _load_safetensors(model: LlamaForCausalLM, model_dir: Path) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for path in _weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.endswith(_IGNORED_SUFFIXES):
                    continue
                if key not in params:
                    raise ValueError(f"{path.name}: unexpected weight {key!r} for a {model.config.model_type} model")
                tensor = f.get_tensor(key)
                if tensor.shape != params[key].shape:
                    raise ValueError(f"{path.name}: {key} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(params[key].shape)}")
                params[key].copy_(tensor)
                loaded.add(key)
    if model.config.tie_word_embeddings:
        loaded.add("lm_head.weight")  # shares embed_tokens
        if "lm_head.weight" in params and "model.embed_tokens.weight" not in loaded:
            loaded.discard("model.embed_tokens.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"model directory {model_dir} is missing weights: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
