"""Offline engine benchmark: a fixed set of prompts through TorchEngine, results as JSON.

    python bench/engine_bench.py --load-format dummy --dummy-shape tiny --num-prompts 32
    python bench/engine_bench.py --device cuda --dtype bfloat16 --load-format dummy \\
        --dummy-shape llama-3.1-8b --num-prompts 256 --input-len 512 --output-len 128
    python bench/engine_bench.py --roofline --device cuda --load-format dummy --dummy-shape llama-3.1-8b

--roofline: ms per decode step at --batch-sizes (default 1,32,128) with --context-len (1024)
cached tokens, the fraction of the memory-bandwidth floor, and transformers' generate and
continuous batching on the same shape in the same run (bench/roofline.py).

Prompts are deterministic random token ids (`--input-len` each, `--output-len` new tokens,
ignore_eos), all submitted at once. Step time and batch size come from a thin wrapper around
the runner's `execute` (which ends with the step's device->host copy, so the time is real on
CUDA too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenrelay_engines.base import Request, SamplingParams, StoppingCriteria  # noqa: E402
from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig  # noqa: E402
from tokenrelay_engines.scheduler.sequence import RunnerOutput, SchedulerOutput  # noqa: E402
from tokenrelay_engines.torch.engine import TorchEngine  # noqa: E402
from tokenrelay_engines.torch.runner import ModelRunner  # noqa: E402
from bench.roofline import roofline, table  # noqa: E402


class TimedRunner:
    """ModelRunner with per-step timing and batch-size counters."""

    def __init__(self, config: TorchEngineConfig) -> None:
        self.inner = ModelRunner(config)
        self.tokenizer = self.inner.tokenizer
        self.model_info = self.inner.model_info
        self.block_size = self.inner.block_size
        self.num_blocks = self.inner.num_blocks
        self.recording = False
        self.step_times: list[float] = []
        self.batch_seqs: list[int] = []
        self.batch_tokens: list[int] = []

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        start = time.perf_counter()
        out = self.inner.execute(scheduler_output)
        if self.recording:
            self.step_times.append(time.perf_counter() - start)
            self.batch_seqs.append(len(scheduler_output.chunks))
            self.batch_tokens.append(scheduler_output.num_batched_tokens)
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a .gguf file or model directory; 'demo': the embedded adder model; "
                   "'': SmolLM2-135M-Instruct")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--dummy-shape", default="", help="named shape for --load-format dummy, e.g. tiny, llama-3.1-8b")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:n]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default="auto", choices=["auto", "none"], help="GGUF weights: see serve --help")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=0, help="0: sized from memory")
    p.add_argument("--kv-cache-memory-fraction", type=float, default=0.3)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--roofline", action="store_true", help="decode ms/step vs the bandwidth floor and transformers")
    p.add_argument("--batch-sizes", default="1,32,128", help="--roofline: comma-separated batch sizes")
    p.add_argument("--context-len", type=int, default=1024, help="--roofline: cached tokens per sequence")
    p.add_argument("--decode-steps", type=int, default=32, help="--roofline: decode steps timed per repeat")
    p.add_argument("--repeats", type=int, default=3, help="--roofline: interleaved repeats (medians)")
    p.add_argument("--compare-transformers", action=argparse.BooleanOptionalAction, default=True,
                   help="--roofline: also time transformers' generate and generate_batch")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        p.error("--num-prompts, --input-len and --output-len must be >= 1")
    return args


async def bench(args: argparse.Namespace) -> dict:
    config = TorchEngineConfig(
        model=args.model, load_format=args.load_format, dummy_shape=args.dummy_shape, device=args.device,
        dtype=args.dtype, quantization=args.quantization, kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        seed=args.seed,
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  block_size=args.block_size, num_blocks=args.num_blocks))
    runners: list[TimedRunner] = []

    def factory(cfg: TorchEngineConfig) -> TimedRunner:
        runners.append(TimedRunner(cfg))
        return runners[-1]

    engine = TorchEngine(config, runner_factory=factory)
    load_start = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - load_start
    runner = runners[0]
    vocab = runner.model_info.vocab_size
    rng = random.Random(args.seed)
    sampling = SamplingParams(temperature=args.temperature, seed=args.seed)
    stopping = StoppingCriteria(max_tokens=args.output_len, ignore_eos=True)

    def request(rid: str, length: int) -> Request:
        return Request(rid, [rng.randrange(vocab) for _ in range(length)], sampling, stopping)

    async def drain(req: Request) -> int:
        n = 0
        async for out in engine.add_request(req):
            n += len(out.token_ids)
            if out.finished and out.error:
                raise RuntimeError(out.error)
        return n

    try:
        await drain(request("warmup", min(args.input_len, 8)))  # first-call overheads out of the numbers
        requests = [request(f"bench-{i}", args.input_len) for i in range(args.num_prompts)]
        runner.recording = True
        start = time.perf_counter()
        generated = sum(await asyncio.gather(*(drain(r) for r in requests)))
        elapsed = time.perf_counter() - start
        stats = engine.stats()
    finally:
        await engine.shutdown()
    steps = len(runner.step_times)
    prompt_tokens = args.num_prompts * args.input_len
    return {
        "model": runner.model_info.name, "device": args.device, "dtype": str(runner.inner.dtype).removeprefix("torch."),
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "num_blocks": runner.num_blocks, "block_size": runner.block_size, "load_s": round(load_s, 3),
        "elapsed_s": round(elapsed, 4),
        "output_tokens_per_s": round(generated / elapsed, 2),
        "total_tokens_per_s": round((generated + prompt_tokens) / elapsed, 2),
        "num_steps": steps,
        "mean_step_ms": round(1000 * sum(runner.step_times) / steps, 3) if steps else 0.0,
        "mean_batch_size": round(sum(runner.batch_seqs) / steps, 2) if steps else 0.0,
        "mean_batched_tokens": round(sum(runner.batch_tokens) / steps, 2) if steps else 0.0,
        "num_preemptions": stats.num_preemptions,
        "generated_tokens": generated,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.roofline:
        result = asyncio.run(roofline(args))
        print(table(result), file=sys.stderr)
    else:
        result = asyncio.run(bench(args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
