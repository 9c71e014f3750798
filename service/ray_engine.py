"""`python -m service --engine ray`: the same HTTP API from N replicas on a Ray cluster, behind Ray Serve's proxy.

Each replica is the whole single-process server: `create_app(settings)` with its own worker, pools and
replay buffers, run by Ray Serve as an ASGI ingress (its lifespan starts and stops the worker), so every
route, status code and stream is the local server's. Ray Serve's proxy forwards each HTTP request to a
replica, streams its answer back as the replica writes it, and cancels the replica's request when the
client goes away (the worker then drops its chains at the next step). `X-Replica` on every `POST /sample`
answer names the replica that ran it.

Routing (`ModelAffinityRouter`, a Ray Serve request router): a request is sent to a replica already running
chains of its model while that replica has chain budget left, so batches form; otherwise to the less busy
of two replicas drawn at random, as Ray Serve's default router does. The proxy picks the replica before it
has read the body, so the model is known to the router only when the client names it in the
`serve_multiplexed_model_id` header (bench/serve.py does); requests without it are spread by load alone.

Replay buffers: replica k saves its shard `buffer-GROUP-DIGEST-replicak.safetensors` in the shared state
directory and pools every shard of its group at start (service/catalogue/buffer_store.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import Any, cast

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from service.settings import Settings

log = logging.getLogger("service")

APP_NAME = "samplebay"
DEPLOYMENT = "SampleServer"
MODEL_HEADER = "serve_multiplexed_model_id"  # Ray Serve's proxy hands this header's value to the router
ROUTING_STATS_PERIOD_S = 1.0
AFFINITY_S = 5.0  # a replica sent a model's request this recently is taken to be running its chains


class ReplicaHeader:
    """ASGI middleware: `X-Replica: NAME` on every HTTP answer (`POST /sample` ones, errors and streams alike,
    and `/metrics`, `/models`, ..., so each replica's figures can be told apart)."""

    def __init__(self, app: Any, name: str) -> None:
        self.app = app
        self.header = (b"x-replica", name.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.deployment
@serve.ingress()
class SampleServer:
    """One replica: the whole server of `create_app`, built once the replica knows who it is."""

    def __init__(self, settings: dict[str, Any]) -> None:
        context = serve.get_replica_context()
        rank = getattr(context.rank, "rank", context.rank)  # the replica's index, stable across restarts
        self.name = context.replica_tag
        self.settings = Settings(**{**settings, "buffer_shard": f"replica{rank}"})
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log.info("replica %s (rank %s) saves its replay buffers as shard replica%s", self.name, rank, rank)

    def __serve_build_asgi_app__(self) -> Any:
        from service.http.app import create_app  # torch loads in the replica, not in the driver

        self.server = create_app(self.settings)
        self.server.add_middleware(ReplicaHeader, name=self.name)
        return self.server

    def record_routing_stats(self) -> dict[str, Any]:
        """Chains running or waiting per served model, and the budget each model's pool runs under."""
        worker = getattr(self.server.state, "worker", None)
        registry = getattr(self.server.state, "registry", None)
        if worker is None or registry is None:
            return {}
        models = {}
        for name, model in registry.models.items():
            scheduler = worker.pools[model.pool].scheduler
            try:
                chains = scheduler.running_chains + sum(job.n for job in list(scheduler.waiting))
            except RuntimeError:  # the worker thread changed the queue while it was counted
                continue
            models[name] = {"chains": chains, "budget": scheduler.chain_budget}
        return {"models": models}


class ModelAffinityRouter(FIFOMixin, RequestRouter):
    """Prefer a replica already running the request's model while it has chain budget; else power of two.

    What a replica runs is known from two sources: the requests of each model this router sent it in the last
    AFFINITY_S seconds (immediate, for this proxy's requests), and each replica's `record_routing_stats`
    (chains running and waiting per model and the budget; Ray Serve refreshes them in the background, so
    they cover other proxies' requests and say when a replica's budget for the model is spent).
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self.last_sent: dict[tuple[ReplicaID, str], float] = {}  # (replica, model) -> when this router sent one
        self.watched: weakref.WeakSet[asyncio.Future] = weakref.WeakSet()  # requests whose replica is awaited

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        model = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # back off once every rank was tried
            if model:
                self._remember_where_it_goes(pending_request, model)
        now = time.monotonic()
        running = sorted(
            (replica for replica in candidate_replicas if model and self._runs_with_budget(replica, model, now)),
            key=lambda replica: self._chains(replica, model),
        )
        drawn = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        return [running, drawn] if running else [drawn]

    def _remember_where_it_goes(self, pending_request: PendingRequest, model: str) -> None:
        """When the request's future gets its replica, note that the replica now runs `model`."""

        def routed(future: Any) -> None:
            if not future.cancelled() and future.exception() is None:
                self.last_sent[(future.result().replica_id, model)] = time.monotonic()

        future = pending_request.future  # a retried request gets a new one
        if future not in self.watched:
            self.watched.add(future)
            future.add_done_callback(routed)

    def _chains(self, replica: RunningReplica, model: str) -> int:
        return int((replica.routing_stats or {}).get("models", {}).get(model, {}).get("chains", 0))

    def _runs_with_budget(self, replica: RunningReplica, model: str, now: float) -> bool:
        figures = (replica.routing_stats or {}).get("models", {}).get(model)
        recent = now - self.last_sent.get((replica.replica_id, model), -AFFINITY_S) < AFFINITY_S
        running = recent or (figures is not None and figures["chains"] > 0)
        return running and (figures is None or figures["chains"] < figures["budget"])


def wants_gpu(settings: Settings, cluster_gpus: float) -> bool:
    """A replica asks for one GPU unless told to use the CPU, or the cluster has none."""
    return not settings.device.startswith("cpu") and cluster_gpus > 0


def build_app(settings: Settings, num_gpus: float = 0.0) -> serve.Application:
    """The Serve application: `settings.replicas` replicas of the whole server, routed by model."""
    shared = settings.model_dump(mode="json", exclude={"buffer_shard"})
    for key in ("models_dir", "state_dir"):  # replicas may start in another working directory (or machine)
        shared[key] = str(Path(shared[key]).resolve())
    router: dict[str, Any] = {
        "request_router_class": ModelAffinityRouter,
        "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
        "request_routing_stats_timeout_s": 5.0,
    }
    deployment = cast(serve.Deployment, SampleServer).options(
        name=DEPLOYMENT,
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": 0 if num_gpus else settings.replica_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=settings.max_queue,  # each replica's own queue answers 503 past max_queue
        max_queued_requests=settings.max_queue,  # the proxy's queue: past it, Ray Serve answers 503
        graceful_shutdown_timeout_s=float(settings.graceful_shutdown_s),
        graceful_shutdown_wait_loop_s=0.5,
        request_router_config=RequestRouterConfig(**router),
    )
    return deployment.bind(shared)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For `serve run` / `serve deploy` (serve_config.yaml): `args` are Settings fields; SAMPLEBAY_* also apply.

    The config file's `deployments:` entry overrides replicas, resources and autoscaling as usual."""
    settings = Settings(**args)
    return build_app(settings, num_gpus=1.0 if settings.device.startswith("cuda") else 0.0)


def serve_forever(settings: Settings) -> None:
    """Start (or, with RAY_ADDRESS, join) a Ray cluster, serve on it until SIGTERM or Ctrl+C, then stop.

    On a signal the replicas get `graceful_shutdown_s` for requests in flight, stop their workers (which
    save their buffer shards), and a cluster this process started is stopped with them."""
    import ray

    joined = bool(os.environ.get("RAY_ADDRESS"))
    # A cluster started here has no load balancer in front of its proxy to wait 30 s for: drain in 1 s.
    os.environ.setdefault("RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S", "1")
    ray.init(include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        http = {"host": settings.host, "port": settings.port, "keep_alive_timeout_s": settings.idle_timeout_s}
        serve.start(http_options=http)
        gpus = 1.0 if wants_gpu(settings, ray.cluster_resources().get("GPU", 0.0)) else 0.0
        serve.run(build_app(settings, gpus), name=APP_NAME, route_prefix="/", blocking=False)
        where = "joined the cluster at RAY_ADDRESS" if joined else "started a local Ray cluster"
        log.info(
            "listening on http://%s:%d through Ray Serve: %d replica(s) of %s (%s; Ctrl+C to stop)",
            settings.host,
            settings.port,
            settings.replicas,
            "1 GPU each" if gpus else f"{settings.replica_cpus:g} CPU each",
            where,
        )
        stop.wait()
        log.info(
            "stopping: replicas finish their requests (up to %d s) and save their buffers", settings.graceful_shutdown_s
        )
    finally:
        if joined:
            serve.delete(APP_NAME)  # other applications on a shared cluster keep running
        else:
            serve.shutdown()
        ray.shutdown()
    log.info("stopped")
