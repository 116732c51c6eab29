"""server.convert: proto -> Request validation and RequestOutput -> proto building; errors mapping."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from tokenrelay.v1 import generation_pb2 as gen

from tokenrelay_engines.base import (
    SAMPLING_RANGES, EngineDeadError, FinishReason, InvalidRequest, ModelInfo, RequestMetrics, RequestOutput,
    SamplingParams, TokenLogprob, Usage,
)
from tokenrelay_server import convert
from tokenrelay_server.errors import AdmissionRejected, InvalidRequests, ServerDraining, to_status
from tokenrelay_server.limits import InputLimits

INFO = ModelInfo(name="m", context_length=64, vocab_size=100, eos_token_ids=(2,), max_logprobs=5,
                 max_stop_strings=2)


def tokenize(text: str) -> list[int]:
    return [1] + [min(ord(c), 99) for c in text]


def build(params: gen.GenerationParams, request_id: str = "rid"):
    return convert.request_from_params(params, request_id=request_id, info=INFO, tokenize=tokenize,
                                       arrival_time=1.0, deadline=None, limits=InputLimits())


def test_defaults_for_unset_fields():
    r = build(gen.GenerationParams(text="abc"))
    assert r.prompt_token_ids == [1, 97, 98, 99]
    assert r.sampling.temperature == 1.0 and r.sampling.top_p == 1.0 and r.sampling.top_k == 0
    assert r.sampling.seed is not None and r.sampling.logprobs is None
    assert r.stopping.max_tokens == 16 and r.stopping.min_tokens == 0 and r.priority == 0
    # zero is a value, not "unset"
    z = build(gen.GenerationParams(text="abc", sampling=gen.SamplingParams(temperature=0.0, seed=0), logprobs=0))
    assert z.sampling.temperature == 0.0 and z.sampling.seed == 0 and z.sampling.logprobs == 0


def test_default_max_tokens_is_capped_by_the_context():
    r = build(gen.GenerationParams(token_ids=gen.TokenIds(ids=[5] * 60)))
    assert r.stopping.max_tokens == 4


def test_fields_copied():
    p = gen.GenerationParams(token_ids=gen.TokenIds(ids=[3, 4]), priority=-3, logprobs=2,
                             sampling=gen.SamplingParams(temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, seed=11,
                                                         repetition_penalty=1.2, presence_penalty=0.5,
                                                         frequency_penalty=-0.5),
                             stopping=gen.StoppingCriteria(max_tokens=9, min_tokens=2, stop=["x"], stop_token_ids=[7],
                                                           ignore_eos=True, include_stop_in_output=True))
    r = convert.request_from_params(p, request_id="q", info=INFO, tokenize=tokenize, arrival_time=2.0, deadline=5.0,
                                  limits=InputLimits())
    assert (r.request_id, r.prompt_token_ids, r.priority, r.arrival_time, r.deadline) == ("q", [3, 4], -3, 2.0, 5.0)
    assert r.sampling.top_k == 7 and r.sampling.seed == 11 and r.sampling.logprobs == 2
    assert r.sampling.top_p == pytest.approx(0.9) and r.sampling.repetition_penalty == pytest.approx(1.2)
    assert r.stopping.stop == ("x",) and r.stopping.stop_token_ids == (7,) and r.stopping.ignore_eos
    assert r.stopping.include_stop_in_output and r.stopping.min_tokens == 2


@pytest.mark.parametrize(("params", "field"), [
    (gen.GenerationParams(), "params.prompt"),
    (gen.GenerationParams(text="x" * 64), "params.prompt"),
    (gen.GenerationParams(text="a", stopping=gen.StoppingCriteria(max_tokens=63)), "params.stopping.max_tokens"),
    (gen.GenerationParams(token_ids=gen.TokenIds(ids=[1, 100])), "params.token_ids.ids[1]"),
    (gen.GenerationParams(text="a", logprobs=6), "params.logprobs"),
    (gen.GenerationParams(text="a", stopping=gen.StoppingCriteria(stop=["a", "b", "c"])), "params.stopping.stop"),
    (gen.GenerationParams(text="a", sampling=gen.SamplingParams(top_p=float("inf"))), "params.sampling.top_p"),
])
def test_violations_name_the_field(params, field):
    with pytest.raises(InvalidRequest) as err:
        build(params)
    assert isinstance(err.value, InvalidRequests)
    assert field in [f for f, _ in err.value.violations]


BAD_SAMPLING = {"temperature": -0.5, "top_p": 0.0, "top_k": -1, "min_p": 1.5, "repetition_penalty": 0.0,
                "presence_penalty": 2.5, "frequency_penalty": float("nan")}


def test_sampling_ranges_are_one_table_for_the_domain_type_and_the_edge():
    assert [name for name, _, _ in SAMPLING_RANGES] == list(BAD_SAMPLING)
    with pytest.raises(InvalidRequests) as err:  # the edge reports every bad field at once
        build(gen.GenerationParams(text="a", sampling=gen.SamplingParams(**BAD_SAMPLING)))
    edge = dict(err.value.violations)
    for name, _, rule in SAMPLING_RANGES:
        assert edge[f"params.sampling.{name}"].startswith(rule + ", got ")
        with pytest.raises(InvalidRequest) as one:  # the domain type applies the same rule itself
            SamplingParams(**{name: BAD_SAMPLING[name]})
        assert (one.value.field, one.value.description) == (f"sampling.{name}", rule)


@pytest.mark.parametrize("bad_id", ["x" * 129, "é", "a\nb", "\x00", "a b"])
def test_request_id_limits(bad_id):
    with pytest.raises(InvalidRequests) as err:
        build(gen.GenerationParams(text="a", request_id=bad_id))
    assert [f for f, _ in err.value.violations] == ["params.request_id"]
    assert build(gen.GenerationParams(text="a", request_id="x" * 128), request_id="x" * 128).request_id == "x" * 128


def test_with_params_prefix():
    assert convert.with_params_prefix("stopping.max_tokens") == "params.stopping.max_tokens"
    assert convert.with_params_prefix("prompt_token_ids[3]") == "params.token_ids.ids[3]"
    assert convert.with_params_prefix("params.prompt") == "params.prompt"


def test_accumulator_builds_the_result():
    acc = convert.ResultAccumulator("r", seed=9, want_logprobs=True)
    acc.add(RequestOutput("r", token_ids=[5], text=" a", logprobs=[TokenLogprob(5, -0.5, ((5, -0.5), (6, -1.0)))],
                          seed=9))
    acc.add(RequestOutput("r", token_ids=[7], text=" b", logprobs=[TokenLogprob(7, -0.25)], finished=True,
                          finish_reason=FinishReason.STOP, stop_reason="x", usage=Usage(3, 2, 1),
                          metrics=RequestMetrics(arrival_time=10.0, first_scheduled_time=10.5,
                                                 first_token_time=11.0, finished_time=12.25)))
    r = acc.result()
    assert (r.request_id, r.text, list(r.token_ids), r.seed) == ("r", " a b", [5, 7], 9)
    assert r.finish_reason == gen.FINISH_REASON_STOP and r.matched_stop.stop_string == "x"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.cached_tokens) == (3, 2, 1)
    assert r.timing.queued.ToMilliseconds() == 500 and r.timing.time_to_first_token.ToMilliseconds() == 1000
    assert r.timing.total.ToMilliseconds() == 2250
    assert [lp.token_id for lp in r.logprobs] == [5, 7] and r.logprobs[0].top[1].token_id == 6


def test_stream_events():
    assert convert.stream_delta(RequestOutput("r")) is None
    d = convert.stream_delta(RequestOutput("r", token_ids=[1], text="x"))
    assert d.delta.text == "x" and list(d.delta.token_ids) == [1]
    f = convert.stream_finished(RequestOutput("r", finished=True, finish_reason=FinishReason.STOP, stop_reason=7,
                                              usage=Usage(1, 1)))
    assert f.finished.matched_stop.stop_token_id == 7 and f.finished.finish_reason == gen.FINISH_REASON_STOP
    assert not f.finished.timing.HasField("total")


def _detail(status, kind):
    for d in status.details:
        if d.Is(kind.DESCRIPTOR):
            msg = kind()
            d.Unpack(msg)
            return msg
    return None


def test_error_mapping():
    s = to_status(InvalidRequest("sampling.top_p", "bad"))
    assert s.code == code_pb2.INVALID_ARGUMENT
    assert _detail(s, error_details_pb2.BadRequest).field_violations[0].field == "sampling.top_p"
    s = to_status(AdmissionRejected("full", 0.25))
    assert s.code == code_pb2.RESOURCE_EXHAUSTED
    assert _detail(s, error_details_pb2.RetryInfo).retry_delay.ToMilliseconds() == 250
    assert to_status(ServerDraining("bye")).code == code_pb2.UNAVAILABLE
    assert to_status(EngineDeadError("dead")).code == code_pb2.UNAVAILABLE
    assert to_status(RuntimeError("boom")).code == code_pb2.INTERNAL
    assert grpc.StatusCode.OK.value[0] == code_pb2.OK
