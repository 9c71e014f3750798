"""create_app(settings): routes and lifespan (load models, start and stop the worker).

A request flows one way: HTTP -> schema (schemas.py) -> order (orders.py) -> worker (bridge.py, then
service/engine/worker.py) -> render (render.py) -> HTTP. The models it can name are those of the live models
directory (service/catalogue/model_watch.py) as the worker last published them
(service/catalogue/served_models.py); each answer says in X-Model-Version which version served it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.catalogue.budgets import MemoryBudgets
from service.catalogue.buffer_store import BufferStore
from service.catalogue.model_watch import CoalescedReloads, ModelRepository, ModelWatcher, ReloadReport
from service.catalogue.registry import Registry, model_files, signals_end_loading
from service.catalogue.served_models import ServedModels
from service.engine.messages import CancelledByClient
from service.engine.worker import Worker
from service.http.bridge import record, response_for, sample_result, stream
from service.http.memory import heap_blocks, map_large_blocks, return_freed_memory
from service.http.middleware import BearerKey, BodyLimits
from service.http.model_info import ServedModelInfo, model_info
from service.http.orders import check_applicable, check_gif_pixels, gif_frames, make_order
from service.http.schemas import ErrorBody, Readiness, SampleRequest, SampleResponse
from service.http.score_route import MODEL_VERSION_HEADER, add_score_route
from service.metrics import Metrics
from service.settings import Settings
from training.runtime.device import dtype_name, pick_device, sampling_dtype
from training.runtime.images import image_body_bytes
from training.sampling.scoring import LikelihoodSettings

STATIC_DIR = Path(__file__).parent / "static"
KEY_PROTECTED_PATHS = ("/sample", "/score", "/models/reload")  # with an API key; health, models, page open
JSON_KINDS = {
    type(None): "null",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true or false",
}

log = logging.getLogger("service")

# What POST /sample really answers, status by status, for the OpenAPI schema (tests/service_http/test_openapi_fuzz.py
# checks every answer against it). Every error body is ErrorBody: {"detail": ..., "errors": [...] on a 422}.
BINARY = {"schema": {"type": "string", "format": "binary"}}


def _sse_event(name: str, fields: list[str]) -> dict:
    """One Server-Sent Event as OpenAPI 3.1 describes an event stream's items: its JSON `data` names `fields`."""
    data = {"type": "object", "required": fields}
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
        },
    }


SSE_EVENTS = {
    "schema": {
        "oneOf": [
            _sse_event("frame", ["step", "steps", "energy", "mean_energy", "grid"]),
            _sse_event("done", ["model", "seed", "images", "grid", "timings"]),  # SampleResponse and the grid
            _sse_event("error", ["status", "detail"]),
        ]
    }
}
SAMPLE_RESPONSES: dict[int | str, dict] = {
    200: {
        "description": "format png or gif: the image; json: SampleResponse; stream (or Accept: text/event-stream):"
        " Server-Sent Events, 'frame' per kept step, then 'done' (the JSON body plus 'grid') or 'error'",
        "content": {"image/png": BINARY, "image/gif": BINARY, "text/event-stream": SSE_EVENTS},
        "headers": {
            "X-Seed": {"description": "the seed the chains used", "schema": {"type": "integer"}},
            "X-Steps": {"description": "steps run (not on a stream)", "schema": {"type": "integer"}},
            MODEL_VERSION_HEADER: {
                "description": "the version (digest prefix) of the model that served it, as /models lists it",
                "schema": {"type": "string"},
            },
        },
    },
    400: {"model": ErrorBody, "description": "the body is not valid JSON (the message says where), not UTF-8 or empty"},
    401: {"model": ErrorBody, "description": "missing or wrong API key (only when the server has one)"},
    404: {"model": ErrorBody, "description": "unknown model; the message lists the served ones"},
    408: {"model": ErrorBody, "description": "the body did not arrive in time"},
    413: {"model": ErrorBody, "description": "body too large"},
    415: {"model": ErrorBody, "description": "the body was not sent with 'content-type: application/json'"},
    422: {
        "model": ErrorBody,
        "description": "invalid, out-of-range or inapplicable field, over a server limit, an unreadable upload,"
        " a mask of another size than its image, chains that diverged (non-finite) under the request's settings,"
        " or a generator or flow whose images for the request were not finite",
    },
    499: {"description": "the client went away before the answer (nobody reads it)"},
    503: {
        "model": ErrorBody,
        "description": "queue full (Retry-After), the device failed the batch, or shutting down",
        "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
    },
    504: {"model": ErrorBody, "description": "the request's deadline passed"},
}


DEFAULT_BODY_BYTES = 64 * 1024  # the body limit when no model needs more (--max-body-bytes unset)


def body_limit(settings: Settings, app: FastAPI) -> int:
    """The largest request body: --max-body-bytes when set; else 64 KiB, or room for an init image and its
    mask of the largest model served (each an uncompressed PNG in base64) and the rest of the request."""
    if settings.max_body_bytes is not None:
        return settings.max_body_bytes
    registry: Registry | None = getattr(app.state, "registry", None)
    shapes = [model.members[0].shape for model in registry.models.values()] if registry else []
    largest = max((image_body_bytes(shape) for shape in shapes), default=0)
    return max(DEFAULT_BODY_BYTES, 2 * largest + 16 * 1024)


async def json_content_type(request: Request) -> None:
    """415 for a body not declared JSON (curl -d declares form encoding unless told otherwise): FastAPI would
    pass it on as bytes, to be refused with a message that names no field and not the fix. A coroutine, so that
    FastAPI runs it on the event loop: a plain function goes through its thread pool, a hand-off to another
    thread and back on every request (2.7 ms of a served request's latency on one shared CPU core)."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    came = f"as {media}" if media else "without a content-type"
    raise HTTPException(
        415,
        detail=f"POST {request.url.path} reads a JSON body: send it with 'content-type: application/json' (curl: -H "
        f"'content-type: application/json' -d '{{...}}', or --json '{{...}}'); this one came {came}",
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    map_large_blocks()  # freed tensors and frames go back to the OS (service/http/memory.py)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        device = pick_device(settings.device)
        dtype = sampling_dtype(settings.sampling_dtype, device)
        log.info(
            "chain steps compute in %s (--sampling-dtype %s)",
            dtype_name(dtype),
            settings.sampling_dtype,
        )
        if not settings.models_dir.is_dir():
            raise FileNotFoundError(f"models directory {settings.models_dir} does not exist")
        budgets = MemoryBudgets.from_settings(settings)  # loaded models, buffers, chains
        repository = ModelRepository(
            settings.models_dir,
            device,
            settings.max_model_bytes,
            settings.model_load_timeout_s,
            budgets.models,
        )
        files = len(model_files(settings.models_dir))
        log.info("loading %d model file%s from %s ...", files, "" if files == 1 else "s", settings.models_dir)
        started = time.perf_counter()
        with signals_end_loading():  # nothing is served or changed yet: SIGTERM need not wait for a slow file
            await asyncio.to_thread(repository.scan, True)  # every file as it is now, as start-up always has
        registry = repository.registry()
        store = BufferStore(settings.state_dir, settings.buffer_shard)

        def published(registry: Registry) -> None:  # on the worker thread, once its pools serve `registry`
            app.state.registry = registry
            metrics.show_models(registry)

        served = ServedModels(registry, on_publish=published)
        worker = Worker(
            registry,
            store,
            device,
            metrics,
            settings.chain_budget,
            settings.max_queue,
            settings.buffer_save_interval_s,
            settings.batch_window_ms / 1000,
            step_budget=settings.step_budget,
            sampling_dtype=dtype,
            served=served,
            buffer_budget=budgets.buffers,
            likelihood=LikelihoodSettings(settings.score_rtol, settings.score_atol),
            device_budget=budgets.device,
            on_idle=return_freed_memory,  # once the chains run out, what their steps freed goes back to the OS
            score_memory=heap_blocks,  # a score pass's blocks from the heap: no page faults on fresh mappings
        )
        published(served.registry)  # the worker's: models whose pools could not be built are refused there
        worker.start()
        watcher = ModelWatcher(repository, settings.watch_interval_s, worker.replace_registry, metrics)
        watcher.start()
        app.state.worker, app.state.store, app.state.served, app.state.watcher = worker, store, served, watcher
        app.state.reloads = CoalescedReloads(watcher.reload)
        registry = served.registry
        names = ", ".join(sorted(registry.models))
        seconds = time.perf_counter() - started
        log.info("serving %d models on %s: %s (loaded in %.1f s)", len(registry.models), device, names, seconds)
        try:
            yield
        finally:
            app.state.reloads.close()
            await asyncio.to_thread(watcher.stop)
            await asyncio.to_thread(worker.stop)

    app = FastAPI(
        title="samplebay",
        version="0.1.0",
        lifespan=lifespan,
        description="Samples from energy-based models, flows and GANs.",
    )
    app.add_middleware(
        BodyLimits,
        limit=lambda: body_limit(settings, app),
        timeout_s=settings.body_timeout_s,
        path_limits={"/score": settings.max_score_body_bytes},
    )
    if settings.api_key is not None:  # added last, so outermost: a request without the key is not even read
        app.add_middleware(BearerKey, key=settings.api_key, protected_paths=KEY_PROTECTED_PATHS)
    app.state.settings = settings
    app.state.metrics = metrics
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        """422 naming each bad field; the offending input is not echoed (NaN is not even valid JSON). A body that
        is not JSON has no fields yet: a 400 (malformed syntax, RFC 9110) that says where the parse stopped."""
        for item in error.errors():
            if item["type"] == "json_invalid":  # FastAPI puts the character offset where a field would go
                document = error.body if isinstance(error.body, str) else ""
                where = json.JSONDecodeError(item["ctx"]["error"], document, item["loc"][-1])
                return JSONResponse({"detail": f"the body is not valid JSON: {where}"}, status_code=400)
        whole = [item for item in error.errors() if tuple(item["loc"]) == ("body",)]  # not fields: the body itself
        if whole and whole[0]["type"] == "missing":
            example = '{"model": "NAME", "n": 4}'
            return JSONResponse({"detail": f"the body is empty; send a JSON object such as {example}"}, 400)
        if whole:
            what = JSON_KINDS.get(type(whole[0].get("input")), "that")
            detail = f'the body must be a JSON object of fields such as {{"model": "NAME"}}, not {what}'
            return JSONResponse({"detail": detail, "errors": [{"field": "body", "message": detail}]}, 422)
        problems = [
            {"field": ".".join(str(part) for part in item["loc"] if part != "body") or "body", "message": item["msg"]}
            for item in error.errors()
        ]
        summary = "; ".join(f"{problem['field']}: {problem['message']}" for problem in problems)
        return JSONResponse({"detail": summary, "errors": problems}, status_code=422)

    @app.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get(
        "/healthz",
        responses={
            200: {"description": '{"status": "alive"} while the device worker runs'},
            503: {"description": '{"status": "worker stopped", "detail": why}: the process exits for its supervisor'},
        },
    )
    async def healthz(request: Request) -> JSONResponse:
        """Liveness: a server whose device worker stopped can only answer 503, so it says it wants a restart."""
        worker: Worker | None = getattr(request.app.state, "worker", None)
        if worker is not None and not worker.running:
            return JSONResponse({"status": "worker stopped", "detail": worker.stop_reason}, status_code=503)
        return JSONResponse({"status": "alive"})

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready: no model loaded, or the worker stopped"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        registry: Registry = request.app.state.served.registry
        worker: Worker = request.app.state.worker
        ready = worker.running and bool(registry.models)
        body = {
            "ready": ready,
            "models": sorted(registry.models),
            "worker_running": worker.running,
            "refused": registry.refused,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text exposition format"}},
    )
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/models", response_model=list[ServedModelInfo])
    async def list_models(request: Request) -> list[ServedModelInfo]:
        registry: Registry = request.app.state.served.registry
        worker, store = request.app.state.worker, request.app.state.store
        return [model_info(model, worker, store, settings) for _, model in sorted(registry.models.items())]

    @app.post(
        "/models/reload",
        response_model=ReloadReport,
        responses={401: {"model": ErrorBody, "description": "missing or wrong API key (only when the server has one)"}},
    )
    async def reload_models(request: Request) -> ReloadReport:
        """Rescan the models directory now (with --watch-interval-s 0, the only way a change is seen); answers
        once the worker serves what changed. A file still being written is listed as pending. Calls that arrive
        while a scan runs get that scan's report (one scan at a time, off the threads that encode answers)."""
        reloads: CoalescedReloads = request.app.state.reloads
        return await reloads()

    @app.post(
        "/sample",
        response_model=SampleResponse,
        responses=SAMPLE_RESPONSES,
        dependencies=[Depends(json_content_type)],
    )
    async def sample(body: SampleRequest, request: Request) -> Response:
        started = time.perf_counter()
        served: ServedModels = request.app.state.served
        worker: Worker = request.app.state.worker
        with served.lease(body.model) as model:  # its version's pool is kept until this request is answered
            label = body.model if model else "unknown"
            status: int | None = 500
            try:
                if model is None:
                    known = ", ".join(sorted(served.registry.models)) or "none"
                    raise HTTPException(404, detail=f"unknown model {body.model!r}; served models: {known}")
                check_applicable(body, model, settings)
                streaming = body.stream or "text/event-stream" in request.headers.get("accept", "")
                order = await make_order(body, model, settings, streaming)
                if streaming:
                    status = None  # the stream records its own outcome when it ends
                    response: Response = stream(worker, order, settings, metrics, started)
                    response.headers[MODEL_VERSION_HEADER] = model.version
                    return response
                if body.format == "gif":
                    check_gif_pixels(gif_frames(order), order, settings)  # before its chains run
                result = await sample_result(worker, order, settings, request)
                if body.format == "gif":
                    check_gif_pixels(len(result.frames) or 1, order, settings)  # a one-pass sampler's states
                response = await response_for(result, order, body.format, started)
                response.headers[MODEL_VERSION_HEADER] = model.version
                status = response.status_code
                return response
            except HTTPException as error:
                status = error.status_code
                raise
            except CancelledByClient:
                status = 499
                return Response(status_code=499)
            finally:
                if status is not None:
                    record(metrics, label, status, started)

    add_score_route(app, settings, metrics, Depends(json_content_type))
    return app
