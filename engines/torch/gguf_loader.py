"""Read a GGUF file (llama.cpp's single-file format) into our Llama-family model.

A GGUF holds the architecture hyper-parameters and the tokenizer as metadata (`llama.block_count`,
`tokenizer.ggml.tokens`, ...) and the weights as tensors, possibly block-quantized. Here:

- `GGUFFile` opens the file (memory-mapped by `gguf.GGUFReader`) and reads typed metadata.
- `model_config_from_gguf` maps the metadata to our `ModelConfig`.
- `load_gguf_weights` dequantizes every tensor with `gguf.quants.dequantize` (F32, F16, BF16,
  Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...) to the serving dtype and copies it into the model under
  its Hugging Face name; given the CPU kernels (engines/torch/kernels/), Q4_1 and Q8_0 linear and
  embedding weights instead stay in their blocks.

llama.cpp's converter permutes the rows of the q and k projections of "llama"-architecture files
so that rotary embedding pairs adjacent dimensions (GPT-J style, its "NORM" rope) instead of the
two halves of each head (the Hugging Face "rotate half" layout our model uses). Loading undoes it:
within each head, row 2*i + j of the file is row j*head_dim/2 + i of the original. Qwen2/Qwen3
files keep the original layout (llama.cpp runs them with "NEOX" rope), so nothing is undone.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenrelay_engines.torch.kernels.blocks import BLOCK_BYTES, BlockQuantEmbedding, BlockQuantLinear, BlockWeight
from tokenrelay_engines.torch.kernels.native import CpuKernels
from tokenrelay_engines.torch.shapes import ModelConfig

log = logging.getLogger(__name__)

# GGUF architecture name -> our model_type. Mistral files are written as "llama" (see `_model_type`).
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
_PERMUTED_QK = ("llama",)  # architectures whose files carry llama.cpp's q/k row permutation

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_IGNORED = ("rope_freqs.weight",)  # llama 3.1 rope factors: not applied (see model_config_from_gguf)


def is_gguf(path: str | Path) -> bool:
    """A path names a GGUF file: by suffix, or by the 4-byte magic for a file without one."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"


def _reader(path: Path):
    """A gguf.GGUFReader that parses metadata from a plain ndarray view of its memory map.

    The stock reader slices a np.memmap once per metadata part (3 per vocabulary entry), and each
    memmap slice costs a Python-level __array_finalize__: 8.6 s for SmolLM2's 49k-entry vocabulary,
    2.4 s through the ndarray view (same bytes, same mapping).
    """
    from gguf import GGUFReader  # the `gguf` package: imported only when a GGUF is served

    class _Reader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            if isinstance(self.data, np.memmap):
                self.data = self.data.view(np.ndarray)
            return super()._get(offset, dtype, count, override_order)

    return _Reader(str(path))


class GGUFFile:
    """One GGUF file's metadata (decoded to Python values on demand) and tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist (nothing is downloaded)")
        try:
            self.reader = _reader(self.path)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{self.path.name} is not a readable GGUF file: {exc}") from exc
        self.architecture = str(self.get("general.architecture", ""))

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def arch(self, key: str, default: Any = None) -> Any:
        """An architecture-scoped key: `arch("block_count")` reads `llama.block_count`."""
        return self.get(f"{self.architecture}.{key}", default)

    def raw_array(self, key: str) -> np.ndarray | None:
        """A numeric array field as one numpy array (fast for 100k-entry token type lists)."""
        field = self.reader.fields.get(key)
        if field is None:
            return None
        if not field.data:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([field.parts[i] for i in field.data])

    @property
    def tensor_names(self) -> set[str]:
        return {t.name for t in self.reader.tensors}


def _model_type(gguf: GGUFFile) -> str:
    arch = gguf.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{gguf.path.name}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {sorted(GGUF_ARCHITECTURES)}")
    # llama.cpp writes Mistral models as "llama"; the name is the only trace (as transformers reads it).
    if arch == "llama" and "mistral" in str(gguf.get("general.name", "")).lower():
        return "mistral"
    return GGUF_ARCHITECTURES[arch]


def model_config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """Our ModelConfig from a GGUF's metadata (token ids from the tokenizer keys)."""
    model_type = _model_type(gguf)

    def need(key: str) -> Any:
        value = gguf.arch(key)
        if value is None:
            raise ValueError(f"{gguf.path.name}: metadata {gguf.architecture}.{key} is missing")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    kv_heads = gguf.arch("attention.head_count_kv")
    head_dim = gguf.arch("attention.key_length") or gguf.arch("rope.dimension_count") or hidden // heads
    vocab = gguf.arch("vocab_size")
    if vocab is None:
        tokens = gguf.reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"{gguf.path.name}: neither {gguf.architecture}.vocab_size nor a vocabulary")
        vocab = len(tokens.data)
    names = gguf.tensor_names
    if "rope_freqs.weight" in names:
        log.warning("%s carries rope frequency factors (Llama 3.1 style); they are not applied",
                    gguf.path.name)
    if gguf.arch("rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{gguf.path.name}: rope scaling {gguf.arch('rope.scaling.type')!r} is not supported")
    eos = _eos_ids(gguf, int(vocab))
    bos = gguf.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads or heads),
        head_dim=int(head_dim),
        max_position_embeddings=int(need("context_length")),
        rms_norm_eps=float(gguf.arch("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gguf.arch("rope.freq_base", 10000.0)),
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos,
    )


def _eos_ids(gguf: GGUFFile, vocab: int) -> tuple[int, ...]:
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = gguf.get(key)
        if value is not None and 0 <= int(value) < vocab and int(value) not in ids:
            ids.append(int(value))
    return tuple(ids)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name of a GGUF tensor; None for tensors we do not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _IGNORED:
        return None
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows (i, j) for pair i, half j -> (j, i)."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    w = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _qk_heads(gguf: GGUFFile, config: ModelConfig, gguf_name: str) -> int | None:
    """Heads to un-permute a q/k tensor by (llama.cpp's row order), or None when it is not one."""
    if gguf.architecture not in _PERMUTED_QK:
        return None
    if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        return config.num_attention_heads
    if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        return config.num_key_value_heads
    return None


def dequantized(gguf: GGUFFile, config: ModelConfig, tensor) -> np.ndarray:
    """A tensor as float32 in the Hugging Face layout."""
    from gguf import GGMLQuantizationType, dequantize

    try:
        array = dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type))
    except NotImplementedError as exc:
        raise ValueError(f"{tensor.name}: {exc}") from None
    if tensor.tensor_type == GGMLQuantizationType.BF16 or array.dtype != np.float32:
        array = array.astype(np.float32)
    heads = _qk_heads(gguf, config, tensor.name)
    return unpermute_qk(array, heads) if heads is not None else array


def block_weight(gguf: GGUFFile, config: ModelConfig, tensor) -> BlockWeight | None:
    """A 2-D Q4_1 / Q8_0 tensor's blocks in the Hugging Face row order; None for other types."""
    from gguf import GGMLQuantizationType

    kind = GGMLQuantizationType(tensor.tensor_type).name
    if kind not in BLOCK_BYTES or len(tensor.shape) != 2:
        return None
    rows = int(tensor.shape[1])  # GGUF lists dimensions innermost first: [K, N]
    weight = BlockWeight.from_gguf(kind, tensor.data, rows)
    heads = _qk_heads(gguf, config, tensor.name)
    if heads is not None:
        weight = weight.permute_rows(torch.from_numpy(unpermute_qk(np.arange(rows), heads)))
    return weight


def _keep_quantized(model: torch.nn.Module, name: str, weight: BlockWeight, kernels: CpuKernels) -> bool:
    """Swap the linear or embedding that owns `name` for its block-quantized form."""
    path = name.removesuffix(".weight")
    if path == name:
        return False
    module = model.get_submodule(path)
    if isinstance(module, torch.nn.Linear):
        replacement: torch.nn.Module = BlockQuantLinear(weight, kernels, bias=module.bias,
                                                       dtype=module.weight.dtype)
    elif isinstance(module, torch.nn.Embedding):
        replacement = BlockQuantEmbedding(weight, module.weight.dtype)
    else:
        return False
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, replacement)
    return True


def load_gguf_weights(model: torch.nn.Module, gguf: GGUFFile, config: ModelConfig,
                      progress: Callable[[Iterator], Iterator] | None = None,
                      kernels: CpuKernels | None = None) -> int:
    """Fill `model` from the file; raises on a missing or misshapen weight. With `kernels`, linear
    and embedding weights stored as Q4_1 / Q8_0 stay in their blocks (`kernels.blocks`); every other
    tensor is dequantized to the model's dtype. Returns the count of tensors kept quantized."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    tensors = gguf.reader.tensors
    for tensor in (progress(tensors) if progress is not None else tensors):
        name = hf_name(tensor.name)
        if name is None:
            continue
        if name not in params:
            raise ValueError(f"{gguf.path.name}: weight {name!r} does not fit a {config.model_type} model")
        param = params[name]
        weight = block_weight(gguf, config, tensor) if kernels is not None else None
        if weight is not None:
            shape = (weight.out_features, weight.in_features)
        else:
            array = dequantized(gguf, config, tensor)
            shape = tuple(array.shape)
        if shape != tuple(param.shape):
            raise ValueError(f"{gguf.path.name}: {name} has shape {shape}, expected {tuple(param.shape)}")
        if weight is None or not _keep_quantized(model, name, weight, kernels):
            if weight is not None:
                array = dequantized(gguf, config, tensor)
            if not array.flags.writeable:  # F32 tensors come back as views of the read-only mapping
                array = array.copy()
            param.copy_(torch.from_numpy(array))
        loaded.add(name)
    if config.tie_word_embeddings:
        loaded.add("lm_head.weight")
        embed = model.get_submodule("model.embed_tokens")
        if isinstance(embed, BlockQuantEmbedding):  # the output layer reads the same blocks
            model.lm_head = BlockQuantLinear(embed.weight, kernels, dtype=embed.dtype)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{gguf.path.name} is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return sum(isinstance(m, (BlockQuantLinear, BlockQuantEmbedding)) for m in model.modules())


def progress_bar(total: int, desc: str) -> Callable[[Iterator], Iterator]:
    """A tqdm progress bar on stderr while the tensors are dequantized."""
    from tqdm import tqdm

    def wrap(items: Iterator) -> Iterator:
        return iter(tqdm(items, total=total, desc=desc, unit="tensor", file=sys.stderr,
                         mininterval=0.25, leave=False))

    return wrap
