"""The runner against transformers: greedy tokens exact, logprobs within 1e-4."""

from __future__ import annotations

import pytest

from tokenrelay_engines.base import SamplingParams
from tokenrelay_engines.torch.runner import ModelRunner

from .helpers import reference_greedy, reference_logprobs, runner_config
from .driver import make_seq, run_to_completion
from .model_factory import VARIANTS

PROMPTS = [
    [1, 17, 33, 99, 200, 7, 8, 250, 3, 45, 61],
    [1, 300, 5],
    [1, 42],
    [1, *range(60, 97)],  # 38 tokens: crosses several blocks and the llama3 rope original length
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers(tiny_models, variant: str) -> None:
    ref = tiny_models.reference(variant)
    runner = ModelRunner(runner_config(tiny_models.path(variant)))
    assert runner.model_info.vocab_size == ref.config.vocab_size
    assert runner.model_info.engine == "torch"
    seqs = [make_seq(f"r{i}", p, SamplingParams(temperature=0.0, logprobs=5), max_tokens=12)
            for i, p in enumerate(PROMPTS)]
    # one batch: mixed prompt lengths, prefill chunked to 5 tokens, then batched decode
    results = run_to_completion(runner, seqs, chunk_size=5)
    for i, prompt in enumerate(PROMPTS):
        got = results[f"r{i}"]
        tokens = [t for t, _ in got]
        assert tokens == reference_greedy(ref, prompt, 12), f"prompt {i}"
        ref_lp = reference_logprobs(ref, prompt + tokens)
        for step, (tok, lp) in enumerate(got):
            row = ref_lp[len(prompt) - 1 + step]
            assert lp is not None and lp.token_id == tok
            assert abs(lp.logprob - row[tok].item()) < 1e-4
            top_vals, top_ids = row.topk(5)
            assert [t for t, _ in lp.top] == top_ids.tolist()
            assert all(abs(v - rv) < 1e-4 for (_, v), rv in zip(lp.top, top_vals.tolist()))


def test_recompute_after_preemption_gives_same_tokens(tiny_models) -> None:
    """A sequence re-prefilled from prompt+output (into different blocks) continues identically."""
    runner = ModelRunner(runner_config(tiny_models.path("llama")))
    prompt = PROMPTS[0]
    full = run_to_completion(runner, [make_seq("a", prompt, max_tokens=10)])["a"]
    first = [t for t, _ in full[:4]]
    resumed = make_seq("b", prompt, max_tokens=10)
    resumed.token_ids += first  # as after preemption: computed tokens dropped to 0
    rest = run_to_completion(runner, [resumed], chunk_size=3)["b"]
    assert first + [t for t, _ in rest] == [t for t, _ in full]
