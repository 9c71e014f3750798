"""`python -m service` or `samplebay-serve`: flags override SAMPLEBAY_* environment variables, which override
defaults.

Everything a user can get wrong before the server runs (a bad setting, a missing or empty models
directory, a state directory that cannot be made, a port in use) is checked first, before torch is
imported, and reported as one line that names the problem and its fix, with exit status 2.

Once serving, a device worker that stops past its guards (service/engine/worker.py) stops the server too, with
exit status 1, so that a supervisor (compose's restart policy) starts a fresh one.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from service.settings import Settings

PROG = "python -m service" if Path(sys.argv[0]).name == "__main__.py" else Path(sys.argv[0]).name
WORKER_STOPPED = 1  # the exit status of a server whose device worker stopped past its guards
EPILOG = """examples:
  python -m service                              serve checkpoints/ on http://127.0.0.1:8000
  samplebay-serve --models-dir runs --port 8080  the same with its console script, other folder and port
  SAMPLEBAY_API_KEY=secret python -m service --host 0.0.0.0 --state-dir /var/lib/samplebay
  python -m service --watch-interval-s 0         no polling: POST /models/reload serves what changed in checkpoints/
  python -m service --engine ray --replicas 2    two replicas on a local Ray cluster (RAY_ADDRESS: join one)
"""


class StartupError(Exception):
    """A problem the user can fix before the server starts; the message is the whole report."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """argparse prints its whole usage before the error; one line says what is wrong instead."""
        raise StartupError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field, so the settings class stays the single list of options.

    Flags are read as strings and converted by Settings, so a bad value gets the same message from a
    flag as from its environment variable.
    """
    parser = OneLineParser(
        prog=PROG,
        description="Serve samples from the checkpoints in a folder over HTTP.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, field in Settings.model_fields.items():
        default = field.default if field.default is not None else "none"
        parser.add_argument(
            _flag(name),
            metavar=name.upper(),
            help=f"{field.description} (default: {default}; env SAMPLEBAY_{name.upper()})",
        )
    return parser


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_settings(argv: list[str] | None) -> Settings:
    args = build_parser().parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if value is not None}
    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            name = str(item["loc"][0]) if item["loc"] else "?"
            where = f"{_flag(name)} (or SAMPLEBAY_{name.upper()})"
            problems.append(f"{where} {item.get('input')!r}: {item['msg'].lower()}")
        raise StartupError("bad setting " + "; ".join(problems)) from None


def check_models_dir(path: Path) -> None:
    where = "point --models-dir (or SAMPLEBAY_MODELS_DIR) at a folder of *.safetensors checkpoints or *.pt2 programs"
    if not path.exists():
        raise StartupError(f"models directory {path} does not exist: {where}")
    if not path.is_dir():
        raise StartupError(f"models directory {path} is not a directory: {where}")
    try:
        found = any(path.glob("*.safetensors")) or any(path.glob("*.pt2"))
    except OSError as error:
        raise StartupError(f"cannot read models directory {path} ({error.strerror}): {where}") from None
    if not found:
        raise StartupError(
            f"models directory {path} holds no *.safetensors checkpoint or *.pt2 program: {where}, "
            f"or train one into it (python -m training ebm --out {path}/ebm.safetensors ...)"
        )


def check_state_dir(path: Path) -> None:
    """A state directory that cannot exist is an error; one that is only read-only is a warning at start
    (BufferStore): the server then samples with buffers that do not persist."""
    where = "point --state-dir (or SAMPLEBAY_STATE_DIR) at a directory this user may create or write"
    if path.exists() and not path.is_dir():
        raise StartupError(f"state directory {path} is a file, not a directory: {where}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StartupError(f"cannot make state directory {path} ({error.strerror}): {where}") from None


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port is reported before the models load."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        problem = f"cannot resolve --host {host!r} ({error.strerror}): use an address such as 127.0.0.1"
        raise StartupError(problem) from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart beside TIME_WAIT
    try:
        listener.bind(address)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is already in use (another server?): stop it or choose another --port"
            ) from None
        problem = f"cannot listen on {host}:{port} ({error.strerror}): choose another --host or --port"
        raise StartupError(problem) from None
    return listener


def check_ray_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise StartupError("--engine ray needs Ray Serve: pip install -e '.[ray]' (or pip install 'ray[serve]')")


def main(argv: list[str] | None = None) -> None:
    try:
        settings = load_settings(argv)
        check_models_dir(settings.models_dir)
        check_state_dir(settings.state_dir)
        listener = bind(settings.host, settings.port)
        if settings.engine == "ray":
            listener.close()  # Ray Serve's proxy listens; the port was only checked
            check_ray_installed()
    except StartupError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.engine == "ray":
        from service.ray_engine import serve_forever

        serve_forever(settings)
        return

    stopped_by = serve_locally(settings, listener)
    if stopped_by is not None:
        what = f"{type(stopped_by).__name__}: {stopped_by}"
        print(
            f"{PROG}: error: the device worker stopped ({what}); exiting with status {WORKER_STOPPED} "
            "so that a supervisor starts a fresh server",
            file=sys.stderr,
        )
        raise SystemExit(WORKER_STOPPED)


def serve_locally(settings: Settings, listener: socket.socket) -> BaseException | None:
    """Serve until a signal, or until the device worker stops; then what stopped it (None after a signal)."""
    import uvicorn  # the server and torch (through the app) load only once the checks have passed

    from service.catalogue.buffer_store import remove_stale_temp_files
    from service.http.app import create_app
    from service.http.middleware import IdleTimeoutH11Protocol
    from training.runtime.device import use_threads

    log = logging.getLogger("service")
    log.info(use_threads(settings.threads))  # this process's: in-process test servers keep the test's threads
    remove_stale_temp_files([settings.models_dir, settings.state_dir])
    app = create_app(settings)
    host, port = listener.getsockname()[:2]

    class SupervisedServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            """The address is said once the models are loaded and the port takes connections, not before."""
            await super().startup(sockets)
            if not self.should_exit:
                log.info("listening on http://%s:%d (Ctrl+C to stop)", host, port)

        async def on_tick(self, counter: int) -> bool:
            """uvicorn asks every 0.1 s whether to exit: also once the worker has stopped serving anyone."""
            worker = getattr(app.state, "worker", None)
            return await super().on_tick(counter) or (worker is not None and worker.stopped_by is not None)

    config = uvicorn.Config(
        app,
        http=IdleTimeoutH11Protocol,
        timeout_keep_alive=settings.idle_timeout_s,
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        log_level="info",
    )
    SupervisedServer(config).run(sockets=[listener])
    worker = getattr(app.state, "worker", None)
    return None if worker is None else worker.stopped_by


if __name__ == "__main__":
    main()
