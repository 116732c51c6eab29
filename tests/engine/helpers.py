"""Helpers shared by the engine tests: runner configs and the transformers reference."""

from __future__ import annotations

from pathlib import Path

import torch

from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig


def runner_config(model_dir: Path, block_size: int = 4, num_blocks: int = 128, **sched) -> TorchEngineConfig:
    return TorchEngineConfig(model=str(model_dir), device="cpu", dtype="float32",
                             scheduler=SchedulerConfig(block_size=block_size, num_blocks=num_blocks, **sched))


def reference_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt),
                                                                                             dtype=torch.long))
    return out[0, len(prompt):].tolist()


def reference_logprobs(hf_model, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the reference logits at every position of `token_ids` [len, vocab]."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([token_ids])).logits[0].float(), dim=-1)
