"""Reflection-driven fuzzing of every RPC against a real server on the reference engine.

The API is discovered the way a gateway would, through server reflection; each case is a random
message for a random method (random strings with non-ASCII and control characters in every
string field, extreme numbers, random presence, nested messages) with random metadata. No case
may end in INTERNAL or UNKNOWN; afterwards the server is SERVING and the engine idle.
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tokenrelay.v1 import jobs_pb2, jobs_pb2_grpc

pytest.importorskip("tokenrelay_engines.torch.engine")

from tests.engine_mode import engine_process  # noqa: E402
from tokenrelay_server.app import start_server  # noqa: E402
from tokenrelay_server.config import ServerConfig  # noqa: E402
from tokenrelay_server.jobs.model import JobsConfig  # noqa: E402
from tests.integration.test_torch_serving import DEMO  # noqa: E402

CASES = 5000
SEED = 20261203
SERVICES = ("tokenrelay.v1.TextGenerationService", "tokenrelay.v1.JobsService")
_INTS = (0, 1, 2, 3, 4, -1, 7, 16, 31, 100, 1000, 2 ** 31 - 1, -2 ** 31, 10 ** 6)
_FLOATS = (0.0, 1.0, 0.5, -1.0, 2.0, 1e30, -1e-30, float("nan"), float("inf"), float("-inf"))
_ALPHABETS = ("0123456789+= ", "abcdefghijklmnopqrstuvwxyz ", "\x00\x01\n\r\t\x1b\x7f", "éß漢字🙂\u200b\ufeff",
              "".join(chr(c) for c in range(0x20, 0x7f)))


def random_text(rng: random.Random) -> str:
    size = rng.choice((0, 1, 3, 8, 20, 200, rng.randint(0, 5000)))
    alphabet = "".join(rng.sample(_ALPHABETS, rng.randint(1, len(_ALPHABETS))))
    return "".join(rng.choice(alphabet) for _ in range(size))


def random_scalar(rng: random.Random, field) -> object:
    t = field.type
    if t == FD.TYPE_STRING:
        return random_text(rng)
    if t == FD.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 64))
    if t == FD.TYPE_BOOL:
        return rng.random() < 0.5
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return rng.choice(_FLOATS) if rng.random() < 0.7 else rng.uniform(-3, 3)
    if t == FD.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return rng.choice(values) if rng.random() < 0.8 else rng.choice((-1, 99, 2 ** 31 - 1))
    value = rng.choice(_INTS) if rng.random() < 0.8 else rng.randint(-5, 64)
    if t in (FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_FIXED32, FD.TYPE_FIXED64):
        return abs(value) if rng.random() < 0.9 else 2 ** 63 + rng.randint(0, 100)
    return value


def fill(rng: random.Random, message, depth: int = 0) -> None:
    """Random values in a random subset of `message`'s fields (one member per oneof)."""
    chosen_oneofs = {o.name: rng.choice(o.fields) for o in message.DESCRIPTOR.oneofs if o.fields}
    for field in message.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and chosen_oneofs.get(oneof.name) is not field:
            continue
        if rng.random() < 0.35:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(message, field.name)
            for _ in range(rng.choice((0, 1, 3, 70))):
                key = random_text(rng)[:80] if rng.random() < 0.9 else random_text(rng)
                target[key] = random_text(rng)[:300]
            continue
        if field.is_repeated:
            target = getattr(message, field.name)
            count = rng.choice((0, 1, 2, 5, 40, 2000))
            for _ in range(count):
                if field.message_type is not None:
                    if depth < 3:
                        fill(rng, target.add(), depth + 1)
                else:
                    target.append(random_scalar(rng, field))
            continue
        if field.message_type is not None:
            if depth < 3:
                fill(rng, getattr(message, field.name), depth + 1)
                getattr(message, field.name).SetInParent()
            continue
        setattr(message, field.name, random_scalar(rng, field))


def random_metadata(rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for key in ("x-request-id", "idempotency-key", "traceparent", "authorization"):
        if rng.random() < 0.3:
            text = random_text(rng) if rng.random() < 0.3 else "".join(
                chr(rng.randint(0x20, 0x7e)) for _ in range(rng.choice((1, 10, 129, 500))))
            out.append((key, text[: rng.choice((10, 200, 3000))]))
    return out


async def discover(channel: grpc.aio.Channel) -> descriptor_pool.DescriptorPool:
    """Every tokenrelay service's file descriptors, through server reflection."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for service in SERVICES:
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=service)]), timeout=10)
        async for response in call:
            protos = [descriptor_pb2.FileDescriptorProto.FromString(b)
                      for b in response.file_descriptor_response.file_descriptor_proto]
            pending = [p for p in protos if p.name not in added]
            while pending:  # dependencies first
                for proto in list(pending):
                    if all(dep in added for dep in proto.dependency):
                        pool.Add(proto)
                        added.add(proto.name)
                        pending.remove(proto)
    return pool


async def run_case(channel: grpc.aio.Channel, method, rng: random.Random) -> str:
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    request = request_cls()
    fill(rng, request)
    path = f"/{method.containing_service.full_name}/{method.name}"
    kwargs = dict(request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString)
    metadata = random_metadata(rng)
    if any(not all(0x20 <= ord(c) <= 0x7e for c in value) for _, value in metadata):
        return "CLIENT_REJECTED"  # grpc clients refuse to send such header values (HTTP/2 rules)
    timeout = rng.choice((0.05, 0.5, 5.0, 20.0))
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=timeout)
            count = 0
            while await call.read() is not grpc.aio.EOF and count < 50:
                count += 1
            call.cancel()
            code = await call.code()
            return code.name if code != grpc.StatusCode.CANCELLED or count < 50 else "OK"
        await channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=timeout)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            return f"{exc.code().name}: {path}: {exc.details()!r}"
        return exc.code().name


@pytest.mark.slow
async def test_fuzz_every_method_from_reflection(tmp_path):
    config = ServerConfig(host="127.0.0.1", port=0, engine="torch", torch=DEMO, engine_process=engine_process(),
                          jobs=JobsConfig(store_url=f"sqlite://{tmp_path}/fuzz.sqlite", max_running=4))
    handle = await asyncio.wait_for(start_server(config), timeout=240)
    rng = random.Random(SEED)
    outcomes: dict[str, int] = {}
    bad: list[str] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            pool = await discover(channel)
            methods = [m for name in SERVICES for m in pool.FindServiceByName(name).methods]
            assert {m.name for m in methods} >= {"Generate", "GenerateStream", "Tokenize", "SubmitJob", "WatchJob"}
            sent = 0
            started = time.monotonic()
            while sent < CASES:
                batch = [run_case(channel, rng.choice(methods), random.Random(rng.random())) for _ in range(32)]
                for result in await asyncio.wait_for(asyncio.gather(*batch), timeout=120):
                    if result == "CLIENT_REJECTED":
                        continue
                    sent += 1
                    key = result.split(":")[0]
                    outcomes[key] = outcomes.get(key, 0) + 1
                    if key in ("INTERNAL", "UNKNOWN"):
                        bad.append(result)
            elapsed = time.monotonic() - started
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", *SERVICES):
                got = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert got.status == health_pb2.HealthCheckResponse.SERVING, service
            jobs = jobs_pb2_grpc.JobsServiceStub(channel)
            listed = await jobs.ListJobs(jobs_pb2.ListJobsRequest(page_size=1000, states=[
                jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING]), timeout=30)
            for job in listed.jobs:  # what the fuzz queued: stop it, then the engine must be empty
                await jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id), timeout=30)
        deadline = time.monotonic() + 60
        while not handle.engine.stats().idle or handle.engine.stats().kv_blocks_used:
            assert time.monotonic() < deadline, f"engine not idle: {handle.engine.stats()}"
            await asyncio.sleep(0.05)
    finally:
        await asyncio.wait_for(handle.stop(0), timeout=60)
    assert not bad, f"{len(bad)} INTERNAL/UNKNOWN, e.g. {bad[:5]}"
    assert sent >= CASES and outcomes.get("INVALID_ARGUMENT", 0) > 500 and outcomes.get("OK", 0) > 100, outcomes
    print(f"fuzz: {sent} cases in {elapsed:.1f}s: {outcomes}")
