"""The gateway's settings, read from the environment (and ``.env``) once by ``gateway.cli``, never at import.

Names the worker also reads (``AMQP_URL``, ``GEMINI_MODEL``, ``ALLOWED_MODELS``, ``MAX_BODY_BYTES``, ``LOG_*``) mean
the same here: give the gateway the values its workers run with, so that it refuses what they would refuse, with
the right HTTP status, before a request crosses the broker.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker import limits
from worker.logs import redact_url
from worker.settings import MODEL_NAME, Settings, known_level


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    gateway_host: str = "0.0.0.0"
    gateway_port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port (tests)
    # Accepted keys, comma-separated. Required unless GATEWAY_ALLOW_ANONYMOUS=true; with keys set, keys are checked
    # whatever GATEWAY_ALLOW_ANONYMOUS says.
    gateway_api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    gateway_allow_anonymous: bool = False
    # Requests being served at once (from their head to their answer); past it, 429 with Retry-After at once.
    gateway_max_in_flight: int = Field(default=256, ge=1)
    gateway_max_connections: int = Field(default=1024, ge=1)  # open at once; more get 503 with Retry-After
    # The longest a request may take, the x-deadline it carries; a shorter timeout the SDK states is honoured.
    gateway_request_timeout_s: float = Field(default=30.0, gt=0)
    # For a client to send its request head, and then its body (slow clients are cut off).
    gateway_client_timeout_s: float = Field(default=10.0, gt=0)
    # Between requests on a kept-alive connection: longer than clients' own expiry (httpx: 5 s), so that it is the
    # client that closes an idle connection, never the server one the client is about to reuse.
    gateway_idle_timeout_s: float = Field(default=75.0, gt=0)

    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    amqp_connect_timeout_s: float = Field(default=60.0, ge=0)
    gemini_model: str = "gemini-embedding-001"
    allowed_models: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("gateway_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            keys = [key.strip() for key in value.split(",")]
            if any(not key for key in keys) and value.strip():
                raise ValueError("an empty key in the comma-separated list")
            return [key for key in keys if key]
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        Settings.check_amqp_url(value.get_secret_value())
        return value

    @field_validator("gemini_model")
    @classmethod
    def _model(cls, value: str) -> str:
        return _checked_model(value)

    @field_validator("allowed_models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        return [_checked_model(name) for name in value]

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        return known_level(value)

    @model_validator(mode="after")
    def _keys_or_anonymous(self) -> GatewaySettings:
        if not self.gateway_api_keys and not self.gateway_allow_anonymous:
            raise ValueError(
                "GATEWAY_API_KEYS is not set: give the accepted keys, comma-separated, or set "
                "GATEWAY_ALLOW_ANONYMOUS=true to serve anyone who reaches the port"
            )
        return self

    @property
    def models(self) -> frozenset[str]:
        """The models the workers serve: the worker's own rule (``Settings.models``)."""
        return frozenset([self.gemini_model, *limits.SERVED_BY_DEFAULT, *self.allowed_models])

    @property
    def amqp_url_redacted(self) -> str:
        return redact_url(self.amqp_url.get_secret_value())


def _checked_model(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(f"not a model name: {name[:60]!r} (letters, digits, '.', '-', '_'; e.g. gemini-embedding-001)")
    return name
