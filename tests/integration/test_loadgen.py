"""`tokenrelay bench` against a real server running the synthetic engine at a known pace.

Tolerances (stated here, checked below): with the synthetic engine at TTFT 50 ms and ITL 10 ms,
the measured mean TTFT must lie in [45, 70] ms (the engine's 50 ms plus at most 20 ms of gRPC,
scheduling and client overhead on a loaded 2-core machine; below 45 would mean we time from
the wrong moment), and mean ITL and mean TPOT within +-25% of 10 ms ([7.5, 12.5] ms). A
measurement that counted from the wrong event or divided by the wrong count (per request
instead of per token, n instead of n - 1) falls outside these bounds.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from tokenrelay._prompts import LengthRange
from tokenrelay.loadgen import BenchConfig, LoadGenerator
from tokenrelay.loadgen import main as loadgen_main

ROOT = Path(__file__).resolve().parents[2]
BOUND = 120.0
TTFT_MS, ITL_MS = 50.0, 10.0


@pytest.mark.parametrize("synthetic_server", [{"ttft_ms": TTFT_MS, "itl_ms": ITL_MS}], indirect=True)
async def test_bench_measures_the_configured_ttft_and_itl(synthetic_server, tmp_path):
    out_file = tmp_path / "bench.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay_server.cli", "bench", "--target", synthetic_server.address,
        "--concurrency", "1,2", "--num-requests", "6", "--input-len", "8:16", "--output-len", "16",
        "--json-out", str(out_file), "--slo-ttft-ms", "1000", cwd=ROOT, env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), BOUND)
    stdout, stderr = out.decode(), err.decode()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "6/6 ok=6 failed=0" in stderr  # the progress bar
    for heading in ("== concurrency 1:", "== concurrency 2:", "== sweep", "TTFT", "ITL", "TPOT", "E2E", "p99"):
        assert heading in stdout

    report = json.loads(out_file.read_text())
    assert report["model"]["engine"] == "synthetic"
    assert [p["value"] for p in report["points"]] == [1, 2]
    for point in report["points"]:
        assert point["completed"] == 6 and point["failed"] == 0, point["errors"]
        assert all(r["output_tokens"] == 16 for r in point["requests"])  # ignore_eos: exact lengths
        assert all(8 <= r["prompt_tokens"] <= 16 for r in point["requests"])
        assert 0.9 * TTFT_MS <= point["ttft"]["mean"] <= TTFT_MS + 20, point["ttft"]
        assert 0.75 * ITL_MS <= point["itl"]["mean"] <= 1.25 * ITL_MS, point["itl"]
        assert 0.75 * ITL_MS <= point["tpot"]["mean"] <= 1.25 * ITL_MS, point["tpot"]
        assert point["ttft"]["p50"] <= point["ttft"]["p99"]
        assert point["itl"]["count"] >= 6 * 15 * 0.9  # about one gap per token after the first
        e2e_expected = TTFT_MS + 15 * ITL_MS
        assert 0.9 * e2e_expected <= point["e2e"]["mean"] <= e2e_expected + 60
        assert point["output_throughput"] == pytest.approx(16 * point["request_throughput"])
        assert point["goodput"] == pytest.approx(point["request_throughput"])


async def test_open_loop_is_seeded_and_bounded(synthetic_server):
    def config(seed: int) -> BenchConfig:
        return BenchConfig(synthetic_server.address, rates=(40.0,), duration=0.5, seed=seed,
                           input_len=LengthRange(4, 4), output_len=LengthRange(2, 6), warmup=0,
                           progress=False, request_timeout=30)

    out = io.StringIO()
    first = await asyncio.wait_for(LoadGenerator(config(3), out=out, err=io.StringIO()).run(), BOUND)
    second = await asyncio.wait_for(LoadGenerator(config(3), out=io.StringIO(), err=io.StringIO()).run(), BOUND)
    (point,), (again,) = first.points, second.points
    assert point.mode == "rate" and point.failed == 0 and point.completed > 0
    assert point.completed == again.completed  # same seed, same arrival schedule
    starts = [r.start - first.records[0][0].start for r in first.records[0]]
    assert max(starts) < 0.5 + 0.25  # no request starts after the duration (plus scheduling slack)
    assert all(2 <= r.output_tokens <= 6 for r in first.records[0])
    assert "rate 40 req/s" in out.getvalue()


async def test_prompt_file_goodput_and_max_concurrency(synthetic_server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"token_ids": [10, 11, 12]}\n"plain string"\n', encoding="utf-8")
    config = BenchConfig(synthetic_server.address, rates=(100.0,), num_requests=6, prompt_file=str(prompts),
                         output_len=LengthRange(3, 3), slo_ttft_ms=0.001, max_concurrency=2,
                         progress=False, json_out=str(tmp_path / "r.json"))
    report = await asyncio.wait_for(LoadGenerator(config, out=io.StringIO(), err=io.StringIO()).run(), BOUND)
    (point,) = report.points
    assert point.completed == 6 and point.goodput == 0.0  # nobody meets a 1 us TTFT
    assert sorted({r.prompt_tokens for r in report.records[0]}) == [3, len("hello") + 1, len("plain string") + 1]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["config"]["prompt_file"] == str(prompts) and saved["points"][0]["goodput"] == 0.0


async def test_bad_lengths_are_rejected_before_any_load(synthetic_server):
    config = BenchConfig(synthetic_server.address, concurrency=(1,), num_requests=1,
                         input_len=LengthRange(5000, 5000), progress=False)
    with pytest.raises(ValueError, match="context length"):
        await asyncio.wait_for(LoadGenerator(config, out=io.StringIO(), err=io.StringIO()).run(), BOUND)


def test_bench_without_a_server_fails_cleanly(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = loadgen_main(["--target", f"127.0.0.1:{port}", "--concurrency", "1", "--num-requests", "1",
                         "--request-timeout", "5"])
    assert code == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


async def test_bench_plots_sharegpt_bursty_and_chosen_percentiles(synthetic_server, tmp_path):
    """`tokenrelay bench --plot DIR` against a real server: a concurrency sweep and a bursty rate,
    prompts from a ShareGPT file, percentiles chosen by flag; every PNG is a valid image."""
    from PIL import Image

    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"question {i}"},
                                                      {"from": "gpt", "value": "answer"}]} for i in range(5)]),
                       encoding="utf-8")
    plots, out_file = tmp_path / "plots", tmp_path / "bench.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay.cli", "bench", "--target", synthetic_server.address,
        "--concurrency", "1,3", "--rate", "50", "--burstiness", "0.5", "--num-requests", "6",
        "--dataset-name", "sharegpt", "--dataset-path", str(dataset), "--output-len", "4",
        "--percentiles", "50,99.9", "--slo-ttft-ms", "1000", "--plot", str(plots),
        "--json-out", str(out_file), "--no-progress", cwd=ROOT, env=dict(os.environ),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), BOUND)
    stdout, stderr = out.decode(), err.decode()
    assert proc.returncode == 0, stderr
    assert "total token throughput" in stdout and "p99.9" in stdout and " std " in stdout
    report = json.loads(out_file.read_text())
    assert report["config"]["dataset_name"] == "sharegpt" and report["config"]["burstiness"] == 0.5
    for point in report["points"]:
        assert point["completed"] == 6 and point["failed"] == 0, point["errors"]
        assert point["total_token_throughput"] == pytest.approx(
            point["input_throughput"] + point["output_throughput"])
        assert [q for q, _ in point["ttft"]["percentiles"]] == [50.0, 99.9]
        assert point["ttft"]["std"] >= 0
        assert {r["prompt_tokens"] for r in point["requests"]} == {len("question 0") + 1}  # from the file
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["latency_distributions.png", "latency_vs_concurrency.png", "latency_vs_rate.png",
                     "throughput_vs_concurrency.png", "throughput_vs_rate.png"]
    for name in names:
        assert f"plot: {plots / name}" in stdout
        with Image.open(plots / name) as image:
            image.verify()  # a whole, valid PNG
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300
