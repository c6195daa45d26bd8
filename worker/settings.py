"""Runtime settings, read from the environment (and ``.env``) once, in the composition root."""

from __future__ import annotations

import logging
import re
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker import limits

log = logging.getLogger(__name__)

# Reply queues a caller may name by default: RabbitMQ Direct Reply-to pseudo-queues and server-named
# (exclusive, auto-delete) queues. Anything else must match REPLY_TO_PATTERN, so a caller cannot make
# the worker publish into another application's queue.
DEFAULT_REPLY_TO = r"amq\.rabbitmq\.reply-to(\..+)?|amq\.gen-[A-Za-z0-9_\-]+"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- broker ---
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    amqp_ca_file: str | None = None
    amqp_cert_file: str | None = None
    amqp_key_file: str | None = None
    queue_type: Literal["quorum", "classic"] = "quorum"
    # Quorum queues count deliveries; past this many the broker dead-letters the message.
    delivery_limit: int = Field(default=5, ge=1)
    prefetch_count: int | None = Field(default=None, ge=1)
    amqp_reconnect_interval_s: float = Field(default=2.0, gt=0)

    # --- embedding backend ---
    embed_backend: Literal["gemini", "emulator"] = "gemini"
    gemini_api_key: SecretStr | None = None
    gemini_model: str = "gemini-embedding-001"
    gemini_base_url: str | None = None
    allowed_models: list[str] = Field(default_factory=list)
    upstream_timeout_s: float = Field(default=30.0, gt=0)
    # Send through the SDK's API client and parse vectors with orjson (see embedders/gemini.py).
    gemini_fast_path: bool = True
    retry_max_attempts: int = Field(default=5, ge=1)
    retry_base_delay_ms: float = Field(default=200.0, ge=0)
    retry_max_delay_ms: float = Field(default=20_000.0, ge=0)
    # Client-side share of the API quota for this process (0 = no limit).
    upstream_rpm: float = Field(default=0, ge=0)
    upstream_tpm: float = Field(default=0, ge=0)
    # Pause consuming after this many failed upstream calls in a row (0 = never); probe after the cooldown.
    breaker_failures: int = Field(default=5, ge=0)
    breaker_cooldown_s: float = Field(default=5.0, gt=0)

    # --- batching ---
    batch_max_size: int = Field(default=limits.MAX_TEXTS_PER_CALL, ge=1, le=limits.MAX_TEXTS_PER_CALL)
    batch_max_wait_ms: float = Field(default=50.0, ge=0)
    max_concurrent_batches: int = Field(default=4, ge=1)

    # --- request limits ---
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_texts_per_request: int = Field(default=1000, ge=1)
    max_tokens_per_text: int = Field(default=limits.MAX_TOKENS_PER_TEXT, ge=1)
    reply_to_pattern: str | None = None
    # Before batching a Direct Reply-to request, ask the broker whether its caller still listens.
    check_callers: bool = True

    # --- deferred lane (fire-and-forget, vectors into Redis); on when REDIS_URL is set ---
    redis_url: SecretStr | None = None
    deferred_enabled: bool = True
    deferred_batch_max_size: int = Field(default=limits.MAX_TEXTS_PER_CALL, ge=1, le=limits.MAX_TEXTS_PER_CALL)
    deferred_max_concurrent_batches: int = Field(default=2, ge=1)
    deferred_flush_interval_s: float = Field(default=300.0, gt=0)
    deferred_max_messages: int = Field(default=1000, ge=1)
    deferred_wake_messages: int = Field(default=1000, ge=0)
    deferred_poll_s: float = Field(default=5.0, gt=0)
    deferred_skip_unchanged: bool = True
    # Gemini Batch API jobs for the deferred lane (lower price, results within Google's batch turnaround).
    deferred_batch_api: bool = False
    deferred_batch_api_poll_s: float = Field(default=60.0, gt=0)
    deferred_batch_api_jobs_key: str = "embed-worker:batch-jobs"  # Redis hash of jobs in flight

    # --- observability ---
    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # /metrics, /healthz, /readyz; unset = off
    metrics_host: str = "0.0.0.0"

    # --- process ---
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {value!r}")
        return level

    @field_validator("reply_to_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value:
            re.compile(value)
        return value or None

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in ("amqp", "amqps"):
            raise ValueError("must start with amqp:// or amqps://")
        return value

    @model_validator(mode="after")
    def _backend_needs_key(self) -> Settings:
        if self.embed_backend == "gemini" and not self.gemini_api_key:
            raise ValueError(
                "GEMINI_API_KEY is not set. Set it to your Gemini API key, or set EMBED_BACKEND=emulator "
                "to run against the bundled Gemini emulator (no key, no network, synthetic vectors)."
            )
        return self

    # --- derived values ---
    @property
    def effective_prefetch(self) -> int:
        """Messages the broker may hand this consumer before any ack.

        Messages stay unacked until their batch's replies are out, so the window must hold every batch
        in flight (``size x concurrency``) and the next round forming behind them (as much again), plus
        one batch of slack: ``size x (2 x concurrency + 1)``. Measured with the upstream-bound benchmark
        (300 ms upstream): mean batch 96 texts at size x (concurrency + 1), 100 at this window.
        """
        if self.prefetch_count is not None:
            return self.prefetch_count
        return self.batch_max_size * (2 * self.max_concurrent_batches + 1)

    def prefetch_warnings(self) -> list[str]:
        prefetch = self.effective_prefetch
        if prefetch < self.batch_max_size:
            return [
                f"PREFETCH_COUNT={prefetch} is below BATCH_MAX_SIZE={self.batch_max_size}: batches of "
                "single-text requests can never fill, and every batch will wait BATCH_MAX_WAIT_MS"
            ]
        needed = self.batch_max_size * self.max_concurrent_batches
        if prefetch < needed:
            return [
                f"PREFETCH_COUNT={prefetch} is below BATCH_MAX_SIZE x MAX_CONCURRENT_BATCHES={needed}: "
                "not every concurrent batch can fill"
            ]
        return []

    @property
    def models(self) -> frozenset[str]:
        return frozenset([self.gemini_model, *self.allowed_models])

    @property
    def reply_to_regex(self) -> re.Pattern[str]:
        pattern = DEFAULT_REPLY_TO
        if self.reply_to_pattern:
            pattern = f"(?:{pattern})|(?:{self.reply_to_pattern})"
        return re.compile(pattern)

    @property
    def amqp_url_redacted(self) -> str:
        return redact_url(self.amqp_url.get_secret_value())


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
