"""One error tree for every service, mapped once per boundary.

Services raise subclasses of :class:`UnimodelError`; the boundaries translate them:
HTTP (status + JSON body), gRPC (status + ErrorDetail in the status details) and NATS (error headers).
Anything else that escapes is reported as INTERNAL with a generic message: never a traceback.
"""

from __future__ import annotations

from typing import ClassVar, cast

import grpc

from unimodel.v1 import errors_pb2

Code = errors_pb2.ErrorCode

HTTP_STATUS: dict[int, int] = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.UNAUTHENTICATED: 401,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.PAYLOAD_TOO_LARGE: 413,
    Code.UNSUPPORTED_MEDIA_TYPE: 415,
    Code.FAILED_PRECONDITION: 409,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
    Code.CANCELLED: 499,
    Code.INTERNAL: 500,
}

GRPC_STATUS: dict[int, grpc.StatusCode] = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.CANCELLED: grpc.StatusCode.CANCELLED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}


class UnimodelError(Exception):
    """Base of the error tree. ``retryable`` errors may succeed when sent again."""

    code: ClassVar[errors_pb2.ErrorCode] = Code.INTERNAL
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, retry_after_s: float = 0.0, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.metadata = {k: str(v) for k, v in metadata.items()}

    @property
    def code_name(self) -> str:
        return cast(str, Code.Name(self.code))  # protobuf ships no type information: its enum wrapper is Any

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return GRPC_STATUS[self.code]

    def to_proto(self) -> errors_pb2.ErrorDetail:
        return errors_pb2.ErrorDetail(
            code=self.code, message=self.message, retry_after_s=self.retry_after_s, metadata=self.metadata
        )

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code_name, "message": self.message}
        if self.metadata:
            body["details"] = dict(self.metadata)
        return {"error": body}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidArgument(UnimodelError):
    code = Code.INVALID_ARGUMENT


class NotFound(UnimodelError):
    code = Code.NOT_FOUND


class AlreadyExists(UnimodelError):
    code = Code.ALREADY_EXISTS


class PermissionDenied(UnimodelError):
    code = Code.PERMISSION_DENIED


class Unauthenticated(UnimodelError):
    code = Code.UNAUTHENTICATED


class ResourceExhausted(UnimodelError):
    code = Code.RESOURCE_EXHAUSTED
    retryable = True


class PayloadTooLarge(UnimodelError):
    code = Code.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(UnimodelError):
    code = Code.UNSUPPORTED_MEDIA_TYPE


class FailedPrecondition(UnimodelError):
    code = Code.FAILED_PRECONDITION


class Unavailable(UnimodelError):
    code = Code.UNAVAILABLE
    retryable = True


class DeadlineExceeded(UnimodelError):
    code = Code.DEADLINE_EXCEEDED


class Cancelled(UnimodelError):
    code = Code.CANCELLED


class Internal(UnimodelError):
    code = Code.INTERNAL


_BY_CODE: dict[int, type[UnimodelError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        PayloadTooLarge,
        UnsupportedMediaType,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}


def from_code(code: int | str, message: str, *, retry_after_s: float = 0.0, **metadata: str) -> UnimodelError:
    """Rebuild an error received over the wire (by enum value or name)."""
    if isinstance(code, str):
        code = Code.Value(code) if code in Code.keys() else Code.INTERNAL
    cls = _BY_CODE.get(code, Internal)
    return cls(message, retry_after_s=retry_after_s, **metadata)


def from_proto(detail: errors_pb2.ErrorDetail) -> UnimodelError:
    return from_code(detail.code, detail.message, retry_after_s=detail.retry_after_s, **dict(detail.metadata))


def ensure_unimodel_error(exc: BaseException) -> UnimodelError:
    """Any exception as a client-safe error: ours pass through, others become a generic INTERNAL."""
    if isinstance(exc, UnimodelError):
        return exc
    return Internal("internal error")
