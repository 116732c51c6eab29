"""The `vllm bench serve` fields of `tokenrelay bench`: standard deviation, chosen percentiles,
total token throughput, bursty (gamma) arrivals and named datasets; and the plots, drawn from a
hand-made report (no server: the integration test draws them from a real run)."""

from __future__ import annotations

import json
import math
import random
import statistics

import numpy as np
import pytest
from PIL import Image

from tokenrelay._bench_config import BenchConfig, add_bench_arguments, config_from_args
from tokenrelay._prompts import load_dataset, load_sharegpt
from tokenrelay._report import format_point
from tokenrelay._stats import RequestRecord, Summary, parse_percentiles, summarize_point
from tokenrelay.loadgen import BenchReport, arrival_offsets


def record(start: float, ttft: float, itl: float, n: int, prompt: int = 5) -> RequestRecord:
    times = [start + ttft + i * itl for i in range(n)]
    return RequestRecord(start=start, end=times[-1], prompt_tokens=prompt, token_times=times, output_tokens=n)


def test_std_and_chosen_percentiles_match_numpy():
    values = [0.003, 0.010, 0.011, 0.050, 0.2, 0.021]
    summary = Summary.of_seconds(values, (25.0, 50.0, 99.9))
    ms = np.array(values) * 1000
    assert summary.std == pytest.approx(float(np.std(ms)))  # population std, as vLLM reports it
    assert [q for q, _ in summary.percentiles] == [25.0, 50.0, 99.9]
    for q, value in summary.percentiles:
        assert value == pytest.approx(float(np.percentile(ms, q)))
    assert summary.at(99.9) == pytest.approx(float(np.percentile(ms, 99.9)))
    assert summary.at(90) == summary.p90  # the standard four are always there
    with pytest.raises(KeyError):
        summary.at(12.5)
    empty = Summary.of_seconds([], (50.0,))
    assert empty.count == 0 and math.isnan(empty.std) and math.isnan(empty.percentiles[0][1])


def test_parse_percentiles():
    assert parse_percentiles("99,50, 90") == (50.0, 90.0, 99.0)
    assert parse_percentiles("99.9") == (99.9,)
    for bad in ("", "50,abc", "101", "-1"):
        with pytest.raises(ValueError):
            parse_percentiles(bad)


def test_total_token_throughput_and_report_columns():
    records = [record(float(i), 0.05, 0.01, 10, prompt=30) for i in range(4)]
    point = summarize_point("concurrency", 2, records, 2.0, percentiles=(50.0, 99.0))
    assert point.output_throughput == pytest.approx(4 * 10 / 2.0)
    assert point.input_throughput == pytest.approx(4 * 30 / 2.0)
    assert point.total_token_throughput == pytest.approx(4 * (30 + 10) / 2.0)
    block = format_point(point)
    assert "total token throughput 80.0 tok/s" in block
    header = next(line for line in block.splitlines() if line.startswith("latency (ms)"))
    assert header.split()[2:] == ["mean", "std", "p50", "p99", "n"]  # only the chosen percentiles


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_arrivals_keep_the_rate_and_set_the_burstiness(burstiness):
    rate, count = 8.0, 20000
    offsets = arrival_offsets(rate, burstiness, random.Random(7))
    times = [next(offsets) for _ in range(count)]
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert all(g >= 0 for g in gaps)
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.05)
    # gamma gaps: coefficient of variation 1/sqrt(shape): 1 for Poisson, 2 at 0.25, 0.5 at 4
    assert statistics.pstdev(gaps) / mean == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)
    again = arrival_offsets(rate, burstiness, random.Random(7))
    assert [next(again) for _ in range(100)] == times[:100]  # seeded


def test_bench_config_checks_the_new_fields(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n", encoding="utf-8")
    assert BenchConfig("h:1", concurrency=(1,), num_requests=1).dataset_name == "random"
    assert BenchConfig("h:1", concurrency=(1,), num_requests=1, prompt_file=str(prompts)).dataset_name == "file"
    for kwargs in ({"burstiness": 0.0}, {"burstiness": math.inf}, {"percentiles": ()},
                   {"percentiles": (50.0, 120.0)}, {"dataset_name": "sharegpt"},
                   {"dataset_name": "random", "prompt_file": str(prompts)}, {"dataset_name": "nope"}):
        with pytest.raises(ValueError):
            BenchConfig("h:1", concurrency=(1,), num_requests=1, **kwargs)


def test_bench_flags_build_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    config = config_from_args(parser.parse_args(
        ["--rate", "4", "--burstiness", "0.5", "--percentiles", "50,90,99", "--plot", "out",
         "--dataset-name", "sharegpt", "--dataset-path", "x.json", "--num-requests", "3"]))
    assert config.rates == (4.0,) and config.burstiness == 0.5
    assert config.percentiles == (50.0, 90.0, 99.0) and config.plot_dir == "out"
    assert config.dataset_name == "sharegpt" and config.prompt_file == "x.json"
    with pytest.raises(SystemExit):
        parser.parse_args(["--percentiles", "50,x"])


def test_sharegpt_dataset(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
        {"id": "b", "conversations": [{"from": "system", "value": "be terse"}, {"from": "human", "value": "Hi"}]},
        {"id": "c", "conversations": [{"from": "gpt", "value": "no human turn"}]},
        {"id": "d"},
    ]), encoding="utf-8")
    assert load_sharegpt(path) == ["What is 2+2?", "Hi"]
    assert load_dataset("sharegpt", path) == ["What is 2+2?", "Hi"]
    assert load_dataset("random", None) is None
    bad = tmp_path / "bad.json"
    for text in ("{not json", '{"conversations": []}', "[]"):
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError):
            load_sharegpt(bad)


def test_plots_from_a_report(tmp_path):
    from tokenrelay._plots import write_plots

    rng = random.Random(1)
    points, all_records = [], []
    for concurrency in (1, 2, 4):
        records = [record(i * 0.1, 0.02 * concurrency + rng.random() * 0.01, 0.01, 8) for i in range(12)]
        points.append(summarize_point("concurrency", concurrency, records, 1.5, slo_ttft=0.05,
                                      percentiles=(50.0, 99.0)))
        all_records.append(records)
    rate_records = [record(i * 0.2, 0.03, 0.012, 6) for i in range(5)]
    points.append(summarize_point("rate", 2.0, rate_records, 1.0))
    all_records.append(rate_records)
    report = BenchReport("h:1", {"model_name": "m"}, {}, points, all_records)
    written = write_plots(report, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["latency_distributions.png", "latency_vs_concurrency.png", "latency_vs_rate.png",
                     "throughput_vs_concurrency.png", "throughput_vs_rate.png"]
    for path in written:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300
