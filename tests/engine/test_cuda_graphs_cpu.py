"""The decode-graph machinery's buffers on CPU: bucketing, padding rows, block-table copies.

A captured CUDA graph replays the model forward over the persistent buffers; here each bucket's
"graph" is that same forward run eagerly over the same buffers (CUDA capture itself needs a GPU:
tests/engine/test_cuda_path.py). Decoding through `DecodeGraphs.run` must give the tokens the
plain runner gives.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from tokenrelay_engines.torch.cuda_graphs import DecodeGraphs  # noqa: E402
from tokenrelay_engines.torch.runner import ModelRunner  # noqa: E402

from .driver import make_seq, run_to_completion  # noqa: E402
from .helpers import runner_config  # noqa: E402


class EagerReplay:
    def __init__(self, graphs: DecodeGraphs, bucket: int) -> None:
        self.graphs, self.bucket, self.replays = graphs, bucket, 0

    def replay(self) -> None:
        self.replays += 1
        self.graphs._forward(self.bucket)


def test_decode_through_bucketed_buffers_matches_the_plain_runner(tiny_models) -> None:
    prompts = {f"s{i}": [1, 4 + i, 5, 6, 7 + i, 8][: 3 + i] for i in range(3)}  # 3 rows -> bucket 4
    plain = ModelRunner(runner_config(tiny_models.path("llama"), block_size=4))
    want = run_to_completion(plain, [make_seq(k, p, max_tokens=6) for k, p in prompts.items()])

    runner = ModelRunner(runner_config(tiny_models.path("llama"), block_size=4))
    graphs = DecodeGraphs(runner.model, runner.kv_cache.kv, max_batch=8, max_context_len=64, block_size=4,
                          hidden_size=runner.model_config.hidden_size, device=runner.device, dtype=runner.dtype)
    assert graphs.buckets == [1, 2, 4, 8]
    graphs.graphs = {b: EagerReplay(graphs, b) for b in graphs.buckets}
    runner.cuda_graphs = graphs
    got = run_to_completion(runner, [make_seq(k, p, max_tokens=6) for k, p in prompts.items()])
    assert {k: [t for t, _ in v] for k, v in got.items()} == {k: [t for t, _ in v] for k, v in want.items()}
    assert graphs.graphs[4].replays >= 4 and graphs.graphs[1].replays == 0
