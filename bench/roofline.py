"""Decode speed against the memory-bandwidth roofline, side by side with transformers (one run).

For each batch size B (prompts of --context-len tokens, --decode-steps new tokens each):
  - tokenrelay: the reference engine (scheduler + runner, CUDA graphs on CUDA); ms per decode step
    from the runner's own step timer (decode-only steps), and end-to-end output tokens/s;
  - transformers generate: the same shape and dtype, random weights; ms per decode step as
    (time(N+1 new tokens) - time(1 new token)) / N, which takes prefill and set-up out;
  - transformers continuous batching (`generate_batch`), timed the same way.
Roofline: a decode step must read every weight once and the batch's whole KV cache, so its floor
is (weight bytes + B * context * KV bytes per token) / measured device copy bandwidth; the
fraction reported is floor / measured step time. Systems are interleaved per repeat; medians.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tokenrelay_engines.base import Request, SamplingParams, StoppingCriteria
from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig
from tokenrelay_engines.torch.backends import resolve_device
from tokenrelay_engines.torch.engine import TorchEngine
from tokenrelay_engines.torch.shapes import ModelConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times[1:])


def step_bytes(model: torch.nn.Module, shape: ModelConfig, batch: int, context: int, dtype: torch.dtype) -> int:
    """Weights read by one decode step (every parameter but the embedding table, which is gathered,
    unless it is tied to the LM head) plus the batch's KV cache."""
    seen, weights = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or (name.endswith("embed_tokens.weight") and not shape.tie_word_embeddings):
            continue
        seen.add(id(p))
        weights += p.numel() * p.element_size()
    elem = torch.empty((), dtype=dtype).element_size()
    kv = batch * context * shape.num_hidden_layers * 2 * shape.num_key_value_heads * shape.head_dim * elem
    return weights + kv


def _hf_config(shape: ModelConfig):
    from transformers import LlamaConfig

    rope_scaling = None
    if shape.rope_scaling is not None:
        rs = shape.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                        "high_freq_factor": rs.high_freq_factor,
                        "original_max_position_embeddings": rs.original_max_position_embeddings}
    return LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                       intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
                       num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                       head_dim=shape.head_dim, max_position_embeddings=shape.max_position_embeddings,
                       rms_norm_eps=shape.rms_norm_eps, rope_theta=shape.rope_theta, rope_scaling=rope_scaling,
                       tie_word_embeddings=shape.tie_word_embeddings, eos_token_id=None, pad_token_id=0)


def build_transformers(shape: ModelConfig, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM._from_config(_hf_config(shape), torch_dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _timed(device: torch.device, fn: Callable[[], Any]) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def hf_generate_step_s(model, prompts: list[list[int]], steps: int, device: torch.device) -> float:
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))

    def run(n: int) -> None:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

    return (_timed(device, lambda: run(steps + 1)) - _timed(device, lambda: run(1))) / steps


def hf_continuous_step_s(model, prompts: list[list[int]], steps: int, device: torch.device) -> float:
    from transformers import GenerationConfig

    def run(n: int) -> None:
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        with torch.no_grad():
            model.generate_batch(inputs=prompts, generation_config=config)

    return (_timed(device, lambda: run(steps + 1)) - _timed(device, lambda: run(1))) / steps


class _StepTimer:
    """Wraps the engine's runner: times decode-only steps of the expected batch size."""

    def __init__(self, runner: Any) -> None:
        self.inner, self.batch, self.times = runner, 0, []
        for name in ("tokenizer", "model_info", "block_size", "num_blocks"):
            setattr(self, name, getattr(runner, name))

    def execute(self, out):
        start = time.perf_counter()
        result = self.inner.execute(out)  # ends with the step's device -> host copy: a sync
        if self.batch and len(out.chunks) == self.batch and out.num_batched_tokens == self.batch:
            self.times.append(time.perf_counter() - start)
        return result


async def _ours(engine: TorchEngine, timer: _StepTimer, prompts: list[list[int]], steps: int) -> tuple[float, float]:
    timer.batch, timer.times = len(prompts), []

    async def one(i: int, prompt: list[int]) -> int:
        req = Request(f"r{time.monotonic_ns()}-{i}", prompt, SamplingParams(temperature=0.0, seed=0),
                      StoppingCriteria(max_tokens=steps, ignore_eos=True))
        return sum([len(o.token_ids) async for o in engine.add_request(req)])

    start = time.perf_counter()
    generated = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    elapsed = time.perf_counter() - start
    timer.batch = 0
    return statistics.median(timer.times), generated / elapsed


async def roofline(args: Any) -> dict[str, Any]:
    device = resolve_device(args.device)
    batches = sorted({int(b) for b in args.batch_sizes.split(",")})
    ctx, steps = args.context_len, args.decode_steps
    blocks = max(batches) * -(-(ctx + steps + 1) // args.block_size) + 8
    config = TorchEngineConfig(
        model=args.model, load_format=args.load_format, dummy_shape=args.dummy_shape, device=str(device),
        dtype=args.dtype, seed=args.seed,
        scheduler=SchedulerConfig(max_num_seqs=max(batches), max_num_batched_tokens=max(args.max_num_batched_tokens,
                                                                                          max(batches)),
                                  block_size=args.block_size, num_blocks=blocks, max_model_len=ctx + steps + 1))
    timers: list[_StepTimer] = []

    def factory(cfg: TorchEngineConfig) -> _StepTimer:
        from tokenrelay_engines.torch.runner import ModelRunner

        timers.append(_StepTimer(ModelRunner(cfg)))
        return timers[-1]

    engine = TorchEngine(config, runner_factory=factory)
    await engine.start()
    timer = timers[0]
    runner = timer.inner
    shape, dtype = runner.model_config, runner.dtype
    hf = build_transformers(shape, device, dtype) if args.compare_transformers else None
    bandwidth = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    try:
        for batch in batches:
            prompts = torch.randint(3, shape.vocab_size, (batch, ctx), generator=gen).tolist()
            samples: dict[str, list[float]] = {"tokenrelay": [], "tokenrelay_tok_s": [], "hf_generate": [],
                                               "hf_continuous": []}
            errors: dict[str, str] = {}
            await _ours(engine, timer, prompts[:1], 2)  # warm-up at this shape
            for _ in range(args.repeats):
                step_s, tok_s = await _ours(engine, timer, prompts, steps)
                samples["tokenrelay"].append(step_s)
                samples["tokenrelay_tok_s"].append(tok_s)
                if hf is None:
                    continue
                for key, fn in (("hf_generate", hf_generate_step_s), ("hf_continuous", hf_continuous_step_s)):
                    if key in errors:
                        continue
                    try:
                        samples[key].append(fn(hf, prompts, steps, device))
                    except Exception as exc:  # noqa: BLE001 - reported, not fatal: the other systems still count
                        errors[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
            floor_s = step_bytes(runner.model, shape, batch, ctx, dtype) / bandwidth
            row: dict[str, Any] = {"batch": batch, "context_len": ctx, "floor_ms": round(1000 * floor_s, 3)}
            ours = statistics.median(samples["tokenrelay"])
            row["tokenrelay_ms_per_step"] = round(1000 * ours, 3)
            row["tokenrelay_output_tok_s"] = round(statistics.median(samples["tokenrelay_tok_s"]), 1)
            row["roofline_fraction"] = round(floor_s / ours, 3)
            for key in ("hf_generate", "hf_continuous"):
                if samples[key]:
                    theirs = statistics.median(samples[key])
                    row[f"{key}_ms_per_step"] = round(1000 * theirs, 3)
                    row[f"speedup_vs_{key}"] = round(theirs / ours, 2)
                elif key in errors:
                    row[f"{key}_error"] = errors[key]
            rows.append(row)
    finally:
        with contextlib.suppress(Exception):
            await engine.shutdown()
    return {"model": runner.model_info.name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "decode_steps": steps, "repeats": args.repeats,
            "cuda_graphs": runner.cuda_graphs is not None, "attention": type(runner.attention).__name__,
            "rows": rows}


def table(result: dict[str, Any]) -> str:
    head = f"{'batch':>5} {'ctx':>5} {'floor ms':>9} {'ours ms':>8} {'roofline':>8} {'HF gen ms':>9} " \
           f"{'x HF gen':>8} {'HF CB ms':>9} {'x HF CB':>8}"
    lines = [f"{result['model']} on {result['device']} ({result['dtype']}), copy bandwidth "
             f"{result['copy_bandwidth_gb_s']} GB/s, medians of {result['repeats']}", head]
    for r in result["rows"]:
        lines.append(f"{r['batch']:>5} {r['context_len']:>5} {r['floor_ms']:>9} {r['tokenrelay_ms_per_step']:>8} "
                     f"{r['roofline_fraction']:>8} {r.get('hf_generate_ms_per_step', '-'):>9} "
                     f"{r.get('speedup_vs_hf_generate', '-'):>8} {r.get('hf_continuous_ms_per_step', '-'):>9} "
                     f"{r.get('speedup_vs_hf_continuous', '-'):>8}")
    return "\n".join(lines)
