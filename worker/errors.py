"""Error kinds and the wire codes they map to.

Every error that reaches a caller carries a stable ``code`` and the wire flag ``retryable``. Two questions
are kept apart, and each kind answers both when it is built:

- ``retry_now`` (upstream errors only): may the same call succeed if we try again within this batch's retry
  budget? Yes for 429 per minute, 5xx, timeouts and connection errors.
- ``retryable`` (the wire flag, under the same name): is the request itself fine, so that sending it again later
  may succeed? Then the caller is told ``retryable: true`` and the message is parked in the dead-letter queue for
  replay. Yes for upstream failures that outlived the budget, per-day quotas and credential problems; no for bad
  input. One exception (``parked = False``): ``OverBudget``, a request the worker's own API budget cannot afford
  before its ``x-deadline``; the caller may send it again, but parked it would only outlive its deadline.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    UPSTREAM_ERROR = "upstream_error"
    RATE_LIMITED = "rate_limited"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    STORE_UNAVAILABLE = "store_unavailable"  # the deferred lane's Redis, in answers to `flush`
    INTERNAL = "internal"


class EmbedError(Exception):
    """An error that becomes an error reply."""

    code: ErrorCode = ErrorCode.INTERNAL
    parked = True  # when retryable, the message is also parked for replay (see above)

    def __init__(self, message: str, *, retryable: bool = False, code: ErrorCode | None = None):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        if code is not None:
            self.code = code


class InvalidRequest(EmbedError):
    code = ErrorCode.INVALID_REQUEST


class DeadlineExceeded(EmbedError):
    code = ErrorCode.DEADLINE_EXCEEDED


class UpstreamError(EmbedError):
    """The embedding API failed. Replayable exactly when a retry now could have helped (the budget ran out)."""

    code = ErrorCode.UPSTREAM_ERROR

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_now: bool,
        retry_after: float | None = None,
        retryable: bool | None = None,
    ):
        super().__init__(message, retryable=retry_now if retryable is None else retryable)
        self.status = status
        self.retry_now = retry_now
        # Seconds the API asked us to wait before retrying (google.rpc.RetryInfo), if it said.
        self.retry_after = retry_after


class OverBudget(EmbedError):
    """The worker's own API budget (UPSTREAM_RPM, UPSTREAM_TPM, UPSTREAM_USD_LIMIT) has no room for the request's
    call before its ``x-deadline``: answered at once, no upstream call, retryable, not parked."""

    code = ErrorCode.RATE_LIMITED
    parked = False

    def __init__(self, wait: float):
        super().__init__(
            f"the API budget (UPSTREAM_RPM, UPSTREAM_TPM, UPSTREAM_USD_LIMIT) has no room for {wait:.1f}s, past "
            "the request's x-deadline; send it again later",
            retryable=True,
        )


class RateLimited(UpstreamError):
    """429. A per-day quota will not recover within our retry budget, so it is not retried now; the request
    is still good tomorrow (or after a quota raise), so it is retryable later either way."""

    code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: float | None = None, daily: bool = False):
        super().__init__(message, status=429, retry_now=not daily, retry_after=retry_after, retryable=True)
        self.daily = daily


class CredentialError(UpstreamError):
    """The API key or the project, not the input: a wrong, expired or revoked key (which Gemini answers with
    HTTP 400 and an ErrorInfo reason such as API_KEY_INVALID), 401, 403, or a project precondition.
    Never bisected and never retried now; it trips the circuit breaker, and the request is parked for replay
    once an operator has fixed the key."""

    def __init__(self, message: str, *, status: int | None = None, reason: str | None = None):
        super().__init__(message, status=status, retry_now=False, retryable=True)
        self.reason = reason


class UpstreamInvalidInput(UpstreamError):
    """The API rejected the batch as a bad request (HTTP 400): some input in it is at fault."""

    code = ErrorCode.INVALID_REQUEST

    def __init__(self, message: str, *, status: int = 400):
        super().__init__(message, status=status, retry_now=False, retryable=False)


class StartupError(Exception):
    """The worker cannot start; the CLI prints the message as one line and exits with ``exit_code``."""

    exit_code = 1


class ConfigurationError(StartupError):
    """A setting is wrong (including credentials the broker refuses, or a vhost that does not exist)."""

    exit_code = 2


class BrokerUnreachable(StartupError):
    """The broker did not answer within AMQP_CONNECT_TIMEOUT_S (orchestrators start containers in any order)."""

    exit_code = 1
