"""The offline benchmark runs end to end on CPU with the tiny dummy shape."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "engine_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("engine_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_bench_tiny_cpu(capsys) -> None:
    load_bench().main(["--load-format", "dummy", "--dummy-shape", "tiny", "--num-prompts", "6", "--input-len", "10",
          "--output-len", "5", "--num-blocks", "64", "--block-size", "4", "--max-num-batched-tokens", "32"])
    result = json.loads(capsys.readouterr().out)
    assert result["generated_tokens"] == 30
    assert result["output_tokens_per_s"] > 0 and result["num_steps"] >= 5
    assert 1 <= result["mean_batch_size"] <= 6
    assert result["mean_batched_tokens"] <= 32


def test_engine_bench_roofline_smoke_cpu(capsys) -> None:
    """The --roofline sweep runs on CPU with a tiny shape (transformers' side is GPU-sized: off here)."""
    load_bench().main(["--roofline", "--device", "cpu", "--load-format", "dummy", "--dummy-shape", "tiny",
                       "--batch-sizes", "1,3", "--context-len", "8", "--decode-steps", "3", "--repeats", "1",
                       "--no-compare-transformers"])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [r["batch"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["tokenrelay_ms_per_step"] > 0 and row["floor_ms"] > 0
        assert 0 < row["roofline_fraction"] < 1.5 and row["tokenrelay_output_tok_s"] > 0
    assert result["copy_bandwidth_gb_s"] > 0 and "roofline" in captured.err
