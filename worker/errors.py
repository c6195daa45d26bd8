"""Error kinds and the wire codes they map to.

Two families matter to the worker: *transient* errors (worth retrying: 429, 5xx, timeouts, connection
errors) and *permanent* ones (the request itself is wrong, or the caller asked for something we cannot
do). Every error that reaches a caller carries a stable ``code`` and a ``retryable`` flag.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    UPSTREAM_ERROR = "upstream_error"
    RATE_LIMITED = "rate_limited"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


class EmbedError(Exception):
    """An error that becomes an error reply."""

    code: ErrorCode = ErrorCode.INTERNAL
    retryable: bool = False

    def __init__(self, message: str, *, code: ErrorCode | None = None, retryable: bool | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable


class InvalidRequest(EmbedError):
    code = ErrorCode.INVALID_REQUEST
    retryable = False


class DeadlineExceeded(EmbedError):
    code = ErrorCode.DEADLINE_EXCEEDED
    retryable = False


class UpstreamError(EmbedError):
    """The embedding API failed. ``transient`` says whether a retry may succeed."""

    code = ErrorCode.UPSTREAM_ERROR

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        transient: bool,
        retry_after: float | None = None,
        code: ErrorCode | None = None,
    ):
        super().__init__(message, code=code, retryable=transient)
        self.status = status
        self.transient = transient
        # Seconds the API asked us to wait before retrying (google.rpc.RetryInfo), if it said.
        self.retry_after = retry_after


class RateLimited(UpstreamError):
    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: float | None = None, daily: bool = False):
        # A per-day quota will not recover within our retry budget: no point retrying it here,
        # but the caller may well try again tomorrow (or after a quota raise).
        super().__init__(message, status=429, transient=not daily, retry_after=retry_after)
        self.retryable = True
        self.daily = daily


class UpstreamInvalidInput(UpstreamError):
    """The API rejected the batch as a bad request (HTTP 400): some input in it is at fault."""

    def __init__(self, message: str, *, status: int = 400):
        super().__init__(message, status=status, transient=False, code=ErrorCode.INVALID_REQUEST)
