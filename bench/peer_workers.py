"""Offline peers for bench/peers.py, run in the peer's own Python (its venv) as a subprocess.

    <python> bench/peer_workers.py transformers --model-dir DIR --threads 2
    <python> bench/peer_workers.py ctranslate2 --model-dir CT2_DIR --threads 2

The worker loads the model once, prints `ready`, then answers one JSON line per command line
read from stdin:

    {"op": "batch1", "prompt": [ids], "output_len": 128}
        -> {"ttft_ms": .., "ms_per_token": .., "output_tokens": 128}
    {"op": "concurrent", "prompts": [[ids], ...], "output_len": 128}
        -> {"output_tokens_per_s": .., "output_tokens": .., "elapsed_s": ..}

Batch 1 times a 1-token generation (TTFT: prefill + first token) and a full generation; ms per
token is (full - first) / (n - 1). "Concurrent" is one padded batch of all prompts (these peers
have no server to take requests as they come): every prompt has the same length, so there is
no padding waste. Generation ignores eos (min length = max length) so every run is exact.
Only the standard library, json and the peer itself are imported here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


class TransformersPeer:
    def __init__(self, model_dir: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def _generate(self, prompts: list[list[int]], n: int) -> None:
        ids = self.torch.tensor(prompts, dtype=self.torch.int64)
        with self.torch.inference_mode():
            self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)

    def generate(self, prompts: list[list[int]], n: int) -> float:
        start = time.perf_counter()
        self._generate(prompts, n)
        return time.perf_counter() - start


class CTranslate2Peer:
    def __init__(self, model_dir: str, threads: int) -> None:
        import ctranslate2

        self.generator = ctranslate2.Generator(model_dir, device="cpu", compute_type="float32",
                                               intra_threads=threads, inter_threads=1)
        vocab = self.generator  # token strings are needed: ctranslate2 speaks tokens, not ids
        del vocab
        import json as _json
        from pathlib import Path

        names = _json.loads((Path(model_dir) / "vocabulary.json").read_text())
        self.names = names

    def generate(self, prompts: list[list[int]], n: int) -> float:
        tokens = [[self.names[i] for i in p] for p in prompts]
        start = time.perf_counter()
        self.generator.generate_batch(tokens, max_length=n, min_length=n, sampling_topk=1,
                                      include_prompt_in_result=False, max_batch_size=len(tokens))
        return time.perf_counter() - start


PEERS = {"transformers": TransformersPeer, "ctranslate2": CTranslate2Peer}


def serve(peer, lines) -> None:
    for line in lines:
        cmd = json.loads(line)
        n = cmd["output_len"]
        if cmd["op"] == "batch1":
            first = peer.generate([cmd["prompt"]], 1)
            full = peer.generate([cmd["prompt"]], n)
            out = {"ttft_ms": 1000 * first, "ms_per_token": 1000 * (full - first) / max(n - 1, 1),
                   "output_tokens": n}
        elif cmd["op"] == "concurrent":
            elapsed = peer.generate(cmd["prompts"], n)
            total = n * len(cmd["prompts"])
            out = {"output_tokens_per_s": total / elapsed, "output_tokens": total, "elapsed_s": elapsed}
        else:
            out = {"error": f"unknown op {cmd['op']!r}"}
        print(json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("peer", choices=sorted(PEERS))
    p.add_argument("--model-dir", required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    peer = PEERS[args.peer](args.model_dir, args.threads)
    peer.generate([[1, 2, 3, 4]], 4)  # warm-up
    print("ready", flush=True)
    serve(peer, sys.stdin)


if __name__ == "__main__":
    main()
