"""An independent client of rigger-inference that knows nothing but the
server's address: it learns the contracts through gRPC reflection (grpcio's
v1alpha client), checks health, and calls every RPC with messages built from
the reflected descriptors. Prints one JSON report for the Rust test to check.
"""

import json
import sys
import time

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "rigger.inference.v1.InferenceService"


def main() -> None:
    address = sys.argv[1]
    channel = grpc.insecure_channel(address)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(database.get_services())
    pool = DescriptorPool(database)
    service = pool.FindServiceByName(SERVICE)

    def rpc(name, streaming=False):
        method = service.methods_by_name[name]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        path = f"/{SERVICE}/{name}"
        factory = channel.unary_stream if streaming else channel.unary_unary
        call = factory(
            path,
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        return lambda fields: call(json_format.ParseDict(fields, request_class()), timeout=120)

    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while True:
        serving = health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status
        if serving == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    try:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        unknown_health = "OK"
    except grpc.RpcError as error:
        unknown_health = error.code().name

    status = json_format.MessageToDict(rpc("GetStatus")({}))

    events = [
        json_format.MessageToDict(message)
        for message in rpc("Generate", streaming=True)(
            {"prompt": "Say hello.", "sampling": {"maxTokens": 8, "temperature": 0}}
        )
    ]

    enhanced = json_format.MessageToDict(
        rpc("EnhanceTask")(
            {
                "task": {
                    "id": "T-1",
                    "title": "Add a logout button",
                    "description": "Users cannot end their session from the page header.",
                },
                "kind": "ENHANCEMENT_KIND_CLARIFY",
                "sampling": {"temperature": 0, "seed": 3},
            }
        )
    )

    models = json_format.MessageToDict(rpc("ListModels")({}))
    try:
        rpc("LoadModel")({"model": models["models"][0]["name"]})
        load = "OK"
    except grpc.RpcError as error:
        load = error.code().name

    try:
        rpc("DecomposeTask")({"task": {"title": "Ship", "complexity": 11}})
        invalid = {"code": "OK"}
    except grpc.RpcError as error:
        invalid = {"code": error.code().name, "message": error.details()}

    print(
        json.dumps(
            {
                "services": services,
                "health": health_pb2.HealthCheckResponse.ServingStatus.Name(serving),
                "unknown_health": unknown_health,
                "status": status,
                "generate": events,
                "enhance": enhanced,
                "models": models,
                "load": load,
                "invalid": invalid,
            }
        )
    )


if __name__ == "__main__":
    main()
