"""Runtime settings, read from the environment (and ``.env``) once per process by ``cli`` (never at import) and
handed to the composition root, ``app.run_worker``."""

from __future__ import annotations

import logging
import math
import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker import limits, logs
from worker.logs import redact_url
from worker.topology import QUORUM_MAX_PREFETCH

log = logging.getLogger(__name__)

DEFAULT_PREFETCH_MAX = 2000  # the derived prefetch window's most (Settings._wanted_prefetch says why)

# Reply queues a caller may name by default: RabbitMQ Direct Reply-to pseudo-queues and server-named
# (exclusive, auto-delete) queues. Anything else must match REPLY_TO_PATTERN. This keeps replies out of named
# application queues; it cannot tell one caller's amq.gen-* queue (or Direct Reply-to name) from another's,
# which is what broker permissions are for (README, Hardening). REPLY_TO_DIRECT_ONLY narrows it to Direct Reply-to.
DIRECT_REPLY_TO_ONLY = r"amq\.rabbitmq\.reply-to(\..+)?"
DEFAULT_REPLY_TO = DIRECT_REPLY_TO_ONLY + r"|amq\.gen-[A-Za-z0-9_\-]+"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Bounds of a sensible API budget: Gemini's longest limit is per day, and a budget allowing less than one call an
# hour is an outage, not a budget.
MAX_WINDOW_S = 86_400.0
MAX_CALL_SPACING_S = 3_600.0


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
    # Quorum queues are created with this many replicas (RabbitMQ takes every node when the cluster is smaller).
    quorum_initial_group_size: int = Field(default=5, ge=1)
    prefetch_count: int | None = Field(default=None, ge=1)
    amqp_reconnect_interval_s: float = Field(default=2.0, gt=0)
    # At start, keep trying a broker that does not answer yet for this long (containers start in any order).
    amqp_connect_timeout_s: float = Field(default=60.0, ge=0)

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
    # The API budget: calls and estimated tokens per UPSTREAM_WINDOW_S (0 = no limit), for this process
    # (UPSTREAM_LIMIT_SCOPE=process) or shared by every process through Redis (fleet).
    upstream_rpm: float = Field(default=0, ge=0)
    upstream_tpm: float = Field(default=0, ge=0)
    upstream_limit_scope: Literal["process", "fleet"] = "process"
    upstream_window_s: float = Field(default=60.0, gt=0)  # Gemini's limits are per minute; shorter only for tests
    # Embedding cache in Redis: 0 = off; a hit costs no upstream call.
    cache_ttl_s: float = Field(default=0, ge=0)
    cache_timeout_ms: float = Field(default=100.0, gt=0)  # past this, a cache read or write is skipped
    # Pause consuming after this many failed upstream calls in a row (0 = never); probe after the cooldown.
    breaker_failures: int = Field(default=5, ge=0)
    breaker_cooldown_s: float = Field(default=5.0, gt=0)

    # One upstream call's budgets: its request body, and (for endpoints with a per-request token cap, such as
    # Vertex's 20,000) its estimated tokens; 0 = no token budget. A batch closes before it would break either.
    upstream_max_request_bytes: int = Field(default=limits.MAX_REQUEST_BYTES, ge=65_536)
    upstream_max_tokens_per_call: int = Field(default=0, ge=0)

    # --- batching ---
    batch_max_size: int = Field(default=limits.MAX_TEXTS_PER_CALL, ge=1, le=limits.MAX_TEXTS_PER_CALL)
    batch_max_wait_ms: float = Field(default=50.0, ge=0)
    # The ceiling of the adaptive limit (flow.AdaptiveConcurrency starts at 4 and finds its own level under it): a
    # 100-text call takes 200-600 ms against Gemini, and Tier 1's 3,000 RPM needs 10-30 calls in flight to be used.
    max_concurrent_batches: int = Field(default=32, ge=1)

    # --- lanes: embed.requests (the default lane, queries) and embed.requests.bulk (ingestion) ---
    # Bulk's prefetch (unset = the same rule as PREFETCH_COUNT) and how long its batches wait to fill; its calls
    # go upstream after the default lane's, keeping BULK_MIN_SHARE of the slots while queries wait.
    bulk_prefetch_count: int | None = Field(default=None, ge=1)
    bulk_max_wait_ms: float = Field(default=200.0, ge=0)
    bulk_min_share: float = Field(default=0.25, ge=0, le=1)
    # A spend cap: estimated USD per UPSTREAM_USD_WINDOW_S (0 = none; Tier 1's is $10 per rolling 10 minutes),
    # in UPSTREAM_LIMIT_SCOPE like UPSTREAM_RPM and UPSTREAM_TPM.
    upstream_usd_limit: float = Field(default=0, ge=0)
    upstream_usd_window_s: float = Field(default=600.0, gt=0)

    # --- request limits ---
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # The bodies one worker holds at once, both lanes together (README, "Memory"): the RPC lane takes no more
    # deliveries while it is spent, the deferred lane takes no more messages for its round. One message larger
    # than all of it is still served, alone. The default keeps a worker with defaults inside a 512 MiB pod.
    max_held_bytes: int = Field(default=64 * 1024 * 1024, ge=65_536)
    # The largest reply the worker publishes: RabbitMQ 4.x refuses messages over 16 MiB by default
    # (max_message_size; 3.x: 128 MiB). A request whose reply would be larger is refused before any upstream call.
    reply_max_bytes: int = Field(default=16 * 1024 * 1024, ge=4096)
    max_texts_per_request: int = Field(default=1000, ge=1)
    # Estimated tokens one input may hold; unset = each model's own limit (2,048 for gemini-embedding-001,
    # 8,192 for gemini-embedding-2). A lower value refuses (or, with "truncate", cuts) longer texts.
    max_tokens_per_text: int | None = Field(default=None, ge=1)
    reply_to_pattern: str | None = None
    # Accept only Direct Reply-to names as reply_to (no server-named queues, no REPLY_TO_PATTERN).
    reply_to_direct_only: bool = False
    # Before batching a Direct Reply-to request, ask the broker whether its caller still listens.
    check_callers: bool = True

    # --- deferred lane (fire-and-forget, vectors into Redis); on when REDIS_URL is set ---
    redis_url: SecretStr | None = None
    # The embedding cache's Redis, when it should not share REDIS_URL's: an evicting (allkeys-lru) Redis is right for a
    # cache alone, and wrong where job records and callers' hashes live. Unset: REDIS_URL.
    cache_redis_url: SecretStr | None = None
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
    # The worker's own Redis keys (Batch API jobs, the embedding cache, fleet rate limits) live under this
    # prefix; deferred items keyed under it are refused, so a caller cannot write into the worker's state.
    redis_key_prefix: str = Field(default="embed-worker:", min_length=1)

    # --- observability ---
    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # /metrics, /healthz, /readyz; unset = off
    metrics_host: str = "0.0.0.0"

    # --- process ---
    # uvloop runs the event loop in C (libuv): measured here it saves ~12% of the CPU per request (161 against 182
    # µs in a drain; README, Performance). "asyncio" opts out; on a platform without uvloop the worker says so and
    # uses asyncio.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        return known_level(value)

    @field_validator("gemini_model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        """A model name goes into the API's URL path: only the characters model names use."""
        return _checked_model(value)

    @field_validator("allowed_models")
    @classmethod
    def _model_names(cls, value: list[str]) -> list[str]:
        return [_checked_model(name) for name in value]

    @field_validator("reply_to_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value or None

    @field_validator("redis_url", "cache_redis_url", mode="before")
    @classmethod
    def _redis_url(cls, value: object) -> object:
        """Empty means unset (the deferred lane stays off); otherwise it must be a Redis URL."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if isinstance(raw, str) and urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_scheme(cls, value: SecretStr) -> SecretStr:
        cls.check_amqp_url(value.get_secret_value())
        return value

    @staticmethod
    def check_amqp_url(value: str) -> None:
        """Raise ValueError unless ``value`` is one or more comma-separated amqp:// or amqps:// URLs, each with a
        valid port or none (``logs.check_amqp_url``, which the client commands call without building Settings)."""
        logs.check_amqp_url(value)

    @field_validator("upstream_rpm", "upstream_tpm", "upstream_window_s", "upstream_usd_limit", "upstream_usd_window_s")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number (UPSTREAM_RPM=0 or UPSTREAM_TPM=0 is no limit)")
        return value

    @model_validator(mode="after")
    def _sensible_budget(self) -> Settings:
        """A fractional UPSTREAM_RPM is accepted (``flow.call_rule``: 2.5 admits 2 calls per window, 0.5 one call per
        two windows); budgets that could not admit one call an hour, or not one token, are refused."""
        for name, window in (
            ("UPSTREAM_WINDOW_S", self.upstream_window_s),
            ("UPSTREAM_USD_WINDOW_S", self.upstream_usd_window_s),
        ):
            if window > MAX_WINDOW_S:
                raise ValueError(f"{name}={window:g} is longer than a day ({MAX_WINDOW_S:g}s)")
        if self.upstream_rpm and self.upstream_window_s / self.upstream_rpm > MAX_CALL_SPACING_S:
            raise ValueError(
                f"UPSTREAM_RPM={self.upstream_rpm:g} per {self.upstream_window_s:g}s allows one call every "
                f"{self.upstream_window_s / self.upstream_rpm:.0f}s (at most {MAX_CALL_SPACING_S:g}s makes sense; "
                "0 = no limit)"
            )
        if 0 < self.upstream_tpm < 1:
            raise ValueError(f"UPSTREAM_TPM={self.upstream_tpm:g} is less than one token (0 = no limit)")
        return self

    @model_validator(mode="after")
    def _frugality_needs_redis(self) -> Settings:
        if self.redis_url is None and self.upstream_limit_scope == "fleet":
            raise ValueError("UPSTREAM_LIMIT_SCOPE=fleet shares the budget through Redis: set REDIS_URL")
        if self.cache_redis is None and self.cache_ttl_s > 0:
            raise ValueError("CACHE_TTL_S turns on the embedding cache in Redis: set CACHE_REDIS_URL or REDIS_URL")
        return self

    @model_validator(mode="after")
    def _one_reply_to_rule(self) -> Settings:
        if self.reply_to_direct_only and self.reply_to_pattern:
            raise ValueError(
                "REPLY_TO_DIRECT_ONLY accepts only Direct Reply-to: unset REPLY_TO_PATTERN, or turn it off"
            )
        return self

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
    def effective_bulk_prefetch(self) -> int:
        """The bulk lane's window: BULK_PREFETCH_COUNT, else the rule of ``_wanted_prefetch``, capped for quorum."""
        return self._capped(self.bulk_prefetch_count or self._wanted_prefetch)

    @property
    def limited(self) -> bool:
        """Whether any API budget is set (UPSTREAM_RPM, UPSTREAM_TPM, UPSTREAM_USD_LIMIT)."""
        return bool(self.upstream_rpm or self.upstream_tpm or self.upstream_usd_limit)

    @property
    def _wanted_prefetch(self) -> int:
        """PREFETCH_COUNT, else the window the batches need.

        Messages stay unacked until their batch's replies are out, so the window must hold every batch
        in flight (``size x concurrency``) and the next round forming behind them (as much again), plus
        one batch of slack: ``size x (2 x concurrency + 1)``. Measured with the upstream-bound benchmark
        (300 ms upstream): mean batch 96 texts at size x (concurrency + 1), 100 at this window.
        Concurrency is the adaptive limit's ceiling, and the window is at most ``DEFAULT_PREFETCH_MAX``: by
        Little's law one process draining ~3,000 requests/s (its CPU's pace at small vectors) against a 600 ms
        upstream holds ~1,800, and a larger window only takes work that other workers of the fleet could do.
        """
        wanted = self.batch_max_size * (2 * self.max_concurrent_batches + 1)
        return self.prefetch_count or min(wanted, DEFAULT_PREFETCH_MAX)

    @property
    def effective_prefetch(self) -> int:
        """Messages the broker may hand this consumer before any ack: ``_wanted_prefetch``, capped for quorum."""
        return self._capped(self._wanted_prefetch)

    def _capped(self, wanted: int) -> int:
        if self.queue_type == "quorum":
            return min(wanted, QUORUM_MAX_PREFETCH)  # RabbitMQ 4.x caps it anyway; say so (prefetch_warnings)
        return wanted

    def prefetch_warnings(self) -> list[str]:
        prefetch = self.effective_prefetch
        wanted = self._wanted_prefetch
        if wanted > prefetch:
            return [
                f"prefetch {wanted} is above the {QUORUM_MAX_PREFETCH} RabbitMQ 4.x allows a quorum queue consumer; "
                f"using {prefetch}"
            ]
        if prefetch < self.batch_max_size:
            return [
                f"PREFETCH_COUNT={prefetch} is below BATCH_MAX_SIZE={self.batch_max_size}: batches of "
                "single-text requests can never fill, and every batch will wait BATCH_MAX_WAIT_MS"
            ]
        needed = self.batch_max_size * self.max_concurrent_batches
        if self.prefetch_count and prefetch < needed:  # the derived window is capped on purpose (above)
            return [
                f"PREFETCH_COUNT={prefetch} is below BATCH_MAX_SIZE x MAX_CONCURRENT_BATCHES={needed}: "
                "not every concurrent batch can fill"
            ]
        return []

    @property
    def cache_redis(self) -> SecretStr | None:
        """Where the embedding cache lives: CACHE_REDIS_URL, else REDIS_URL."""
        return self.cache_redis_url or self.redis_url

    @property
    def batch_jobs_key(self) -> str:
        """The Redis hash of Batch API jobs in flight."""
        return f"{self.redis_key_prefix}batch-jobs"

    @property
    def models(self) -> frozenset[str]:
        return frozenset([self.gemini_model, *limits.SERVED_BY_DEFAULT, *self.allowed_models])

    @property
    def reply_to_regex(self) -> re.Pattern[str]:
        if self.reply_to_direct_only:
            return re.compile(DIRECT_REPLY_TO_ONLY)
        pattern = DEFAULT_REPLY_TO
        if self.reply_to_pattern:
            pattern = f"(?:{pattern})|(?:{self.reply_to_pattern})"
        return re.compile(pattern)

    @property
    def amqp_url_redacted(self) -> str:
        return redact_url(self.amqp_url.get_secret_value())


def known_level(value: str) -> str:
    """A LOG_LEVEL, upper-cased, or ValueError (the worker's and the gateway's)."""
    level = value.upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown log level {value!r}")
    return level


def _checked_model(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(f"not a model name: {name[:60]!r} (letters, digits, '.', '-', '_'; e.g. gemini-embedding-001)")
    return name
