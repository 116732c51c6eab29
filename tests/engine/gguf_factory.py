"""Small GGUF files written in the test with gguf.GGUFWriter, the way llama.cpp's converter lays them out.

From a tiny transformers model (tests/engine/model_factory.py): llama.cpp's tensor names, the q/k
row permutation for "llama"-architecture files (rotary pairs interleaved), 1-D norms in F32 and
2-D weights in the requested type (quantized with gguf.quants). K-quant types (Q4_K, Q6_K) have
no quantizer in gguf-py, so those weights are random blocks with a sane f16 scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "tied": "llama"}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: per head, the two rotary halves become interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_quant_blocks(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    import gguf

    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    scale = np.array([0.004], dtype=np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin (f16) lead the block
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = scale
    else:  # Q6_K: d (f16) ends the block
        blocks[:, -2:] = scale
    return blocks.reshape(rows, cols // 256 * block_bytes)


def write_tokenizer(writer, tokenizer_json: dict, *, pre: str = "default", chat_template: str | None = None,
                    add_bos: bool = False) -> None:
    """A byte-level BPE tokenizer.json (tokenizers) as llama.cpp's "gpt2" tokenizer metadata."""
    vocab = tokenizer_json["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    tokens = [""] * (max([*vocab.values(), *added.values()]) + 1)
    for t, i in {**vocab, **added}.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(added.get("<s>", 1))
    writer.add_eos_token_id(added.get("</s>", 2))
    writer.add_add_bos_token(add_bos)
    if chat_template:
        writer.add_chat_template(chat_template)


def write_gguf(path: Path, hf_model, variant: str, qtype_name: str, tokenizer_json: dict,
               *, seed: int = 0, name: str | None = None, chat_template: str | None = None) -> Path:
    import gguf

    cfg = hf_model.config
    arch = GGUF_ARCH[variant]
    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name or f"tiny-{variant}")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    w.add_rope_freq_base(float(theta))
    w.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(qtype) if qtype_name not in ("F32",) else 0)
    write_tokenizer(w, tokenizer_json, chat_template=chat_template)
    rng = np.random.default_rng(seed)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, param in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        name_ = gguf_name(hf_name)
        data = param.detach().float().numpy().copy()
        if arch == "llama" and name_.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, heads)
        elif arch == "llama" and name_.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, kv_heads)
        if data.ndim == 1 or qtype_name == "F32":
            w.add_tensor(name_, data.astype(np.float32))
        elif qtype_name == "F16":
            w.add_tensor(name_, data.astype(np.float16))
        elif qtype_name in ("Q4_K", "Q6_K"):
            w.add_tensor(name_, _k_quant_blocks(data.shape[0], data.shape[1], qtype, rng), raw_dtype=qtype)
        else:  # the byte shape: the writer derives the element shape from it
            w.add_tensor(name_, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tokenizer_json_of(model_dir: Path) -> dict:
    return json.loads((model_dir / "tokenizer.json").read_text())
