"""Greedy argmax on CPU: torch's `argmax(dim=-1)` vs numpy's `argmax(axis=-1)` (what
`Sampler.greedy` uses on CPU) over [rows, vocab] float32 logits.

    python bench/greedy_cpu.py [--rows 256] [--vocab 16 49152] [--repeats 7]

Both run on the same tensor, interleaved, `--repeats` rounds; the table shows the median time
of each and the ratio torch / numpy. Torch runs with one thread, as the engine's host work does
on a 2-core box (`--threads` to change).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, nargs="+", default=[16, 49152])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"argmax over [{args.rows}, vocab] float32 on CPU, median of {args.repeats} interleaved rounds")
    print(f"{'vocab':>8}{'torch':>14}{'numpy':>14}{'ratio':>8}")
    for vocab in args.vocab:
        logits = torch.randn(args.rows, vocab, generator=torch.Generator().manual_seed(0))
        assert torch.equal(torch.from_numpy(logits.numpy().argmax(axis=-1)), logits.argmax(dim=-1))
        number = max(1, int(2e6 // (args.rows * vocab)))
        runs: dict[str, list[float]] = {"torch": [], "numpy": []}
        for _ in range(args.repeats):
            runs["torch"].append(_time(lambda: logits.argmax(dim=-1), number))
            runs["numpy"].append(_time(lambda: logits.numpy().argmax(axis=-1), number))
        t, n = statistics.median(runs["torch"]), statistics.median(runs["numpy"])
        print(f"{vocab:>8}{t * 1e6:>11.1f} us{n * 1e6:>11.1f} us{t / n:>7.2f}x")


if __name__ == "__main__":
    main()
