"""GGUF loading against transformers loading the same file: small synthetic files for each
architecture and weight type, and tokenizers built from GGUF metadata (byte-level and
sentencepiece-style) compared string by string."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tokenrelay_engines.base import SamplingParams  # noqa: E402
from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig  # noqa: E402
from tokenrelay_engines.torch.gguf_loader import GGUFFile, model_config_from_gguf, unpermute_qk  # noqa: E402
from tokenrelay_engines.torch.gguf_tokenizer import tokenizer_from_gguf  # noqa: E402
from tokenrelay_engines.torch.runner import ModelRunner  # noqa: E402

from .driver import make_seq, run_to_completion  # noqa: E402
from .gguf_factory import llama_cpp_permute, tokenizer_json_of, write_gguf, write_tokenizer  # noqa: E402
from .helpers import reference_greedy  # noqa: E402
from .model_factory import CORPUS, build_model_dir, build_tokenizer  # noqa: E402
from .tokenizer_strings import tokenizer_strings  # noqa: E402

PROMPTS = [
    [1, 17, 33, 99, 200, 7, 8, 250, 3, 45, 61],
    [1, 300, 5],
    [1, *range(60, 97)],  # crosses several 4-token KV blocks
]
# (variant, weight type): every architecture and every type, without the full cross product.
CASES = [("llama", "F32"), ("llama", "F16"), ("llama", "Q8_0"), ("llama", "Q4_1"), ("mistral", "BF16"),
         ("qwen2", "Q4_0"), ("qwen2", "Q8_0"), ("tied", "Q4_0")]


def _hf_from_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _runner(path: Path, quantization: str = "none") -> ModelRunner:
    """"none" (every weight dequantized, float matmuls) is what is token-exact with transformers;
    the block-quantized kernels ("auto") are tested in test_quant.py."""
    return ModelRunner(TorchEngineConfig(model=str(path), device="cpu", dtype="float32", quantization=quantization,
                                         scheduler=SchedulerConfig(block_size=4, num_blocks=128)))


def _greedy_batch(runner: ModelRunner, max_tokens: int = 10) -> list[list[int]]:
    seqs = [make_seq(f"r{i}", p, SamplingParams(temperature=0.0), max_tokens=max_tokens)
            for i, p in enumerate(PROMPTS)]
    results = run_to_completion(runner, seqs, chunk_size=5)  # one batch, chunked prefill
    return [[t for t, _ in results[f"r{i}"]] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.mark.parametrize(("variant", "qtype"), CASES, ids=lambda v: v)
def test_greedy_matches_transformers_on_the_same_gguf(gguf_dir: Path, variant: str, qtype: str) -> None:
    model_dir = gguf_dir / f"hf-{variant}"
    hf = build_model_dir(model_dir, variant)
    path = write_gguf(gguf_dir / f"{variant}-{qtype}.gguf", hf, variant, qtype, tokenizer_json_of(model_dir))
    ref = _hf_from_gguf(path)
    runner = _runner(path)
    # llama.cpp writes Mistral as "llama"; general.name tells it apart (same layers, no window here)
    assert runner.model_config.model_type == {"tied": "llama"}.get(variant, variant)
    got = _greedy_batch(runner)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == reference_greedy(ref, prompt, 10)
    if qtype == "F32":
        assert got[0] == reference_greedy(hf, PROMPTS[0], 10)  # the q/k permutation undone exactly


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
def test_qwen3_matches_the_original_model_with_the_same_weights(gguf_dir: Path, qtype: str) -> None:
    """transformers cannot load a qwen3 GGUF with a non-default head_dim; the reference here is the
    original model with its weights quantized and dequantized as the file stores them."""
    model_dir = gguf_dir / "hf-qwen3"
    hf = build_model_dir(model_dir, "qwen3")
    path = write_gguf(gguf_dir / f"qwen3-{qtype}.gguf", hf, "qwen3", qtype, tokenizer_json_of(model_dir))
    if qtype != "F32":
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if p.ndim == 2:
                    q = gguf.GGMLQuantizationType[qtype]
                    back = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q), q)
                    p.copy_(torch.from_numpy(np.ascontiguousarray(back)))
    runner = _runner(path)
    assert runner.model_config.qk_norm and runner.model_config.model_type == "qwen3"
    for prompt, tokens in zip(PROMPTS, _greedy_batch(runner)):
        assert tokens == reference_greedy(hf, prompt, 10)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quants_match_transformers(gguf_dir: Path, qtype: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=384, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    tokenizer_json = json.loads(build_tokenizer().to_str())
    path = write_gguf(gguf_dir / f"llama-{qtype}.gguf", hf, "llama", qtype, tokenizer_json)
    ref = _hf_from_gguf(path)
    for prompt, tokens in zip(PROMPTS, _greedy_batch(_runner(path))):
        assert tokens == reference_greedy(ref, prompt, 10)


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        permuted = llama_cpp_permute(w, heads)
        assert not np.array_equal(permuted, w)
        assert np.array_equal(unpermute_qk(permuted, heads), w)


def test_metadata_becomes_model_config(gguf_dir: Path) -> None:
    model_dir = gguf_dir / "hf-qwen2"
    hf = build_model_dir(model_dir, "qwen2")
    path = write_gguf(gguf_dir / "meta-qwen2.gguf", hf, "qwen2", "F32", tokenizer_json_of(model_dir))
    cfg = model_config_from_gguf(GGUFFile(path))
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == ("qwen2", 64, 2, 2)
    assert cfg.attention_bias and not cfg.qk_norm and not cfg.tie_word_embeddings
    assert cfg.max_position_embeddings == 512 and cfg.eos_token_ids == (2,)


def test_unsupported_architecture_and_broken_files_are_refused(gguf_dir: Path) -> None:
    path = gguf_dir / "gpt2-arch.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        model_config_from_gguf(GGUFFile(path))
    bogus = gguf_dir / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        GGUFFile(bogus)
    with pytest.raises(FileNotFoundError):
        _runner(gguf_dir / "missing.gguf")


# -- tokenizers ---------------------------------------------------------------------------------

def _tokenizer_only_gguf(path: Path, write) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    write(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _assert_same_tokenizer(path: Path, specials: list[str]) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours, _ = tokenizer_from_gguf(GGUFFile(path))
    strings = tokenizer_strings(specials)
    assert len(strings) >= 300
    for s in strings:
        ids = ours.encode(s).ids
        assert ids == ref.encode(s), repr(s)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), repr(s)


@pytest.mark.parametrize(("pre", "add_bos"), [("default", False), ("qwen2", False), ("llama-bpe", True)])
def test_byte_level_tokenizer_matches_transformers(gguf_dir: Path, pre: str, add_bos: bool) -> None:
    tokenizer = build_tokenizer()
    # GPT-2-style vocabularies carry <|endoftext|>; transformers' byte-level class adds it otherwise.
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer_json = json.loads(tokenizer.to_str())
    path = _tokenizer_only_gguf(gguf_dir / f"tok-gpt2-{pre}.gguf",
                                lambda w: write_tokenizer(w, tokenizer_json, pre=pre, add_bos=add_bos))
    _assert_same_tokenizer(path, ["<s>", "</s>", "<pad>", "<|endoftext|>"])
    ours, _ = tokenizer_from_gguf(GGUFFile(path))
    assert (ours.encode("hello").ids[0] == ours.token_to_id("<s>")) == add_bos


def _sentencepiece_metadata(w) -> None:
    """A Llama-2-style vocabulary: <unk> <s> </s>, 256 byte tokens, then BPE pieces with ▁."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train_from_iterator(CORPUS + ["Hello world, the capital of France is Paris."] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [2 if t == "<unk>" else 3 if t in specials else 6 if t in byte_tokens else 1 for t in tokens]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def test_sentencepiece_tokenizer_matches_transformers(gguf_dir: Path) -> None:
    path = _tokenizer_only_gguf(gguf_dir / "tok-llama.gguf", _sentencepiece_metadata)
    _, info = tokenizer_from_gguf(GGUFFile(path))
    assert info.add_bos_token and info.bos_token == "<s>"  # sentencepiece vocabularies add BOS by default
    _assert_same_tokenizer(path, ["<s>", "</s>", "<unk>"])
