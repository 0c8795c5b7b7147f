"""Service settings: one pydantic-settings class read from ``EXCLIP_*`` env vars (plus ``REDIS_URL``).

The CLI turns its flags into the same fields, so a flag and its env var always mean the same thing.
"""

from __future__ import annotations

import os
import secrets
import socket
from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from attribution.memory import DEFAULT_MEMORY_FRACTION
from attribution.models import DEFAULT_MODEL, DEFAULT_PRETRAINED
from attribution.text import MAX_CAPTION_CHARS
from service.errors import ConfigError


def _default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Every knob of the API and the worker; see the table in docs/contract.md."""

    model_config = SettingsConfigDict(env_prefix="EXCLIP_", extra="ignore", populate_by_name=True)

    # Queue: unset means embedded mode (in-memory queue, worker thread inside `serve`).
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "redis_url"),
        description="Redis URL; unset: embedded in-memory queue and worker inside `serve`",
    )
    redis_timeout_s: float = Field(default=5.0, gt=0, description="socket and connect timeout for Redis")
    key_prefix: str = Field(
        default="exclip", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$", description="prefix of every Redis key"
    )

    # Model held by a worker.
    model: str = Field(
        default=DEFAULT_MODEL,
        description=(
            "open_clip architecture; with neither this nor the weights named and the default's weights"
            " neither cached nor reachable, the demo `exclip-scenes` is served"
        ),
    )
    pretrained: str | None = Field(
        default=DEFAULT_PRETRAINED, description="pretrained tag, checkpoint path, or `none` (random weights)"
    )
    device: str | None = Field(
        default=None, description="`cpu`, `cuda` or `cuda:N`; unset: CUDA when present"
    )
    cache_dir: str | None = Field(default=None, description="model download cache (unset: open_clip's)")

    # API bind address.
    host: str = Field(default="127.0.0.1", description="API bind address")
    port: int = Field(default=8000, ge=0, le=65535, description="API port")

    # Worker batching and reliability.
    max_batch: int = Field(default=8, ge=1, description="jobs one engine call computes at most")
    max_wait_ms: int = Field(
        default=0,
        ge=0,
        description=(
            "wait this long for more jobs after the first; 0: jobs arriving during a batch form the next"
        ),
    )
    visibility_timeout_s: float = Field(
        default=120.0, gt=0, description="pending jobs idle this long are claimed by another worker"
    )
    max_deliveries: int = Field(default=3, ge=1, description="deliveries before a job is marked failed")
    job_timeout_s: float = Field(default=300.0, gt=0, description="compute limit per job")
    heartbeat_s: float = Field(default=5.0, gt=0, description="heartbeat period; the key lives 3 periods")
    memory_fraction: float = Field(
        default=DEFAULT_MEMORY_FRACTION,
        gt=0,
        le=1,
        description="share of the device's free memory one engine pass may use (sizes the tangent batches)",
    )
    worker_name: str = Field(
        default_factory=_default_worker_name,
        min_length=1,
        description="consumer name in the group",
    )

    # API limits.
    wait_max_s: float = Field(default=60.0, ge=0, description="server bound on a request's `wait`")
    result_ttl_s: int = Field(default=3600, ge=1, description="expiry of job records, results and images")
    max_stored_bytes: int = Field(
        default=512_000_000, ge=1, description="images and results kept; finished jobs' are evicted above it"
    )
    max_queue: int = Field(default=1000, ge=1, description="queue depth above which new jobs get 429")
    max_upload_bytes: int = Field(
        default=20_000_000, ge=1, description="request body limit (413, checked while reading)"
    )
    max_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description=(
            "decoded pixel limit, checked before decoding (WebP, AVIF 25 %, TIFF 40 %, progressive JPEG 50 %)"
        ),
    )
    max_captions: int = Field(default=16, ge=1, description="captions per request")
    max_selections: int = Field(default=64, ge=0, description="selections per request")
    max_steps: int = Field(default=100, ge=1, description="interpolation steps a request may ask for")
    max_caption_chars: int = Field(
        default=MAX_CAPTION_CHARS,
        ge=1,
        le=MAX_CAPTION_CHARS,
        description="longest caption, checked before any text processing",
    )
    max_renders: int = Field(default=2, ge=1, description="heatmap PNGs rendered at once")
    client_timeout_s: float = Field(
        default=20.0, gt=0, description="to send a request's head, or the next part of its body"
    )
    body_timeout_s: float = Field(default=120.0, gt=0, description="to send a whole request body")

    # Security.
    api_keys: str | None = Field(
        default=None, description="comma-separated API keys; set: `Authorization: Bearer <key>` required"
    )
    api_keys_file: Path | None = Field(
        default=None, description="file with one API key per line (missing, unreadable or keyless: no start)"
    )
    owner_secret: SecretStr | None = Field(
        default=None,
        description=(
            "HMAC key for the job owner tag; the same on every API replica (unset: random per process)"
        ),
    )
    cors_origins: str | None = Field(
        default=None, description="comma-separated allowed origins (unset: CORS off)"
    )

    # Label Studio ML backend (/label-studio): where task images may be fetched from, and defaults
    # for the thresholds a backend's extra_params can override (see service.label_studio.protocol).
    label_studio_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("LABEL_STUDIO_URL", "EXCLIP_LABEL_STUDIO_URL", "label_studio_url"),
        description="the only host Label Studio task images are fetched from (unset: the one `/setup` names)",
    )
    label_studio_api_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "LABEL_STUDIO_API_KEY", "EXCLIP_LABEL_STUDIO_API_KEY", "label_studio_api_key"
        ),
        description="token sent to the Label Studio host with image requests",
    )
    label_studio_mask_level: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="a mask keeps patches at least this fraction of the phrase's maximum",
    )
    label_studio_min_token_score: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="a box highlights words scoring at least this fraction of the best",
    )
    label_studio_budget_s: float = Field(
        default=80.0, gt=0, description="time one /predict call may take (Label Studio waits 100 s)"
    )
    label_studio_max_answer_bytes: int = Field(
        default=64_000_000,
        ge=1,
        description="predictions one /predict call returns; the rest wait for the next",
    )

    @field_validator(
        "pretrained",
        "device",
        "cache_dir",
        "api_keys",
        "cors_origins",
        "label_studio_url",
        "label_studio_api_key",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip() == "" else value

    @field_validator("pretrained")
    @classmethod
    def _none_word(cls, value: str | None) -> str | None:
        return None if value is not None and value.strip().lower() == "none" else value

    @cached_property
    def keys(self) -> tuple[str, ...]:
        """The configured API keys: the env list plus the file (one per line; blanks, # comments skipped).

        Fails closed: a keys file that cannot be read, or holds no key, raises ``ConfigError`` (the
        service refuses to start) rather than turning authentication off.
        """
        found = [k.strip() for k in (self.api_keys or "").split(",")]
        if self.api_keys_file is not None:
            path = self.api_keys_file
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ConfigError(
                    f"EXCLIP_API_KEYS_FILE={path} cannot be read ({reason}); the service does "
                    "not start without the keys it was told to require"
                ) from None
            from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not from_file:
                raise ConfigError(
                    f"EXCLIP_API_KEYS_FILE={path} holds no key (only blank lines or comments); "
                    "put one key per line, or unset it to run without authentication"
                )
            found += from_file
        return tuple(k for k in found if k)

    @cached_property
    def owner_key(self) -> bytes:
        """The HMAC key of job owner tags: ``EXCLIP_OWNER_SECRET``, or random for this process when unset
        (then only the process that created a job can show it to its key: fine for one API)."""
        if self.owner_secret is not None and self.owner_secret.get_secret_value():
            return self.owner_secret.get_secret_value().encode()
        return secrets.token_bytes(32)

    @property
    def model_requested(self) -> bool:
        """Whether a model or weights were named (flag, env var); if not, serve may fall back to the demo."""
        return bool({"model", "pretrained"} & self.model_fields_set)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in (self.cors_origins or "").split(",") if o.strip()]

    @property
    def resolved_device(self) -> str:
        if self.device:
            return self.device
        import torch  # only the worker needs torch; the API never calls this

        return "cuda" if torch.cuda.is_available() else "cpu"
