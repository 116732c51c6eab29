"""grpc.health.v1 Health/Check for `tokenrelay health`, with no dependency beyond grpcio and
protobuf (the client's own): the two messages are declared here in a private descriptor pool,
so they never clash with grpcio-health-checking's registration when both are loaded."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"
_FIELD = descriptor_pb2.FieldDescriptorProto


def _health_messages() -> tuple[Any, Any, Any]:
    """(HealthCheckRequest, HealthCheckResponse, its ServingStatus enum descriptor), as in
    grpc/health/v1/health.proto."""
    file = descriptor_pb2.FileDescriptorProto(name="tokenrelay/cli/grpc_health_v1.proto",
                                              package="grpc.health.v1", syntax="proto3")
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=_FIELD.TYPE_STRING, label=_FIELD.LABEL_OPTIONAL)
    response = file.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(name="status", number=1, type=_FIELD.TYPE_ENUM, label=_FIELD.LABEL_OPTIONAL,
                       type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    request_type = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest"))
    response_descriptor = pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
    return (request_type, message_factory.GetMessageClass(response_descriptor),
            response_descriptor.enum_types_by_name["ServingStatus"])


def check(channel: grpc.Channel, service: str, *, timeout: float,
          metadata: Any = None) -> str:
    """The serving status name (SERVING, NOT_SERVING, ...) of `service` ('' = the server)."""
    request_type, response_type, status_enum = _health_messages()
    call = channel.unary_unary(CHECK_METHOD, request_serializer=request_type.SerializeToString,
                               response_deserializer=response_type.FromString)
    response = call(request_type(service=service), timeout=timeout, metadata=metadata)
    value = status_enum.values_by_number.get(response.status)
    return value.name if value is not None else str(response.status)
