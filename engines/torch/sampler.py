"""Token sampling for one step's batch of rows (one row per sequence that samples).

Order per row: penalties (repetition over prompt + output, presence / frequency over output),
min-tokens ban of stop/eos ids, then greedy argmax (temperature 0) or temperature -> top-k ->
top-p (on the top-k-renormalised distribution) -> min-p -> draw. Logprobs are log_softmax of
the RAW logits, before any of that.

Randomness is stateless: a row's draw uses exponential noise from a generator seeded with
mix(seed, num_output_tokens), so the same seed gives the same tokens whatever else is in the
batch, after preemption-recompute, and across restarts. The draw is argmax(probs / noise), an
exact sample from `probs` that never picks a token whose probability is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): decorrelated per-step seeds in [0, 2^64)."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(slots=True)
class SamplingBatch:
    """Per-row parameters as device tensors (built on the host, copied with the step's inputs)."""

    temperature: torch.Tensor  # [S] float32; 0 = greedy
    top_k: torch.Tensor  # [S] int64; 0 = off
    top_p: torch.Tensor  # [S] float32
    min_p: torch.Tensor  # [S] float32
    repetition_penalty: torch.Tensor  # [S] float32
    presence_penalty: torch.Tensor  # [S] float32
    frequency_penalty: torch.Tensor  # [S] float32
    # (row, token) pairs: prompt+output tokens of rows with repetition penalty, output tokens
    # of rows with presence/frequency penalty, banned tokens of rows below min_tokens.
    seen_rows: torch.Tensor
    seen_tokens: torch.Tensor
    output_rows: torch.Tensor
    output_tokens: torch.Tensor
    banned_rows: torch.Tensor
    banned_tokens: torch.Tensor
    # host-side facts (branching without device syncs)
    step_seeds: list[int]
    all_greedy: bool
    any_top_k_top_p: bool
    any_min_p: bool
    any_repetition: bool
    any_presence_frequency: bool
    max_logprobs: int  # -1: no row wants logprobs

    def __post_init__(self) -> None:
        if len(self.step_seeds) != self.temperature.shape[0]:
            raise ValueError("one step seed per row")


class Sampler:
    """Stateless apart from a reusable pool of torch.Generators (reseeded every step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: list[torch.Generator] = []

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                          torch.Tensor | None, torch.Tensor | None]:
        """logits [S, V] -> (token_ids [S], logprob of each [S], top ids [S, n], top logprobs [S, n])."""
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_logprobs >= 0 else None
        logits = self.apply_penalties(logits, batch)
        greedy = self.greedy(logits)
        if batch.all_greedy:
            token_ids = greedy
        else:
            token_ids = torch.where(batch.temperature == 0, greedy, self._draw(self.probs(logits, batch), batch))
        if raw_logprobs is None:
            return token_ids, None, None, None
        chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        top_vals, top_ids = raw_logprobs.topk(batch.max_logprobs, dim=-1)
        return token_ids, chosen, top_ids, top_vals

    @staticmethod
    def greedy(logits: torch.Tensor) -> torch.Tensor:
        """Argmax per row (the first of equal maxima, NaN counting as the maximum, as torch's).
        On CPU numpy's argmax does it: faster than torch's, most of all over a large vocabulary
        (`python bench/greedy_cpu.py`)."""
        if logits.device.type == "cpu":
            return torch.from_numpy(Sampler.greedy_host(logits))
        return logits.float().argmax(dim=-1)

    @staticmethod
    def greedy_host(logits: torch.Tensor) -> np.ndarray:
        """`greedy`, its ids on the host: what `__call__` returns when every row is greedy,
        unpenalised and wants no logprobs (without building a SamplingBatch)."""
        if logits.dtype != torch.float32:
            logits = logits.float()
        if logits.device.type == "cpu":
            return logits.numpy().argmax(axis=-1)
        return logits.argmax(dim=-1).cpu().numpy()

    @staticmethod
    def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Returns penalised logits; never modifies `logits` in place."""
        in_ptr = logits.data_ptr()
        if batch.any_repetition:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[batch.seen_rows, batch.seen_tokens] = True
            penalty = batch.repetition_penalty[:, None]
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, penalised, logits)
        if batch.any_presence_frequency:
            counts = torch.zeros_like(logits)
            counts.index_put_((batch.output_rows, batch.output_tokens),
                              torch.ones_like(batch.output_tokens, dtype=logits.dtype), accumulate=True)
            logits = (logits - batch.frequency_penalty[:, None] * counts
                      - batch.presence_penalty[:, None] * (counts > 0).to(logits.dtype))
        if batch.banned_rows.numel():
            logits = logits.clone() if logits.data_ptr() == in_ptr else logits
            logits[batch.banned_rows, batch.banned_tokens] = float("-inf")
        return logits

    @staticmethod
    def probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The distribution each non-greedy row draws from (zero outside the kept support)."""
        temperature = torch.where(batch.temperature == 0, 1.0, batch.temperature)
        logits = logits / temperature[:, None]
        if batch.any_top_k_top_p:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            vocab = logits.shape[-1]
            rank = torch.arange(vocab, device=logits.device)[None, :]
            k = torch.where(batch.top_k > 0, batch.top_k, vocab)
            sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            cut = (mass_before >= batch.top_p[:, None]) & (batch.top_p[:, None] < 1) & (rank > 0)
            sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        probs = torch.softmax(logits, dim=-1)
        if batch.any_min_p:
            floor = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < floor, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def _draw(self, probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        rows, vocab = probs.shape
        while len(self._generators) < rows:
            self._generators.append(torch.Generator(device=self.device))
        noise = torch.empty_like(probs)
        for i, seed in enumerate(batch.step_seeds):
            gen = self._generators[i]
            gen.manual_seed(seed)
            noise[i].exponential_(generator=gen)
        return (probs / noise.clamp_min(torch.finfo(probs.dtype).tiny)).argmax(dim=-1)
