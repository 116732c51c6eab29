"""Tiny random Llama-family model directories, saved for real with transformers + tokenizers."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB_SIZE = 384
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "tokenrelay serves large language models over grpc",
    "paged attention keeps the kv cache in fixed size blocks",
    "continuous batching mixes prefill chunks with decode tokens",
    "hello world, hello tokens; streaming text as it is produced",
] * 8

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB_SIZE, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)

VARIANTS = ("llama", "llama3", "mistral", "qwen2", "qwen3", "tied")


def hf_config(variant: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if variant == "llama":
        return LlamaConfig(**_COMMON)
    if variant == "llama3":
        return LlamaConfig(**_COMMON, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
    if variant == "mistral":
        return MistralConfig(**_COMMON, head_dim=16, sliding_window=None, rope_theta=1000000.0)
    if variant == "qwen2":
        return Qwen2Config(**_COMMON, use_sliding_window=False)
    if variant == "qwen3":
        return Qwen3Config(**_COMMON, head_dim=16, use_sliding_window=False)
    if variant == "tied":
        return LlamaConfig(**_COMMON, tie_word_embeddings=True)
    raise ValueError(variant)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 8, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def build_model_dir(path: Path, variant: str, seed: int = 0):
    """Save a random tiny model of `variant` to `path`; returns the transformers model (float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(variant), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # not all ones, so the norm weights are really loaded
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:  # larger than the default init: well-separated logits, no near-ties in greedy
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer().save(str(path / "tokenizer.json"))
    return model
