"""create_app(settings): routes, lifespan (load models, start and stop the worker), limits and errors."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.buffer_store import BufferStore
from service.metrics import Metrics
from service.middleware import BodySizeLimit
from service.registry import Registry, ServedModel, load_registry
from service.render import frame_event, gif_body, grid_b64, json_body, png_body, sse
from service.schemas import EBM_ONLY_FIELDS, ModelInfo, SampleRequest, SampleResponse
from service.settings import Settings
from service.worker import CancelledByClient, QueueFull, SampleOrder, SampleResult, Worker, WorkerFailure
from training.device import pick_device
from training.images import decode_image
from training.sampler_config import EBMSampler

STATIC_DIR = Path(__file__).parent / "static"

log = logging.getLogger("service")


KEEPALIVE_SECONDS = 5.0


class CancellingStream(StreamingResponse):
    """A stream whose job is cancelled however the response ends, even before its first byte."""

    def __init__(self, job: Any, content: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled = True  # harmless once the job finished: the scheduler no longer holds it


def _check_applicable(body: SampleRequest, model: ServedModel, settings: Settings) -> None:
    """422 for fields that do not apply to the model's family or exceed the server's limits."""
    problems = []
    if body.label is not None:
        problems.append(f"'label' does not apply to {model.name}: it is an unconditional {model.family} model")
    if model.family != "ebm":
        problems += [
            f"'{name}' applies to EBMs only; {model.name} is a {model.family} model (one generator pass)"
            for name in EBM_ONLY_FIELDS
            if getattr(body, name) is not None
        ]
    if body.init == "image" and body.image is None:
        problems.append("init 'image' needs 'image': a base64 PNG or JPEG")
    if body.image is not None and body.init != "image":
        problems.append("'image' is only read with init 'image'")
    if body.mask is not None and body.image is None:
        problems.append("'mask' needs an 'image' to complete")
    largest = min(settings.max_n, settings.chain_budget)
    if body.n > largest:
        problems.append(f"'n' is {body.n}; this server allows at most {largest}")
    steps = _steps(body, model)
    if steps > settings.max_steps:
        problems.append(f"'steps' is {steps}; this server allows at most {settings.max_steps}")
    if body.trajectory_every is not None:
        frames = math.ceil(steps / body.trajectory_every) + 1
        if frames > settings.max_frames:
            problems.append(
                f"trajectory_every={body.trajectory_every} over {steps} steps gives {frames} frames; "
                f"at most {settings.max_frames} are allowed (raise trajectory_every)"
            )
    if problems:
        raise HTTPException(422, detail="; ".join(problems))


def _decode_upload(field: str, text: str, model: ServedModel) -> torch.Tensor:
    """A base64 image (or data: URL) -> [*shape] in the model's data range; 422 when unreadable."""
    encoded = text.partition(",")[2] if text.startswith("data:") else text
    try:
        payload = base64.b64decode("".join(encoded.split()), validate=True)  # line-wrapped base64 is fine
        return decode_image(payload, model.members[0].shape, model.members[0].data_range)
    except (binascii.Error, ValueError) as error:
        raise HTTPException(422, detail=f"'{field}' is not a base64 image: {error}") from error


def _steps(body: SampleRequest, model: ServedModel) -> int:
    """Langevin steps (EBM), or 1: one pass of a GAN's generator or a flow's inverse (whose trajectory,
    when asked for, reports the number of states the inverse went through instead)."""
    if model.family != "ebm":
        return 1
    return body.steps or model.members[0].sampler_as(EBMSampler).steps


def _frame_limit(settings: Settings, streaming: bool) -> int:
    """Frames a trajectory may have: all allowed when streamed, a GIF or JSON body keeps it smaller."""
    return settings.max_frames if streaming else min(settings.max_frames, 33)


async def _order(body: SampleRequest, model: ServedModel, settings: Settings, streaming: bool) -> SampleOrder:
    steps = _steps(body, model)
    temperature = body.temperature if body.temperature is not None else model.members[0].sampler.temperature
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    every = body.trajectory_every
    wants_frames = body.format == "gif" or streaming
    if model.family != "ebm":  # frames are the states of a flow's inverse, thinned evenly (a GAN has one)
        return SampleOrder(
            model=model,
            n=body.n,
            seed=seed,
            temperature=temperature,
            steps=steps,
            trajectory_every=1 if wants_frames else None,
            max_frames=_frame_limit(settings, streaming),
        )
    if every is None and wants_frames:
        every = max(1, math.ceil(steps / (_frame_limit(settings, streaming) - 1)))
    sampler = model.members[0].sampler_as(EBMSampler)
    start_image = free_mask = None
    if body.image is not None:
        start_image = await asyncio.to_thread(_decode_upload, "image", body.image, model)
    if body.mask is not None:
        low, high = model.members[0].data_range
        free_mask = (await asyncio.to_thread(_decode_upload, "mask", body.mask, model)) > (low + high) / 2
    return SampleOrder(
        model=model,
        n=body.n,
        seed=seed,
        temperature=temperature,
        steps=steps,
        step_size=body.step_size if body.step_size is not None else sampler.step_size,
        noise=body.noise if body.noise is not None else sampler.noise,
        init=body.init or sampler.init,
        trajectory_every=every,
        start_image=start_image,
        free_mask=free_mask,
    )


GRACE_SECONDS = 10.0  # past a job's deadline, the HTTP side stops waiting even if the worker never answers


async def _wait_or_disconnect(future: asyncio.Future, request: Request, job: Any) -> SampleResult:
    """The worker's result; if the client goes away first, its chains are cancelled at the next step."""
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.1)
        if done:
            outcome = future.result()
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        if await request.is_disconnected():
            job.cancelled = True
            raise CancelledByClient("client disconnected")
        if time.monotonic() > job.deadline + GRACE_SECONDS:
            job.cancelled = True
            raise TimeoutError("deadline")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        device = pick_device(settings.device)
        registry = await asyncio.to_thread(load_registry, settings.models_dir, device)
        store = BufferStore(settings.state_dir)
        worker = Worker(
            registry,
            store,
            device,
            metrics,
            settings.chain_budget,
            settings.max_queue,
            settings.buffer_save_interval_s,
            settings.batch_window_ms / 1000,
        )
        worker.start()
        app.state.registry, app.state.worker, app.state.store = registry, worker, store
        log.info("serving %d models on %s: %s", len(registry.models), device, ", ".join(sorted(registry.models)))
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(
        title="samplebay",
        version="0.1.0",
        lifespan=lifespan,
        description="Samples from energy-based models, flows and GANs.",
    )
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        """422 naming each bad field; the offending input is not echoed (NaN is not even valid JSON)."""
        problems = [
            {"field": ".".join(str(part) for part in item["loc"] if part != "body") or "body", "message": item["msg"]}
            for item in error.errors()
        ]
        summary = "; ".join(f"{problem['field']}: {problem['message']}" for problem in problems)
        return JSONResponse({"detail": summary, "errors": problems}, status_code=422)

    app.state.settings = settings
    app.state.metrics = metrics

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        registry: Registry = request.app.state.registry
        worker: Worker = request.app.state.worker
        ready = worker.running and bool(registry.models)
        body = {
            "ready": ready,
            "models": sorted(registry.models),
            "worker_running": worker.running,
            "refused": registry.refused,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/models", response_model=list[ModelInfo])
    async def list_models(request: Request) -> list[ModelInfo]:
        registry: Registry = request.app.state.registry
        worker: Worker = request.app.state.worker
        store: BufferStore = request.app.state.store
        infos = []
        for name, model in sorted(registry.models.items()):
            config = model.config
            pool = worker.pools.get(model.group) if model.group else None  # EBMs: the buffer group's pool
            infos.append(
                ModelInfo(
                    name=name,
                    family=model.family,
                    members=[member.name for member in model.members],
                    shape=list(config.data["shape"]),
                    data_range=list(model.members[0].data_range),
                    dataset=config.data.get("dataset"),
                    ensemble=config.ensemble,
                    sampler=config.sampler,
                    limits={
                        "max_n": settings.max_n,
                        "max_steps": settings.max_steps,
                        "max_frames": settings.max_frames,
                    },
                    metrics=config.metrics
                    if len(model.members) == 1
                    else {key: value for key, value in config.metrics.items() if key.startswith("evaluate_ensemble")},
                    buffer_size=len(pool.buffer) if pool else None,
                    buffer_capacity=pool.buffer.capacity if pool else None,
                    buffer_saved_at=store.saved_at.get(model.group) if model.group else None,
                )
            )
        return infos

    @app.post(
        "/sample",
        response_model=SampleResponse,
        responses={
            200: {"content": {"image/png": {}, "image/gif": {}}},
            404: {"description": "unknown model"},
            413: {"description": "body too large"},
            422: {"description": "invalid or inapplicable field"},
            503: {"description": "queue full (Retry-After) or device failure"},
            504: {"description": "deadline passed"},
        },
    )
    async def sample(body: SampleRequest, request: Request) -> Response:
        started = time.perf_counter()
        registry: Registry = request.app.state.registry
        model = registry.models.get(body.model)
        label = body.model if model else "unknown"
        status: int | None = 500
        try:
            _authorize(request, settings)
            if model is None:
                known = ", ".join(sorted(registry.models)) or "none"
                raise HTTPException(404, detail=f"unknown model {body.model!r}; served models: {known}")
            _check_applicable(body, model, settings)
            response = await _sample(body, model, request)
            status = response.status_code
            if isinstance(response, CancellingStream):
                status = None  # the stream records its own outcome when it ends
            return response
        except HTTPException as error:
            status = error.status_code
            raise
        except CancelledByClient:
            status = 499
            return Response(status_code=499)
        finally:
            if status is not None:
                metrics.requests.labels(label, str(status)).inc()
                metrics.latency_seconds.labels(label).observe(time.perf_counter() - started)

    def _submit(order: SampleOrder, deliver, on_frame=None):
        worker: Worker = app.state.worker
        try:
            return worker.submit(order, deliver, time.monotonic() + settings.request_timeout_s, on_frame)
        except QueueFull as error:
            raise HTTPException(
                503, detail=f"server busy: {error}; retry shortly", headers={"Retry-After": str(settings.retry_after_s)}
            ) from error
        except WorkerFailure as error:
            raise _worker_error(error) from error

    async def _sample(body: SampleRequest, model: ServedModel, request: Request) -> Response:
        started = time.perf_counter()
        streaming = body.stream or "text/event-stream" in request.headers.get("accept", "")
        order = await _order(body, model, settings, streaming)
        if streaming:
            return _stream(order, model, started)
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def deliver(outcome: SampleResult | BaseException) -> None:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(outcome))

        job = _submit(order, deliver)
        try:
            result = await _wait_or_disconnect(future, request, job)
        except (TimeoutError, WorkerFailure) as error:
            raise _worker_error(error) from error
        data_range = model.members[0].data_range
        headers = {"X-Seed": str(order.seed), "X-Steps": str(order.steps)}
        if body.format == "png":
            return Response(
                await asyncio.to_thread(png_body, result, data_range), media_type="image/png", headers=headers
            )
        if body.format == "gif":
            return Response(
                await asyncio.to_thread(gif_body, result, data_range), media_type="image/gif", headers=headers
            )
        payload = await asyncio.to_thread(
            json_body, result, data_range, model.name, order.seed, order.steps, time.perf_counter() - started
        )
        return JSONResponse(payload.model_dump(exclude_none=True), headers=headers)

    def _stream(order: SampleOrder, model: ServedModel, started: float) -> StreamingResponse:
        """Server-Sent Events: 'frame' per kept step as the worker makes it, then 'done' (or 'error')."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        data_range = model.members[0].data_range

        def on_frame(step: int, x: torch.Tensor, energy: torch.Tensor | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("frame", step, x, energy))

        def deliver(outcome: SampleResult | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("done", outcome))

        job = _submit(order, deliver, on_frame)

        async def event_source():
            status = 200
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(events.get(), timeout=KEEPALIVE_SECONDS)
                    except TimeoutError:
                        if time.monotonic() > job.deadline + GRACE_SECONDS:
                            item = ("done", TimeoutError("deadline"))
                        else:
                            yield ": waiting for the worker\n\n"  # an SSE comment keeps proxies from timing out
                            continue
                    if item[0] == "frame":
                        _, step, x, energy = item
                        payload = await asyncio.to_thread(frame_event, step, order.steps, x, energy, data_range)
                        yield sse("frame", payload)
                        continue
                    outcome = item[1]
                    if isinstance(outcome, BaseException):
                        error = _worker_error(outcome)
                        status = error.status_code
                        yield sse("error", {"status": error.status_code, "detail": error.detail})
                    else:
                        payload = await asyncio.to_thread(
                            json_body,
                            outcome,
                            data_range,
                            model.name,
                            order.seed,
                            order.steps,
                            time.perf_counter() - started,
                        )
                        done = payload.model_dump(exclude_none=True)
                        done["grid"] = await asyncio.to_thread(grid_b64, outcome.samples, data_range)
                        yield sse("done", done)
                    return
            except asyncio.CancelledError:
                status = 499
                raise
            finally:
                metrics.requests.labels(model.name, str(status)).inc()
                metrics.latency_seconds.labels(model.name).observe(time.perf_counter() - started)

        return CancellingStream(
            job,
            event_source(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Seed": str(order.seed), "X-Accel-Buffering": "no"},
        )

    return app


def _worker_error(error: BaseException) -> HTTPException:
    if isinstance(error, TimeoutError):
        return HTTPException(504, detail="the request's deadline passed before its chains finished")
    if isinstance(error, WorkerFailure):
        return HTTPException(503, detail=str(error), headers={"Retry-After": "1"})
    return HTTPException(500, detail=f"unexpected worker error: {type(error).__name__}")


def _authorize(request: Request, settings: Settings) -> None:
    if settings.api_key is None:
        return
    supplied = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not secrets.compare_digest(supplied.encode(), settings.api_key.encode()):
        raise HTTPException(
            401,
            detail="missing or wrong API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
