"""Server settings: environment variables (SAMPLEBAY_*) and command-line flags, one class."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from training.runtime.cores import parse_threads
from training.runtime.device import SAMPLING_DTYPE_HELP


class Settings(BaseSettings):
    """Every field is also a `python -m service` flag (service/__main__.py builds them from this class)."""

    model_config = SettingsConfigDict(env_prefix="SAMPLEBAY_", extra="ignore")

    models_dir: Path = Field(
        Path("checkpoints"),
        description="every *.safetensors checkpoint and *.pt2 program here is served (see --watch-interval-s)",
    )
    watch_interval_s: float = Field(
        2.0,
        ge=0,
        description="rescan the models dir this often: a new or changed file is served once complete, a removed one"
        " no longer offered (0: only on POST /models/reload)",
    )
    state_dir: Path = Field(Path("state"), description="persistent replay buffers live here")
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    threads: int | Literal["auto"] = Field(
        "auto",
        description="torch CPU threads: a count, or auto: $OMP_NUM_THREADS when set, else the cores idle at start"
        " (within a container's CPU quota)"
        " (--engine ray: Ray sets each replica's OMP_NUM_THREADS to its --replica-cpus, at least 1)",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    api_key: str | None = Field(
        None,
        description="when set, POST /sample, POST /score and POST /models/reload need 'Authorization: Bearer <key>'",
    )

    max_n: int = Field(64, ge=1, description="samples per request")
    max_steps: int = Field(2000, ge=1, description="Langevin steps per request")
    max_frames: int = Field(65, ge=2, description="trajectory frames per request")
    max_gif_pixels: int = Field(
        1 << 26,
        ge=1,
        description="pixels of a GIF answer, all its frames together (frames x the grid of n images): larger ones"
        " are refused before their chains run; streamed trajectories are not bounded by it (64 Mi: n 64 at"
        " 3x128x128 over 33 frames is 36 M)",
    )
    max_body_bytes: int | None = Field(
        None,
        ge=1024,
        description="largest request body (none: 64 KiB, or room for an init image and mask of the largest model "
        "served if more: a 3x128x128 model's take 150 kB)",
    )
    max_score_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="largest POST /score body: fits max_score_images base64 images of up to ~16 KB each",
    )
    max_score_images: int = Field(256, ge=1, description="images one POST /score request may send")
    score_rtol: float = Field(
        1e-5, gt=0, le=0.1, description="a CNF's likelihood solve for POST /score: dopri5's relative tolerance"
    )
    score_atol: float = Field(
        1e-5, gt=0, le=0.1, description="a CNF's likelihood solve for POST /score: dopri5's absolute tolerance"
    )
    score_timeout_s: float = Field(
        900.0,
        gt=0,
        description="a POST /score request's deadline, queueing included (a CNF's adaptive likelihood solves take"
        " seconds an image on a CPU core)",
    )
    max_model_bytes: int = Field(
        512 * 1024 * 1024, ge=1, description="largest file read from the models dir (its size checked before reading)"
    )
    max_loaded_model_bytes: int | None = Field(
        2 * 1024 * 1024 * 1024,
        ge=1,
        description="the most bytes of model files loaded at once, all files together (each is also bounded by"
        " --max-model-bytes); a file that would pass it is refused with the reason in /readyz until others are"
        " removed (none: no bound)",
    )
    model_load_timeout_s: float = Field(
        60.0, gt=0, description="a model file still loading after this long is refused, and start-up goes on without it"
    )
    chain_budget: int = Field(1024, ge=1, description="most chains one model runs at once (admitted, on the device)")
    sampling_dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description=SAMPLING_DTYPE_HELP)
    step_budget: int | None = Field(
        None,
        ge=1,
        description="most chains one model's step advances (none: the chain budget); below it each step's batch is"
        " where the pool's measured cost per chain is least",
    )
    max_queue: int = Field(256, ge=1, description="waiting requests before 503")
    request_timeout_s: float = Field(120.0, gt=0, description="a request's deadline, queueing included")
    batch_window_ms: float = Field(5.0, ge=0, description="one-shot samplers (GANs, flows) gather requests this long")
    buffer_save_interval_s: float = Field(60.0, gt=0, description="how often changed replay buffers are saved")
    buffer_budget_mb: float = Field(
        2048.0,
        gt=0,
        description="MiB for all replay buffers of this server (float16 slots: 10,000 of 3x128x128 take 938); "
        "a buffer that does not fit is thinned, or refused when under 16 slots fit, and /models says why",
    )
    device_budget_mb: float | None = Field(
        512.0,
        gt=0,
        description="MiB for the chains on the device, every model together: what running requests hold (states,"
        " velocities, trajectory frames kept) and what one step needs besides (activations, measured per model); a"
        " request larger than a step's share is stepped in slices of chains (the same images), one that can never"
        " fit is refused, and /models states each model's limits (none: no bound)",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After of a 503 (queue full, device failure)")
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body must arrive whole within this many seconds of its head, else 408"
    )
    idle_timeout_s: int = Field(
        5, ge=1, description="a connection is closed after this long without a whole request head (new or kept alive)"
    )
    graceful_shutdown_s: int = Field(
        20, ge=0, description="on SIGTERM, requests in flight get this long; then they are cancelled, buffers saved"
    )
    stream_pending_bytes: int = Field(
        16 * 1024 * 1024,
        ge=0,
        description="frames a stream holds for a client reading slower than its chains make them; past this the"
        " oldest are dropped and counted in the next event (the newest is always kept)",
    )
    stream_send_timeout_s: float = Field(
        30.0, gt=0, description="a stream whose client takes nothing this long is cancelled (its chains too) and closed"
    )

    engine: Literal["local", "ray"] = Field(
        "local", description="local: this process serves; ray: replicas on a Ray cluster behind Ray Serve's proxy"
    )
    replicas: int = Field(1, ge=1, le=1024, description="replicas (full device workers) of --engine ray")
    replica_cpus: float = Field(
        1.0, gt=0, description="CPUs Ray reserves for each replica of --engine ray (a GPU replica asks for one GPU)"
    )
    buffer_shard: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_]{1,64}$",
        description="save replay buffers as this server's shard (buffer-GROUP-DIGEST-SHARD) and pool every"
        " shard of the state dir at start (--engine ray names each replica's: replica0, replica1, ...)",
    )

    @field_validator("threads", mode="before")
    @classmethod
    def count_or_auto(cls, value: int | str) -> int | Literal["auto"]:
        """One message for a bad value, by the rule training's --threads follows too."""
        return parse_threads(value)

    @field_validator("device_budget_mb", mode="before")
    @classmethod
    def none_means_unbounded(cls, value: object) -> object:
        """--device-budget-mb none (as its help says) turns the bound off."""
        return None if isinstance(value, str) and value.strip().lower() == "none" else value

    @field_validator("api_key")
    @classmethod
    def empty_key_means_none(cls, value: str | None) -> str | None:
        """SAMPLEBAY_API_KEY= (empty, as compose passes an unset variable) turns the key off."""
        return value or None
