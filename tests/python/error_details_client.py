"""An independent client that reads gRPC's standard error details
(google.rpc) from rigger-inference with grpcio-status, as any Python caller
would. It needs no stubs: it sends request bytes the Rust test encoded and
decodes only the error.

Reads the calls from stdin as JSON, one object per call: `name`, `address`,
`method` (the full path), `request` (hex), `streaming`, `timeout` (seconds,
or null for none). Prints one JSON object: per call its code, message,
trailers and each decoded detail.
"""

import json
import sys

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# Trailers the service keeps next to the details, for clients without them.
TRAILERS = ("retry-after", "rigger-violation")


def decoded(details):
    """The details the service sends, in the shape the Rust test compares."""
    report = {"bad_request": None, "retry_info": None, "error_info": None, "unknown": []}
    for detail in details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            message = error_details_pb2.BadRequest()
            detail.Unpack(message)
            report["bad_request"] = [
                [violation.field, violation.description]
                for violation in message.field_violations
            ]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            message = error_details_pb2.RetryInfo()
            detail.Unpack(message)
            delay = message.retry_delay.ToMilliseconds() if message.HasField("retry_delay") else None
            report["retry_info"] = {"delay_ms": delay}
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            message = error_details_pb2.ErrorInfo()
            detail.Unpack(message)
            report["error_info"] = {
                "reason": message.reason,
                "domain": message.domain,
                "metadata": dict(message.metadata),
            }
        else:
            report["unknown"].append(detail.type_url)
    return report


def outcome(call):
    channel = grpc.insecure_channel(call["address"])
    # No serializers: the request goes as the given bytes, answers come back
    # as bytes and are not read.
    factory = channel.unary_stream if call["streaming"] else channel.unary_unary
    method = factory(call["method"])
    try:
        answer = method(bytes.fromhex(call["request"]), timeout=call["timeout"])
        if call["streaming"]:
            for _ in answer:
                pass
        return {"code": "OK"}
    except grpc.RpcError as error:
        # from_call also checks that the details agree with the call's own
        # code and message.
        status = rpc_status.from_call(error)
        return {
            "code": error.code().name,
            "message": error.details(),
            "trailers": {
                key: value for key, value in error.trailing_metadata() or () if key in TRAILERS
            },
            "details": decoded(status.details) if status is not None else None,
        }
    finally:
        channel.close()


def main() -> None:
    calls = json.load(sys.stdin)
    json.dump({call["name"]: outcome(call) for call in calls}, sys.stdout)


if __name__ == "__main__":
    main()
