"""The gateway's errors, each with its HTTP status and gRPC code in one place; both front ends map them
from here (HTTP handlers in `app.py`, gRPC in `grpc_server.py`)."""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, job_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.job_ids = job_ids or []

    @property
    def headers(self) -> dict[str, str]:
        return {}


class InvalidField(GatewayError):
    """A request field the gateway refuses; nothing was enqueued."""

    http_status = 422
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


class Unauthenticated(GatewayError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class NotFound(GatewayError):
    """An unknown model, or a job that does not exist or belongs to another API key."""

    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class UnknownLora(NotFound):
    """A request names a LoRA adapter that is not in the LoRA directory."""


class QueueFull(GatewayError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class QueueBytesFull(GatewayError):
    """The model's backlog holds its bound of bytes (LDM_MAX_BACKLOG_BYTES): the queue's memory, not the
    caller's rate, is what is short, so 503 (gRPC RESOURCE_EXHAUSTED), with Retry-After."""

    http_status = 503
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class WaitTimeout(GatewayError):
    """The request's wait ran out; the jobs go on and can be followed by id."""

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED

    @property
    def headers(self) -> dict[str, str]:
        return {"Location": f"/v1/jobs/{self.job_ids[0]}"} if self.job_ids else {}


class JobCancelled(GatewayError):
    http_status = 409
    grpc_code = grpc.StatusCode.CANCELLED


class JobExpired(GatewayError):
    """The job's deadline passed before a worker started it."""

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class JobFailed(GatewayError):
    """A worker took the job and failed it: a bad gateway, not a bad request."""

    http_status = 502
    grpc_code = grpc.StatusCode.INTERNAL


class Unavailable(GatewayError):
    """Redis cannot be reached, or refuses writes for now (out of memory, read-only, loading)."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, job_ids: list[str] | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, job_ids)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class WaitInterrupted(GatewayError):
    """The job queue went away while a request waited for jobs it had accepted: they go on. Not a
    code clients retry on their own (gRPC ABORTED, HTTP `x-should-retry: false`): a blind retry would
    run them twice; follow them by id, or retry with the same Idempotency-Key."""

    http_status = 503
    grpc_code = grpc.StatusCode.ABORTED

    @property
    def headers(self) -> dict[str, str]:
        location = {"Location": f"/v1/jobs/{self.job_ids[0]}"} if self.job_ids else {}
        return {**location, "Retry-After": "1", "x-should-retry": "false"}
