"""The handover's wire codec: typed messages <-> one protobuf record each.

Why apart from ``uffdd.core.handover``: the core stays free of generated code, so the
types and every check live there and this module only translates. Both ends use it
(the daemon's listener and the restorer), so they agree by construction. A request is
decoded *and* validated in one call: nothing unchecked leaves :func:`decode_request`.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from uffdd.core.addresses import ImageAddr, RunAddr
from uffdd.core.errors import PeerProtocolError
from uffdd.core.handover import (
    MAX_REQUEST_BYTES,
    Ack,
    Error,
    ErrorCode,
    Failed,
    HandoverLimits,
    HandoverRegion,
    HandoverRejected,
    HandoverRequest,
    Progress,
    Reply,
    ResidentSummary,
    check_version,
    validate_request,
)
from uffdd.v1 import handover_pb2

__all__ = ["decode_reply", "decode_request", "encode_reply", "encode_request"]


def encode_request(request: HandoverRequest) -> bytes:
    """The bytes of one request record (no validation: tests send bad ones on purpose)."""
    message = handover_pb2.HandoverRequest(
        version=request.version,  # type: ignore[arg-type]  # any int, to test refusals
        pid=request.pid,
        image_id=request.image_id,
        page_server=request.page_server,
        regions=[
            handover_pb2.HandoverRegion(
                run_address=r.run_address,
                image_address=r.image_address,
                length=r.length,
                page_size=r.page_size,
            )
            for r in request.regions
        ],
        restorer=request.restorer,
        labels=dict(request.labels),
    )
    return message.SerializeToString()


def decode_request(
    data: bytes | bytearray | memoryview, limits: HandoverLimits | None = None
) -> HandoverRequest:
    """Decode and validate one request record; raise HandoverRejected saying what is wrong."""
    if len(data) > MAX_REQUEST_BYTES:
        raise HandoverRejected(ErrorCode.LIMIT, f"request of more than {MAX_REQUEST_BYTES} bytes")
    message = handover_pb2.HandoverRequest()
    try:
        message.ParseFromString(bytes(data))
    except (DecodeError, ValueError) as exc:  # ValueError: bad UTF-8 in a string field
        raise HandoverRejected(
            ErrorCode.MALFORMED, f"not a HandoverRequest ({len(data)} bytes): {exc}"
        ) from None
    check_version(message.version)  # first: another version may mean other fields
    request = HandoverRequest(
        image_id=message.image_id,
        regions=tuple(
            HandoverRegion(
                run_address=RunAddr(r.run_address),
                image_address=ImageAddr(r.image_address),
                length=r.length,
                page_size=r.page_size,
            )
            for r in message.regions
        ),
        pid=message.pid,
        page_server=message.page_server,
        restorer=message.restorer,
        labels=dict(message.labels),
        version=message.version,
    )
    return validate_request(request, limits or HandoverLimits())


def encode_reply(reply: Reply) -> bytes:
    """The bytes of one reply record."""
    match reply:
        case Ack(handover_id):
            message = handover_pb2.HandoverReply(
                ack=handover_pb2.HandoverAck(handover_id=handover_id)
            )
        case Error(code, text):
            message = handover_pb2.HandoverReply(
                error=handover_pb2.HandoverError(code=int(code), message=text)  # type: ignore[arg-type]
            )
        case Progress(resident, total):
            message = handover_pb2.HandoverReply(
                progress=handover_pb2.HandoverProgress(resident_bytes=resident, total_bytes=total)
            )
        case ResidentSummary():
            message = handover_pb2.HandoverReply(
                resident=handover_pb2.HandoverResident(
                    pages=reply.pages,
                    bytes=reply.bytes,
                    faults=reply.faults,
                    fault_p50_us=reply.fault_p50_us,
                    fault_p99_us=reply.fault_p99_us,
                    seconds_to_resident=reply.seconds_to_resident,
                )
            )
        case Failed(reason):
            message = handover_pb2.HandoverReply(failed=handover_pb2.HandoverFailed(reason=reason))
    return message.SerializeToString()


def decode_reply(data: bytes | bytearray | memoryview) -> Reply:
    """Decode one reply record; raise PeerProtocolError for anything else."""
    message = handover_pb2.HandoverReply()
    try:
        message.ParseFromString(bytes(data))
    except (DecodeError, ValueError) as exc:
        raise PeerProtocolError(f"not a HandoverReply ({len(data)} bytes): {exc}") from None
    kind = message.WhichOneof("reply")
    if kind == "ack":
        return Ack(message.ack.handover_id)
    if kind == "error":
        try:
            code = ErrorCode(message.error.code)
        except ValueError:
            code = ErrorCode.UNSPECIFIED
        return Error(code, message.error.message)
    if kind == "progress":
        return Progress(message.progress.resident_bytes, message.progress.total_bytes)
    if kind == "resident":
        r = message.resident
        return ResidentSummary(
            pages=r.pages,
            bytes=r.bytes,
            faults=r.faults,
            fault_p50_us=r.fault_p50_us,
            fault_p99_us=r.fault_p99_us,
            seconds_to_resident=r.seconds_to_resident,
        )
    if kind == "failed":
        return Failed(message.failed.reason)
    raise PeerProtocolError(f"a HandoverReply with no known reply ({len(data)} bytes)")
