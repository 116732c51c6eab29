"""Sampling: support restrictions, penalties, raw logprobs, seeds independent of the batch."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import torch

from tokenrelay_engines.base import SamplingParams, StoppingCriteria
from tokenrelay_engines.torch.runner import ModelRunner
from tokenrelay_engines.torch.sampler import Sampler, SamplingBatch, step_seed

from .helpers import reference_logprobs, runner_config
from .driver import make_seq, run_to_completion

CPU = torch.device("cpu")


def _pairs(rows_tokens: list[tuple[int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [r for r, toks in rows_tokens for _ in toks]
    toks = [t for _, toks in rows_tokens for t in toks]
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(toks, dtype=torch.int64)


def make_batch(params: list[SamplingParams], seeds: list[int], seen: list[list[int]] | None = None,
               outputs: list[list[int]] | None = None, banned: list[list[int]] | None = None) -> SamplingBatch:
    n = len(params)
    seen_rows, seen_tokens = _pairs(list(enumerate(seen or [[]] * n)))
    out_rows, out_tokens = _pairs(list(enumerate(outputs or [[]] * n)))
    ban_rows, ban_tokens = _pairs(list(enumerate(banned or [[]] * n)))

    def col(name, dtype=torch.float32):
        return torch.tensor([getattr(p, name) for p in params], dtype=dtype)

    wanted = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingBatch(
        temperature=col("temperature"), top_k=col("top_k", torch.int64), top_p=col("top_p"),
        min_p=col("min_p"), repetition_penalty=col("repetition_penalty"),
        presence_penalty=col("presence_penalty"), frequency_penalty=col("frequency_penalty"),
        seen_rows=seen_rows, seen_tokens=seen_tokens, output_rows=out_rows, output_tokens=out_tokens,
        banned_rows=ban_rows, banned_tokens=ban_tokens, step_seeds=[step_seed(s, 0) for s in seeds],
        all_greedy=all(p.greedy for p in params),
        any_top_k_top_p=any(p.top_k > 0 or p.top_p < 1 for p in params),
        any_min_p=any(p.min_p > 0 for p in params),
        any_repetition=any(p.repetition_penalty != 1 for p in params),
        any_presence_frequency=any(p.presence_penalty or p.frequency_penalty for p in params),
        max_logprobs=max(wanted) if wanted else -1)


def draw_many(logits_row: list[float], params: SamplingParams, n: int = 400) -> list[int]:
    logits = torch.tensor([logits_row] * n, dtype=torch.float32)
    tokens, *_ = Sampler(CPU)(logits, make_batch([params] * n, seeds=list(range(n))))
    return tokens.tolist()


LOGITS = [math.log(p) for p in (0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02)]


def test_top_k_restricts_support() -> None:
    drawn = draw_many(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    assert set(drawn) == {0, 1}


def test_top_p_restricts_support() -> None:
    # cumulative 0.4, 0.65, 0.8: the smallest set with mass >= 0.7 is {0, 1, 2}
    drawn = draw_many(LOGITS, SamplingParams(temperature=1.0, top_p=0.7))
    assert set(drawn) == {0, 1, 2}


def test_min_p_restricts_support() -> None:
    # floor = 0.3 * 0.4 = 0.12: tokens 0, 1, 2 stay
    drawn = draw_many(LOGITS, SamplingParams(temperature=1.0, min_p=0.3))
    assert set(drawn) == {0, 1, 2}


def test_top_k_then_top_p_on_renormalised_mass() -> None:
    # top_k=3 renormalises to 0.5, 0.3125, 0.1875; top_p=0.6 then keeps {0, 1}
    drawn = draw_many(LOGITS, SamplingParams(temperature=1.0, top_k=3, top_p=0.6))
    assert set(drawn) == {0, 1}


def test_unrestricted_draw_follows_the_distribution() -> None:
    drawn = draw_many([math.log(0.75), math.log(0.25)], SamplingParams(temperature=1.0), n=2000)
    share = drawn.count(0) / len(drawn)
    assert 0.7 < share < 0.8  # binomial sd ~0.01
    low_temp = draw_many([math.log(0.75), math.log(0.25)], SamplingParams(temperature=0.25), n=2000)
    assert low_temp.count(0) / len(low_temp) > 0.95  # 0.75^4 / (0.75^4 + 0.25^4) ~ 0.988


def test_greedy_ignores_filters_and_seeds() -> None:
    drawn = draw_many(LOGITS, SamplingParams(temperature=0.0, top_k=3, top_p=0.5), n=20)
    assert set(drawn) == {0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_picks_as_torch_argmax(dtype) -> None:
    """The CPU argmax (numpy's) agrees with torch's: first of equal maxima, NaN as the maximum,
    rows of -inf, non-contiguous rows, a large vocabulary."""
    gen = torch.Generator().manual_seed(5)
    for rows, vocab in ((256, 16), (9, 49152), (3, 5)):
        logits = torch.randn(rows, vocab, generator=gen).to(dtype)
        logits[0] = 1.0
        logits[1, 2], logits[1, 4] = float("nan"), float("nan")
        logits[2] = float("-inf")
        want = logits.float().argmax(dim=-1)
        assert torch.equal(Sampler.greedy(logits), want)
        assert Sampler.greedy_host(logits).tolist() == want.tolist()
        assert Sampler.greedy_host(logits[::2]).tolist() == want[::2].tolist()


def test_penalties_change_logits_as_specified() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    batch = make_batch([params], seeds=[0], seen=[[0, 1, 3]], outputs=[[3, 3, 4]])
    got = Sampler.apply_penalties(logits.clone(), batch)[0].tolist()
    # repetition over prompt+output (0, 1, 3): positive / 2, negative * 2
    # presence (0.5) and frequency (0.25 * count) over output (3 twice, 4 once)
    expected = [1.0, -2.0, 0.5, 1.5 - 0.5 - 0.5, 1.0 - 0.5 - 0.25]
    assert got == pytest.approx(expected)


def test_banned_tokens_never_drawn() -> None:
    n = 200
    logits = torch.tensor([LOGITS] * n)
    batch = make_batch([SamplingParams(temperature=1.0)] * n, seeds=list(range(n)), banned=[[0, 1]] * n)
    tokens, *_ = Sampler(CPU)(logits, batch)
    assert not {0, 1} & set(tokens.tolist())


def test_logprobs_are_raw_and_sorted() -> None:
    logits = torch.tensor([LOGITS])
    params = SamplingParams(temperature=0.0, repetition_penalty=3.0, logprobs=3)
    tokens, chosen, top_ids, top_vals = Sampler(CPU)(logits, make_batch([params], [0], seen=[[0]]))
    raw = torch.log_softmax(logits, dim=-1)[0]
    assert tokens.item() == 1  # the penalty moved greedy off token 0 ...
    assert chosen.item() == pytest.approx(raw[1].item(), abs=1e-6)  # ... the logprob is still raw
    assert top_ids[0].tolist() == [0, 1, 2]
    assert top_vals[0].tolist() == pytest.approx(raw[:3].tolist(), abs=1e-6)


def test_step_seed_mixes_seed_and_step() -> None:
    values = {step_seed(s, k) for s in range(20) for k in range(20)}
    assert len(values) == 400
    assert all(0 <= v < 2**64 for v in values)
    assert step_seed(2**64 - 1, 5) < 2**64


def _sampled_tokens(runner, seqs) -> dict[str, list[int]]:
    return {rid: [t for t, _ in got] for rid, got in run_to_completion(runner, seqs, chunk_size=4).items()}


def test_seed_gives_same_tokens_whatever_the_batch(tiny_models) -> None:
    runner = ModelRunner(runner_config(tiny_models.path("llama")))
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    prompt = [1, 20, 30, 40, 50]
    alone = _sampled_tokens(runner, [make_seq("t", prompt, target, max_tokens=10, seed=1234)])["t"]
    others = [
        make_seq("g", [1, 5, 6], SamplingParams(temperature=0.0), max_tokens=4),
        make_seq("k", [1, *range(100, 130)], SamplingParams(temperature=0.7, top_k=5), max_tokens=12, seed=7),
        make_seq("p", [1, 9], SamplingParams(temperature=1.3, repetition_penalty=1.2, logprobs=2),
                 max_tokens=6, seed=99),
    ]
    crowded = _sampled_tokens(runner, [*others[:2], make_seq("t", prompt, target, max_tokens=10, seed=1234),
                                       others[2]])
    assert crowded["t"] == alone
    other_seed = _sampled_tokens(runner, [make_seq("t", prompt, target, max_tokens=10, seed=1235)])["t"]
    assert other_seed != alone


def test_runner_logprobs_ignore_penalties_and_temperature(tiny_models) -> None:
    ref = tiny_models.reference("qwen2")
    runner = ModelRunner(runner_config(tiny_models.path("qwen2")))
    prompt = [1, 11, 22, 33]
    params = SamplingParams(temperature=0.8, repetition_penalty=1.5, presence_penalty=1.0, logprobs=1)
    got = run_to_completion(runner, [make_seq("x", prompt, params, max_tokens=6, seed=5)])["x"]
    tokens = [t for t, _ in got]
    ref_lp = reference_logprobs(ref, prompt + tokens)
    for step, (tok, lp) in enumerate(got):
        assert abs(lp.logprob - ref_lp[len(prompt) - 1 + step, tok].item()) < 1e-4
        assert len(lp.top) == 1


def test_min_tokens_bans_eos_and_stop_tokens(tiny_models) -> None:
    runner = ModelRunner(runner_config(tiny_models.path("llama")))
    eos = runner.model_info.eos_token_ids
    assert eos
    seq = make_seq("m", [1, 2, 3], SamplingParams(temperature=5.0), max_tokens=30, seed=3)
    # most of the vocabulary is a stop token: without the ban nearly every draw would hit one
    seq.request.stopping = StoppingCriteria(max_tokens=30, min_tokens=20, stop_token_ids=tuple(range(300)))
    tokens = [t for t, _ in run_to_completion(runner, [seq])["m"]]
    assert len(tokens) == 30
    assert all(t >= 300 for t in tokens[:20])
    assert any(t < 300 for t in tokens[20:])  # the ban lifts once min_tokens are out


def reference_support(logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The tokens a row may draw, computed independently in float64 Python."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    kept = order[:top_k] if top_k > 0 else order
    weights = [math.exp(logits[i] / temperature) for i in kept]
    total = sum(weights)
    probs = [w / total for w in weights]
    if top_p < 1:
        mass, cut = 0.0, len(kept)
        for j, p in enumerate(probs):
            if j > 0 and mass >= top_p:
                cut = j
                break
            mass += p
        kept, probs = kept[:cut], probs[:cut]
    floor = min_p * max(probs)
    return {t for t, p in zip(kept, probs) if p >= floor}


def _near_boundary(logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float) -> bool:
    """True when a float32/float64 difference could flip a token in or out of the support."""
    order = sorted(logits, reverse=True)
    kept = order[:top_k] if top_k > 0 else order
    weights = [math.exp(v / temperature) for v in kept]
    probs = [w / sum(weights) for w in weights]
    mass = 0.0
    for p in probs:
        if abs(mass - top_p) < 1e-4:
            return True
        mass += p
    # min-p sees the top-p-renormalised distribution: keep away from its floor too
    return any(abs(p / probs[0] - min_p) < 1e-3 for p in probs)


@given(values=st.lists(st.integers(-40, 40), min_size=2, max_size=12, unique=True),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), top_k=st.integers(0, 6),
       top_p=st.sampled_from([1.0, 0.9, 0.6, 0.3]), min_p=st.sampled_from([0.0, 0.05, 0.2, 0.5]))
@settings(max_examples=60, deadline=None)
def test_draws_stay_in_reference_support(values, temperature, top_k, top_p, min_p) -> None:
    logits = [v / 4 for v in values]
    assume(not _near_boundary(logits, temperature, top_k, top_p, min_p))
    support = reference_support(logits, temperature, top_k, top_p, min_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    drawn = set(draw_many(logits, params, n=64))
    assert drawn <= support
    if len(support) == 1:
        assert drawn == support
