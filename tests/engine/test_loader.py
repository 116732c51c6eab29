"""Loading: named shapes, config parsing, sharded safetensors, dummy weights, errors, KV sizing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tokenrelay_engines.base import SamplingParams
from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig
from tokenrelay_engines.torch.kv_cache import bytes_per_block, size_num_blocks
from tokenrelay_engines.torch.loader import byte_level_tokenizer, resolve_dtype
from tokenrelay_engines.torch.models.llama import rope_inv_freq
from tokenrelay_engines.torch.runner import ModelRunner
from tokenrelay_engines.torch.shapes import NAMED_SHAPES, ModelConfig, named_shape

from .helpers import reference_greedy, runner_config
from .driver import make_seq, run_to_completion


def test_llama_31_8b_shape_builds_without_weights() -> None:
    shape = named_shape("llama-3.1-8b")
    assert (shape.num_hidden_layers, shape.hidden_size, shape.num_key_value_heads) == (32, 4096, 8)
    assert shape.rope_scaling is not None and shape.rope_scaling.factor == 8.0
    assert 7.9e9 < shape.num_params < 8.1e9
    assert bytes_per_block(shape, 16, torch.bfloat16) == 32 * 2 * 16 * 8 * 128 * 2
    for name in ("llama-3-8b", "mistral-7b", "qwen2-7b", "qwen3-8b", "tiny"):
        assert named_shape(name).model_type in ("llama", "mistral", "qwen2", "qwen3")
    assert NAMED_SHAPES["qwen2-7b"].attention_bias and NAMED_SHAPES["qwen3-8b"].qk_norm
    with pytest.raises(ValueError, match="unknown dummy_shape"):
        named_shape("gpt-5")


def test_config_parsing_old_and_new_rope_keys() -> None:
    base = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, eos_token_id=[5, 6])
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    old = ModelConfig.from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}})
    new = ModelConfig.from_hf_config({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                                                  **scaling}})
    assert old == new and old.rope_theta == 5e5 and old.head_dim == 16 and old.eos_token_ids == (5, 6)
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_config({**base, "model_type": "gpt2"})
    assert ModelConfig.from_hf_config({**base, "model_type": "qwen2"}).attention_bias
    windowed = ModelConfig.from_hf_config({**base, "model_type": "mistral", "sliding_window": 256,
                                           "max_position_embeddings": 4096})
    assert windowed.context_length == 256  # attention is full: serve only where it equals the window


def test_llama3_rope_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(16, 5e5, ModelConfig.from_hf_config(cfg.to_dict()).rope_scaling)
    assert torch.equal(ours, ref.float())


def test_sharded_checkpoint_loads(tiny_models, tmp_path) -> None:
    ref = tiny_models.reference("qwen2")
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    shutil.copy(tiny_models.path("qwen2") / "tokenizer.json", tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    runner = ModelRunner(runner_config(tmp_path))
    prompt = [1, 8, 9, 10]
    got = run_to_completion(runner, [make_seq("s", prompt, max_tokens=6)])["s"]
    assert [t for t, _ in got] == reference_greedy(ref, prompt, 6)


def test_bad_model_directories_fail_clearly(tiny_models, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelRunner(runner_config(tmp_path / "nowhere"))
    src = tiny_models.path("llama")
    broken = tmp_path / "no_weights"
    broken.mkdir()
    shutil.copy(src / "config.json", broken)
    shutil.copy(src / "tokenizer.json", broken)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        ModelRunner(runner_config(broken))
    wrong = tmp_path / "wrong_shape"
    shutil.copytree(src, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        ModelRunner(runner_config(wrong))


def test_attention_backend_slots_in(tiny_models) -> None:
    """A different backend plugs into the runner without touching it (here: a counting wrapper)."""
    from tokenrelay_engines.torch.attention import TorchAttention

    class CountingAttention(TorchAttention):
        def __init__(self) -> None:
            self.calls = 0

        def attend(self, query, kv_cache, meta, scale):
            self.calls += 1
            return super().attend(query, kv_cache, meta, scale)

    backend = CountingAttention()
    runner = ModelRunner(runner_config(tiny_models.path("tied")), attention=backend)
    prompt = [1, 4, 5, 6, 7]
    got = run_to_completion(runner, [make_seq("c", prompt, max_tokens=3)])["c"]
    assert backend.calls == 3 * 2  # 3 steps x 2 layers
    assert [t for t, _ in got] == reference_greedy(tiny_models.reference("tied"), prompt, 3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_dummy_shape_runs_end_to_end(dtype: str) -> None:
    config = TorchEngineConfig(load_format="dummy", dummy_shape="tiny", dtype=dtype,
                               scheduler=SchedulerConfig(block_size=8, num_blocks=32))
    runner = ModelRunner(config)
    assert runner.model_info.name == "dummy-tiny" and runner.model_info.eos_token_ids == (257,)
    assert runner.kv_cache.kv.dtype == getattr(torch, dtype)
    text_ids = runner.tokenizer.encode("héllo").ids
    assert runner.tokenizer.decode(text_ids) == "héllo"
    seqs = [make_seq("a", [256, *text_ids], max_tokens=5),
            make_seq("b", [256, 1, 2], SamplingParams(temperature=1.0, logprobs=2), max_tokens=5, seed=1)]
    results = run_to_completion(runner, seqs)
    assert all(len(v) == 5 and all(0 <= t < 320 for t, _ in v) for v in results.values())
    # same seed -> same random weights -> same greedy tokens
    again = run_to_completion(ModelRunner(config), [make_seq("a", [256, *text_ids], max_tokens=5)])
    assert [t for t, _ in again["a"]] == [t for t, _ in results["a"]]


def test_byte_level_tokenizer_round_trips_bytes() -> None:
    tok = byte_level_tokenizer()
    text = "tokenrelay ✓ \n\t 日本"
    ids = tok.encode(text).ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.token_to_id("<s>") == 256 and tok.token_to_id("</s>") == 257


def test_dtype_resolution() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("float16", torch.device("cpu"))


def test_kv_sizing() -> None:
    shape = named_shape("tiny")
    cpu = torch.device("cpu")
    assert size_num_blocks(shape, 16, torch.float32, cpu, 0.3, configured=7) == 7
    assert size_num_blocks(shape, 16, torch.float32, cpu, 0.3) == 65536 // 16
    big = named_shape("llama-3.1-8b")
    blocks = size_num_blocks(big, 16, torch.bfloat16, cpu, 0.01)
    assert 1 <= blocks <= 65536 // 16


@pytest.mark.gpu
def test_dummy_llama_31_8b_bfloat16_on_cuda() -> None:
    config = TorchEngineConfig(load_format="dummy", dummy_shape="llama-3.1-8b", device="cuda", dtype="bfloat16",
                               kv_cache_memory_fraction=0.2, scheduler=SchedulerConfig(block_size=16))
    runner = ModelRunner(config)
    assert runner.model_info.context_length == 131072 and runner.num_blocks > 0
    seqs = [make_seq(f"r{i}", [128000, *range(1000, 1000 + 7 * i + 3)],
                     SamplingParams(temperature=0.0 if i % 2 else 0.8, logprobs=2), max_tokens=8, seed=i)
            for i in range(4)]
    results = run_to_completion(runner, seqs, chunk_size=16)
    assert all(len(v) == 8 and all(0 <= t < 128256 for t, _ in v) for v in results.values())


def test_embedded_demo_model_loads_when_present() -> None:
    from importlib import resources
    from pathlib import Path

    demo = Path(str(resources.files("tokenrelay_engines.torch").joinpath("demo_model")))
    if not (demo / "config.json").is_file():
        pytest.skip("the embedded demo model is not in the tree yet")
    from transformers import AutoModelForCausalLM

    runner = ModelRunner(TorchEngineConfig(model="demo", scheduler=SchedulerConfig(block_size=16, num_blocks=64)))
    assert runner.model_info.name == "tokenrelay-demo"
    prompt = runner.tokenizer.encode("12+34=").ids or [0]
    got = run_to_completion(runner, [make_seq("d", prompt, max_tokens=8)])["d"]
    ref = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    assert [t for t, _ in got] == reference_greedy(ref, prompt, 8)
