"""Service settings: one pydantic-settings class read from ``EXCLIP_*`` env vars (plus ``REDIS_URL``).

The CLI turns its flags into the same fields, so a flag and its env var always mean the same thing.
"""

from __future__ import annotations

import os
import socket
from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PRECISIONS = ("float32", "bfloat16", "float16")


def _default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Every knob of the API and the worker; see the table in docs/contract.md."""

    model_config = SettingsConfigDict(env_prefix="EXCLIP_", extra="ignore", populate_by_name=True)

    # Queue: unset means embedded mode (in-memory queue, worker thread inside `serve`).
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "redis_url"))
    redis_timeout_s: float = Field(default=5.0, gt=0, description="socket and connect timeout for Redis")
    key_prefix: str = Field(default="exclip", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")

    # Model held by a worker.
    model: str = "ViT-B-16"
    pretrained: str | None = "laion2b_s34b_b88k"
    device: str | None = None  # None: cuda when present, else cpu
    cache_dir: str | None = None

    # API bind address.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # Worker batching and reliability.
    max_batch: int = Field(default=8, ge=1)
    max_wait_ms: int = Field(default=20, ge=0)
    visibility_timeout_s: float = Field(default=120.0, gt=0)
    max_deliveries: int = Field(default=3, ge=1)
    job_timeout_s: float = Field(default=300.0, gt=0)
    heartbeat_s: float = Field(default=5.0, gt=0, description="heartbeat period; the key lives 3 periods")
    worker_name: str = Field(default_factory=_default_worker_name, min_length=1)

    # API limits.
    wait_max_s: float = Field(default=60.0, ge=0)
    result_ttl_s: int = Field(default=3600, ge=1)
    max_queue: int = Field(default=1000, ge=1)
    max_upload_bytes: int = Field(default=20_000_000, ge=1)
    max_pixels: int = Field(default=40_000_000, ge=1)
    max_captions: int = Field(default=16, ge=1)
    max_selections: int = Field(default=64, ge=0)
    max_steps: int = Field(default=100, ge=1)

    # Security.
    api_keys: str | None = None
    api_keys_file: Path | None = None
    cors_origins: str | None = None

    @field_validator("pretrained", "device", "cache_dir", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip() == "" else value

    @field_validator("pretrained")
    @classmethod
    def _none_word(cls, value: str | None) -> str | None:
        return None if value is not None and value.strip().lower() == "none" else value

    @cached_property
    def keys(self) -> tuple[str, ...]:
        """The configured API keys: the env list plus the file (one per line; blanks, # comments skipped)."""
        found = [k.strip() for k in (self.api_keys or "").split(",")]
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            found += [line.strip() for line in lines if not line.lstrip().startswith("#")]
        return tuple(k for k in found if k)

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
