"""Server settings: environment variables (SAMPLEBAY_*) and command-line flags, one class."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAMPLEBAY_", extra="ignore")

    models_dir: Path = Path("checkpoints")  # every *.safetensors here is served
    state_dir: Path = Path("state")  # persistent replay buffers live here
    device: str = "auto"  # auto = cuda when available, else cpu
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, POST /sample needs 'Authorization: Bearer <key>'

    max_n: int = Field(64, ge=1)  # samples per request
    max_steps: int = Field(2000, ge=1)  # Langevin steps per request
    max_frames: int = Field(65, ge=2)  # trajectory frames per request
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    chain_budget: int = Field(1024, ge=1)  # most chains one model's batch advances in one step
    max_queue: int = Field(256, ge=1)  # waiting requests before 503
    request_timeout_s: float = Field(120.0, gt=0)  # a request's deadline, queueing included
    batch_window_ms: float = Field(5.0, ge=0)  # one-shot samplers gather requests this long
    buffer_save_interval_s: float = Field(60.0, gt=0)
    retry_after_s: int = 1

    @field_validator("api_key")
    @classmethod
    def empty_key_means_none(cls, value: str | None) -> str | None:
        """SAMPLEBAY_API_KEY= (empty, as compose passes an unset variable) turns the key off."""
        return value or None
