"""Pure load-generator pieces: percentiles, per-request metrics, point summaries, prompts, output."""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay._prompts import LengthRange, load_prompt_file, random_token_prompts
from tokenrelay._report import ProgressBar, format_point, format_sweep
from tokenrelay._stats import RequestRecord, Summary, percentile, summarize_point
from tokenrelay.loadgen import BenchConfig, BenchReport


def test_percentile_known_values():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=50),
       st.sampled_from([50, 90, 95, 99]))
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-9)


def test_summary_is_in_milliseconds():
    s = Summary.of_seconds([0.010, 0.020, 0.030])
    assert s.count == 3 and s.mean == pytest.approx(20.0)
    assert s.p50 == pytest.approx(20.0) and s.min == pytest.approx(10.0) and s.max == pytest.approx(30.0)
    empty = Summary.of_seconds([])
    assert empty.count == 0 and math.isnan(empty.mean)


def record(start=0.0, ttft=0.05, itl=0.01, n=5, prompt=8, error="", per_delta=1) -> RequestRecord:
    deltas = n // per_delta
    times = [start + ttft + i * itl * per_delta for i in range(deltas)]
    end = (times[-1] if times else start) + 0.001
    return RequestRecord(start=start, end=end, prompt_tokens=prompt, token_times=times,
                         output_tokens=n if not error else 0, error=error)


def test_request_record_metrics():
    r = record(start=10.0, ttft=0.05, itl=0.01, n=5)
    assert r.ok and r.ttft == pytest.approx(0.05)
    assert r.itls == pytest.approx([0.01] * 4)
    assert r.e2e == pytest.approx(0.05 + 0.04 + 0.001)
    assert r.tpot == pytest.approx((r.e2e - 0.05) / 4)
    one = record(n=1)
    assert one.tpot is None and one.itls == []
    # Two tokens per delta: gaps are per delta, TPOT still per token.
    chunked = record(ttft=0.05, itl=0.01, n=6, per_delta=2)
    assert chunked.itls == pytest.approx([0.02, 0.02])
    assert chunked.tpot == pytest.approx((chunked.e2e - 0.05) / 5)
    failed = record(error="UNAVAILABLE")
    assert not failed.ok
    with pytest.raises(ValueError):
        RequestRecord(start=1.0, end=0.5, prompt_tokens=1)


def test_goodput_and_slo():
    fast = record(ttft=0.05, itl=0.01, n=10)
    slow_first = record(ttft=0.5, itl=0.01, n=10)
    slow_tokens = record(ttft=0.05, itl=0.1, n=10)
    assert fast.meets_slo(0.1, 0.02) and not slow_first.meets_slo(0.1, 0.02)
    assert not slow_tokens.meets_slo(0.1, 0.02) and slow_tokens.meets_slo(0.1, None)
    assert not record(error="INTERNAL").meets_slo(None, None)


def test_summarize_point():
    records = [record(start=float(i), n=10, prompt=20) for i in range(4)]
    records.append(record(error="RESOURCE_EXHAUSTED"))
    records.append(record(error="RESOURCE_EXHAUSTED"))
    records.append(RequestRecord(start=0.0, end=1.0, prompt_tokens=3))  # no tokens at all
    point = summarize_point("concurrency", 4, records, 2.0, slo_ttft=0.06)
    assert point.completed == 4 and point.failed == 3
    assert point.errors == {"EMPTY_OUTPUT": 1, "RESOURCE_EXHAUSTED": 2}
    assert point.request_throughput == pytest.approx(2.0)
    assert point.output_throughput == pytest.approx(20.0)
    assert point.input_throughput == pytest.approx(40.0)
    assert point.goodput == pytest.approx(2.0)
    assert point.ttft.mean == pytest.approx(50.0) and point.itl.mean == pytest.approx(10.0)
    assert point.itl.count == 4 * 9 and point.tpot.count == 4
    assert summarize_point("rate", 1, records, 2.0).goodput is None
    strict = summarize_point("rate", 1, records, 2.0, slo_ttft=0.01)
    assert strict.goodput == 0.0
    with pytest.raises(ValueError):
        summarize_point("rate", 1, records, 0.0)


def test_length_range_parse_and_draw():
    assert LengthRange.parse("128") == LengthRange(128, 128)
    assert LengthRange.parse("64:256") == LengthRange(64, 256)
    assert str(LengthRange(64, 256)) == "64:256" and str(LengthRange(8, 8)) == "8"
    for bad in ("0", "10:5", "x", "1:2:3", ""):
        with pytest.raises(ValueError):
            LengthRange.parse(bad)
    rng = random.Random(1)
    draws = {LengthRange(3, 5).draw(rng) for _ in range(200)}
    assert draws == {3, 4, 5}


def test_random_token_prompts_are_seeded_and_in_vocab():
    length = LengthRange(4, 9)
    first = random_token_prompts(20, length, 50, [2], random.Random(7))
    again = random_token_prompts(20, length, 50, [2], random.Random(7))
    assert first == again
    assert all(4 <= len(p) <= 9 for p in first)
    ids = {t for p in first for t in p}
    assert ids and max(ids) < 50 and 2 not in ids and 0 not in ids
    with pytest.raises(ValueError):
        random_token_prompts(1, length, 1, [], random.Random(0))


def test_prompt_files(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("hello there\n\nsecond prompt\n", encoding="utf-8")
    assert load_prompt_file(plain) == ["hello there", "second prompt"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"text": "b"}\n{"token_ids": [1, 2]}\n"c"\n[5]\n', encoding="utf-8")
    assert load_prompt_file(jsonl) == ["a", "b", [1, 2], "c", [5]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_prompt_file(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_file(empty)


def test_bench_config_validation():
    assert BenchConfig("h:1", concurrency=(1,), num_requests=1)
    for kwargs in ({}, {"concurrency": (0,), "num_requests": 1}, {"rates": (0.0,), "num_requests": 1},
                   {"concurrency": (1,)}, {"concurrency": (1,), "num_requests": 0},
                   {"concurrency": (1,), "duration": -1.0}, {"rates": (1.0,), "num_requests": 1,
                                                              "max_concurrency": 0},
                   {"concurrency": (1,), "num_requests": 1, "slo_ttft_ms": 0.0}):
        with pytest.raises(ValueError):
            BenchConfig("h:1", **kwargs)


def test_progress_bar_and_tables():
    out = io.StringIO()
    bar = ProgressBar("concurrency 2", out, total=4, duration=None, interval=0.0)
    bar.update(True)
    bar.update(False)
    bar.finish()
    text = out.getvalue()
    assert "2/4 ok=1 failed=1" in text and text.endswith("\n") and "#" * 15 in text
    silent = io.StringIO()
    quiet = ProgressBar("x", silent, total=None, duration=1.0, enabled=False)
    quiet.update(True)
    quiet.finish()
    assert silent.getvalue() == ""

    records = [record(start=float(i)) for i in range(3)]
    point = summarize_point("rate", 2.0, records, 1.5, slo_tpot=0.02)
    block = format_point(point)
    assert "rate 2 req/s" in block and "goodput 2.00 req/s" in block
    for name in ("TTFT", "ITL", "TPOT", "E2E", "p50", "p90", "p95", "p99", "mean"):
        assert name in block
    assert "50.0" in block  # the TTFT mean, in ms
    assert "concurrency 3" in format_sweep([summarize_point("concurrency", 3, records, 1.0), point])

    report = BenchReport("h:1", {"vocab_size": 10}, {"seed": 0}, [point], [records])
    data = report.to_dict()
    json.dumps(data, allow_nan=False)  # standard JSON: no NaN
    assert data["points"][0]["ttft"]["mean"] == pytest.approx(50.0)
    assert len(data["points"][0]["requests"]) == 3
    assert data["points"][0]["requests"][1]["start_s"] == pytest.approx(1.0)
