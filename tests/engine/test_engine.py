"""The whole reference engine (scheduler + runner + loop) against transformers, greedy."""

from __future__ import annotations

import asyncio

import pytest

from tokenrelay_engines.base import FinishReason, Request, SamplingParams, StoppingCriteria
from tokenrelay_engines.torch.engine import TorchEngine

from .helpers import reference_greedy, reference_logprobs, runner_config

TIMEOUT_S = 120.0


def prompts(n: int) -> list[list[int]]:
    """n prompts of different lengths (2..40 tokens), deterministic."""
    return [[1, *[(7 * i + 13 * j) % 370 + 3 for j in range(1 + (i * 11) % 39)]] for i in range(n)]


async def collect(engine: TorchEngine, request: Request) -> tuple[list[int], FinishReason | None]:
    tokens: list[int] = []
    finish = None
    async for out in engine.add_request(request):
        tokens.extend(out.token_ids)
        if out.finished:
            finish = out.finish_reason
    return tokens, finish


async def run_engine(config, requests: list[Request]) -> tuple[list[list[int]], TorchEngine]:
    engine = TorchEngine(config)
    await engine.start()
    try:
        results = await asyncio.wait_for(asyncio.gather(*(collect(engine, r) for r in requests)), TIMEOUT_S)
        stats = engine.stats()
    finally:
        await engine.shutdown()
    for tokens, finish in results:
        assert finish is FinishReason.LENGTH
    return [t for t, _ in results], stats


def greedy_requests(all_prompts: list[list[int]], max_tokens: list[int]) -> list[Request]:
    return [Request(request_id=f"req-{i}", prompt_token_ids=p, sampling=SamplingParams(temperature=0.0),
                    stopping=StoppingCriteria(max_tokens=m, ignore_eos=True))
            for i, (p, m) in enumerate(zip(all_prompts, max_tokens))]


def check_against_reference(ref, all_prompts, max_tokens, outputs) -> None:
    for i, (prompt, m, got) in enumerate(zip(all_prompts, max_tokens, outputs)):
        assert got == reference_greedy(ref, prompt, m), f"request {i} (prompt of {len(prompt)} tokens)"


@pytest.mark.parametrize("num_requests", [1, 7, 32])
async def test_concurrent_requests_match_transformers(tiny_models, num_requests: int) -> None:
    variant = "llama3"
    all_prompts = prompts(num_requests)
    max_tokens = [4 + (i * 5) % 9 for i in range(num_requests)]
    outputs, stats = await run_engine(runner_config(tiny_models.path(variant), block_size=8, num_blocks=256),
                                      greedy_requests(all_prompts, max_tokens))
    check_against_reference(tiny_models.reference(variant), all_prompts, max_tokens, outputs)
    assert stats.kv_blocks_used == 0


async def test_small_kv_pool_preempts_and_stays_exact(tiny_models) -> None:
    variant = "qwen3"
    all_prompts = prompts(8)
    max_tokens = [12] * 8
    # 16 blocks of 4 = 64 tokens for 8 requests of up to 52 tokens each: preemption is forced
    config = runner_config(tiny_models.path(variant), block_size=4, num_blocks=16)
    outputs, stats = await run_engine(config, greedy_requests(all_prompts, max_tokens))
    assert stats.num_preemptions > 0
    check_against_reference(tiny_models.reference(variant), all_prompts, max_tokens, outputs)


async def test_chunked_prefill_stays_exact(tiny_models) -> None:
    variant = "mistral"
    all_prompts = prompts(6)
    max_tokens = [8] * 6
    config = runner_config(tiny_models.path(variant), block_size=4, num_blocks=128,
                           max_num_batched_tokens=8, max_num_seqs=4)
    outputs, _ = await run_engine(config, greedy_requests(all_prompts, max_tokens))
    check_against_reference(tiny_models.reference(variant), all_prompts, max_tokens, outputs)


async def test_seeded_sampling_reproducible_through_engine(tiny_models) -> None:
    config = runner_config(tiny_models.path("llama"), block_size=4, num_blocks=64)
    req = lambda rid: Request(request_id=rid, prompt_token_ids=[1, 50, 60, 70],  # noqa: E731
                              sampling=SamplingParams(temperature=1.0, top_k=50, seed=42),
                              stopping=StoppingCriteria(max_tokens=10, ignore_eos=True))
    filler = greedy_requests(prompts(5), [10] * 5)
    alone, _ = await run_engine(config, [req("a")])
    crowded, _ = await run_engine(config, [*filler[:3], req("b"), *filler[3:]])
    assert crowded[3] == alone[0]


async def test_logprobs_through_engine_match_reference(tiny_models) -> None:
    variant = "qwen2"
    engine = TorchEngine(runner_config(tiny_models.path(variant), block_size=4, num_blocks=64))
    await engine.start()
    prompt = [1, 30, 31, 32, 33, 34]
    request = Request(request_id="lp", prompt_token_ids=prompt, sampling=SamplingParams(temperature=0.0, logprobs=3),
                      stopping=StoppingCriteria(max_tokens=6, ignore_eos=True))
    tokens, logprobs = [], []
    try:
        async def consume() -> None:
            async for out in engine.add_request(request):
                tokens.extend(out.token_ids)
                logprobs.extend(out.logprobs or [])
        await asyncio.wait_for(consume(), TIMEOUT_S)
    finally:
        await engine.shutdown()
    ref = tiny_models.reference(variant)
    assert tokens == reference_greedy(ref, prompt, 6)
    ref_lp = reference_logprobs(ref, prompt + tokens)
    assert len(logprobs) == len(tokens)
    for step, (tok, lp) in enumerate(zip(tokens, logprobs)):
        assert lp.token_id == tok and len(lp.top) == 3
        assert abs(lp.logprob - ref_lp[len(prompt) - 1 + step, tok].item()) < 1e-4
