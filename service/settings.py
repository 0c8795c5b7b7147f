"""Service settings: one pydantic-settings class read from ``EXCLIP_*`` env vars (plus ``REDIS_URL``).

The CLI turns its flags into the same fields, so a flag and its env var always mean the same thing.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import stat
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from attribution.memory import DEFAULT_MEMORY_FRACTION
from attribution.models import DEFAULT_MODEL, DEFAULT_PRETRAINED
from attribution.text import MAX_CAPTION_CHARS
from service.errors import ConfigError

_NO_SPACE = r"^\S+$"
_DAY_S = 24 * 3600
SHUTDOWN_MARGIN_S = 10
MAX_KEYS_BYTES = 1_000_000
"""The most a keys file (or ``EXCLIP_API_KEYS``) may hold: thousands of keys, read before anything else."""


def _default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Every knob of the API and the worker; see the table in docs/contract.md."""

    # Floats are finite: inf or nan in a time or a fraction is always a mistake.
    model_config = SettingsConfigDict(
        env_prefix="EXCLIP_", extra="ignore", populate_by_name=True, allow_inf_nan=False
    )

    # Queue: unset means embedded mode (in-memory queue, worker thread inside `serve`).
    redis_url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^(redis|rediss|unix)://\S+$",
        validation_alias=AliasChoices("REDIS_URL", "redis_url"),
        description="Redis URL; unset: embedded in-memory queue and worker inside `serve`",
    )
    redis_timeout_s: float = Field(
        default=5.0, gt=0, le=300, description="socket and connect timeout for Redis"
    )
    key_prefix: str = Field(
        default="exclip",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="prefix of every Redis key",
    )

    # Model held by a worker.
    model: str = Field(
        default=DEFAULT_MODEL,
        min_length=1,
        max_length=256,
        pattern=_NO_SPACE,
        description=(
            "open_clip architecture; with neither this nor the weights named and the default's weights"
            " neither cached nor reachable, the demo `exclip-scenes` is served"
        ),
    )
    pretrained: str | None = Field(
        default=DEFAULT_PRETRAINED,
        max_length=4096,
        description="pretrained tag, checkpoint path, or `none` (random weights)",
    )
    tokenizer: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description=(
            "directory of the model's Hugging Face tokenizer (unset: the Hugging Face cache); only for"
            " models with one"
        ),
    )
    device: str | None = Field(
        default=None,
        pattern=r"^(cpu|cuda(:\d{1,3})?|mps)$",
        description="`cpu`, `cuda` or `cuda:N`; unset: CUDA when present",
    )
    cache_dir: str | None = Field(
        default=None, max_length=4096, description="model download cache (unset: open_clip's)"
    )

    # API bind address.
    host: str = Field(
        default="127.0.0.1", min_length=1, max_length=253, pattern=_NO_SPACE, description="API bind address"
    )
    port: int = Field(default=8000, ge=0, le=65535, description="API port")

    # Worker batching and reliability.
    max_batch: int = Field(default=8, ge=1, le=1024, description="jobs one engine call computes at most")
    max_wait_ms: int = Field(
        default=0,
        ge=0,
        le=60_000,
        description=(
            "wait this long for more jobs after the first; 0: jobs arriving during a batch form the next"
        ),
    )
    visibility_timeout_s: float = Field(
        default=120.0,
        gt=0,
        le=_DAY_S,
        description="pending jobs idle this long are claimed by another worker",
    )
    max_deliveries: int = Field(
        default=3, ge=1, le=100, description="deliveries before a job is marked failed"
    )
    job_timeout_s: float = Field(default=300.0, gt=0, le=_DAY_S, description="compute limit per job")
    heartbeat_s: float = Field(
        default=5.0,
        ge=0.1,
        le=600,
        description="heartbeat period; the key lives 3 periods (below 0.1 s it expires before it is read)",
    )
    memory_fraction: float = Field(
        default=DEFAULT_MEMORY_FRACTION,
        gt=0,
        le=1,
        description="share of the device's free memory one engine pass may use (sizes the tangent batches)",
    )
    worker_name: str = Field(
        default_factory=_default_worker_name,
        min_length=1,
        max_length=256,
        pattern=_NO_SPACE,
        description="consumer name in the group",
    )

    # API limits.
    wait_max_s: float = Field(default=60.0, ge=0, le=3600, description="server bound on a request's `wait`")
    result_ttl_s: int = Field(
        default=3600, ge=1, le=30 * _DAY_S, description="expiry of job records, results and images"
    )
    max_stored_bytes: int = Field(
        default=512_000_000,
        ge=1,
        le=2**50,
        description="images and results kept; finished jobs' are evicted above it",
    )
    max_queue: int = Field(
        default=1000, ge=1, le=10_000_000, description="queue depth above which new jobs get 429"
    )
    max_upload_bytes: int = Field(
        default=20_000_000, ge=1, le=2**31, description="request body limit (413, checked while reading)"
    )
    max_pixels: int = Field(
        default=40_000_000,
        ge=1,
        le=2**31,
        description=(
            "decoded pixel limit, checked before decoding (WebP, AVIF 25 %, TIFF 40 %, progressive JPEG 50 %)"
        ),
    )
    max_captions: int = Field(default=16, ge=1, le=10_000, description="captions per request")
    max_selections: int = Field(default=64, ge=0, le=10_000, description="selections per request")
    max_steps: int = Field(
        default=100, ge=1, le=100_000, description="interpolation steps a request may ask for"
    )
    max_caption_chars: int = Field(
        default=MAX_CAPTION_CHARS,
        ge=1,
        le=MAX_CAPTION_CHARS,
        description="longest caption, checked before any text processing",
    )
    max_renders: int = Field(default=2, ge=1, le=256, description="heatmap PNGs rendered at once")
    client_timeout_s: float = Field(
        default=20.0, gt=0, le=3600, description="to send a request's head, or the next part of its body"
    )
    body_timeout_s: float = Field(default=120.0, gt=0, le=_DAY_S, description="to send a whole request body")

    # Security.
    api_keys: str | None = Field(
        default=None,
        max_length=MAX_KEYS_BYTES,
        description="comma-separated API keys; set: `Authorization: Bearer <key>` required",
    )
    api_keys_file: Path | None = Field(
        default=None, description="file with one API key per line (missing, unreadable or keyless: no start)"
    )
    owner_secret: SecretStr | None = Field(
        default=None,
        max_length=4096,
        description=(
            "HMAC key for the job owner tag; the same on every API replica (unset: random per process)"
        ),
    )
    cors_origins: str | None = Field(
        default=None, max_length=65_536, description="comma-separated allowed origins (unset: CORS off)"
    )

    # Label Studio ML backend (/label-studio): where task images may be fetched from, and defaults
    # for the thresholds a backend's extra_params can override (see service.label_studio.protocol).
    label_studio_url: str | None = Field(
        default=None,
        max_length=2048,
        validation_alias=AliasChoices("LABEL_STUDIO_URL", "EXCLIP_LABEL_STUDIO_URL", "label_studio_url"),
        description="the only host Label Studio task images are fetched from (unset: the one `/setup` names)",
    )
    label_studio_api_key: str | None = Field(
        default=None,
        max_length=4096,
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
        default=80.0, gt=0, le=3600, description="time one /predict call may take (Label Studio waits 100 s)"
    )
    label_studio_max_answer_bytes: int = Field(
        default=64_000_000,
        ge=1,
        le=2**31,
        description="predictions one /predict call returns; the rest wait for the next",
    )

    @field_validator(
        "redis_url",
        "pretrained",
        "tokenizer",
        "device",
        "cache_dir",
        "cors_origins",
        "label_studio_url",
        "label_studio_api_key",
        "api_keys_file",
        mode="before",
    )
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip() == "" else value

    @field_validator("pretrained")
    @classmethod
    def _none_word(cls, value: str | None) -> str | None:
        return None if value is not None and value.strip().lower() == "none" else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_listed(cls, value: object) -> object:
        """Empty means unset; anything else must name a key, as a keys file must (fail closed)."""
        if value == "":
            return None
        if isinstance(value, str) and not _listed_keys(value):
            raise ValueError(
                "holds no key (only commas or blanks); list keys separated by commas, or leave it "
                "empty to run without authentication"
            )
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str | None) -> str | None:
        for origin in (o.strip() for o in (value or "").split(",")):
            if origin and origin != "*" and not _is_origin(origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], or *)")
        return value

    @field_validator("label_studio_url")
    @classmethod
    def _label_studio_url(cls, value: str | None) -> str | None:
        # The one rule for where images may come from (also /setup's), so a URL the backend would refuse
        # stops the service at start instead of failing every task.
        from service.label_studio.protocol import checked_label_studio_url

        if value is not None:
            try:
                checked_label_studio_url(value)
            except ValueError as exc:
                raise ValueError(
                    f"{exc}; give the Label Studio server's http(s) URL, e.g. http://label-studio:8080"
                ) from None
        return value

    @cached_property
    def keys(self) -> tuple[str, ...]:
        """The configured API keys: the env list plus the file (one per line; blanks, # comments skipped).

        Fails closed: a keys source that is set but names no key (``EXCLIP_API_KEYS=" , "`` is refused
        when the settings are read), or a keys file that cannot be read, is not a regular file or is
        larger than ``MAX_KEYS_BYTES``, raises ``ConfigError`` (the service refuses to start) rather
        than turning authentication off.
        """
        found = _listed_keys(self.api_keys or "")
        if self.api_keys_file is not None:
            path = self.api_keys_file
            lines = _read_keys_file(path).splitlines()
            from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not from_file:
                raise ConfigError(
                    f"EXCLIP_API_KEYS_FILE={path} holds no key (only blank lines or comments); "
                    "put one key per line, or unset it to run without authentication"
                )
            found += from_file
        return tuple(found)

    @cached_property
    def owner_key(self) -> bytes:
        """The HMAC key of job owner tags: ``EXCLIP_OWNER_SECRET``, or random for this process when unset
        (then only the process that created a job can show it to its key: fine for one API)."""
        if self.owner_secret is not None and self.owner_secret.get_secret_value():
            return self.owner_secret.get_secret_value().encode()
        return secrets.token_bytes(32)

    @property
    def shutdown_grace_s(self) -> int:
        """How long ``serve`` lets in-flight requests finish after SIGTERM: the longest long poll
        (``wait_max_s``) and 10 s to store and answer. Deployments give the process more than this."""
        return math.ceil(self.wait_max_s) + SHUTDOWN_MARGIN_S

    @property
    def model_requested(self) -> bool:
        """Whether a model or weights were named (flag, env var); if not, serve may fall back to the demo."""
        return bool({"model", "pretrained", "tokenizer"} & self.model_fields_set)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in (self.cors_origins or "").split(",") if o.strip()]

    @property
    def resolved_device(self) -> str:
        if self.device:
            return self.device
        import torch  # only the worker needs torch; the API never calls this

        return "cuda" if torch.cuda.is_available() else "cpu"


def _listed_keys(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def _read_keys_file(path: Path) -> str:
    """The keys file's text, read only if it is a regular file of at most ``MAX_KEYS_BYTES``."""

    def refuse(reason: str) -> ConfigError:
        return ConfigError(
            f"EXCLIP_API_KEYS_FILE={path} {reason}; the service does not start without the keys it "
            "was told to require"
        )

    try:
        with path.open("rb") as file:  # opened once: what is checked is what is read
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise refuse("is not a regular file")
            data = file.read(MAX_KEYS_BYTES + 1)
    except OSError as exc:
        raise refuse(f"cannot be read ({exc.strerror or exc})") from None
    if len(data) > MAX_KEYS_BYTES:
        raise refuse(f"is larger than {MAX_KEYS_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"cannot be read ({exc})") from None


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _is_origin(value: str) -> bool:
    return _is_http_url(value) and urlsplit(value).path in ("", "/") and not urlsplit(value).query


def env_name(field: str) -> str:
    """The environment variable a setting is read from (the first of its aliases, else ``EXCLIP_<FIELD>``)."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return f"EXCLIP_{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment (and ``overrides``, e.g. CLI flags), checked at the door.

    Raises ``ConfigError`` naming each bad setting's environment variable and the value it had, so the
    service stops with one line per mistake instead of a traceback, or of starting with a value it
    cannot run with.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = error["loc"][0] if error["loc"] else ""
            field = loc if loc in Settings.model_fields else _field_of_alias(str(loc))
            name = env_name(field) if field else str(loc)
            shown = "<hidden>" if field in _SECRET_FIELDS else repr(error.get("input"))[:200]
            problems.append(f"{name}={shown}: {error['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None


_SECRET_FIELDS = {"api_keys", "owner_secret", "label_studio_api_key"}


def _field_of_alias(alias: str) -> str | None:
    for field, info in Settings.model_fields.items():
        choices = info.validation_alias.choices if isinstance(info.validation_alias, AliasChoices) else ()
        if alias in choices:
            return field
    return None
