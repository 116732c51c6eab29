"""Per-step host time of the reference engine at N running sequences, split by phase.

    git archive <main-commit> | tar -x -C /tmp/before
    python bench/step_host.py --tree before=/tmp/before --tree after=. --seqs 256 --repeats 5

Only host work is timed: the model's forward pass is replaced by a fake that returns a
preallocated hidden state and fixed logits (the demo model's weights are loaded but not run,
its context raised to fit the outputs). Each worker (a subprocess importing one tree, see
bench/trees.py) admits N requests, runs their prefill, then drives the engine's step by hand,
on one thread, exactly as the engine loop does:

    schedule  = scheduler.schedule()
    prepare   = runner.execute(batch) minus the fake forward (inputs, sampling rows, sampler
                on [N, vocab] logits, collect)
    update    = scheduler.update(batch, runner_output)   (includes stop checks / detokenizer)
    publish   = engine._publish(touched)                 (deltas into output slots)
    detokenize: the incremental detokenizer's share of update + publish; core = total - detokenize

With the engine core (engines/core/), publish is the core's: this step's outputs (one
`RequestUpdate` per request in older trees, columns now) encoded as the `StepOutputs` frame it sends; "detokenize" is then the front end's output
processor (detokenizer, stop strings, slots), timed apart, and core = total.

After each step the event loop runs the slots' wake-ups and a consumer that keeps up drains
every slot (neither timed). Times are the stepping
thread's CPU time (time.thread_time: torch runs with one thread), so other load on a shared box
does not count. Trees run alternately,
`--repeats` times; the table shows medians over repeats of each worker's median step, and the
publish time over the first and last 20 % of steps (it must not grow with output length).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trees import parse_trees, tree_env  # noqa: E402

PHASES = ("schedule", "prepare", "update", "publish")
KEYS = (*PHASES, "total", "detokenize", "core", "publish_first", "publish_last")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", help="name=path of a checkout (repeat); default: this one")
    p.add_argument("--seqs", type=int, default=256, help="running sequences")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--steps", type=int, default=200, help="decode steps timed (output length)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json-out", default="")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- worker: runs inside one tree --------------------------------------------------------------

class _FakeModel:
    """Stands in for the forward pass: fixed hidden state and logits, no compute."""

    def __init__(self, real, rows: int, eos: tuple[int, ...]) -> None:
        import torch
        vocab = real.config.vocab_size if hasattr(real, "config") else 16
        self.hidden = torch.zeros(4096, 8)
        gen = torch.Generator().manual_seed(0)
        self.logits = torch.randn(4096, vocab, generator=gen)
        self.logits[:, list(eos)] = -1e9
        self.forward_s = 0.0

    def __call__(self, input_ids, *args, **kwargs):
        t = time.thread_time()
        out = self.hidden[: input_ids.shape[0]]
        self.forward_s += time.thread_time() - t
        return out

    def compute_logits(self, hidden):
        return self.logits[: hidden.shape[0]]


def _model_dir(tmp: Path, context: int) -> str:
    from tokenrelay_engines.torch import loader
    src = Path(loader.__file__).parent / loader.DEMO_MODEL_DIR
    dst = tmp / "demo-long"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = context
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


async def _worker(args: argparse.Namespace) -> dict:
    from tokenrelay_engines.base import Request, SamplingParams, StoppingCriteria
    from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig
    from tokenrelay_engines.detokenizer import IncrementalDetokenizer
    from tokenrelay_engines.torch.engine import TorchEngine
    from tokenrelay_engines.torch.runner import ModelRunner

    detok_s = [0.0]

    def timed(fn):
        def wrapper(*a, **kw):
            t = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                detok_s[0] += time.thread_time() - t
        return wrapper

    for name in ("append", "take_text", "finish"):
        setattr(IncrementalDetokenizer, name, timed(getattr(IncrementalDetokenizer, name)))

    n, total = args.seqs, args.prompt_len + args.steps + 8
    blocks = n * (-(-total // 16) + 1)
    fakes = []

    def factory(config):
        runner = ModelRunner(config)
        runner.model = _FakeModel(runner.model, n, runner.model_info.eos_token_ids)
        fakes.append(runner.model)
        return runner

    with tempfile.TemporaryDirectory() as tmp:
        config = TorchEngineConfig(model=_model_dir(Path(tmp), total + 64), device="cpu", dtype="float32",
                                   num_threads=1, scheduler=SchedulerConfig(
                                       max_num_seqs=n, max_num_batched_tokens=max(4096, n * args.prompt_len),
                                       block_size=16, num_blocks=blocks))
        engine = TorchEngine(config, runner_factory=factory)
        engine._run = lambda: None  # no engine thread: this worker drives the steps itself
        await engine.start()
        engine._thread.join()
        sched, runner = getattr(engine, "_scheduler", None), engine._runner
        vocab = runner.model_info.vocab_size
        streams = []
        for i in range(n):
            prompt = [(3 + i + j) % vocab for j in range(args.prompt_len)]
            req = Request(request_id=f"r{i}", prompt_token_ids=prompt, sampling=SamplingParams(temperature=0.0),
                          stopping=StoppingCriteria(max_tokens=args.steps + 2, ignore_eos=True))
            streams.append(engine.add_request(req))
        with engine._cv:
            commands = list(engine._inbox)
            engine._inbox.clear()
        engine._apply(commands)
        slots = [s._slot for s in streams]
        fake = fakes[0]
        times = {p: [] for p in (*PHASES, "detokenize")}
        core = getattr(engine, "_core", None)  # trees with the engine core (engines/core/)
        if core is not None:
            from tokenrelay_engines.core.messages import FrameEncoder, StepOutputs
            sched, encoder = core.scheduler, FrameEncoder()
        columnar = hasattr(core, "_outputs")  # one StepOutputs of columns per step (not one update per request)
        while sched.has_unfinished:
            detok_s[0] = 0.0
            t0 = time.thread_time()
            out = sched.schedule()
            t1 = time.thread_time()
            fake.forward_s = 0.0
            runner_out = runner.execute(out)
            t2 = time.thread_time()
            touched = sched.update(out, runner_out)
            t3 = time.thread_time()
            if core is None:
                engine._publish(touched)
                t4 = time.thread_time()
            elif columnar:
                # the core's publish: this step's columns as the frame it sends to the front end
                step = core._outputs(runner_out, [s for s in touched if s.is_finished])
                step.stats = core.stats()
                encoder.encode(step)
                t4 = time.thread_time()
                engine._publish(step)  # the front end's output processor (detokenizer, slots)
                detok_s[0] = time.thread_time() - t4
            else:
                # the core's publish: this step's updates as the frame it sends to the front end
                updates = core._updates(touched)
                encoder.encode(StepOutputs(updates, core.stats(), len(runner_out.token_ids)))
                t4 = time.thread_time()
                engine._publish(updates)  # the front end's output processor (detokenizer, slots)
                detok_s[0] = time.thread_time() - t4
            await asyncio.sleep(0)  # the event loop runs the slots' wake-ups (not timed)
            for slot in slots:
                slot._take()
            full_decode = len(out.chunks) == n and all(c.num_new_tokens == 1 for c in out.chunks)
            if full_decode and sched.num_running == n:
                for p, dt in zip(PHASES, (t1 - t0, t2 - t1 - fake.forward_s, t3 - t2, t4 - t3)):
                    times[p].append(dt * 1e3)
                times["detokenize"].append(detok_s[0] * 1e3)
        await engine.shutdown()
    steps = len(times["publish"])
    k = max(1, steps // 5)
    result = {p: statistics.median(v) for p, v in times.items()}
    totals = [sum(x) for x in zip(*(times[p] for p in PHASES))]
    result["total"] = statistics.median(totals)
    if core is None:  # the detokenizer ran inside update/publish: take it out
        result["core"] = statistics.median([t - d for t, d in zip(totals, times["detokenize"])])
    else:  # the front end's share was timed apart from the four phases
        result["core"] = result["total"]
    result["publish_first"] = statistics.median(times["publish"][:k])
    result["publish_last"] = statistics.median(times["publish"][-k:])
    result["steps"] = steps
    return result


# ---- driver ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(asyncio.run(_worker(args))))
        return
    trees = parse_trees(args.tree)
    runs: dict[str, list[dict]] = {name: [] for name, _ in trees}
    forward = ["--worker", "--seqs", str(args.seqs), "--prompt-len", str(args.prompt_len), "--steps", str(args.steps)]
    for r in range(args.repeats):
        for name, tree in (trees if r % 2 == 0 else trees[::-1]):
            proc = subprocess.run([sys.executable, __file__, *forward], env=tree_env(tree), cwd="/",
                                  capture_output=True, text=True, timeout=1200)
            if proc.returncode != 0:
                raise SystemExit(f"worker for {name} failed:\n{proc.stderr[-4000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"repeat {r + 1} {name}: total {runs[name][-1]['total']:.3f} ms", file=sys.stderr)
    keys = KEYS
    summary = {name: {k: round(statistics.median(x[k] for x in rs), 4) for k in keys} for name, rs in runs.items()}
    print(f"per-step host time at {args.seqs} running sequences, ms (median of {args.repeats} runs, "
          f"{runs[trees[0][0]][0]['steps']} decode steps each)")
    print(f"{'phase':<14}" + "".join(f"{name:>12}" for name, _ in trees)
          + (f"{'ratio':>10}" if len(trees) == 2 else ""))
    for k in keys:
        row = f"{k:<14}" + "".join(f"{summary[name][k]:>12.3f}" for name, _ in trees)
        if len(trees) == 2:
            a, b = summary[trees[0][0]][k], summary[trees[1][0]][k]
            row += f"{(a / b if b else float('inf')):>9.1f}x"
        print(row)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
