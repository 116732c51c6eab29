"""The reference engine's CUDA path (GPU-marked: skipped without CUDA; never run on the CPU CI)."""

from __future__ import annotations

import copy

import pytest
import torch

from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig
from tokenrelay_engines.torch.runner import ModelRunner

from .driver import make_seq, run_to_completion

pytestmark = pytest.mark.gpu


def cuda_config(model_dir, dtype: str, cuda_graphs: bool) -> TorchEngineConfig:
    return TorchEngineConfig(model=str(model_dir), device="auto", dtype=dtype, cuda_graphs=cuda_graphs,
                             scheduler=SchedulerConfig(block_size=16, num_blocks=256, max_num_seqs=8))


def test_auto_device_is_cuda_with_triton_attention_and_bf16(tiny_models) -> None:
    from tokenrelay_engines.torch.triton_attention import TritonAttention

    runner = ModelRunner(cuda_config(tiny_models.path("llama"), "auto", cuda_graphs=True))
    assert runner.device.type == "cuda" and runner.dtype == torch.bfloat16
    assert isinstance(runner.attention, TritonAttention) and runner.cuda_graphs is not None


def test_cuda_graph_decode_matches_eager(tiny_models) -> None:
    prompts = {f"s{i}": [1, 4 + i, 5, 6, 7 + i] for i in range(5)}  # 5 rows: a padded bucket of 8
    outs = []
    for graphs in (False, True):
        runner = ModelRunner(cuda_config(tiny_models.path("llama"), "float32", cuda_graphs=graphs))
        outs.append(run_to_completion(runner, [make_seq(k, p, max_tokens=12) for k, p in prompts.items()]))
    assert {k: [t for t, _ in v] for k, v in outs[0].items()} == {k: [t for t, _ in v] for k, v in outs[1].items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_matches_transformers_on_cuda(tiny_models, dtype: str) -> None:
    runner = ModelRunner(cuda_config(tiny_models.path("llama"), dtype, cuda_graphs=True))
    reference = copy.deepcopy(tiny_models.reference("llama")).to("cuda", getattr(torch, dtype))
    prompts = {f"p{i}": [1, 4 + i, 5, 6, 7 + i, 8] for i in range(4)}
    got = run_to_completion(runner, [make_seq(k, p, max_tokens=8) for k, p in prompts.items()])
    agree = total = 0
    for key, prompt in prompts.items():
        with torch.no_grad():
            ids = torch.tensor([prompt], device="cuda")
            want = reference.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                                      attention_mask=torch.ones_like(ids))[0, len(prompt):].tolist()
        mine = [t for t, _ in got[key]]
        total += len(want)
        agree += sum(a == b for a, b in zip(mine, want))
    rate = agree / total
    # fp32 must be exact; bf16 is compared in the same dtype and reported (kernels differ in rounding).
    assert rate == 1.0 if dtype == "float32" else rate >= 0.9, f"{dtype}: agreement {rate:.3f}"
